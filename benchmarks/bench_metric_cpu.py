"""Fused CPU metric learner (pldr::metric_tensors) vs the eager PyTorch reference.

The reference in fp32 is the eager formulation a user would otherwise run (one F.linear per
SwiGLU projection). Both are timed interleaved in one process, after a warm-up, and the medians
are compared. The machine may be shared: besides wall time, the process CPU time per call (all
threads) is reported, which time slices lost to other processes do not inflate. Not a test: run
it directly, e.g.

    .venv/bin/python benchmarks/bench_metric_cpu.py                 # B=1 S=1024 H=14 d=64, 2 threads
    .venv/bin/python benchmarks/bench_metric_cpu.py --rounds 5 --iters 30
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import pldr_kernels  # noqa: F401  (loads torch.ops.pldr)
from pldr_kernels import reference
from pldr_kernels.bench.inputs import make_metric_weights, metric_args


def time_once(fn):
    """(wall seconds, CPU seconds of this process) for one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


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
    ratios, cpu_ratios = [], []
    for rnd in range(args.rounds):
        tk, te = [], []
        for _ in range(args.iters):  # interleaved so both see the same machine load
            tk.append(time_once(kernel))
            te.append(time_once(eager))
        mk, me = (statistics.median(t[0] for t in ts) for ts in (tk, te))
        ck, ce = (statistics.median(t[1] for t in ts) for ts in (tk, te))
        ratios.append(me / mk)
        cpu_ratios.append(ce / ck)
        min_k, min_e = (min(t[0] for t in ts) for ts in (tk, te))
        print(f"round {rnd}: wall median kernel {mk * 1e3:7.2f} ms (min {min_k * 1e3:6.2f}, "
              f"{flops / mk / 1e9:5.1f} GFLOP/s) eager {me * 1e3:7.2f} ms "
              f"(min {min_e * 1e3:6.2f}) -> {me / mk:5.2f}x | CPU-time median kernel "
              f"{ck * 1e3:6.2f} ms eager {ce * 1e3:6.2f} ms -> {ce / ck:5.2f}x")
    print(f"speedup eager/kernel, median over rounds: wall {statistics.median(ratios):.2f}x, "
          f"CPU time {statistics.median(cpu_ratios):.2f}x")


if __name__ == "__main__":
    main()
