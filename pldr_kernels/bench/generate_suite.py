"""`pldr-bench generate`: end-to-end greedy generation, reference model vs pldr_kernels, per cache
mode (none / kv / kvg) and prompt length.

Both models hold the same weights (the paper's 110M configuration, random unless
``--checkpoint``), get the same prompt and do identical work. The reference runs in fp32 (the
published inference); pldr_kernels in each ``--gen-dtypes``. Runs are interleaved: every repeat runs
each (implementation, mode) once, in a rotating order. A step is timed where its logits leave the
LM head (a forward hook on ``final_layer``, the same point in both models): time to first token is
start → the prompt's logits, a token's latency the time between consecutive steps' logits. On CUDA
the hook records events (no sync in the loop); with ``--cuda-graph`` the replayed step bypasses the
hook, so pldr_kernels is timed at each token ``generate_stream`` yields. Checked before timing
(a failure marks the rows invalid): fp32 pldr_kernels' greedy tokens must be the fp32 reference's;
another dtype's logits of the prompt must pass the peer rule.
"""
from __future__ import annotations

import copy
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import testing
from .measure import Clock, measure_interleaved, progress_bar, rotated, run_with_peak, summarize
from .ops_suite import OPS, add_speedups, kernel_missing, report_disagreement, selected, skipped

MODES = ("none", "kv", "kvg")
NO_EOS = {"eos_token_id": None}  # every run generates all its tokens


@dataclass
class GenerateConfig:
    """The runs; a field is set by the ``pldr-bench`` option of the same name."""
    contestants: Sequence[str] | None = None  # patterns on "reference", "pldr_kernels"
    modes: Sequence[str] = MODES
    prompt_lens: Sequence[int] = (64, 256, 512)
    new_tokens: int = 32
    batch_size: int = 1  # the first --batch
    repeats: int = 5
    gen_dtypes: Sequence[str] = ("float32",)
    checkpoint: str | None = None
    cuda_graph: bool = False
    memory: bool = True
    seed: int = 0
    model_config: Sequence[tuple[str, object]] = ()  # PLDRConfig fields of the random model


QUICK = dict(prompt_lens=(16, 64, 128), new_tokens=6, repeats=3)


def load_models(cfg: GenerateConfig, device: torch.device):
    """``(models {(impl, dtype): model}, skips, source model, fp32 reference)``."""
    from ..config import PLDRConfig
    from ..model import PLDRForCausalLM
    from ..reference_model import ReferencePLDR

    torch.manual_seed(cfg.seed)
    if cfg.checkpoint:
        source = (PLDRForCausalLM.from_pretrained(cfg.checkpoint) if os.path.isdir(cfg.checkpoint)
                  else PLDRForCausalLM.from_pth(cfg.checkpoint))
    else:
        source = PLDRForCausalLM(PLDRConfig(**dict(cfg.model_config)))
    source = source.to(device).float().eval()
    ref32 = ReferencePLDR.from_model(source, torch.float32).eval()
    models, skips = {}, []
    if selected("reference", cfg.contestants):
        models[("reference", "float32")] = ref32
    missing = next(filter(None, (kernel_missing(op, device) for op in OPS)), None)
    if selected("pldr_kernels", cfg.contestants) and missing:
        skips.append(skipped("generate", None, "pldr_kernels", missing))
    elif selected("pldr_kernels", cfg.contestants):
        for dt in cfg.gen_dtypes:
            if dt == "int8":  # weight-only int8, fp32 activations (quantize_weights)
                model = copy.deepcopy(source).quantize_weights("int8")
            else:
                model = source if dt == "float32" else copy.deepcopy(source).to(getattr(torch, dt))
            models[("pldr_kernels", dt)] = model.eval()
    return models, skips, source, ref32


# ---- what a decode step reads, and the copy bandwidth for that many bytes ----------------------
# Not read by a decode step: the embedding (one row per token, counted apart), the metric learner
# (the G path runs on the prompt only; mode 'kv' reads A and plgatt_layer, counted apart).
NOT_STREAMED = ("decoder.embedding.", "reslayerAs.", "plgatt_layer.", "mha1.layernorm1.",
                "past_G_values")


def decode_step_bytes(model, mode: str, cache_len: int, batch: int) -> int | None:
    """Bytes one decode step must read at ``cache_len`` cached rows: every weight of the
    projections, FFN, LayerNorms and LM head in its dtype (int8 + fp32 scales after
    quantize_weights), the batch's embedding rows, K and V of every layer, and G (mode 'kvg') or
    A and plgatt_layer's weights (mode 'kv'); None for mode 'none' (no cache: it re-reads the
    prompt's activations, not a streaming step)."""
    if mode not in ("kv", "kvg"):
        return None
    c = model.config
    state = model.state_dict()
    weights = sum(t.nbytes for name, t in state.items()
                  if not any(part in name for part in NOT_STREAMED))
    elem = model.dtype.itemsize
    H, d, L = c.num_attention_heads, c.head_dim, c.num_hidden_layers
    metric_rows = batch if c.has_metric_learner and not c.cache_first_G else 1
    kv = 2 * L * batch * cache_len * H * d * elem
    g = L * metric_rows * H * d * d * 4
    if mode == "kv":
        g += sum(t.nbytes for name, t in state.items() if "plgatt_layer." in name)
    return weights + batch * c.hidden_size * elem + kv + g


COPY_REPEATS = 15  # at least this many copies per byte count over a run


class CopyBandwidth:
    """``tensor.copy_`` of ``nbytes`` buffers: bytes read + written per s at the fastest copy, in
    GB/s. The fastest, not the median: it is the machine's limit that a decode step is held to.
    Sampled in rounds spread over the whole measurement (``sample`` after every round of decode
    repeats), because a shared host runs at half speed for seconds at a time: one burst of copies
    can fall entirely into a slow phase (Intel Xeon, 2 threads, 300 MB: bursts of 15 copies gave
    7.4–17 GB/s within one run) while the steps, spread over the run, did not."""

    def __init__(self, sizes, device: torch.device):
        self.device = device
        self.buffers = {}
        self.best_s = {}
        self.copies = {}
        for nbytes in sorted(set(sizes)):
            src = torch.ones(nbytes, dtype=torch.uint8, device=device)
            dst = torch.empty_like(src)
            dst.copy_(src)  # the first touch of dst's pages is not a copy's cost
            self.buffers[nbytes] = (src, dst)
            self.best_s[nbytes] = float("inf")
            self.copies[nbytes] = 0

    def sample(self, copies: int) -> None:
        """``copies`` timed copies of every buffer."""
        for nbytes, (src, dst) in self.buffers.items():
            m = measure_interleaved({"copy": functools.partial(dst.copy_, src)}, Clock(self.device),
                                    warmup=0, repeats=copies, inner=1)["copy"]
            self.best_s[nbytes] = min(self.best_s[nbytes], min(m.samples_ms) * 1e-3)
            self.copies[nbytes] += copies

    def gbps(self, nbytes: int) -> float:
        missing = COPY_REPEATS - self.copies[nbytes]
        if missing > 0:
            self.sample(missing)
        return 2 * nbytes / self.best_s[nbytes] / 1e9

    def release(self) -> None:
        self.buffers.clear()


def decode_rows_bytes(models, source, keys, modes, prompt_len: int, new_tokens: int,
                      batch: int) -> dict:
    """``{(impl, dtype, mode): bytes one decode step reads}`` (None where not defined)."""
    cache_len = prompt_len + new_tokens // 2  # the decode steps' mean
    out = {}
    for impl, dt in keys:
        model = source if impl == "reference" else models[(impl, dt)]
        for mode in modes:
            out[(impl, dt, mode)] = decode_step_bytes(model, mode, cache_len, batch)
    return out


def add_streaming_columns(rows: list[dict], step_bytes: dict, copies: CopyBandwidth) -> None:
    """``step_bytes``, ``step_gbps`` (bytes / p50 step time) and ``copy_gbps`` (a copy of a buffer
    of the same size, sampled through the same run) on every decode row; the reference's bytes
    are those of its fp32 weights (the source model's)."""
    for r in rows:
        nbytes = step_bytes[(r["impl"], r["dtype"], r["mode"])]
        r["step_bytes"] = nbytes
        if nbytes is None or not r.get("per_token_ms_p50"):
            r["step_gbps"] = r["copy_gbps"] = r["copy_fraction"] = None
            continue
        r["step_gbps"] = nbytes / (r["per_token_ms_p50"] * 1e-3) / 1e9
        r["copy_gbps"] = copies.gbps(nbytes)
        r["copy_fraction"] = r["step_gbps"] / r["copy_gbps"]


def model_description(source, cfg: GenerateConfig, device: torch.device) -> dict:
    """The fields every row of a generation suite carries about the model and the kernels' ISA."""
    c = source.config
    return {"model": f"L{c.num_hidden_layers} D{c.hidden_size} H{c.num_attention_heads} "
                     f"V{c.vocab_size}",
            "params": sum(p.numel() for p in source.parameters()),
            "weights": cfg.checkpoint or "random (seeded)",
            "cpu_isa": ops_isa(device)}


def ops_isa(device: torch.device) -> str | None:
    """The CPU kernels' ISA, which the decode step's linears (pldr::linear_small) run with, and
    their bf16/int8 rows' prefetch distance, as ``python -m pldr_kernels`` prints them; None on
    CUDA."""
    from .. import ops
    from ..__main__ import cpu_kernels_isa, row_prefetch
    if device.type != "cpu" or ops._LOAD_ERROR is not None:
        return None
    return f"{cpu_kernels_isa()}; bf16/int8 row prefetch: {row_prefetch()}"


def graphed(cfg: GenerateConfig, impl: str, mode: str) -> bool:
    return cfg.cuda_graph and impl == "pldr_kernels" and mode in ("kv", "kvg")


def timed_generate(model, ids: torch.Tensor, new_tokens: int, mode: str, use_graph: bool
                   ) -> tuple[float, list[float], float]:
    """``(ttft_ms, per-step ms, total_ms)`` of one greedy generation."""
    clock, marks = Clock(ids.device), []

    def mark(*_):  # also the forward hook
        marks.append(clock.mark())
    handle = None if use_graph else model.final_layer.register_forward_hook(mark)
    try:
        mark()
        if use_graph:
            for _ in model.generate_stream(ids, new_tokens, cache=mode, cuda_graph=True, **NO_EOS):
                mark()
        else:
            model.generate(ids, new_tokens, cache=mode, do_sample=False, **NO_EOS)
        mark()
    finally:
        if handle is not None:
            handle.remove()
    stamps = [clock.elapsed_ms(marks[0], m) for m in marks[1:]]
    steps = stamps[:-1]  # one per forward: the prompt's, then each decode step's
    return steps[0], [b - a for a, b in zip(steps, steps[1:])], stamps[-1]


def tokens_verdict(tokens: torch.Tensor, want: torch.Tensor, prompt_len: int) -> testing.Verdict:
    differ = (tokens != want).any(dim=0)
    first = f"first at new token {int(differ.nonzero()[0]) - prompt_len}" if differ.any() else ""
    return testing.Verdict("greedy tokens", not differ.any(), float(differ.sum()), 0.0,
                           "differing token positions vs the fp32 reference's", first)


def logits_verdict(model, dtype: str, ids, source, refs: dict) -> testing.Verdict:
    """The prompt's logits by the peer rule: oracle the reference model in fp64, peer it in
    ``dtype`` (both built on first use, kept in ``refs``)."""
    from ..reference_model import ReferencePLDR

    def logits(m):
        with torch.no_grad():
            out = m(ids)
        return getattr(out, "logits", out)
    oracle_dtype, peer_dtype = torch.float64, getattr(torch, dtype)
    for dt in (oracle_dtype, peer_dtype):
        if dt not in refs:
            refs[dt] = ReferencePLDR.from_model(source, dt).eval()
    return testing.compare(logits(model), logits(refs[oracle_dtype]), logits(refs[peer_dtype]),
                           name=f"{dtype} logits of the prompt")


def int8_logits_verdict(model, ids, source, refs: dict) -> testing.Verdict:
    """An int8 model's prompt logits by the peer rule against the reference holding its
    dequantised weights (oracle fp64, peer fp32): the kernels' error, not the quantisation's."""
    if "int8 source" not in refs:
        dequantized = copy.deepcopy(source)
        with torch.no_grad():
            for name, m in model.named_modules():
                if hasattr(m, "dequantized"):
                    dequantized.get_submodule(name).weight.copy_(m.dequantized())
        refs["int8 source"], refs["int8 refs"] = dequantized, {}
    return logits_verdict(model, "float32", ids, refs["int8 source"], refs["int8 refs"])


def check_and_measure_memory(models, cfg: GenerateConfig, ids, device, source, refs):
    """One untimed run per (implementation, mode) after a 2-token warm-up (one-time setup is not
    memory): ``(verdicts, memory)`` by ``(impl, dtype, mode)``."""
    prompt_len = ids.shape[1]
    memory, verdicts, ref_tokens = {}, {}, {}
    for mode in cfg.modes:
        for (impl, dt), model in models.items():
            model.generate(ids, min(2, cfg.new_tokens), cache=mode, do_sample=False, **NO_EOS)
            run = functools.partial(model.generate, ids, cfg.new_tokens, cache=mode,
                                    do_sample=False, cuda_graph=graphed(cfg, impl, mode), **NO_EOS)
            if cfg.memory:
                out, nbytes, method = run_with_peak(run, device)
                memory[(impl, dt, mode)] = (nbytes, method + ", extra over the loaded weights")
            else:
                out = run()
            if impl == "reference":  # the first entry: its tokens are the fp32 check's
                ref_tokens[mode] = out
                continue
            if dt == "int8":
                v = int8_logits_verdict(model, ids, source, refs)
            elif dt == "float32":
                want = ref_tokens[mode] if mode in ref_tokens else refs[torch.float32].generate(
                    ids, cfg.new_tokens, cache=mode, do_sample=False, **NO_EOS)
                v = tokens_verdict(out.cpu(), want.cpu(), prompt_len)
            else:
                v = logits_verdict(model, dt, ids, source, refs)
            verdicts[(impl, dt, mode)] = v
            report_disagreement(f"generate mode={mode} prompt={prompt_len}: {impl} {dt}", v)
    return verdicts, memory


def run_prompt(models, cfg: GenerateConfig, ids, device, source, refs, bar) -> list[dict]:
    verdicts, memory = check_and_measure_memory(models, cfg, ids, device, source, refs)
    bar.update(1)
    keys = list(models)
    step_bytes = decode_rows_bytes(models, source, keys, cfg.modes, ids.shape[1],
                                   cfg.new_tokens, cfg.batch_size)
    copies = CopyBandwidth([n for n in step_bytes.values() if n is not None], device)
    copies_per_round = -(-COPY_REPEATS // max(cfg.repeats, 1))
    runs = {(key, mode): [] for mode in cfg.modes for key in keys}
    for rep in range(cfg.repeats):
        for m_i, mode in enumerate(cfg.modes):
            for key in rotated(keys, rep + m_i):
                runs[(key, mode)].append(timed_generate(models[key], ids, cfg.new_tokens, mode,
                                                        graphed(cfg, key[0], mode)))
        copies.sample(copies_per_round)
        bar.update(1)
    rows = []
    for mode in cfg.modes:
        for impl, dt in keys:
            ttft, steps, total = (list(x) for x in zip(*runs[((impl, dt), mode)]))
            per_token = [x for run in steps for x in run]
            tok = summarize(per_token) if per_token else {}
            total_p50 = summarize(total)["p50"]
            v = verdicts.get((impl, dt, mode))
            nbytes, method = memory.get((impl, dt, mode), (None, None))
            rows.append({
                "bench": "generate", "impl": impl, "dtype": dt, "mode": mode,
                "prompt_len": ids.shape[1], "new_tokens": cfg.new_tokens,
                "batch": cfg.batch_size, "ttft_ms": summarize(ttft)["p50"],
                **{f"per_token_ms_{p}": tok.get(p) for p in ("p10", "p50", "p90")},
                "tokens_per_s": cfg.batch_size * cfg.new_tokens / (total_p50 / 1e3),
                "total_ms_p50": total_p50, "ttft_samples_ms": ttft, "step_ms": steps,
                "total_samples_ms": total, "peak_memory_bytes": nbytes,
                "memory_method": method, "cuda_graph": graphed(cfg, impl, mode),
                "valid": v is None or v.ok,
                "agreement": "the reference" if v is None else str(v)})
    for mode in cfg.modes:
        same_mode = [r for r in rows if r["mode"] == mode]
        add_speedups(same_mode, "per_token_ms_p50", "speedup_vs_reference")
        add_speedups(same_mode, "ttft_ms", "ttft_speedup_vs_reference")
    add_streaming_columns(rows, step_bytes, copies)
    copies.release()
    return rows


def run_generate(cfg: GenerateConfig, device: torch.device, show_progress: bool = True
                 ) -> tuple[list[dict], list[dict]]:
    models, skips, source, ref32 = load_models(cfg, device)
    if not models:
        return [], skips
    c, desc = source.config, model_description(source, cfg, device)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    refs, results = {torch.float32: ref32}, []
    with progress_bar(len(cfg.prompt_lens) * (1 + cfg.repeats), "generate", show_progress) as bar:
        for prompt_len in cfg.prompt_lens:
            if prompt_len + cfg.new_tokens > c.max_position_embeddings:
                skips.append(skipped("generate", None, "all",
                                     f"prompt {prompt_len} + {cfg.new_tokens} new tokens exceeds "
                                     f"max_position_embeddings {c.max_position_embeddings}"))
                continue
            bar.set_postfix_str(f"prompt {prompt_len}", refresh=False)
            ids = torch.randint(4, c.vocab_size, (cfg.batch_size, prompt_len), generator=gen)
            results += [{**r, **desc} for r in run_prompt(models, cfg, ids.to(device), device,
                                                          source, refs, bar)]
    return results, skips
