"""CPU benchmark of pldr::g_attention / pldr::g_attention_decode against what a user would otherwise run.

Prints a table of median times and the ratios the issue asks for (run as a script, not a test):
  (a) prefill, causal:  g_attention vs torch SDPA on the pre-multiplied query (SDPA alone, and q·G + SDPA)
      and vs the eager formulation (reference.g_attention in fp32: matmul, mask, softmax, matmul);
  (b) decode, 1 new token over a long cache: g_attention_decode vs SDPA on the same cache.
Contestants are interleaved round by round in a rotating order (the machine is shared), after a
warm-up; medians of repeats (pldr_kernels.bench.timing).

    .venv/bin/python benchmarks/bench_attention_cpu.py [--threads 2] [--rounds 15] [--seq 1024] [--cache 4096]
"""
from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F

import pldr_kernels  # noqa: F401  (loads torch.ops.pldr)
from pldr_kernels import reference
from pldr_kernels.bench.inputs import random_g
from pldr_kernels.bench.timing import Clock, measure_interleaved


def time_interleaved(contestants: dict, rounds: int, inner: int, warmup: int = 3) -> dict:
    """Median seconds per call of each contestant; each round runs every contestant `inner` times."""
    measured = measure_interleaved(contestants, Clock("cpu"), warmup=warmup, repeats=rounds,
                                   inner=inner)
    return {name: m.stats["p50"] / 1e3 for name, m in measured.items()}


def bench_prefill(B, S, H, d, rounds):
    q, k, v = (torch.randn(B, S, H, d) for _ in range(3))
    G = random_g(B, H, d)
    q_tilde = torch.einsum("bshi,bhij->bshj", q, G)
    perm = lambda t: t.permute(0, 2, 1, 3)  # [B,S,H,d] -> [B,H,S,d] view, as a user would pass it

    def kernel():
        return torch.ops.pldr.g_attention(q, k, v, G, None, True, None)

    def sdpa_premultiplied():
        return F.scaled_dot_product_attention(perm(q_tilde), perm(k), perm(v), is_causal=True)

    def g_then_sdpa():
        qt = torch.einsum("bshi,bhij->bshj", q, G)
        return F.scaled_dot_product_attention(perm(qt), perm(k), perm(v), is_causal=True)

    def eager():
        return reference.g_attention(q, k, v, G, causal=True)

    # sanity: every contestant computes the same attention
    out = kernel()[0]
    torch.testing.assert_close(out, perm(sdpa_premultiplied()), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, eager()[0], rtol=1e-4, atol=1e-4)
    inner = 1 if S >= 1024 else 5
    return time_interleaved({"g_attention": kernel, "SDPA(q·G given)": sdpa_premultiplied,
                             "q·G + SDPA": g_then_sdpa, "eager (reference fp32)": eager},
                            rounds, inner)


def bench_decode(B, L, H, d, rounds):
    Smax = L + 64
    k_cache, v_cache = torch.randn(B, Smax, H, d), torch.randn(B, Smax, H, d)
    q, k_new, v_new = (torch.randn(B, 1, H, d) for _ in range(3))
    G = random_g(B, H, d)
    # The cache already holds L-1 tokens; each call appends the new token at row L-1 (idempotent).
    lens = torch.full((B,), L - 1, dtype=torch.int32)
    q_tilde = torch.einsum("bshi,bhij->bshj", q, G)
    perm = lambda t: t.permute(0, 2, 1, 3)

    def kernel():
        return torch.ops.pldr.g_attention_decode(q, k_cache, v_cache, lens, k_new, v_new, None, G,
                                                 None, 0)

    def sdpa_premultiplied():
        # the same cache (already appended), all L keys visible to the single new query
        return F.scaled_dot_product_attention(perm(q_tilde), perm(k_cache[:, :L]),
                                              perm(v_cache[:, :L]))

    def g_then_sdpa():
        qt = torch.einsum("bshi,bhij->bshj", q, G)
        return F.scaled_dot_product_attention(perm(qt), perm(k_cache[:, :L]), perm(v_cache[:, :L]))

    out = kernel()
    torch.testing.assert_close(out, perm(sdpa_premultiplied()), rtol=1e-4, atol=1e-4)
    return time_interleaved({"g_attention_decode": kernel, "SDPA(q·G given)": sdpa_premultiplied,
                             "q·G + SDPA": g_then_sdpa}, rounds, 20)


def print_table(title, times, ours):
    print(f"\n{title}")
    print(f"  {'contestant':<24}{'median ms':>12}{'ours is x faster':>18}")
    for name, t in times.items():
        ratio = "" if name == ours else f"{t / times[ours]:.2f}x"
        print(f"  {name:<24}{t * 1e3:>12.3f}{ratio:>18}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=14)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--cache", type=int, default=4096)
    ap.add_argument("--only", choices=("prefill", "decode"), default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, fp32, B={args.batch} H={args.heads} d={args.head_dim}")
    if args.only != "decode":
        t = bench_prefill(args.batch, args.seq, args.heads, args.head_dim, args.rounds)
        print_table(f"(a) prefill causal S={args.seq}", t, "g_attention")
    if args.only != "prefill":
        t = bench_decode(args.batch, args.cache, args.heads, args.head_dim, args.rounds)
        print_table(f"(b) decode: 1 new token, {args.cache}-token cache", t, "g_attention_decode")


if __name__ == "__main__":
    main()
