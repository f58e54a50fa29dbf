"""`pldr-bench` (`python -m pldr_kernels.bench`): time the pldr ops and whole-model generation.

  pldr-bench --quick                   every suite, small (what `make bench` runs)
  pldr-bench ops [sweep options]       each op vs the reference, eager, SDPA backends, FlexAttention
  pldr-bench generate [options]        generation, reference vs pldr_kernels, cache none/kv/kvg
  pldr-bench hf [generate options]     HF generate on PldrllmForCausalLM vs PLDRForCausalLM.generate
                                       (default 110M, B=1, prompt 128, fp32, kvg; needs [hf])
  pldr-bench train [options]           forward + backward: g_attention vs eager and SDPA, the metric
                                       learner vs eager autograd, a model training step vs the
                                       reference model
  pldr-bench llama [options]           a transformers Llama with attn_implementation "pldr" vs
                                       "sdpa" and "eager": prefill and a decode step
  pldr-bench --from-json RUN.json --markdown --plot RUN.png     render a saved run again

Options go before or after the subcommand. `--json` keeps every sample; the terminal report,
`--markdown` and `--plot` are rendered from that same data.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import json
import os
import re
import sys
import time

from ..cli._args import non_negative, positive

DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def device_name(text: str) -> str:
    if not DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def field_value(text: str) -> tuple[str, object]:
    """``num_hidden_layers=1`` → ``("num_hidden_layers", 1)``: a literal (int, float, None…), else
    the text."""
    field, equals, value = text.partition("=")
    if not equals:
        raise argparse.ArgumentTypeError(f"expects FIELD=VALUE, got {text!r}")
    try:
        return field, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return field, value


def build_parser() -> argparse.ArgumentParser:
    """The options of a suite are stored under the name of the OpsConfig / GenerateConfig field
    they set."""
    from . import __doc__ as invocations
    parser = argparse.ArgumentParser(prog="pldr-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=invocations)
    opt = parser.add_argument
    opt("suite", nargs="?", choices=("ops", "generate", "train", "hf", "llama", "all"),
        default="all",
        help="ops: each op vs its rivals; generate: whole-model generation; train: forward + "
             "backward of the ops and a model training step; hf: HF generate on "
             "PldrllmForCausalLM vs PLDRForCausalLM.generate; llama: a transformers Llama with "
             'attn_implementation "pldr" vs "sdpa" and "eager"; all (default): ops, generate '
             "and train (hf and llama need transformers)")
    opt("--quick", action="store_true",
        help="small sweeps (~1 min on a 2-core CPU; no FlexAttention compile)")
    opt("--device", type=device_name, default="cpu",
        help="cpu (default) or cuda[:N] (times with CUDA events)")
    opt("--threads", type=positive, help="torch intra-op threads (default: all usable cores)")
    opt("--repeats", type=positive, help="timed repeats per contestant")
    opt("--warmup", type=non_negative, help="warm-up calls per contestant (ops)")
    opt("--contestants", nargs="+", metavar="PATTERN",
        help="who is timed, shell patterns over pldr_kernels reference eager sdpa_<backend> "
             "sdpa_<backend>_qg_given flex_compiled (default: all but *_qg_given)")
    opt("--json", metavar="PATH", help="write {env, results} with every sample")
    opt("--markdown", metavar="PATH", nargs="?", const="-",
        help="Markdown for the README (to PATH, or printed)")
    opt("--plot", metavar="PATH", help="PNG of latency against length (needs matplotlib)")
    opt("--from-json", metavar="PATH", help="render a saved --json file instead of measuring")
    opt("--no-memory", dest="memory", action="store_false",
        help="skip the peak-memory measurements")
    opt("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")
    opt = parser.add_argument_group("the ops sweep").add_argument
    opt("--ops", nargs="+", choices=("g_attention", "g_attention_decode", "metric_tensors"),
        metavar="OP", help="g_attention g_attention_decode metric_tensors (default: all)")
    opt("--batch", nargs="+", type=positive, metavar="B", help="batch sizes (generate: the first)")
    opt("--seqlens", nargs="+", type=positive, metavar="S", help="prefill, metric-learner lengths")
    opt("--cache-lens", nargs="+", type=positive, metavar="L", help="decode KV-cache lengths")
    opt("--heads", type=positive, metavar="H", help="heads (default 14, as the 110M model)")
    opt("--head-dims", nargs="+", type=int, choices=(64, 128))
    opt("--dtypes", nargs="+", choices=("float32", "bfloat16", "float16"), metavar="DTYPE",
        help="float32 bfloat16 float16 (default: the first two)")
    opt("--causal", choices=("yes", "no", "both"), help="prefill masks (default yes)")
    opt("--memory-check-len", type=positive, metavar="S", help="prefill memory check's S (4096)")
    opt("--flex", action=argparse.BooleanOptionalAction,
        help="include torch.compile(flex_attention) with --quick (--no-flex: never)")
    opt = parser.add_argument_group("generate").add_argument
    opt("--checkpoint", metavar="PATH",
        help="HF-format directory or authors' .pth (default: random weights)")
    opt("--prompt-lens", nargs="+", type=positive, metavar="N")
    opt("--new-tokens", type=positive, metavar="N")
    opt("--modes", nargs="+", choices=("none", "kv", "kvg"))
    opt("--gen-dtypes", nargs="+", choices=("float32", "bfloat16", "int8"), metavar="DTYPE",
        help="pldr_kernels' dtypes (the reference runs in fp32; int8 = quantize_weights('int8'))")
    opt("--model-config", nargs="+", type=field_value, metavar="FIELD=VALUE",
        help="PLDRConfig fields of the random model (e.g. num_hidden_layers=2; also train's)")
    opt("--cuda-graph", action="store_true",
        help="replay pldr_kernels' decode step from a CUDA graph (kv, kvg)")
    opt = parser.add_argument_group(
        "train (also --batch, --seqlens, --heads, --head-dims, --dtypes, --causal, "
        "--contestants, --model-config)").add_argument
    opt("--train-parts", nargs="+", choices=("g_attention", "metric_tensors", "model"),
        metavar="PART", help="g_attention metric_tensors model (default: all)")
    opt = parser.add_argument_group("llama (also --repeats, --contestants)").add_argument
    opt("--llama-seqlens", nargs="+", type=positive, metavar="S",
        help="prompt lengths (default 512 1024)")
    opt("--llama-kv-heads", nargs="+", type=positive, metavar="H_KV",
        help="key/value heads of the 8 query heads (default 8 2)")
    opt("--llama-layers", type=positive, metavar="N", help="decoder layers (default 4)")
    return parser


def check_before_running(parser: argparse.ArgumentParser, args) -> None:
    """Every output's dependency and every input, before minutes of measuring: a wrong argument
    ends here with ``pldr-bench: error: …`` and exit status 2."""
    needs = {"tqdm": "the progress bar"} if not args.from_json else {}
    if args.plot:
        needs["matplotlib"] = "--plot"
    for module, what in needs.items():
        if importlib.util.find_spec(module) is None:
            parser.error(f"{what} needs {module}, which is not installed: pip install "
                         f"'pldr-kernels[bench]' (or `{sys.executable} -m pip install {module}`)")
    for flag in ("json", "markdown", "plot"):
        path = getattr(args, flag)
        if not path or path == "-":
            continue
        directory = os.path.dirname(path) or "."
        if not os.path.isdir(directory):
            parser.error(f"--{flag} {path}: the directory {os.path.dirname(path)!r} does not exist")
        if os.path.isdir(path):
            parser.error(f"--{flag} {path}: is a directory; give a file name")
        if not os.access(directory, os.W_OK | os.X_OK):
            parser.error(f"--{flag} {path}: the directory {directory!r} is not writable")
    if args.plot:
        from matplotlib.backend_bases import FigureCanvasBase
        formats = FigureCanvasBase.get_supported_filetypes()
        suffix = os.path.splitext(args.plot)[1][1:]
        if suffix and suffix.lower() not in formats:
            parser.error(f"--plot {args.plot}: matplotlib cannot write {suffix!r} files; use one "
                         f"of {', '.join(sorted(formats))}")
    for flag in ("from_json", "checkpoint"):
        path = getattr(args, flag)
        if path and not os.path.exists(path):
            parser.error(f"--{flag.replace('_', '-')} {path}: no such file or directory")
    if args.from_json:
        args.saved_run = read_run(parser, args.from_json)
        return
    check_model_options(parser, args)
    import torch
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} but no CUDA device is visible (torch "
                     f"{torch.__version__}, CUDA {torch.version.cuda or 'none'})")
    if args.device.startswith("cuda:") and int(args.device[5:]) >= torch.cuda.device_count():
        parser.error(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s) "
                     f"are visible")
    if args.cuda_graph and not args.device.startswith("cuda"):
        parser.error("--cuda-graph needs --device cuda")


def read_run(parser: argparse.ArgumentParser, path: str) -> dict:
    """A saved ``--json`` run, or a parser error saying why it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        parser.error(f"--from-json {path}: not a readable JSON file ({e})")
    if not (isinstance(data, dict) and isinstance(data.get("env"), dict)
            and isinstance(data.get("results"), list)):
        parser.error(f"--from-json {path}: expected a run that --json wrote, an object with "
                     f"'env' and 'results'")
    return data


def check_model_options(parser: argparse.ArgumentParser, args) -> None:
    """--model-config must name PLDRConfig fields and give a valid config; --checkpoint must hold
    a readable config (its weights are read when the generate suite starts)."""
    from ..config import PLDRConfig
    from ..loaders import read_config

    if args.model_config and args.checkpoint:
        parser.error("--model-config sets the fields of the random model; a --checkpoint brings "
                     "its own config (give one of the two)")
    if args.model_config:
        names = {f.name for f in dataclasses.fields(PLDRConfig)}
        for field, value in args.model_config:
            if field not in names:
                parser.error(f"argument --model-config: PLDRConfig has no field {field!r} "
                             f"(given {field}={value!r}); its fields: {', '.join(sorted(names))}")
        try:
            PLDRConfig(**dict(args.model_config))
        except ValueError as e:
            parser.error(f"argument --model-config: {e}")
    if args.checkpoint:
        try:
            read_config(args.checkpoint)
        except (ValueError, OSError) as e:
            parser.error(f"--checkpoint {args.checkpoint}: {e}")


def given(args, config_class, quick: dict) -> dict:
    """``config_class``'s fields: the ``--quick`` preset, overridden by the options given."""
    options = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(config_class)}
    return {**(quick if args.quick else {}), **{k: v for k, v in options.items() if v is not None}}


def ops_config(args):
    from .ops_suite import QUICK, OpsConfig

    cfg = OpsConfig(**given(args, OpsConfig, QUICK))
    if args.seqlens:
        cfg.metric_seqlens = args.seqlens
    if args.flex is not None:
        cfg.flex_skip_reason = None if args.flex else "--no-flex"
    return cfg


def generate_config(args):
    from .generate_suite import QUICK, GenerateConfig

    return GenerateConfig(**given(args, GenerateConfig, QUICK),
                          batch_size=args.batch[0] if args.batch else 1)


def hf_config(args):
    from .generate_suite import GenerateConfig
    from .hf_suite import DEFAULTS, QUICK

    return GenerateConfig(**{**DEFAULTS, **given(args, GenerateConfig, QUICK)},
                          batch_size=args.batch[0] if args.batch else 1)


def train_config(args):
    from .train_suite import QUICK, TrainConfig

    return TrainConfig(**given(args, TrainConfig, QUICK))


def llama_config(args):
    from .llama_suite import QUICK, LlamaConfig

    return LlamaConfig(**given(args, LlamaConfig, QUICK))


def measure(args, argv: list[str]) -> dict:
    """The suites: ``{"env", "results"}``, what ``--json`` writes."""
    import torch

    from .generate_suite import run_generate
    from .llama_suite import run_llama
    from .measure import busy_machine_warning, collect_env, usable_cores
    from .ops_suite import run_ops
    from .train_suite import run_train

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(args.threads or usable_cores())
    started, suite = time.perf_counter(), args.suite
    busy = busy_machine_warning(torch.get_num_threads())
    if busy:
        print(f"pldr-bench: WARNING: {busy}", file=sys.stderr)
    results, skipped = [], []
    if suite in ("ops", "all"):
        results, skipped = run_ops(ops_config(args), device, args.progress)
    if suite in ("generate", "all"):
        more, more_skipped = run_generate(generate_config(args), device, args.progress)
        results, skipped = results + more, skipped + more_skipped
    if suite in ("train", "all"):
        more, more_skipped = run_train(train_config(args), device, args.progress)
        results, skipped = results + more, skipped + more_skipped
    if suite == "hf":  # hf and llama are not in "all": they need transformers
        from .hf_suite import run_hf
        more, more_skipped = run_hf(hf_config(args), device, args.progress)
        results, skipped = results + more, skipped + more_skipped
    if suite == "llama":
        more, more_skipped = run_llama(llama_config(args), device, args.progress)
        results, skipped = results + more, skipped + more_skipped
    busy = busy or busy_machine_warning(torch.get_num_threads())  # at the start, else at the end
    env = collect_env(device, ["pldr-bench", *argv])
    env.update(suite=suite, quick=args.quick, skipped=skipped,
               wall_s=round(time.perf_counter() - started, 1), warnings=[busy] if busy else [])
    return {"env": env, "results": results}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    check_before_running(parser, args)
    from .._io import atomic_write_text
    from . import report

    if args.from_json:
        data = args.saved_run
    else:
        data = json.loads(json.dumps(measure(args, argv), default=str))  # exactly what JSON holds
    if args.json:
        atomic_write_text(args.json, json.dumps(data, indent=1))
    print(report.render(data))
    if args.markdown == "-":
        print(report.render(data, markdown=True))
    elif args.markdown:
        atomic_write_text(args.markdown, report.render(data, markdown=True))
    if args.plot:
        report.write_plot(args.plot, data)
    for path in (args.json, args.markdown, args.plot):
        if path and path != "-":
            print(f"wrote {path}")
    return 1 if any(not r.get("valid", True) for r in data["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
