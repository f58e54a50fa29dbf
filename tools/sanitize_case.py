"""Small CUDA case for compute-sanitizer (memcheck, racecheck): each op once on awkward shapes,
compared with the CPU kernels so a sanitizer run also catches wrong results."""
import torch

import pldr_kernels  # noqa: F401
from pldr_kernels import ops
from pldr_kernels.testing import make_metric_weights, metric_args


def close(a, b, tol):
    err = (a.float().cpu() - b.float().cpu()).abs().max().item()
    scale = b.float().abs().max().item() + 1e-6
    if not err <= tol * scale:
        raise SystemExit(f"mismatch: max abs err {err:.3e} vs scale {scale:.3e}")


def main():
    torch.manual_seed(0)
    dev = "cuda"
    B, S, H, d = 2, 37, 3, 64
    for dtype in (torch.bfloat16, torch.float32):
        q, k, v = (torch.randn(B, S, H, d, dtype=dtype) for _ in range(3))
        G = (torch.eye(d) + 0.05 * torch.randn(B, H, d, d)).float()
        key_mask = torch.ones(B, S, dtype=torch.bool)
        key_mask[1, :5] = False
        cpu = ops.g_attention(q, k, v, G, key_mask, True)
        gpu = ops.g_attention(q.to(dev), k.to(dev), v.to(dev), G.to(dev), key_mask.to(dev), True)
        close(gpu[0], cpu[0], 2e-2)

        Smax = 50
        kc, vc = torch.zeros(B, Smax, H, d, dtype=dtype), torch.zeros(B, Smax, H, d, dtype=dtype)
        kc[:, :S], vc[:, :S] = k, v
        lens = torch.full((B,), S, dtype=torch.int32)
        qn, kn, vn = (torch.randn(B, 2, H, d, dtype=dtype) for _ in range(3))
        kcg, vcg = kc.to(dev), vc.to(dev)
        out_gpu = ops.g_attention_decode(qn.to(dev), kcg, vcg, lens.to(dev), kn.to(dev), vn.to(dev),
                                         G=G.to(dev))
        out_cpu = ops.g_attention_decode(qn, kc, vc, lens, kn, vn, G=G)
        close(out_gpu, out_cpu, 2e-2)
        close(kcg, kc, 0)

    w = make_metric_weights(d=64, H=H)
    q = torch.randn(B, S, H, d)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[0, :3] = False
    cpu = ops.metric_tensors(q, mask, *metric_args(w))
    gpu = ops.metric_tensors(q.to(dev), mask.to(dev), *[t.to(dev) for t in metric_args(w)])
    for c, g in zip(cpu, gpu):
        close(g, c, 1e-3)
    torch.cuda.synchronize()
    print("sanitize_case: all ops ran and matched the CPU kernels")


if __name__ == "__main__":
    main()
