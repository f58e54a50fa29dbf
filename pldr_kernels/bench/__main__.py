"""`pldr-bench` / `python -m pldr_kernels.bench`: benchmark the pldr ops and whole-model generation.

  pldr-bench --quick                      both suites, sized for ~2 minutes on a 2-core CPU
  pldr-bench ops [--quick] [sweep options] [--json P] [--plot P] [--markdown [P]]
  pldr-bench generate [--quick] [--checkpoint PATH] [--cuda-graph] ...
  pldr-bench all ...                      both (the default when no subcommand is given)
"""
from __future__ import annotations

import argparse
import os
import sys
import time

SUITES = ("ops", "generate", "all")


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def parse_bool_list(text: str) -> list[bool]:
    return {"yes": [True], "true": [True], "no": [False], "false": [False],
            "both": [True, False]}[text.lower()]


def add_common(p: argparse.ArgumentParser, sub: bool) -> None:
    """Options accepted before or after the subcommand (a subparser must not reset them)."""
    def d(value):
        return argparse.SUPPRESS if sub else value

    p.add_argument("--quick", action="store_true", default=d(False),
                   help="small sweep (~2 min on a 2-core CPU; no FlexAttention compile)")
    p.add_argument("--device", default=d("cpu"), help="cpu (default) or cuda[:N]")
    p.add_argument("--threads", type=int, default=d(None),
                   help="torch intra-op threads (default: all cores)")
    p.add_argument("--repeats", type=int, default=d(None),
                   help="timed repeats per contestant (default: 5 ops / 5 generate with --quick)")
    p.add_argument("--warmup", type=int, default=d(None), help="warm-up calls per contestant (ops)")
    p.add_argument("--json", metavar="PATH", default=d(None),
                   help="write {env, results} with every sample")
    p.add_argument("--plot", metavar="PATH", default=d(None),
                   help="PNG: latency against sequence length (needs matplotlib)")
    p.add_argument("--markdown", metavar="PATH", nargs="?", const="-", default=d(None),
                   help="Markdown summary for the README (to PATH, or printed without PATH)")
    p.add_argument("--no-memory", action="store_true", default=d(False),
                   help="skip the peak-memory measurements")
    p.add_argument("--no-progress", action="store_true", default=d(False),
                   help="no progress bar on stderr")
    # ops sweep
    p.add_argument("--ops", nargs="+", default=d(None),
                   choices=("g_attention", "g_attention_decode", "metric_tensors"))
    p.add_argument("--batch", nargs="+", type=int, default=d(None), help="batch sizes B")
    p.add_argument("--seqlens", nargs="+", type=int, default=d(None),
                   help="prefill / metric-learner sequence lengths S")
    p.add_argument("--cache-lens", nargs="+", type=int, default=d(None),
                   help="decode KV-cache lengths")
    p.add_argument("--heads", type=int, default=d(None), help="heads H (default 14, the 110M model)")
    p.add_argument("--head-dims", nargs="+", type=int, default=d(None), help="head dims d (64, 128)")
    p.add_argument("--dtypes", nargs="+", default=d(None),
                   choices=("float32", "bfloat16", "float16"))
    p.add_argument("--causal", type=parse_bool_list, default=d(None),
                   help="yes / no / both (prefill)")
    p.add_argument("--memory-check-len", type=int, default=d(None),
                   help="S of the prefill memory comparison (default 4096)")
    p.add_argument("--flex", dest="flex", action="store_true", default=d(None),
                   help="include torch.compile(flex_attention) even with --quick")
    p.add_argument("--no-flex", dest="flex", action="store_false", default=d(None))
    # generate
    p.add_argument("--checkpoint", default=d(None),
                   help="model weights: an HF-format directory or an authors' .pth (default: random)")
    p.add_argument("--prompt-lens", nargs="+", type=int, default=d(None))
    p.add_argument("--new-tokens", type=int, default=d(None))
    p.add_argument("--modes", nargs="+", choices=("none", "kv", "kvg"), default=d(None))
    p.add_argument("--impls", nargs="+", choices=("reference", "pldr_kernels"), default=d(None))
    p.add_argument("--gen-dtype", choices=("float32", "bfloat16"), default=d(None),
                   help="model dtype for generate (default float32, as the published inference)")
    p.add_argument("--model-config", nargs="+", metavar="FIELD=VALUE", default=d(None),
                   help="override PLDRConfig fields of the random-weight model "
                        "(e.g. num_hidden_layers=7 num_attention_heads=12 hidden_size=768)")
    p.add_argument("--cuda-graph", action="store_true", default=d(False),
                   help="replay pldr_kernels' decode step from a CUDA graph (CUDA, kv/kvg)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pldr-bench", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Times are medians over interleaved repeats (p20-p80 spread); every contestant's "
               "output is checked against the fp64 reference before it is timed.")
    add_common(parser, sub=False)
    subs = parser.add_subparsers(dest="suite", metavar="{ops,generate,all}")
    for name, text in (("ops", "each op vs the reference, eager, SDPA backends, FlexAttention"),
                       ("generate", "end-to-end generation, reference vs pldr_kernels, cache "
                                    "modes none/kv/kvg"),
                       ("all", "both suites")):
        add_common(subs.add_parser(name, help=text, description=text), sub=True)
    return parser


def ops_config(args):
    from . import ops_suite
    cfg = ops_suite.quick_config() if args.quick else ops_suite.full_config()
    for attr, field in (("ops", "ops"), ("batch", "batches"), ("seqlens", "prefill_seqlens"),
                        ("cache_lens", "decode_seqlens"), ("heads", "heads"),
                        ("head_dims", "head_dims"), ("dtypes", "dtypes"), ("causal", "causal"),
                        ("repeats", "repeats"), ("warmup", "warmup"),
                        ("memory_check_len", "memory_check_len")):
        value = getattr(args, attr)
        if value is not None:
            setattr(cfg, field, value)
    if args.seqlens is not None:
        cfg.metric_seqlens = args.seqlens
    if args.flex is not None:
        cfg.with_flex = args.flex
        if not args.flex:
            cfg.flex_skip_reason = "--no-flex"
    cfg.memory = not args.no_memory
    return cfg


def generate_config(args, device):
    from . import generate_suite
    cfg = generate_suite.quick_config() if args.quick else generate_suite.full_config()
    for attr, field in (("prompt_lens", "prompt_lens"), ("new_tokens", "new_tokens"),
                        ("modes", "modes"), ("impls", "impls"), ("repeats", "repeats"),
                        ("checkpoint", "checkpoint"), ("gen_dtype", "dtype"),
                        ("batch", "batch")):
        value = getattr(args, attr)
        if value is not None:
            setattr(cfg, field, value[0] if attr == "batch" else value)
    if args.model_config:
        cfg.model_overrides = parse_overrides(args.model_config)
    cfg.cuda_graph = bool(args.cuda_graph)
    cfg.memory = not args.no_memory
    return cfg


def parse_overrides(items: list[str]) -> dict:
    """``["num_hidden_layers=1", "custom_G_type=None"]`` → typed dict (ints, floats, bools, None)."""
    import ast
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"pldr-bench: --model-config expects FIELD=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    suite = args.suite or "all"

    import torch

    from . import report
    from .env import collect_env

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("pldr-bench: --device cuda but no CUDA device is visible "
              f"(torch {torch.__version__}, CUDA {torch.version.cuda or 'none'})", file=sys.stderr)
        return 2
    if args.cuda_graph and device.type != "cuda":
        print("pldr-bench: --cuda-graph needs --device cuda", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads or usable_cores())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    started = time.perf_counter()
    from .env import busy_machine_warning
    warnings = [w for w in [busy_machine_warning(torch.get_num_threads())] if w]
    for w in warnings:
        print(f"pldr-bench: WARNING: {w}", file=sys.stderr)
    results, skipped = [], []
    if suite in ("ops", "all"):
        from .ops_suite import run_ops
        r, s = run_ops(ops_config(args), device, not args.no_progress)
        results += r
        skipped += s
    if suite in ("generate", "all"):
        from .generate_suite import run_generate
        r, s = run_generate(generate_config(args, device), device, not args.no_progress)
        results += r
        skipped += s
    env = collect_env(device, argv=[sys.argv[0]] + list(sys.argv[1:] if argv is None else argv))
    env["suite"] = suite
    env["quick"] = bool(args.quick)
    env["wall_s"] = round(time.perf_counter() - started, 1)
    env["skipped"] = skipped
    late = busy_machine_warning(torch.get_num_threads())
    if late and not warnings:
        warnings.append(late)
    env["warnings"] = warnings
    print(report.terminal_report(env, results))
    print(f"\nwall time {env['wall_s']:.1f} s")
    for w in warnings:
        print(f"WARNING: {w}")
    if any(not r.get("valid", True) for r in results):
        print("\nWARNING: some rows are INVALID (contestants disagreed); see the messages above.")
    if args.json:
        report.write_json(args.json, env, results)
        print(f"wrote {args.json}")
    if args.markdown:
        md = report.markdown_report(env, results)
        if args.markdown == "-":
            print("\n" + md)
        else:
            with open(args.markdown, "w") as f:
                f.write(md)
            print(f"wrote {args.markdown}")
    if args.plot and report.write_plot(args.plot, env, results):
        print(f"wrote {args.plot}")
    return 1 if any(not r.get("valid", True) for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
