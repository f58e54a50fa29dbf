"""`pldr-bench generate`: end-to-end generation, reference model vs pldr_kernels, per cache mode.

Both implementations hold the same weights (the paper's 110M configuration, random unless
``--checkpoint``), get the same prompt and generate greedily, so they do identical work. The runs
are interleaved (every repeat runs each (mode, implementation) once, implementations in a rotating
order). Each decode step is timed where the step's logits come out of the LM head (a forward hook
on ``final_layer``, the same point in both models): time to first token is start → the prompt's
logits, per-token latency is the time between consecutive steps' logits. On CUDA the hook records
CUDA events (no host sync inside the loop); with ``--cuda-graph`` the replayed step bypasses the
hook, so pldr_kernels is timed at each token its ``generate_stream`` yields.

Before timing, the implementations' greedy tokens are compared per mode: a difference is printed
loudly and the rows are marked invalid.
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .memory import run_with_peak
from .timing import Progress, percentile

IMPLS = ("reference", "pldr_kernels")
MODES = ("none", "kv", "kvg")
PLDR_OPS = ("g_attention", "g_attention_decode", "metric_tensors")


@dataclass
class GenerateConfig:
    impls: Sequence[str] = IMPLS
    modes: Sequence[str] = MODES
    prompt_lens: Sequence[int] = (32,)
    new_tokens: int = 8
    batch: int = 1
    repeats: int = 3
    checkpoint: str | None = None
    dtype: str = "float32"
    cuda_graph: bool = False
    memory: bool = True
    seed: int = 0
    model_overrides: dict | None = None  # PLDRConfig fields (e.g. a smaller model for tests)


def quick_config() -> GenerateConfig:
    return GenerateConfig(prompt_lens=(32,), new_tokens=12, repeats=5)


def full_config() -> GenerateConfig:
    return GenerateConfig(prompt_lens=(64, 256, 512), new_tokens=32, repeats=5)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def load_models(cfg: GenerateConfig, device: torch.device
                ) -> tuple[dict[str, torch.nn.Module], list[dict], object | None]:
    """``({impl: model}, skipped, config)``: both models with one set of weights."""
    skipped: list[dict] = []
    try:
        from ..config import PLDRConfig
        from ..model import PLDRForCausalLM
        from ..reference_model import ReferencePLDR
    except ImportError as exc:
        reason = f"the model code is not available yet ({exc})"
        return {}, [{"bench": "generate", "impl": i, "reason": reason} for i in cfg.impls], None
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    torch.manual_seed(cfg.seed)
    if cfg.checkpoint:
        path = cfg.checkpoint
        source = (PLDRForCausalLM.from_pretrained(path) if os.path.isdir(path)
                  else PLDRForCausalLM.from_pth(path))
    else:  # the paper's 110M configuration unless overridden
        source = PLDRForCausalLM(PLDRConfig(**(cfg.model_overrides or {})))
    source = source.to(device).eval()
    models: dict[str, torch.nn.Module] = {}
    if "reference" in cfg.impls:
        models["reference"] = ReferencePLDR.from_model(source, dtype).eval()
    if "pldr_kernels" in cfg.impls:
        missing = [op for op in PLDR_OPS if pldr_op_missing(op, device)]
        if missing:
            skipped.append({"bench": "generate", "impl": "pldr_kernels",
                            "reason": f"no {device.type.upper()} kernel registered yet for "
                                      + ", ".join(f"pldr::{op}" for op in missing)})
        else:
            models["pldr_kernels"] = source.to(dtype)
    return models, skipped, source.config


def pldr_op_missing(op: str, device: torch.device) -> str | None:
    from .contestants import pldr_kernel_missing
    return pldr_kernel_missing(op, device)


def lm_head(model: torch.nn.Module) -> torch.nn.Module:
    head = getattr(model, "final_layer", None)
    if head is None:
        raise AttributeError(f"{type(model).__name__} has no final_layer (the LM head to time at)")
    return head


# ---------------------------------------------------------------------------------------------
# One timed generation
# ---------------------------------------------------------------------------------------------
class StepTimer:
    """Timestamps of the LM head's outputs (one per forward step) during one generate call."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self, *_):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter_ns())

    def elapsed_ms(self) -> list[float]:
        """Milliseconds from the first mark to each later one."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [self.marks[0].elapsed_time(m) for m in self.marks[1:]]
        return [(m - self.marks[0]) / 1e6 for m in self.marks[1:]]


def timed_generate(model, impl: str, ids: torch.Tensor, new_tokens: int, mode: str,
                   cuda_graph: bool) -> tuple[torch.Tensor, float, list[float], float]:
    """``(ids, ttft_ms, per_step_ms, total_ms)`` of one greedy generation."""
    timer = StepTimer(ids.device)
    use_stream = cuda_graph and impl == "pldr_kernels" and mode in ("kv", "kvg")  # see graphed()
    handle = None if use_stream else lm_head(model).register_forward_hook(
        lambda *a: timer.mark())
    try:
        timer.mark()  # start
        if use_stream:
            toks = []
            for tok in model.generate_stream(ids, new_tokens, cache=mode, cuda_graph=True):
                timer.mark()
                toks.append(tok)
            out = torch.cat([ids, torch.stack(toks, dim=1)], dim=1)
        else:
            out = model.generate(ids, new_tokens, cache=mode, do_sample=False)
        timer.mark()  # end (after the last token was chosen)
    finally:
        if handle is not None:
            handle.remove()
    stamps = timer.elapsed_ms()
    total = stamps[-1]
    marks = stamps[:-1]  # one per forward (prefill, then each decode step)
    ttft = marks[0]
    steps = [b - a for a, b in zip(marks, marks[1:])]
    return out, ttft, steps, total


# ---------------------------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------------------------
def graphed(cfg: GenerateConfig, impl: str, mode: str) -> bool:
    """Whether this (implementation, mode) replays its decode step from a CUDA graph."""
    return cfg.cuda_graph and impl == "pldr_kernels" and mode in ("kv", "kvg")


def shout(msg: str) -> None:
    from .ops_suite import shout as _shout
    _shout(msg)


def run_generate(cfg: GenerateConfig, device: torch.device, show_progress: bool = True
                 ) -> tuple[list[dict], list[dict]]:
    models, skipped, config = load_models(cfg, device)
    if not models:
        return [], skipped
    impls = [i for i in cfg.impls if i in models]
    first = next(iter(models.values()))
    model_desc = {"model": f"L{config.num_hidden_layers} D{config.hidden_size} "
                           f"H{config.num_attention_heads} V{config.vocab_size}",
                  "params": sum(p.numel() for p in first.parameters()),
                  "weights": cfg.checkpoint or "random (seeded)"}
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    results: list[dict] = []
    total_steps = len(cfg.prompt_lens) * (1 + cfg.repeats)
    with Progress(total_steps, "generate", show_progress) as progress:
        for prompt_len in cfg.prompt_lens:
            limit = config.max_position_embeddings
            if prompt_len + cfg.new_tokens > limit:
                skipped.append({"bench": "generate", "impl": "all",
                                "reason": f"prompt {prompt_len} + {cfg.new_tokens} new tokens "
                                          f"exceeds max_position_embeddings {limit}"})
                continue
            ids = torch.randint(4, config.vocab_size, (cfg.batch, prompt_len),
                                generator=gen).to(device)
            rows = run_prompt(models, impls, cfg, ids, device, progress)
            results += [{**r, **model_desc} for r in rows]
    return results, skipped


def run_prompt(models, impls, cfg: GenerateConfig, ids, device, progress) -> list[dict]:
    prompt_len = ids.shape[1]
    # 1. Agreement, warm-up and peak memory in one untimed run per (implementation, mode): the
    #    greedy tokens of every implementation are compared per mode.
    tokens: dict[tuple[str, str], torch.Tensor] = {}
    memory: dict[tuple[str, str], tuple[int, str]] = {}
    for mode in cfg.modes:
        for impl in impls:  # a 2-token warm-up first, so one-time setup is not counted as memory
            models[impl].generate(ids, min(2, cfg.new_tokens), cache=mode, do_sample=False)

            def once(model=models[impl], mode=mode, impl=impl):
                graph = {"cuda_graph": True} if graphed(cfg, impl, mode) else {}
                return model.generate(ids, cfg.new_tokens, cache=mode, do_sample=False, **graph)
            if cfg.memory:
                out, nbytes, method = run_with_peak(once, device)
                memory[(impl, mode)] = (nbytes, method)
            else:
                out = once()
            tokens[(impl, mode)] = out.cpu()
    valid: dict[tuple[str, str], bool] = {}
    notes: dict[tuple[str, str], str] = {}
    for mode in cfg.modes:
        base = tokens.get(("reference", mode))
        for impl in impls:
            t = tokens[(impl, mode)]
            ok = base is None or torch.equal(t, base)
            valid[(impl, mode)] = ok
            if not ok:
                first = int((t != base).any(dim=0).nonzero()[0]) - prompt_len
                notes[(impl, mode)] = f"tokens differ from the reference from new token {first}"
                shout(f"DISAGREEMENT in generate mode={mode} prompt={prompt_len}: {impl} "
                      f"{notes[(impl, mode)]} — its row is marked invalid")
    progress.update(1, note=f"prompt {prompt_len}: agreement, memory")
    # 2. Timing, interleaved.
    samples = {(impl, mode): {"ttft": [], "steps": [], "total": []}
               for impl in impls for mode in cfg.modes}
    order = list(impls)
    for rep in range(cfg.repeats):
        for mode in cfg.modes:
            shift = (rep + cfg.modes.index(mode)) % len(order)
            for impl in order[shift:] + order[:shift]:
                _, ttft, steps, total = timed_generate(models[impl], impl, ids, cfg.new_tokens,
                                                       mode, cfg.cuda_graph)
                s = samples[(impl, mode)]
                s["ttft"].append(ttft)
                s["steps"].append(steps)
                s["total"].append(total)
        progress.update(1, note=f"prompt {prompt_len}: repeat {rep + 1}/{cfg.repeats}")
    rows = []
    for mode in cfg.modes:
        for impl in impls:
            s = samples[(impl, mode)]
            flat = [x for steps in s["steps"] for x in steps]
            total_p50 = percentile(s["total"], 50)
            row = {
                "bench": "generate", "impl": impl, "mode": mode, "prompt_len": prompt_len,
                "new_tokens": cfg.new_tokens, "batch": cfg.batch, "dtype": cfg.dtype,
                "ttft_ms": percentile(s["ttft"], 50),
                "per_token_ms_p50": percentile(flat, 50) if flat else None,
                "per_token_ms_p90": percentile(flat, 90) if flat else None,
                "per_token_ms_p10": percentile(flat, 10) if flat else None,
                "tokens_per_s": cfg.batch * cfg.new_tokens / (total_p50 / 1e3),
                "total_ms_p50": total_p50,
                "ttft_samples_ms": s["ttft"], "step_ms": s["steps"], "total_samples_ms": s["total"],
                "peak_memory_bytes": memory.get((impl, mode), (None, None))[0],
                "memory_method": (memory[(impl, mode)][1] + ", extra over the loaded weights")
                if (impl, mode) in memory else None,
                "cuda_graph": graphed(cfg, impl, mode),
                "valid": valid[(impl, mode)], "note": notes.get((impl, mode), ""),
            }
            rows.append(row)
    return rows
