"""CUDA decode and metric-learner benchmark (for an H200 run; meaningless on a CPU).

    python benchmarks/bench_decode_metric_cuda.py OUT.json [--reps 50] [--quick]
    python benchmarks/bench_decode_metric_cuda.py --json OUT.json      (as tools/gpu_check.sh calls it)

g_attention_decode: one step (Sn = 1, append of k_new/v_new, per-layer G) over a full cache,
against what a user would otherwise run on the same cache: the append (two index copies), the
q·G GEMM and torch SDPA on the [B,H,S,d] views, with the backend chosen by torch. Reported: time,
achieved GB/s (K/V bytes read + the rest), that as a fraction of the device-copy bandwidth measured
in the same run, and the ratio to the SDPA path. Shapes: B=1 cache 1024 H=14 d=64 (the published
models), and caches whose K+V exceed 256 MB (bandwidth regime).

metric_tensors: the fused kernels against the eager PyTorch metric learner
(reference.metric_tensors in fp32 on CUDA) at B=1, S=1024, H=14, d=64, bf16 and fp32 queries.

Timing: CUDA events around each call, candidates interleaved call by call (in a rotating order)
so clock and thermal drift hit them alike; median and p20/p80 over the repetitions
(pldr_kernels.bench.timing).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

import pldr_kernels  # noqa: F401  (torch.ops.pldr)
from pldr_kernels import reference
from pldr_kernels.bench.inputs import make_metric_weights, metric_args
from pldr_kernels.bench.timing import Clock, median_bands_ms

H, D = 14, 64


def time_interleaved(calls: dict, reps: int, warmup: int = 5) -> dict:
    """Per-call CUDA-event times (inner=1: every sample is one call, as in earlier runs),
    interleaved in a rotating order; median and p20/p80 per call, in ms."""
    return median_bands_ms(calls, Clock("cuda"), reps, warmup=warmup, inner=1)


def copy_bandwidth(reps: int, nbytes: int = 1 << 30) -> dict:
    """Device-to-device copy of 1 GiB: bytes read + bytes written per second."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = time_interleaved({"copy": lambda: dst.copy_(src)}, reps)["copy"]
    del src, dst
    torch.cuda.empty_cache()
    return {"bytes": nbytes, **t, "gb_per_s": 2 * nbytes / (t["median_ms"] * 1e-3) / 1e9}


def bench_decode(B, Smax, dtype, reps, copy_gbs):
    gen = torch.Generator(device="cuda").manual_seed(0)
    k_cache = torch.randn(B, Smax, H, D, device="cuda", dtype=dtype, generator=gen)
    v_cache = torch.randn_like(k_cache)
    q, k_new, v_new = (torch.randn(B, 1, H, D, device="cuda", dtype=dtype, generator=gen)
                       for _ in range(3))
    G = torch.eye(D, device="cuda") + 0.3 * torch.randn(B, H, D, D, device="cuda",
                                                        generator=gen) / math.sqrt(D)
    L = Smax - 1  # the step fills the last row: every call reads the whole cache
    lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    pos = torch.full((1,), L, dtype=torch.long, device="cuda")
    kt, vt = k_cache.transpose(1, 2), v_cache.transpose(1, 2)  # [B,H,S,d] views

    def ours():
        return torch.ops.pldr.g_attention_decode(q, k_cache, v_cache, lens, k_new, v_new, None, G,
                                                 None, 0)

    def sdpa():
        k_cache.index_copy_(1, pos, k_new)
        v_cache.index_copy_(1, pos, v_new)
        qt = torch.matmul(q.transpose(1, 2), G.to(dtype))  # [B,H,1,d]
        return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)

    times = time_interleaved({"pldr_decode": ours, "append+gemm+sdpa": sdpa}, reps)
    kv_bytes = 2 * B * Smax * H * D * k_cache.element_size()
    other = (3 * B * H * D * k_cache.element_size() * 2  # q, k_new, v_new, out (+ cache rows written)
             + B * H * D * D * 4)                          # G
    for t in times.values():
        t["gb_per_s"] = (kv_bytes + other) / (t["median_ms"] * 1e-3) / 1e9
        t["fraction_of_copy_bw"] = t["gb_per_s"] / copy_gbs
    out = ours().float()
    ref = sdpa().float()
    row = {"op": "g_attention_decode", "B": B, "Smax": Smax, "H": H, "d": D, "dtype": str(dtype),
           "kv_megabytes": kv_bytes / 1e6, "times": times,
           "pldr_over_sdpa": times["pldr_decode"]["median_ms"] / times["append+gemm+sdpa"]["median_ms"],
           "max_abs_diff_vs_sdpa": (out - ref).abs().max().item()}
    del k_cache, v_cache, kt, vt
    torch.cuda.empty_cache()
    return row


def bench_metric(B, S, dtype, reps):
    w = make_metric_weights(d=D, H=H, device="cuda")
    args = metric_args(w)
    q = torch.randn(B, S, H, D, device="cuda").to(dtype)
    times = time_interleaved({
        "pldr_metric_tensors": lambda: torch.ops.pldr.metric_tensors(q, None, *args),
        "eager_reference_fp32": lambda: reference.metric_tensors(q, None, *args),
    }, reps)
    ours = torch.ops.pldr.metric_tensors(q, None, *args)
    ref = reference.metric_tensors(q, None, *args)
    return {"op": "metric_tensors", "B": B, "S": S, "H": H, "d": D, "dtype": str(dtype),
            "times": times,
            "speedup_vs_eager": times["eager_reference_fp32"]["median_ms"]
            / times["pldr_metric_tensors"]["median_ms"],
            "A_max_abs_diff_vs_eager": (ours[0] - ref[0]).abs().max().item()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", help="JSON file to write")
    ap.add_argument("--json", dest="json_out", help="JSON file to write (same as OUT)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    args = ap.parse_args(argv)
    args.out = args.json_out or args.out
    if not args.out:
        ap.error("give the JSON output path (OUT or --json OUT)")
    if not torch.cuda.is_available():
        sys.exit("bench_decode_metric_cuda.py needs a CUDA device")
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cuda": torch.version.cuda, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "reps": args.reps, "copy": copy_bandwidth(args.reps), "results": []}
    copy_gbs = report["copy"]["gb_per_s"]
    print(f"device copy: {copy_gbs:.0f} GB/s", flush=True)
    decode_shapes = [(1, 1024), (1, 131072), (8, 16384)]  # K+V: 3.7 MB, 470 MB, 470 MB (bf16)
    if not args.quick:
        decode_shapes += [(1, 8192), (4, 4096), (32, 1024)]
    jobs = [("decode", B, S, torch.bfloat16) for B, S in decode_shapes]
    jobs += [("metric", 1, 1024, torch.bfloat16), ("metric", 1, 1024, torch.float32)]
    for kind, B, S, dtype in jobs:
        if kind == "decode":
            row = bench_decode(B, S, dtype, args.reps, copy_gbs)
            t = row["times"]["pldr_decode"]
            print(f"decode B={B} Smax={S}: {t['median_ms'] * 1e3:.1f} us, {t['gb_per_s']:.0f} GB/s"
                  f" ({t['fraction_of_copy_bw']:.2f} of copy), vs SDPA path"
                  f" {row['pldr_over_sdpa']:.2f}x time", flush=True)
        else:
            row = bench_metric(B, S, dtype, args.reps)
            t = row["times"]["pldr_metric_tensors"]
            print(f"metric_tensors B={B} S={S} {dtype}: {t['median_ms'] * 1e3:.1f} us,"
                  f" {row['speedup_vs_eager']:.1f}x faster than eager", flush=True)
        report["results"].append(row)
        with open(args.out, "w") as f:  # rewrite after each row: partial runs still leave data
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
