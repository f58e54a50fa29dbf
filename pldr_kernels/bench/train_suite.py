"""`pldr-bench train`: forward + backward, what a training step costs, against what a user would
otherwise train with.

Three parts (``--train-parts``), each contestant timed as one call that runs the forward and the
backward and returns the gradients:

* ``g_attention`` — ``pldr_kernels`` (``pldr::g_attention`` under autograd: dq, dk, dv and dG from
  ``pldr::g_attention_backward``), ``reference`` (autograd of the oracle's math), ``eager`` (the
  authors' formulation in the working dtype) and ``sdpa_<backend>`` (q̃ = q·G, then SDPA pinned
  to that backend with ``sdpa_kernel``; the q·G GEMM and its backward inside the timed call, so
  every contestant returns the same four gradients). The incoming gradient of out is fixed.
* ``metric_tensors`` — ``pldr_kernels`` (``pldr::metric_tensors`` and its backward: the gradients
  of q and of all 15 weights) against ``reference``, the eager metric learner under autograd, for
  a gradient arriving at G (the one output a training loss reaches).
* ``model`` — one training step, ``model.zero_grad(); model(ids, labels=ids).loss.backward()``
  (the optimiser step, the same for both, left out), of ``PLDRForCausalLM`` against the authors'-
  style ``ReferencePLDR`` with the same weights (the paper's 110M configuration unless
  ``--model-config``); tokens/s. ``--dtypes bfloat16`` runs both under ``torch.autocast``.

Before timing, each contestant's first call is judged against fp64 (a failure marks its row
invalid): the attention gradients by ``testing.check_g_attention_grads``; the metric learner's
by ``testing.check_metric_grads_given_a`` for the CPU kernel (the per-case guarantee it makes) and
by ``testing.check_metric_tensors_grads`` otherwise; the model's loss by the peer rule against the
fp64 reference model (the fp32 reference model its peer), and its gradients against fp64
autograd by the statistical form of the rule (tests/test_training.py's): on
``MODEL_GRAD_CHECK_WINDOWS`` windows of ``MODEL_GRAD_CHECK_LEN`` tokens of the batch (the fp64
backward at full length would hold twice the fp32 reference's activations), the median of the
largest relative error over the parameters ≤ 2 × the fp32 reference model's median + 1e-5.

Peak memory (``--no-memory`` skips it): ``measure.run_with_peak``, the largest sum of the bytes
torch's CPU allocator hands out during one call (torch.profiler allocation events, on one
thread; on CUDA the caching allocator's peak) beyond what existed before: gradients, saved
activations and temporaries, not the inputs or the parameters.
"""
from __future__ import annotations

import functools
import itertools
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from .. import ops as pk_ops
from .. import reference, testing
from .measure import Clock, measure_interleaved, progress_bar, run_with_peak
from .ops_suite import (
    CAUSAL,
    SDPA_BACKENDS,
    add_speedups,
    eager,
    kernel_missing,
    premultiply,
    report_disagreement,
    selected,
    skipped,
    visible_pairs,
)

PARTS = ("g_attention", "metric_tensors", "model")
MODEL_GRAD_CHECK_LEN = 128  # tokens of the batch the model's gradients are judged on (fp64)
# Windows of the batch judged (the statistical form): at the authors' initialisation the ratio to
# the peer's error moves a lot from window to window (the 110M model at the bench's seed, an Intel
# Xeon, the linears on torch's GEMMs: 3.6x, 1.4x, 1.9x the peer's in three windows of one batch).
MODEL_GRAD_CHECK_WINDOWS = 3


@dataclass(frozen=True)
class TrainCase:
    """One measured case; its fields are columns of its result rows."""
    part: str
    B: int
    S: int
    H: int
    d: int
    dtype: str
    causal: bool = True

    def label(self) -> str:
        return f"B{self.B} S{self.S} H{self.H} d{self.d}"


@dataclass
class TrainConfig:
    """The sweep; a field is set by the ``pldr-bench`` option of the same name."""
    train_parts: Sequence[str] = PARTS
    batch: Sequence[int] = (1,)
    seqlens: Sequence[int] = (1024,)
    heads: int = 14
    head_dims: Sequence[int] = (64,)
    dtypes: Sequence[str] = ("float32",)
    causal: str = "yes"  # a key of ops_suite.CAUSAL (the attention part)
    warmup: int = 1
    repeats: int = 10
    contestants: Sequence[str] | None = None
    memory: bool = True
    model_config: Sequence[tuple[str, object]] = ()  # PLDRConfig fields of the random model
    seed: int = 0


QUICK = dict(seqlens=(128,), repeats=3, warmup=0)


def cases(cfg: TrainConfig) -> list[TrainCase]:
    out = []
    for part in cfg.train_parts:
        heads = (cfg.heads,) if part != "model" else (None,)
        dims = cfg.head_dims if part != "model" else (None,)
        masks = CAUSAL[cfg.causal] if part == "g_attention" else (True,)
        for B, S, H, d, dt, causal in itertools.product(cfg.batch, cfg.seqlens, heads, dims,
                                                         cfg.dtypes, masks):
            out.append(TrainCase(part, B, S, H, d, dt, causal))
    return out


def work(case: TrainCase) -> float | None:
    """FLOPs of one forward + backward, by FlashAttention's convention for attention (the
    backward's five matmuls = 2.5 × the forward's two) plus q·G and its two backward GEMMs; the
    metric learner's backward counted as twice its forward; None for the model (tokens/s)."""
    B, S, H, d = case.B, case.S, case.H, case.d
    if case.part == "g_attention":
        return 14.0 * B * H * d * visible_pairs(S, S, case.causal) + 6.0 * B * S * H * d * d
    if case.part == "metric_tensors":
        R, Gd, Fd = testing.NUM_RESLAYER_A, testing.NUM_DENSE_A, testing.A_DFF
        forward = 2.0 * B * S * H * d * d + B * H * d * R * Gd * 6 * d * Fd + 4 * B * H * d ** 3
        return 3 * forward
    return None


# ---- contestants: name → the call to time (it returns the gradients), or why it cannot run -----
Contestants = dict[str, Callable[[], object] | str]


def backward_missing(op: str, device: torch.device) -> str | None:
    """Why ``pldr::<op>`` or its backward cannot run on ``device`` (None when both can)."""
    missing = kernel_missing(op, device)
    if missing is None and device.type not in testing.available_backends(f"{op}_backward"):
        missing = (f"this build has no {device.type.upper()} kernel for pldr::{op}_backward "
                   "(`python -m pldr_kernels` tells how it was built)")
    return missing


def attention_grads(forward: Callable, q, k, v, G, dout) -> Callable[[], tuple]:
    """A call: ``forward(q, k, v, G)`` → out under autograd, then ``(dq, dk, dv, dG)`` for the
    incoming gradient ``dout``."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v, G)]

    def run():
        out = forward(*leaves)
        return torch.autograd.grad(out, leaves, dout)
    return run


def sdpa_forward(backend, causal: bool):
    def forward(q, k, v, G):
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(premultiply(q, G), k.transpose(1, 2),
                                                 v.transpose(1, 2), is_causal=causal)
        return out.transpose(1, 2)
    return forward


def prepare_attention(case: TrainCase, device, gen, cfg: TrainConfig):
    dtype = getattr(torch, case.dtype)
    q, k, v = testing.random_attention_inputs(case.B, case.S, case.S, case.H, case.d, dtype,
                                              device, gen)
    G = testing.random_g(case.B, case.H, case.d, device, gen)
    dout = testing.randn(q.shape, dtype, device, gen)
    causal = case.causal
    forwards = {
        "pldr_kernels": lambda q, k, v, G: pk_ops.g_attention(q, k, v, G, None, causal)[0],
        "reference": lambda q, k, v, G: reference.g_attention(q, k, v, G, None, causal)[0],
        "eager": lambda q, k, v, G: eager(q, k, v, G, causal),
    }
    for backend in SDPA_BACKENDS[device.type]:
        forwards[f"sdpa_{backend.name.lower().removesuffix('_attention')}"] = sdpa_forward(
            backend, causal)
    contestants: Contestants = {n: attention_grads(f, q, k, v, G, dout)
                                for n, f in forwards.items()}
    contestants["pldr_kernels"] = (backward_missing("g_attention", device)
                                   or contestants["pldr_kernels"])
    oracle = functools.cache(lambda: grads_by_heads(testing.g_attention_grad_oracle, dout, q, k,
                                                    v, G, causal))
    peer = functools.cache(lambda: grads_by_heads(testing.g_attention_grad_peer, dout, q, k, v,
                                                  G, causal))

    def judge(name, grads):
        return testing.check_g_attention_grads(grads, dout, q, k, v, G, causal=causal,
                                               oracle=oracle(), peer=peer())
    return contestants, judge


def grads_by_heads(fn, dout, q, k, v, G, causal: bool) -> tuple:
    """``fn(dout, q, k, v, G, None, causal)`` → ``(dq, dk, dv, dG)`` over slices of heads, so that
    the S×S scores of an fp64 oracle stay small (heads are independent, dG per head too)."""
    from .ops_suite import ORACLE_CHUNK_ELEMENTS

    B, S, H, _ = q.shape
    step = max(1, min(H, ORACLE_CHUNK_ELEMENTS // max(1, B * S * k.shape[1])))
    parts = [fn(*(t[:, :, h:h + step] for t in (dout, q, k, v)), G[:, h:h + step], None, causal)
             for h in range(0, H, step)]
    return tuple(torch.cat([p[i] for p in parts], dim=1 if i == 3 else 2) for i in range(4))


def prepare_metric(case: TrainCase, device, gen, cfg: TrainConfig):
    dtype = getattr(torch, case.dtype)
    q = testing.randn((case.B, case.S, case.H, case.d), dtype, device, gen)
    weights = {k: w.to(device) for k, w in testing.make_metric_weights(case.d, case.H,
                                                                       generator=gen).items()}
    grad_G = testing.randn((case.B, case.H, case.d, case.d), torch.float32, device, gen)
    grad_outputs = (None, None, grad_G)

    def grads_call(forward):
        leaves = [q.detach().requires_grad_(),
                  *(w.detach().requires_grad_() for w in testing.metric_args(weights))]

        def run():
            G = forward(leaves[0], None, *leaves[1:])[2]
            return torch.autograd.grad(G, leaves, grad_G)
        return run
    contestants: Contestants = {"pldr_kernels": grads_call(pk_ops.metric_tensors),
                                "reference": grads_call(reference.metric_tensors)}
    contestants["pldr_kernels"] = (backward_missing("metric_tensors", device)
                                   or contestants["pldr_kernels"])

    def judge(name, grads):
        if name == "pldr_kernels" and device.type == "cpu":
            with torch.no_grad():
                A = pk_ops.metric_tensors(q, None, *testing.metric_args(weights))[0]
            return testing.check_metric_grads_given_a(grads, grad_outputs, q, None, weights, A)
        return testing.check_metric_tensors_grads(grads, grad_outputs, q, None, weights)
    return contestants, judge


def autocast_to(dtype: torch.dtype, device: torch.device):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def training_step(model, ids, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    def step():
        model.zero_grad(set_to_none=True)
        with autocast_to(dtype, ids.device):
            loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach()
    return step


def load_models(cfg: TrainConfig, device):
    from ..config import PLDRConfig
    from ..model import PLDRForCausalLM
    from ..reference_model import ReferencePLDR

    torch.manual_seed(cfg.seed)
    source = PLDRForCausalLM(PLDRConfig(**dict(cfg.model_config))).to(device).train()
    return source, ReferencePLDR.from_model(source, torch.float32).train()


def check_windows(ids):
    """Up to MODEL_GRAD_CHECK_WINDOWS disjoint windows of MODEL_GRAD_CHECK_LEN tokens of ``ids``
    (one shorter window when the batch is shorter)."""
    n = MODEL_GRAD_CHECK_LEN
    starts = range(0, max(ids.shape[1] - n, 0) + 1, n)
    return [ids[:, s:s + n] for s in list(starts)[:MODEL_GRAD_CHECK_WINDOWS]]


def prepare_model(case: TrainCase, device, gen, cfg: TrainConfig, models):
    from ..reference_model import ReferencePLDR

    ours, ref32 = models
    c = ours.config
    if case.S > c.max_position_embeddings:
        reason = f"S{case.S} exceeds max_position_embeddings {c.max_position_embeddings}"
        return {"pldr_kernels": reason, "reference": reason}, None
    dtype = getattr(torch, case.dtype)
    ids = torch.randint(4, c.vocab_size, (case.B, case.S), generator=gen).to(device)
    contestants: Contestants = {"pldr_kernels": training_step(ours, ids, dtype),
                                "reference": training_step(ref32, ids, dtype)}
    missing = next(filter(None, (backward_missing(op, device)
                                 for op in ("g_attention", "metric_tensors"))), None)
    contestants["pldr_kernels"] = missing or contestants["pldr_kernels"]

    def judge(name, loss):
        oracle_model = ReferencePLDR.from_model(ours, torch.float64).train()
        with torch.no_grad():
            want = oracle_model(ids, labels=ids).loss
            with autocast_to(dtype, device):
                peer = ref32(ids, labels=ids).loss
        parts = [testing.compare(loss, want, peer, name=f"{case.dtype} loss")]
        if name == "pldr_kernels":
            parts.append(model_grads_verdict(ours, ref32, oracle_model,
                                             check_windows(ids), dtype))
        for model in (ours, ref32):
            model.zero_grad(set_to_none=True)
        return testing.Verdict.combine("training step", parts)
    return contestants, judge


def model_grads_verdict(ours, peer_model, oracle_model, windows: list, dtype) -> testing.Verdict:
    """Over the token ``windows``: the median of the largest relative gradient error over the
    parameters (max|g − fp64| / max|fp64|) ≤ 2 × the peer model's median + 1e-5 (docs/design.md
    §4.5: behind the power stage every gradient inherits its amplification of rounding, so the
    per-parameter rule is for well-conditioned cases, and one window decides nothing)."""
    def grads(model, ids, autocast_dtype):
        training_step(model, ids, autocast_dtype)()
        return {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    def largest(got, want):
        return max((got[n].double() - w).abs().max().item() / max(w.abs().max().item(), 1e-30)
                   for n, w in want.items())

    errs, peer_errs = [], []
    for ids in windows:
        want = grads(oracle_model, ids, torch.float32)
        errs.append(largest(grads(ours, ids, dtype), want))
        peer_errs.append(largest(grads(peer_model, ids, dtype), want))
    err, peer_err = statistics.median(errs), statistics.median(peer_errs)
    bound = 2 * peer_err + testing.FP32_REL_TOL
    shown = ", ".join(f"{e:.2e}/{p:.2e}" for e, p in zip(errs, peer_errs))
    return testing.Verdict(
        f"gradients on {len(windows)} window{'s' if len(windows) > 1 else ''} of "
        f"{windows[0].shape[1]} tokens", err <= bound, err,
        bound, f"median of the largest relative error over the parameters <= 2 x the reference "
        f"model's median {peer_err:.3e} + {testing.FP32_REL_TOL:g}; per window ours/reference: "
        f"{shown}")


# ---- one case ----------------------------------------------------------------------------------
def run_case(case: TrainCase, device: torch.device, cfg: TrainConfig, clock: Clock,
             skips: list[dict], models=None) -> list[dict]:
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    if case.part == "g_attention":
        contestants, judge = prepare_attention(case, device, gen, cfg)
    elif case.part == "metric_tensors":
        contestants, judge = prepare_metric(case, device, gen, cfg)
    else:
        contestants, judge = prepare_model(case, device, gen, cfg, models)
    contestants = {n: c for n, c in contestants.items() if selected(n, cfg.contestants)}
    shape = f"{case.label()} {case.dtype}"
    live, verdicts = {}, {}
    for name, fn in contestants.items():
        if isinstance(fn, str):
            skips.append(skipped("train", case.part, name, fn))
            continue
        try:
            out = fn()
            clock.synchronize()
        except Exception as exc:  # e.g. an SDPA backend that does not take these inputs
            first_line = (str(exc).splitlines() or [""])[0][:200]
            skips.append(skipped("train", case.part, name,
                                 f"{shape}: {type(exc).__name__}: {first_line}"))
            continue
        live[name], verdicts[name] = fn, judge(name, out)
        del out
        report_disagreement(f"train {case.part} {shape}: {name}", verdicts[name])
    memory = {n: run_with_peak(fn, device)[1:] for n, fn in live.items()} if cfg.memory else {}
    flops = work(case)
    rows = []
    for name, m in measure_interleaved(live, clock, cfg.warmup, cfg.repeats).items():
        stats = m.stats
        seconds = stats["p50"] * 1e-3
        peak, method = memory.get(name, (None, None))
        rows.append({
            "bench": "train", **asdict(case), "impl": name,
            **{f"time_ms_{p}": t for p, t in stats.items()},
            "samples_ms": m.samples_ms, "calls_per_sample": m.inner,
            "tflops": flops / seconds / 1e12 if flops else None,
            "tokens_per_s": case.B * case.S / seconds if case.part == "model" else None,
            "peak_extra_bytes": peak, "memory_method": method,
            "valid": verdicts[name].ok, "agreement": str(verdicts[name])})
    add_speedups(rows, "time_ms_p50", "speedup_vs_reference")
    ours = next((r for r in rows if r["impl"] == "pldr_kernels"), None)
    for r in rows:
        if ours and r is not ours and r["peak_extra_bytes"] and ours["peak_extra_bytes"]:
            r["pldr_kernels_memory_ratio"] = ours["peak_extra_bytes"] / r["peak_extra_bytes"]
    others = [r for r in rows if r["valid"] and r["impl"] not in ("pldr_kernels", "reference")]
    if ours and others:
        best = min(others, key=lambda r: r["time_ms_p50"])
        ours["best_other"] = best["impl"]
        ours["speedup_vs_best_other"] = best["time_ms_p50"] / ours["time_ms_p50"]
    return rows


def run_train(cfg: TrainConfig, device: torch.device, show_progress: bool = True
              ) -> tuple[list[dict], list[dict]]:
    clock, skips, results = Clock(device), [], []
    todo = cases(cfg)
    models = load_models(cfg, device) if any(c.part == "model" for c in todo) else None
    with progress_bar(len(todo), "train", show_progress) as bar:
        for case in todo:
            bar.set_postfix_str(f"{case.part} {case.label()} {case.dtype}", refresh=False)
            rows = run_case(case, device, cfg, clock, skips, models)
            if case.part == "model" and rows:
                c = models[0].config
                desc = {"model": f"L{c.num_hidden_layers} D{c.hidden_size} "
                                 f"H{c.num_attention_heads} V{c.vocab_size}",
                        "params": sum(p.numel() for p in models[0].parameters())}
                rows = [{**r, **desc} for r in rows]
            results += rows
            bar.update(1)
    unique = {(s["op"], s["impl"], s["reason"]): s for s in skips}
    return results, list(unique.values())
