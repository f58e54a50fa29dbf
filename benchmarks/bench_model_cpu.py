"""Whole-model CPU timings: PLDRForCausalLM (pldr ops) vs ReferencePLDR (authors'-style PyTorch).

Random weights, the paper's 110M config by default. Contestants are interleaved in every repeat and
the median is reported, since the machine is shared. Prints one line per measurement and the ratios.

    .venv/bin/python benchmarks/bench_model_cpu.py --threads 2 --prompt 128 --new 32 --repeats 5
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from pldr_kernels import PLDRConfig, PLDRForCausalLM
from pldr_kernels.bench.timing import Clock
from pldr_kernels.reference_model import ReferencePLDR

CONFIGS = {
    "110m": PLDRConfig(),
    "tiny": PLDRConfig(vocab_size=256, hidden_size=128, intermediate_size=341,
                       num_hidden_layers=2, num_attention_heads=2, num_reslayerA=2),
}


def timed_generate(model, ids, new_tokens: int, cache: str):
    """(prefill s, median decode step s) of one greedy generate, from timestamps of the LM head
    (one call per forward step): robust to a disturbed step on a shared machine."""
    marks = []
    handle = model.final_layer.register_forward_hook(lambda *a: marks.append(time.perf_counter()))
    try:
        t0 = time.perf_counter()
        model.generate(ids, new_tokens + 1, cache=cache)
    finally:
        handle.remove()
    steps = [b - a for a, b in zip(marks, marks[1:])]
    return marks[0] - t0, statistics.median(steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="110m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=32, help="decode steps timed per repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cache", default="kvg", choices=["kv", "kvg"])
    ap.add_argument("--no-bf16", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = CONFIGS[args.config]
    model = PLDRForCausalLM(config).eval()
    ref = ReferencePLDR.from_model(model).eval()
    contestants = {"reference fp32": ref, "pldr fp32": model}
    if not args.no_bf16:
        bf16 = PLDRForCausalLM(config).eval()
        bf16.load_state_dict(model.state_dict())
        contestants["pldr bf16"] = bf16.to(torch.bfloat16)
    ids = torch.randint(4, config.vocab_size, (args.batch, args.prompt))
    print(f"config={args.config} threads={args.threads} B={args.batch} prompt={args.prompt} "
          f"new={args.new} cache={args.cache} torch={torch.__version__}")

    clock = Clock("cpu")
    results = {name: {"forward": [], "prefill": [], "decode": []} for name in contestants}
    with torch.inference_mode():
        for name, m in contestants.items():  # warm-up
            m(ids[:, :8])
            m.generate(ids[:, :8], 2, cache=args.cache)
        for _ in range(args.repeats):
            for name, m in contestants.items():
                r = results[name]
                r["forward"].append(clock.time_ms(lambda: m(ids)) / 1e3)
                t_prefill, t_step = timed_generate(m, ids, args.new, args.cache)
                r["prefill"].append(t_prefill)
                r["decode"].append(t_step)

    # On a shared machine the minimum is the least disturbed sample; the median is shown too.
    for stat_name, stat in (("median", statistics.median), ("min", min)):
        agg = {n: {k: stat(v) for k, v in r.items()} for n, r in results.items()}
        print(f"-- {stat_name} of {args.repeats} interleaved repeats")
        for name, r in agg.items():
            print(f"{name:16s} forward(full logits) {r['forward'] * 1e3:8.1f} ms   "
                  f"generate-prefill (to 1st logits) {r['prefill'] * 1e3:8.1f} ms   "
                  f"decode {r['decode'] * 1e3:7.2f} ms/token")
        base = agg["reference fp32"]
        for name, r in agg.items():
            if name != "reference fp32":
                print(f"{name:16s} speed-up vs reference: forward "
                      f"{base['forward'] / r['forward']:.2f}x  prefill "
                      f"{base['prefill'] / r['prefill']:.2f}x  decode "
                      f"{base['decode'] / r['decode']:.2f}x")


if __name__ == "__main__":
    main()
