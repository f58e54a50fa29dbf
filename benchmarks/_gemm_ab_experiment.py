import torch, time, statistics, sys, os
import pldr_kernels
torch.set_num_threads(int(sys.argv[1]))
B,S,H,d=1,1024,14,int(sys.argv[2]) if len(sys.argv)>2 else 64
q,k,v=(torch.randn(B,S,H,d) for _ in range(3))
G=(torch.eye(d)+0.03*torch.randn(B,H,d,d))
def run(own):
    if own: os.environ["PLDR_OWN_GEMM"]="1"
    else: os.environ.pop("PLDR_OWN_GEMM", None)
    t=time.perf_counter(); torch.ops.pldr.g_attention(q,k,v,G,None,True,None); return time.perf_counter()-t
for _ in range(3): run(0); run(1)
ts={0:[],1:[]}
for r in range(21):
    for own in (0,1): ts[own].append(run(own))
for own in ts: print("own" if own else "brgemm", "%.2f ms"%(statistics.median(ts[own])*1e3))
print("brgemm/own time ratio %.3f"%(statistics.median(ts[0])/statistics.median(ts[1])))
