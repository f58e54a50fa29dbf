"""Profile one CPU decode step of the 110M PLDR-LLM op by op: where the time goes, and how much of
it is Python / dispatch overhead rather than op work (issue 12).

    PYTHONPATH=. python tools/profile_decode.py [--dtype bfloat16] [--int8] [--steps 40]
                                                [--threads 2] [--layer-loop] [--json out.json]

The model is PLDRForCausalLM with PLDRConfig's defaults (the paper's 110M config), random weights
(seed 0), eval mode; B=1, a 128-token prompt, cache mode 'kvg'. The step timed is exactly the one
``generate`` runs per token (``generation._eager_decode``: check_room, ``model.decode_step``,
``state.advance``), under ``torch.inference_mode`` as there. On the CPU that step runs one fused
``pldr::decode_layer`` call per layer; ``--layer-loop`` profiles the Python layer loop instead
(``PLDRForCausalLM.fused_decode = False``; the same bits, more calls).

Printed: the median step wall time without the profiler; with it, the median step time, the self
CPU time of all aten/pldr ops per step, and the remainder (the time inside the step that no op
accounts for: Python, argument parsing, module calls, dispatch to the first op), then the ops one
by one. The profiler inflates each op a little (its own bookkeeping), so the un-profiled step time
minus the profiled op time is a lower bound of the overhead, the profiled remainder an upper one.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import pldr_kernels
from pldr_kernels import generation
from pldr_kernels.bench.measure import cpu_model
from pldr_kernels.config import PLDRConfig
from pldr_kernels.model import PLDRForCausalLM

STEP_LABEL = "decode_step(profiled)"
PROMPT_LENGTH = 128


def build_model(dtype: torch.dtype, int8: bool) -> PLDRForCausalLM:
    torch.manual_seed(0)
    model = PLDRForCausalLM(PLDRConfig()).eval()
    if dtype != torch.float32:
        model = model.to(dtype)
    if int8:
        model.quantize_weights("int8")
    return model


def decode_setup(model: PLDRForCausalLM, n_steps: int):
    """Caches for the prompt and ``n_steps`` tokens, the prefill, and the generate loop's step."""
    prompt = torch.randint(4, model.config.vocab_size, (1, PROMPT_LENGTH),
                           generator=torch.Generator().manual_seed(0))
    max_length = PROMPT_LENGTH + n_steps
    with torch.inference_mode():
        model.setup_caches(1, max_length)
        logits = model.prefill(prompt)
        state = generation.DecodeState.after_prompt(None, 1, PROMPT_LENGTH, max_length,
                                                    prompt.device)
    step = generation._eager_decode(model, state, recompute_G=False)
    return step, logits.argmax(-1)[:, None]


def timed_steps(step, tokens: torch.Tensor, n: int) -> list[float]:
    times = []
    with torch.inference_mode():
        for _ in range(n):
            t0 = time.perf_counter()
            step(tokens)
            times.append(time.perf_counter() - t0)
    return times


def profiled_steps(step, tokens: torch.Tensor, n: int):
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU],
                                         record_shapes=False) as prof:
        for _ in range(n):
            with record_function(STEP_LABEL):
                step(tokens)
    return prof


def summarise(prof, n: int, unprofiled_s: list[float]) -> dict:
    events = prof.events()
    step_us = sorted(e.cpu_time_total for e in events if e.name == STEP_LABEL)
    ops = {}
    for e in prof.key_averages():
        if e.key == STEP_LABEL:
            continue
        ops[e.key] = (e.count / n, e.self_cpu_time_total / n)
    step_median_us = statistics.median(step_us)
    op_us = sum(t for _, t in ops.values())
    step_mean_us = sum(step_us) / n
    unprofiled_us = statistics.median(unprofiled_s) * 1e6
    return {
        "unprofiled_step_median_us": unprofiled_us,
        "profiled_step_median_us": step_median_us,
        "profiled_step_mean_us": step_mean_us,
        "op_self_us_per_step": op_us,
        "overhead_profiled_us": step_mean_us - op_us,
        "overhead_lower_bound_us": unprofiled_us - op_us,
        "op_calls_per_step": sum(c for c, _ in ops.values()),
        "ops": {k: {"calls": c, "self_us": t}
                for k, (c, t) in sorted(ops.items(), key=lambda kv: -kv[1][1])},
    }


def print_report(r: dict, title: str) -> None:
    step = r["profiled_step_mean_us"]
    print(f"\n== {title}")
    print(f"step, no profiler (median)      {r['unprofiled_step_median_us']:9.1f} us")
    print(f"step, profiled (median / mean)  {r['profiled_step_median_us']:9.1f} / {step:.1f} us")
    print(f"  self time of the ops          {r['op_self_us_per_step']:9.1f} us "
          f"({r['op_calls_per_step']:.0f} op calls)")
    print(f"  remainder = overhead          {r['overhead_profiled_us']:9.1f} us "
          f"({100 * r['overhead_profiled_us'] / step:.1f}% of the profiled step)")
    print(f"  un-profiled step - op time    {r['overhead_lower_bound_us']:9.1f} us "
          f"({100 * r['overhead_lower_bound_us'] / r['unprofiled_step_median_us']:.1f}% of the "
          f"un-profiled step)")
    print(f"\n{'op':<36}{'calls/step':>11}{'self us/step':>14}{'% step':>8}")
    for name, o in r["ops"].items():
        print(f"{name[:35]:<36}{o['calls']:>11.1f}{o['self_us']:>14.1f}"
              f"{100 * o['self_us'] / step:>8.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--int8", action="store_true", help="model.quantize_weights('int8')")
    p.add_argument("--steps", type=int, default=40, help="decode steps profiled (and timed)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layer-loop", action="store_true",
                   help="run the Python layer loop, not one pldr::decode_layer call per layer")
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    PLDRForCausalLM.fused_decode = not args.layer_loop
    dtype = getattr(torch, args.dtype)
    model = build_model(dtype, args.int8)
    step, tokens = decode_setup(model, args.warmup + 2 * args.steps)
    timed_steps(step, tokens, args.warmup)
    unprofiled = timed_steps(step, tokens, args.steps)
    report = summarise(profiled_steps(step, tokens, args.steps), args.steps, unprofiled)
    title = (f"110M PLDR-LLM decode step, {args.dtype}{' int8 weights' if args.int8 else ''}, "
             f"B=1, prompt {PROMPT_LENGTH}, kvg, {args.threads} threads, "
             f"{'Python layer loop' if args.layer_loop else 'fused decode_layer'}; {cpu_model()}")
    print_report(report, title)
    print(f"\npldr_kernels from {pldr_kernels.__file__}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "cpu": cpu_model(),
                       "pldr_kernels": pldr_kernels.__file__, **report}, f,
                      indent=1)


if __name__ == "__main__":
    main()
