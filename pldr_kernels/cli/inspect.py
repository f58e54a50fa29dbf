"""`pldr-inspect` (`python -m pldr_kernels.cli.inspect`): is G_LM input-invariant? (the paper's
claim, docs/spec.md §7)

  pldr-inspect --model DIR --prompts PROMPTS.txt                      the table
  pldr-inspect --model DIR --prompts P.txt --text HELD_OUT.txt        + perplexity per cache mode
  pldr-inspect --model DIR --prompts P.txt --json R.json --plot R.png --layer 0 --head 3

Per layer and head, for A, A_LM, A_P and G_LM of each prompt (one a line): the determinant (sign
and log|det|, fp64), the Frobenius norm; the RMSE of G_LM between prompts and between cache none
(G from the whole sequence after --new-tokens greedy steps) and kvg (the prompt's G); and with
--text the perplexity of that text, scored token by token, in cache modes none, kv and kvg.
"""
from __future__ import annotations

import json
import sys

from . import _args
from .generate import load_model_and_tokenizer


def build_parser() -> _args.ArgumentParser:
    parser = _args.ArgumentParser(prog="pldr-inspect", description=__doc__,
                                  formatter_class=_args.argparse.RawDescriptionHelpFormatter)
    opt = parser.add_argument
    opt("--model", required=True, metavar="PATH",
        help="an HF-format directory or an authors' .pth file")
    opt("--prompts", required=True, metavar="FILE",
        help="UTF-8 text, one prompt a line (blank lines skipped); two or more for the "
             "across-prompt RMSE")
    opt("--text", metavar="FILE", help="a held-out UTF-8 text: its perplexity per cache mode")
    opt("--max-text-tokens", type=_args.positive, metavar="N",
        help="score at most N tokens of --text (default and cap: the model's context)")
    opt("--context", type=_args.positive, default=1, metavar="N",
        help="the first N tokens of --text are the prompt G is cached from (default 1)")
    opt("--new-tokens", type=_args.non_negative, default=16, metavar="N",
        help="greedy steps before G of cache none is compared with kvg's (default 16)")
    opt("--tokenizer", metavar="PATH", help="default: found beside the model")
    opt("--hyperparameters", metavar="FILE", help="the .pth's sidecar (default: beside it)")
    opt("--json", metavar="PATH", help="write every value (per prompt, layer and head)")
    opt("--plot", metavar="PATH", help="PNG: G of --layer/--head and G-RMSE per layer")
    opt("--layer", type=_args.non_negative, default=0, help="layer of the heat map (default 0)")
    opt("--head", type=_args.non_negative, default=0, help="head of the heat map (default 0)")
    opt("--device", type=_args.device_name, default="cpu", help="cpu (default), cuda or cuda:N")
    opt("--dtype", type=_args.dtype_name, default="float32",
        help="float32 (default), bfloat16 or float16 (the G path stays fp32)")
    return parser


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    prompts = [line for line in _args.read_text(args.prompts, "--prompts").splitlines()
               if line.strip()]
    if not prompts:
        raise _args.UsageError(f"--prompts: {args.prompts} holds no prompt")
    text = None if args.text is None else _args.read_text(args.text, "--text")
    if text is not None and not text.strip():
        raise _args.UsageError(f"--text: {args.text} holds no text")
    if args.plot:
        with _args.user_errors("--plot"):
            import matplotlib  # noqa: F401  (fail before the work, not after it)
    import torch

    from .. import inspection
    _args.check_device(args.device)
    model, tok = load_model_and_tokenizer(args.model, args.tokenizer, args.hyperparameters)
    model.to(device=args.device, dtype=getattr(torch, args.dtype))
    config = model.config
    if args.layer >= config.num_hidden_layers or args.head >= config.num_attention_heads:
        raise _args.UsageError(
            f"--layer/--head: the model has {config.num_hidden_layers} layers and "
            f"{config.num_attention_heads} heads, got --layer {args.layer} --head {args.head}")
    with _args.user_errors("inspect"):
        result = inspection.inspect_model(model, tok, prompts, text=text,
                                          new_tokens=args.new_tokens, context=args.context,
                                          max_text_tokens=args.max_text_tokens)
    result["model"] = args.model
    print(inspection.format_table(result))
    if args.json:
        from .. import _io
        with _args.user_errors("--json"):
            _io.atomic_write_text(args.json, json.dumps(result, indent=1))
    if args.plot:
        G = inspection.deductive_outputs(model, tok.encode(prompts[0]))[args.layer]["G_LM"]
        with _args.user_errors("--plot"):
            inspection.plot(result, G[args.head], args.layer, args.head, args.plot)
    return 0


def main(argv=None) -> int:
    return _args.run("pldr-inspect", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
