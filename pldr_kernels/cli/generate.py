"""`pldr-generate` (`python -m pldr_kernels.cli.generate`): text in, text out.

  pldr-generate --model DIR --prompt "The cat"            an HF-format directory (config.json,
                                                          model.safetensors, tokenizer.model)
  pldr-generate --model X.pth --prompt "The cat"          the authors' .pth with its sidecar
                                                          *_hyperparameters.py, tokenizer beside it
  pldr-generate --model DIR --prompts-file P.txt          one prompt a line, one left-padded batch

The continuation streams to stdout as it is generated; the timings (start-up split into import,
load and first token; prompt and generation tokens per second) go to stderr. A mistake in the
command line or the files is one line on stderr and exit status 2.
"""
from __future__ import annotations

import os
import sys
import time

from . import _args


def build_parser() -> _args.ArgumentParser:
    parser = _args.ArgumentParser(prog="pldr-generate", description=__doc__,
                                  formatter_class=_args.argparse.RawDescriptionHelpFormatter)
    opt = parser.add_argument
    opt("--model", required=True, metavar="PATH",
        help="an HF-format directory or an authors' .pth file")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", metavar="TEXT", help="the prompt")
    prompts.add_argument("--prompts-file", metavar="FILE",
                         help="UTF-8 text, one prompt a line (blank lines skipped): one batch")
    opt("--tokenizer", metavar="PATH",
        help="a .model file, tokenizer tarball or directory (default: found beside the model)")
    opt("--hyperparameters", metavar="FILE",
        help="the .pth's *_hyperparameters.py (default: the one beside it)")
    opt("--max-new-tokens", type=_args.positive, default=64, metavar="N",
        help="tokens to generate per prompt (default 64; a row stops early at [END])")
    opt("--temperature", type=_args.non_negative_float, default=0.0,
        help="0 (default): greedy; > 0: sample at this temperature")
    opt("--top-k", type=_args.non_negative, default=0, metavar="K",
        help="sample from the K most likely tokens (0, default: all); needs --temperature > 0")
    opt("--top-p", type=_args.probability, default=1.0, metavar="P",
        help="nucleus sampling (1, default: off); needs --temperature > 0")
    opt("--seed", type=int, help="seed of the sampler (default: not seeded)")
    opt("--cache", choices=("none", "kv", "kvg"), default="kvg",
        help="none: recompute everything each step; kv: KV-cache, G recomputed; kvg (default): "
             "KV-cache and G-cache (docs/spec.md §3)")
    opt("--device", type=_args.device_name, default="cpu", help="cpu (default), cuda or cuda:N")
    opt("--dtype", type=_args.dtype_name, default="float32",
        help="float32 (default), bfloat16 or float16 (the G path stays fp32)")
    opt("--threads", type=_args.positive, help="torch intra-op threads (default: torch's)")
    opt("--no-stats", dest="stats", action="store_false",
        help="print only the text (no timings on stderr)")
    return parser


def read_prompts(args) -> list[str]:
    if args.prompt is not None:
        if not args.prompt.strip():
            raise _args.UsageError("--prompt: expected some text, got an empty prompt")
        return [args.prompt]
    prompts = [line for line in _args.read_text(args.prompts_file, "--prompts-file").splitlines()
               if line.strip()]
    if not prompts:
        raise _args.UsageError(f"--prompts-file: {args.prompts_file} holds no prompt")
    return prompts


def load_model_and_tokenizer(path: str, tokenizer: str | None = None,
                             hyperparameters: str | None = None):
    """(model, tokenizer) of an HF-format directory or an authors' .pth, the tokenizer checked
    against the config; UsageError for a missing or unfitting file."""
    from ..model import PLDRForCausalLM
    from ..tokenizer import PLDRTokenizer
    _args.require_path(path, "--model")
    if tokenizer is not None:
        _args.require_path(tokenizer, "--tokenizer")
    if hyperparameters is not None:
        _args.require_file(hyperparameters, "--hyperparameters")
    with _args.user_errors("--model"):
        if os.path.isdir(path):
            tok = (PLDRTokenizer.from_path(tokenizer) if tokenizer
                   else PLDRTokenizer.from_pretrained(path))
            model = PLDRForCausalLM.from_pretrained(path)
        else:
            tok = PLDRTokenizer.from_pth(path, tokenizer)
            model = PLDRForCausalLM.from_pth(path, hyperparameters=hyperparameters)
        tok.check_fits(model.config)
    return model.eval(), tok


def _since_process_start() -> float | None:
    """Seconds since this process started (Linux), the interpreter's own start-up included."""
    try:
        with open("/proc/self/stat") as f:
            started_ticks = int(f.read().rpartition(")")[2].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _main(argv) -> int:
    entered = _since_process_start()  # the interpreter and `import pldr_kernels` (torch)
    t0 = time.perf_counter()
    parser = build_parser()
    args = parser.parse_args(argv)
    prompts = read_prompts(args)
    if args.temperature == 0 and (args.top_k or args.top_p < 1):
        raise _args.UsageError("--top-k and --top-p sample: give --temperature > 0 as well "
                               "(0 is greedy)")
    import torch

    from .. import textgen
    _args.check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_import = time.perf_counter() - t0 + (entered or 0.0)
    t0 = time.perf_counter()
    model, tok = load_model_and_tokenizer(args.model, args.tokenizer, args.hyperparameters)
    model.to(device=args.device, dtype=getattr(torch, args.dtype))
    t_load = time.perf_counter() - t0

    sampling = dict(do_sample=True, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p) if args.temperature > 0 else {}
    out = sys.stdout
    single = len(prompts) == 1
    if single:
        out.write(prompts[0])
        out.flush()
    with _args.user_errors("generate"):
        stream = textgen.stream_text(model, tok, prompts, max_new_tokens=args.max_new_tokens,
                                     cache=args.cache, seed=args.seed, **sampling)
        while True:
            try:
                pieces = next(stream)
            except StopIteration as done:
                result = done.value
                break
            if single and pieces[0]:
                out.write(pieces[0])
                out.flush()
    if single:
        out.write("\n")
    else:
        for i, (prompt, text) in enumerate(zip(prompts, result.texts, strict=True)):
            out.write(f"[{i}] {prompt}{text}\n")
    out.flush()
    if args.stats:
        since_start = _since_process_start()
        total = f"; the whole run took {since_start:.2f} s" if since_start else ""
        what = "python + imports" if entered is not None else "imports"
        print(f"pldr-generate: {len(prompts)} prompt(s), {result.prompt_tokens} prompt tokens at "
              f"{result.prompt_tokens_per_s:.1f} tokens/s, {result.new_tokens} generated tokens "
              f"at {result.decode_tokens_per_s:.1f} tokens/s after the first (cache "
              f"{args.cache}, {args.dtype}, {args.device})\n"
              f"pldr-generate: start-up: {what} {t_import:.2f} s, load {t_load:.2f} s, first "
              f"token {result.first_token_s:.2f} s{total}", file=sys.stderr, flush=True)
    return 0


def main(argv=None) -> int:
    return _args.run("pldr-generate", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
