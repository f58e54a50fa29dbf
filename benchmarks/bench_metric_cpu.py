"""Fused CPU metric learner (pldr::metric_tensors) vs the eager PyTorch reference.

The reference in fp32 is the eager formulation a user would otherwise run (one F.linear per
SwiGLU projection). Both are timed interleaved in one process, after a warm-up, and the medians
are compared. Not a test: run it directly, e.g.

    .venv/bin/python benchmarks/bench_metric_cpu.py                 # B=1 S=1024 H=14 d=64, 2 threads
    .venv/bin/python benchmarks/bench_metric_cpu.py --rounds 5 --iters 30
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from testing import make_metric_weights, metric_args  # noqa: E402

import pldr_kernels  # noqa: E402,F401  (loads torch.ops.pldr)
from pldr_kernels import reference  # noqa: E402


def time_once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--head-dim", type=int, default=64, choices=(64, 128))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20, help="timed calls per op per round")
    p.add_argument("--rounds", type=int, default=3, help="repeat the interleaved measurement")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, S, H, d = args.batch, args.seq, args.heads, args.head_dim
    weights = make_metric_weights(d=d, H=H)
    q = torch.randn(B, S, H, d)
    wargs = metric_args(weights)

    def kernel():
        return torch.ops.pldr.metric_tensors(q, None, *wargs)

    def eager():
        return reference.metric_tensors(q, None, *wargs)

    # Sanity: both compute the same thing (A to fp32 accuracy).
    A_k, A_r = kernel()[0], eager()[0]
    rel = (A_k - A_r).abs().max().item() / A_r.abs().max().item()
    R, Gd, F = weights["w1"].shape[:3]
    flops = 2 * B * H * (S * d * d + d * R * Gd * 3 * d * F + 2 * d ** 3)
    print(f"pldr::metric_tensors vs eager reference | B={B} S={S} H={H} d={d} fp32 "
          f"threads={torch.get_num_threads()} | torch {torch.__version__} | "
          f"cpu {torch.backends.cpu.get_cpu_capability()} | {os.cpu_count()} cores visible")
    print(f"sanity: max|A_kernel - A_eager| / max|A| = {rel:.2e}; work {flops / 1e9:.3f} GFLOP")
    for _ in range(args.warmup):
        kernel()
        eager()
    ratios = []
    for rnd in range(args.rounds):
        tk, te = [], []
        for _ in range(args.iters):  # interleaved so both see the same machine load
            tk.append(time_once(kernel))
            te.append(time_once(eager))
        mk, me = statistics.median(tk), statistics.median(te)
        ratios.append(me / mk)
        print(f"round {rnd}: kernel median {mk * 1e3:7.2f} ms (min {min(tk) * 1e3:6.2f}, "
              f"{flops / mk / 1e9:6.1f} GFLOP/s) | eager median {me * 1e3:7.2f} ms "
              f"(min {min(te) * 1e3:6.2f}) | speedup {me / mk:5.2f}x")
    print(f"speedup (eager / kernel, median of per-round medians): {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
