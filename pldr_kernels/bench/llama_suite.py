"""`pldr-bench llama`: a random LlamaForCausalLM (transformers) with ``attn_implementation``
"pldr" (pldr_kernels/hf/attention.py, docs/design.md §3.8) against "sdpa" and "eager".

Three parts per prompt length S and kv-head count: ``attention`` — one layer's attention call
alone (the registered attention functions on that layer's causal prefill shapes, no mask, as the
model calls them), ``prefill`` — one forward over S tokens (``use_cache=False``, logits of the
last position only), the time to first token's work — and ``decode`` — one greedy step over a
DynamicCache holding S tokens (cropped back after each call). The three implementations share
the model (switched with ``set_attn_implementation``) and run interleaved, medians of the
repeats. Checked before timing: pldr's output (logits, or the attention output) must be within
2x eager's distance from sdpa's, plus 1e-5 (a row fails as INVALID otherwise).
"""
from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .measure import Clock, measure_interleaved, progress_bar
from .ops_suite import selected, skipped

IMPLS = ("pldr", "sdpa", "eager")


@dataclass
class LlamaConfig:
    """The runs; a field is set by the ``pldr-bench`` option of the same name."""
    contestants: Sequence[str] | None = None  # patterns on "pldr", "sdpa", "eager"
    llama_seqlens: Sequence[int] = (512, 1024)
    llama_kv_heads: Sequence[int] = (8, 2)
    llama_layers: int = 4
    repeats: int = 7
    seed: int = 0


QUICK = dict(llama_seqlens=(256,), llama_kv_heads=(2,), llama_layers=2, repeats=3)
HIDDEN, HEADS, HEAD_DIM, FFN, VOCAB = 512, 8, 64, 1376, 32000


def missing() -> str | None:
    if importlib.util.find_spec("transformers") is None:
        return "needs transformers (pip install 'pldr-kernels[hf]')"
    return None


def build_model(cfg: LlamaConfig, kv_heads: int, device):
    import transformers

    from ..hf import attention  # noqa: F401  (registers "pldr")
    torch.manual_seed(cfg.seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
        num_hidden_layers=cfg.llama_layers, num_attention_heads=HEADS,
        num_key_value_heads=kv_heads, head_dim=HEAD_DIM, max_position_embeddings=4096)
    return transformers.LlamaForCausalLM(config).to(device).eval()


def contestants(model, ids, part: str):
    """name → a call returning the last position's logits, for ``part``."""
    from transformers import DynamicCache

    S = ids.shape[1]
    calls = {}
    if part == "attention":
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.llama.modeling_llama import eager_attention_forward

        layer = model.model.layers[0].self_attn
        gen = torch.Generator().manual_seed(S)
        dev = ids.device
        q = torch.randn(1, HEADS, S, HEAD_DIM, generator=gen).to(dev)
        k, v = (torch.randn(1, model.config.num_key_value_heads, S, HEAD_DIM, generator=gen)
                .to(dev) for _ in range(2))
        for impl in IMPLS:
            fn = eager_attention_forward if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]
            if impl == "eager":  # eager needs the materialised causal mask
                mask = torch.full((S, S), float("-inf"), device=dev).triu(1)[None, None]
            else:
                mask = None

            def run(fn=fn, mask=mask):
                return fn(layer, q, k, v, mask, scaling=layer.scaling, dropout=0.0)[0]
            calls[impl] = run
        return calls
    for impl in IMPLS:
        if part == "prefill":
            def run(impl=impl):
                model.set_attn_implementation(impl)
                return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
        else:
            model.set_attn_implementation(impl)
            cache = DynamicCache(config=model.config)
            model(input_ids=ids[:, :-1], cache=cache, use_cache=True)
            step = ids[:, -1:]

            def run(impl=impl, cache=cache, step=step):
                model.set_attn_implementation(impl)
                logits = model(input_ids=step, cache=cache, use_cache=True,
                               logits_to_keep=1).logits
                cache.crop(-1)  # back to the S − 1 prompt tokens
                return logits
        calls[impl] = run
    return calls


def run_llama(cfg: LlamaConfig, device: torch.device, show_progress: bool = True
              ) -> tuple[list[dict], list[dict]]:
    reason = missing()
    if reason:
        return [], [skipped("llama", None, "all", reason)]
    clock, results, skips = Clock(device), [], []
    todo = [(h, s, part) for h in cfg.llama_kv_heads for s in cfg.llama_seqlens
            for part in ("attention", "prefill", "decode")]
    models = {}
    with progress_bar(len(todo), "llama", show_progress) as bar, torch.no_grad():
        for kv_heads, S, part in todo:
            bar.set_postfix_str(f"{part} S{S} H_kv{kv_heads}", refresh=False)
            if kv_heads not in models:
                models[kv_heads] = build_model(cfg, kv_heads, device)
            model = models[kv_heads]
            gen = torch.Generator().manual_seed(cfg.seed + S)
            ids = torch.randint(0, VOCAB, (1, S), generator=gen).to(device)
            calls = {n: c for n, c in contestants(model, ids, part).items()
                     if selected(n, cfg.contestants)}
            logits = {n: c().float() for n, c in calls.items()}
            valid, agreement = True, "not checked (needs pldr, sdpa and eager)"
            if set(IMPLS) <= set(logits):
                err = (logits["pldr"] - logits["sdpa"]).abs().max().item()
                bound = 2 * (logits["eager"] - logits["sdpa"]).abs().max().item() + 1e-5
                valid = err <= bound
                agreement = f"|pldr - sdpa| = {err:.2e} <= {bound:.2e}: {valid}"
            tokens = 1 if part == "decode" else S
            for name, m in measure_interleaved(calls, clock, 1, cfg.repeats).items():
                stats = m.stats
                results.append({
                    "bench": "llama", "part": part, "B": 1, "S": S, "H": HEADS,
                    "H_kv": kv_heads, "d": HEAD_DIM, "layers": cfg.llama_layers,
                    "hidden": HIDDEN, "dtype": "float32", "impl": name,
                    **{f"time_ms_{p}": t for p, t in stats.items()},
                    "samples_ms": m.samples_ms, "calls_per_sample": m.inner,
                    "tokens_per_s": tokens / (stats["p50"] * 1e-3),
                    "valid": valid, "agreement": agreement})
            bar.update(1)
    add_ratios(results)
    return results, skips


def add_ratios(rows: list[dict]) -> None:
    """``sdpa_over_pldr``: sdpa's p50 / pldr's in the same case (> 1: "pldr" is faster)."""
    keys = ("part", "S", "H_kv")
    for r in rows:
        sdpa = next((o for o in rows if o["impl"] == "sdpa"
                     and all(o[k] == r[k] for k in keys)), None)
        r["sdpa_over_this"] = sdpa["time_ms_p50"] / r["time_ms_p50"] if sdpa else None


def fmt(x):
    return "-" if x is None else f"{x:.3g}" if x < 100 else f"{x:.0f}"


LLAMA_COLUMNS = (
    ("part", False, lambda r: r["part"]),
    ("shape", False, lambda r: f"B{r['B']} S{r['S']} H{r['H']} H_kv{r['H_kv']} d{r['d']}"),
    ("attn", False, lambda r: r["impl"]),
    ("p50 ms", True, lambda r: fmt(r["time_ms_p50"])),
    ("p20–p80 ms", True, lambda r: f"{fmt(r['time_ms_p20'])}–{fmt(r['time_ms_p80'])}"),
    ("tok/s", True, lambda r: fmt(r["tokens_per_s"])),
    ("sdpa / this", True, lambda r: "-" if r.get("sdpa_over_this") is None
     else f"{r['sdpa_over_this']:.2f}x"),
    ("check", False, lambda r: "ok" if r["valid"] else "INVALID"))


def heading(rows: list[dict]) -> str:
    r = rows[0]
    return (f"Llama (transformers LlamaForCausalLM, random, {r['layers']} layers, hidden "
            f"{r['hidden']}, {r['H']} heads of d {r['d']}, fp32; attn_implementation pldr vs "
            "sdpa vs eager; attention = one layer's causal attention call alone, prefill = one "
            "forward over S tokens, decode = one step over a DynamicCache of S tokens)")
