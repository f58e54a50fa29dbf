"""The run-time ISA choice of the CPU kernels (docs/design.md §3.6, csrc/cpu/isa.h): every path this
CPU runs — forced with PLDR_KERNELS_ISA in a fresh process, since the choice is made once per
process — gives results within the rules of docs/design.md §4, and says which path it took."""
import json
import os
import subprocess
import sys

import pytest

from pldr_kernels import ops
from pldr_kernels.__main__ import cpu_kernels_isa

pytestmark = pytest.mark.skipif(ops._LOAD_ERROR is not None, reason="pldr_kernels._C not built")

ISAS = ("avx512", "avx2", "portable")

# Each op once, small shapes that still cross a tile (64 queries / keys) and the causal diagonal;
# the attention ops in fp32 and bf16, the metric learner, the backward ops and the cross entropy
# rows in fp32; the decode linears on 12 shapes x dtypes each.
# Prints {"isa": ..., "verdicts": {case: [ok, text]}}.
CHECKS = r"""
import json, torch
from pldr_kernels import ops, testing
torch.manual_seed(0)
gen = torch.Generator().manual_seed(0)
verdicts = {}
def record(name, verdict):
    verdicts[name] = [bool(verdict.ok), str(verdict)]
for dtype in (torch.float32, torch.bfloat16):
    B, S, H, d = 2, 80, 2, 64
    q, k, v = testing.random_attention_inputs(B, S, S, H, d, dtype, "cpu", gen)
    G = testing.random_g(B, H, d, "cpu", gen)
    key_mask = torch.ones(B, S, dtype=torch.bool)
    key_mask[1, 70:] = False
    out, lse = ops.g_attention(q, k, v, G, key_mask, True)
    record(f"g_attention {dtype}", testing.check_g_attention(out, lse, q, k, v, G, key_mask, True))
    L = 100
    seqlens = torch.tensor([L, 37], dtype=torch.int32)
    k_cache, v_cache = (testing.randn((B, L, H, d), dtype, "cpu", gen) for _ in range(2))
    q1 = testing.randn((B, 1, H, d), dtype, "cpu", gen)
    out = ops.g_attention_decode(q1, k_cache, v_cache, seqlens, G=G)
    record(f"g_attention_decode {dtype}",
           testing.check_g_attention_decode(out, q1, k_cache, v_cache, seqlens, G=G))
q, k, v = testing.random_attention_inputs(1, 70, 70, 2, 64, torch.float32, "cpu", gen)
G = testing.random_g(1, 2, 64, "cpu", gen)
dout = torch.randn(1, 70, 2, 64, generator=gen)
leaves = [t.clone().requires_grad_() for t in (q, k, v, G)]
ops.g_attention(*leaves, None, True)[0].backward(dout)
record("g_attention backward", testing.check_g_attention_grads(
    [t.grad for t in leaves], dout, q, k, v, G, causal=True))
weights = testing.make_metric_weights(64, 2, generator=gen)
qm = testing.randn((1, 20, 2, 64), torch.float32, "cpu", gen)
out = ops.metric_tensors(qm, None, *testing.metric_args(weights))
record("metric_tensors", testing.check_metric_tensors(out, qm, None, weights))
A = out[0]
grad_outputs = (torch.randn(A.shape, generator=gen), None, None)  # through A: judged case by case
grads = ops.metric_tensors_backward(*grad_outputs, qm, None, *testing.metric_args(weights))
record("metric_tensors backward",
       testing.check_metric_tensors_grads(grads, grad_outputs, qm, None, weights))
logits = torch.randn(37, 1000, generator=gen) * 4
targets = torch.randint(0, 1000, (37,), generator=gen)
targets[::4] = -100
lse, nll = ops.cross_entropy_forward(logits, targets)
record("cross_entropy_forward", testing.check_cross_entropy(lse, nll, logits, targets))
grad_nll = torch.rand(37, generator=gen)
g = ops.cross_entropy_backward(logits, lse, targets, grad_nll, 13, 990)
record("cross_entropy_backward",
       testing.check_cross_entropy_grad(g, logits, targets, grad_nll, 13, 990))
x = torch.randn(133, 70, generator=gen)
record("transpose_2d", testing.Verdict("transpose_2d", torch.equal(ops.transpose_2d(x), x.t()),
                                       0.0, 0.0, "bit for bit"))
# linear_small / swiglu_small: every weight dtype, rows 1, 3, 8, 11 (two passes over the weights),
# K and N no multiple of a vector, bias or none, x in fp32 and bf16 (tests/test_linear_small.py
# runs the full matrix on the selected path).
for i, (M, K, N) in enumerate([(1, 37, 19), (3, 131, 45), (8, 70, 9), (11, 33, 17)]):
    for j, kind in enumerate(("float32", "bfloat16", "int8")):
        x_dtype, with_bias = (torch.float32, torch.bfloat16)[(i + j) % 2], j != i % 3
        x = torch.randn(M, K, generator=gen).to(x_dtype)
        for swiglu in (False, True):
            w, scale, w64 = testing.random_linear_small_weight(2 * N if swiglu else N, K, kind, gen)
            bias = torch.randn(w.shape[0], generator=gen) if with_bias else None
            out = (ops.swiglu_small if swiglu else ops.linear_small)(x, w, bias, scale)
            name = f"{'swiglu' if swiglu else 'linear'}_small {M}x{K}x{N} {kind} {x_dtype}"
            record(name + (" bias" if with_bias else ""),
                   testing.check_linear_small(out, x, w64, bias, swiglu=swiglu))
from pldr_kernels.__main__ import cpu_kernels_isa
print(json.dumps({"isa": cpu_kernels_isa(), "verdicts": verdicts}))
"""


def run_with_isa(isa: str | None, script: str) -> subprocess.CompletedProcess:
    env = {k: val for k, val in os.environ.items() if k != "PLDR_KERNELS_ISA"}
    if isa is not None:
        env["PLDR_KERNELS_ISA"] = isa
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=300)


def best_isa() -> str:
    return cpu_kernels_isa().split("(best ")[1].rstrip(")")


def runnable_isas() -> list[str]:
    return list(ISAS[ISAS.index(best_isa()):])


@pytest.mark.parametrize("isa", ISAS)
def test_each_isa_path_meets_the_rules(isa):
    if isa not in runnable_isas():
        pytest.skip(f"this CPU / build runs at most {best_isa()}")
    proc = run_with_isa(isa, CHECKS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["isa"] == f"{isa} (best {best_isa()})"
    failed = {name: text for name, (ok, text) in result["verdicts"].items() if not ok}
    assert not failed, failed
    assert len(result["verdicts"]) == 10 + 2 * 12


def test_the_default_is_the_best_this_cpu_runs_and_the_build_report_names_it():
    env = {k: val for k, val in os.environ.items() if k != "PLDR_KERNELS_ISA"}
    proc = subprocess.run([sys.executable, "-m", "pldr_kernels"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("cpu isa"))
    assert line.split()[2:5] == [best_isa(), "(best", f"{best_isa()})"], line
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    if ops.build_info().get("cpu_flags", "").startswith("runtime ISA") and "avx2" in flags:
        assert best_isa() in ("avx2", "avx512")  # the copies were built and are found


def test_an_unknown_or_unsupported_isa_is_refused_by_name():
    """By every CPU op with the same words: the attention ops and linear_small alike."""
    script = """
import torch
from pldr_kernels import ops
for call in (lambda: ops.g_attention(*(torch.randn(1, 4, 1, 64) for _ in range(3))),
             lambda: ops.linear_small(torch.randn(1, 8), torch.randn(4, 8))):
    try:
        call()
        print("ran")
    except RuntimeError as e:
        print(str(e).splitlines()[0])
"""
    proc = run_with_isa("sse9", script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2, lines
    words = "PLDR_KERNELS_ISA=sse9: expected avx512, avx2 or portable"
    assert all(words in x for x in lines), lines
    if best_isa() != "avx512":
        proc = run_with_isa("avx512", script)
        lines = proc.stdout.strip().splitlines()
        assert proc.returncode == 0 and len(lines) == 2, proc.stderr[-3000:]
        assert all("PLDR_KERNELS_ISA=avx512: this CPU and build support at most "
                   f"{best_isa()}" in x for x in lines), lines
