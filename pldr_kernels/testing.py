"""What decides "correct" in pldr-kernels, shipped with the package (like ``torch.testing``).

The tests, the benchmark harness and users checking their own integration use the same pieces:

* **inputs** — ``random_attention_inputs``, ``random_g``, ``random_kv_cache``,
  ``make_metric_weights``, ``metric_args``: realistic data (a G near the identity, caches whose
  unused rows are NaN, xavier-initialised metric-learner weights with power exponents of both
  signs), not degenerate values;
* **peers** — one same-dtype PyTorch formulation per op (``g_attention_peer``,
  ``g_attention_decode_peer``, ``metric_tensors_peer``): what a user would write in plain PyTorch
  in the kernel's dtype; its error against fp64 sets the bound for low-precision kernels;
* **the rule** (docs/design.md §4) — ``compare`` returns a :class:`Verdict`; ``check_g_attention``,
  ``check_g_attention_decode`` and ``check_metric_tensors`` apply it to every output of an op
  against ``pldr_kernels.reference`` run in fp64;
* **gradients** — ``g_attention_grad_oracle`` (fp64 autograd of the reference),
  ``g_attention_grad_peer`` (autograd of the peer) and ``check_g_attention_grads``: the same rule
  for every gradient of ``g_attention`` (docs/design.md §4.5);
* **gradients** (docs/design.md §4.5) — ``metric_tensors_grads`` (autograd of the reference, fp64 =
  the oracle), ``metric_tensors_grad_peer`` (the same in fp32), ``check_metric_tensors_grads``,
  ``check_metric_tensors_grads_over_seeds`` (the statistical form for losses through G) and
  ``check_metric_grads_given_a`` (stage by stage from the kernel's own A);
* **linear_small** — ``random_linear_small_weight`` (fp32, bf16 or int8 with its scales) and
  ``check_linear_small`` (the peer rule for ``linear_small`` / ``swiglu_small``);
* **backends** — ``available_backends(op)``: which devices this build can run an op on.

The rule: fp32 outputs within ``FP32_REL_TOL`` · max|oracle| of the fp64 oracle; low-precision
outputs within 2 × (the peer's error against the oracle) + ``LOW_PRECISION_FLOOR``. Non-finite
entries must be non-finite in the same places with the same value (NaN where NaN, ±inf where ±inf);
``check_nonfinite`` is that rule for inputs holding NaN or Inf, against the oracle with the keys a
row does not see removed (``reference.g_attention(..., visible_only=True)``).
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from . import reference

Tensor = torch.Tensor

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FP32_REL_TOL = 1e-5
LOW_PRECISION_FLOOR = 1e-5
OPS = ("metric_tensors", "g_attention", "g_attention_decode")
# Ops that only the registered autograd formulas call (docs/design.md §3.4).
BACKWARD_OPS = ("g_attention_backward", "metric_tensors_backward")
# CPU-only ops: the decode step's linears (§3.9), the LM head's loss rows (§3.10), the
# training step's transposed copies (§3.11) and the decode step's fused layer (§3.12).
CPU_OPS = ("linear_small", "swiglu_small", "cross_entropy_forward", "cross_entropy_backward",
           "transpose_2d", "decode_layer")
METRIC_WEIGHT_ORDER = ("ln0_w", "ln0_b", "w1", "b1", "w2", "b2", "w3", "b3", "lnA_w", "lnA_b", "W",
                       "b", "pw", "a", "ba")
# The paper's 110M model (docs/spec.md §1): the metric learner's shape.
A_DFF, NUM_RESLAYER_A, NUM_DENSE_A = 170, 8, 2


# --------------------------------------------------------------------------------------------
# Verdicts
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    """The outcome of the rule for one output (or, with ``parts``, for all outputs of an op).

    Truthy when it passes; ``str()`` says what was compared, the error, the bound and the rule, and
    for a failure the worst entries. ``assert_ok()`` raises AssertionError with that text."""
    name: str
    ok: bool
    max_abs_err: float
    bound: float
    rule: str
    worst: str = ""
    parts: tuple[Verdict, ...] = field(default=())

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        if self.parts:
            shown = [p for p in self.parts if not p.ok] or [self.worst_part()]
            head = "ok" if self.ok else f"{len(shown)} of {len(self.parts)} outputs disagree"
            return f"{self.name}: {head}; " + "; ".join(str(p) for p in shown)
        text = (f"{self.name}: max abs error {self.max_abs_err:.3e} "
                f"{'<=' if self.ok else '>'} bound {self.bound:.3e} ({self.rule})")
        return text + (f"; worst: {self.worst}" if self.worst else "")

    def worst_part(self) -> Verdict:
        """The part closest to (or furthest past) its bound."""
        def ratio(v: Verdict) -> float:
            if v.max_abs_err == 0:
                return 0.0
            return math.inf if v.bound <= 0 else v.max_abs_err / v.bound
        return max(self.parts, key=ratio) if self.parts else self

    def assert_ok(self) -> None:
        if not self.ok:
            raise AssertionError(str(self))

    @staticmethod
    def combine(name: str, parts: Sequence[Verdict]) -> Verdict:
        parts = tuple(parts)
        worst = max(parts, key=lambda v: (not v.ok, v.max_abs_err / v.bound if v.bound > 0
                                          else (math.inf if v.max_abs_err else 0.0)))
        return Verdict(name, all(p.ok for p in parts), worst.max_abs_err, worst.bound,
                       worst.rule, parts=parts)


def _max_abs(x: Tensor) -> float:
    return x.abs().max().item() if x.numel() else 0.0


def _worst_entries(o: Tensor, r: Tensor, n: int = 5) -> str:
    diff = (o - r).abs().flatten()
    idx = torch.topk(diff, min(n, diff.numel())).indices.tolist()
    of, rf = o.flatten(), r.flatten()
    return ", ".join(f"[{i}] got {of[i].item():.6g} want {rf[i].item():.6g}" for i in idx)


def _position(index: int, shape: tuple[int, ...]) -> str:
    """A flat index as ``[i, j, ...]`` of ``shape``."""
    coords = []
    for n in reversed(shape):
        index, c = divmod(index, n)
        coords.append(c)
    return "[" + ", ".join(map(str, reversed(coords))) + "]"


def _nonfinite_pattern(name: str, o: Tensor, r: Tensor) -> Verdict:
    """Whether ``o`` is NaN exactly where ``r`` is and ±Inf exactly where ``r`` has that Inf
    (both already float64 on the CPU, same shape)."""
    bad = (o.isnan() != r.isnan()) | (o.isposinf() != r.isposinf()) | (
        o.isneginf() != r.isneginf())
    n_bad = int(bad.sum())
    if n_bad == 0:
        return Verdict(name, True, 0.0, 0.0, "non-finite entries as the oracle's")
    shape = tuple(o.shape)
    idx = bad.flatten().nonzero()[:5, 0].tolist()
    of, rf = o.flatten(), r.flatten()
    where = ", ".join(f"{_position(i, shape)} got {of[i].item():.6g} want {rf[i].item():.6g}"
                      for i in idx)
    counts = ", ".join(f"{what} got {int(f(o).sum())} want {int(f(r).sum())}" for what, f in
                       (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)))
    return Verdict(name, False, math.inf, 0.0,
                   f"{n_bad} entries non-finite where the oracle's are not, or the other way round "
                   f"({counts})", where)


def compare(out: Tensor, oracle: Tensor, peer: Tensor | None = None, *, name: str = "out",
            rel_tol: float = FP32_REL_TOL, floor: float = LOW_PRECISION_FLOOR) -> Verdict:
    """The rule of docs/design.md §4 for one output.

    Non-finite entries first: NaN exactly where the oracle has NaN, ±Inf exactly where it has that
    Inf. Then the finite entries: ``peer`` None, the fp32 rule, max|out − oracle| ≤ rel_tol ·
    max|oracle|; otherwise the peer rule, max|out − oracle| ≤ 2 · max|peer − oracle| + floor,
    where ``peer`` is the same math done by PyTorch in the kernel's dtype (one of the ``*_peer``
    functions), its error measured where it is finite."""
    if tuple(out.shape) != tuple(oracle.shape):
        return Verdict(name, False, math.inf, 0.0,
                       f"shape {tuple(out.shape)} differs from the oracle's {tuple(oracle.shape)}")
    o, r = out.detach().double().cpu(), oracle.detach().double().cpu()
    pattern = _nonfinite_pattern(name, o, r)
    if not pattern:
        return pattern
    finite = torch.isfinite(r)
    o, r = o[finite], r[finite]
    err = _max_abs(o - r)
    if peer is None:
        scale = _max_abs(r)
        bound = rel_tol * max(scale, 1e-30)
        rule = f"fp32 rule: {rel_tol:g} x max|oracle| {scale:.3e}"
    else:
        # A peer in plain PyTorch may give 0·NaN = NaN for a masked key (reference.g_attention's
        # visible_only): leaving such entries out only lowers the bound.
        peer_error = (peer.detach().double().cpu()[finite] - r).abs()
        peer_err = _max_abs(peer_error[torch.isfinite(peer_error)])
        bound = 2 * peer_err + floor
        rule = f"peer rule: 2 x same-dtype PyTorch error {peer_err:.3e} + {floor:.3g}"
    ok = err <= bound
    return Verdict(name, ok, err, bound, rule, "" if ok else _worst_entries(o, r))


def check_nonfinite(actual: Tensor | Sequence[Tensor], expected: Tensor | Sequence[Tensor],
                    peer: Tensor | Sequence[Tensor] | None = None, *,
                    names: Sequence[str] = ("out", "lse")) -> Verdict:
    """The NaN rule of the attention ops (docs/design.md §3.5), for inputs with NaN or ±Inf in
    any element: each output (``actual``: a tensor, or a sequence such as ``(out, lse)``, named by
    ``names``) is NaN exactly where ``expected`` is NaN and ±Inf exactly where it has that Inf
    (so a NaN stays in its batch row, head and query row, and no finite-but-wrong value stands
    where the oracle has NaN); its finite entries then meet the rule of :func:`compare` (the fp32
    rule, or the peer rule with ``peer``, the ``*_peer`` outputs on the same inputs).

    ``expected`` must be the fp64 oracle with the keys a row does not see removed:
    ``reference.g_attention(q.double(), …, visible_only=True)`` or
    ``reference.g_attention_decode(…, visible_only=True)``. The plain reference lets a NaN in a
    masked V row through (0·NaN = NaN); the kernels never let masked or causally hidden keys
    contribute."""
    single = isinstance(actual, Tensor)
    actual = [actual] if single else list(actual)
    expected = [expected] if isinstance(expected, Tensor) else list(expected)
    peers = [None] * len(actual) if peer is None else (
        [peer] if isinstance(peer, Tensor) else list(peer))
    if not len(actual) == len(expected) == len(peers):
        raise ValueError(f"check_nonfinite: {len(actual)} outputs, {len(expected)} expected, "
                         f"{len(peers)} peers; give one of each per output")
    parts = []
    for name, a, e, pe in zip(names, actual, expected, peers, strict=False):
        if tuple(a.shape) != tuple(e.shape):
            parts.append(compare(a, e, name=name))  # the shape verdict
            continue
        pattern = _nonfinite_pattern(f"{name} (non-finite entries)", a.detach().double().cpu(),
                                     e.detach().double().cpu())
        parts.append(pattern if not pattern else compare(a, e, pe, name=f"{name} (finite)"))
    return Verdict.combine("NaN rule", parts)


def assert_close(out: Tensor, oracle: Tensor, peer: Tensor | None = None, **kw) -> None:
    """``compare(...)`` that raises AssertionError (with the worst entries) when it fails."""
    compare(out, oracle, peer, **kw).assert_ok()


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
def randn(shape, dtype=torch.float32, device="cpu", generator=None) -> Tensor:
    """Standard normal values drawn on the CPU (same values on every device for a seed), then
    moved and cast."""
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


def random_attention_inputs(B: int, Sq: int, Sk: int, H: int, d: int, dtype=torch.float32,
                            device="cpu", generator=None, *, kv_heads: int | None = None
                            ) -> tuple[Tensor, Tensor, Tensor]:
    """``q [B,Sq,H,d]``, ``k, v [B,Sk,H_kv,d]`` standard normal in ``dtype``; ``kv_heads``
    (H_kv, dividing H; default H) for grouped-query / multi-query attention."""
    H_kv = H if kv_heads is None else kv_heads
    return (randn((B, Sq, H, d), dtype, device, generator),
            randn((B, Sk, H_kv, d), dtype, device, generator),
            randn((B, Sk, H_kv, d), dtype, device, generator))


def random_g(B: int, H: int, d: int, device="cpu", generator=None) -> Tensor:
    """A well-conditioned fp32 G near the identity, as learned G_LM tends to be in scale.

    Drawn on the CPU (from ``generator``, else the global CPU RNG) and then moved, so a seed gives
    the same G on every device."""
    noise = torch.randn(B, H, d, d, generator=generator).to(device)
    return (torch.eye(d, device=device) + 0.3 * noise / math.sqrt(d)).float()


def random_kv_cache(B: int, Smax: int, H: int, d: int, lens: Sequence[int],
                    dtype=torch.float32, starts: Sequence[int] | None = None,
                    fill: float = math.nan, device="cpu",
                    generator=None) -> tuple[Tensor, Tensor]:
    """``k_cache, v_cache [B,Smax,H,d]`` for ``g_attention_decode`` (H: the kv heads, H_kv
    for grouped-query attention): row b holds standard normal
    keys/values in ``[starts[b], lens[b])`` and ``fill`` elsewhere (NaN by default, so a kernel
    that reads a row it must not shows it in its output)."""
    k_cache = torch.full((B, Smax, H, d), fill).to(dtype)
    v_cache = torch.full((B, Smax, H, d), fill).to(dtype)
    for b, n in enumerate(lens):
        s0 = 0 if starts is None else starts[b]
        k_cache[b, s0:n] = randn((n - s0, H, d), dtype, generator=generator)
        v_cache[b, s0:n] = randn((n - s0, H, d), dtype, generator=generator)
    return k_cache.to(device), v_cache.to(device)


def make_metric_weights(d: int = 64, H: int = 14, R: int = NUM_RESLAYER_A, Gd: int = NUM_DENSE_A,
                        F: int = A_DFF, device="cpu",
                        generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """fp32 metric-learner + PLGA weights in the packed layout of ``pldr::metric_tensors``
    (docs/design.md §3.1).

    Linear weights are xavier-uniform like the authors' init; LayerNorm affines near (1, 0); the
    power exponents pw spread over both signs so the power stage is exercised (docs/spec.md §5.1).
    """
    def u(shape, bound):
        return (torch.rand(shape, generator=generator) * 2 - 1) * bound

    xav_in = math.sqrt(6.0 / (d + F))
    xav_sq = math.sqrt(6.0 / (2 * d))
    w = dict(
        ln0_w=1 + 0.1 * u((d,), 1), ln0_b=0.1 * u((d,), 1),
        w1=u((R, Gd, F, d), xav_in), b1=0.05 * u((R, Gd, F), 1),
        w2=u((R, Gd, F, d), xav_in), b2=0.05 * u((R, Gd, F), 1),
        w3=u((R, Gd, d, F), xav_in), b3=0.05 * u((R, Gd, d), 1),
        lnA_w=1 + 0.1 * u((R, d), 1), lnA_b=0.1 * u((R, d), 1),
        W=u((H, d, d), xav_sq), b=0.1 * u((H, d, d), 1),
        pw=u((H, d, d), 1.0), a=u((H, d, d), xav_sq), ba=0.1 * u((H, d, d), 1),
    )
    return {k: v.to(device=device, dtype=torch.float32) for k, v in w.items()}


def metric_args(weights: dict[str, Tensor], dtype=None) -> list[Tensor]:
    """Weights in the positional order of ``pldr::metric_tensors`` (after q, q_mask)."""
    return [weights[k] if dtype is None else weights[k].to(dtype) for k in METRIC_WEIGHT_ORDER]


# --------------------------------------------------------------------------------------------
# Peers: the same math in plain PyTorch, in the kernel's dtype
# --------------------------------------------------------------------------------------------
def g_attention_peer(q: Tensor, k: Tensor, v: Tensor, G: Tensor | None = None,
                     key_mask: Tensor | None = None, causal: bool = False,
                     scale: float | None = None) -> tuple[Tensor, Tensor]:
    """``g_attention`` as a user writes it in q's dtype (the HF port's eager path):
    q̃ = q·G in fp32 rounded once to the dtype, scores from a dtype matmul, softmax in fp32, P
    rounded to the dtype, P·V as a dtype matmul. Returns ``(out [B,Sq,H,d], lse [B,H,Sq] fp32)``."""
    dt = q.dtype
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qt = reference.apply_g(q, G).to(dt).permute(0, 2, 1, 3)
    k, v = (reference.repeat_kv(t, q.shape[2]) for t in (k, v))  # grouped-query attention
    scores = torch.matmul(qt, k.permute(0, 2, 3, 1)).float() * scale
    p, lse = reference.masked_softmax(scores, key_mask, causal)
    out = torch.matmul(p.to(dt), v.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)
    return out.contiguous(), lse


def _decode_rows(cache_seqlens: Tensor, cache_start: Tensor | None, B: int):
    lens = cache_seqlens.to(torch.int64).tolist()
    starts = [0] * B if cache_start is None else cache_start.to(torch.int64).tolist()
    return lens, starts


def g_attention_decode_peer(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                            k_new: Tensor | None = None, v_new: Tensor | None = None,
                            cache_start: Tensor | None = None, G: Tensor | None = None,
                            scale: float | None = None) -> Tensor:
    """``g_attention_decode`` in plain PyTorch in q's dtype: the append done on copies of the
    caches (the arguments are not modified), then :func:`g_attention_peer` per batch row over its
    visible rows, causal inside the new block."""
    B, Sn = q.shape[:2]
    lens, starts = _decode_rows(cache_seqlens, cache_start, B)
    kc, vc = k_cache.clone(), v_cache.clone()
    if k_new is not None:
        for b in range(B):
            kc[b, lens[b]:lens[b] + Sn] = k_new[b]
            vc[b, lens[b]:lens[b] + Sn] = v_new[b]
    appended = Sn if k_new is not None else 0
    out = torch.empty_like(q)
    for b in range(B):
        s0, s1 = starts[b], lens[b] + appended
        Gb = None if G is None else G[b if G.shape[0] > 1 else 0][None]
        out[b] = g_attention_peer(q[b:b + 1], kc[b:b + 1, s0:s1], vc[b:b + 1, s0:s1], Gb,
                                  causal=True, scale=scale)[0][0]
    return out


def metric_tensors_peer(q: Tensor, q_mask: Tensor | None, *weights: Tensor,
                        eps_ln: float = reference.LN_EPS, eps_adj: float = reference.EPS_ADJ
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """The metric learner in plain PyTorch fp32 — the op's only compute dtype (docs/spec.md §5)."""
    return reference.metric_tensors(q, q_mask, *(w.float() for w in weights), eps_ln=eps_ln,
                                    eps_adj=eps_adj)


def metric_tensors_grads(grad_outputs: Sequence[Tensor | None], q: Tensor, q_mask: Tensor | None,
                         weights: dict[str, Tensor], eps_ln: float = reference.LN_EPS,
                         eps_adj: float = reference.EPS_ADJ, *,
                         dtype: torch.dtype = torch.float64) -> tuple[Tensor, ...]:
    """PyTorch autograd of ``reference.metric_tensors`` with q and the weights cast to ``dtype``:
    the gradients of q and of each weight (``METRIC_GRAD_NAMES`` order) from ``grad_outputs`` =
    (grad_A, grad_A_LM, grad_G), None counting as zero. fp64 is the oracle of the op's backward
    (docs/design.md §4.5)."""
    leaves = [q.detach().to(dtype).requires_grad_(),
              *(w.detach().to(dtype).requires_grad_() for w in metric_args(weights))]
    with torch.enable_grad():
        outputs = reference.metric_tensors(leaves[0], q_mask, *leaves[1:], eps_ln=eps_ln,
                                           eps_adj=eps_adj)
        given = [(o, g.to(dtype)) for o, g in zip(outputs, grad_outputs) if g is not None]
        grads = torch.autograd.grad([o for o, _ in given], leaves, [g for _, g in given],
                                    allow_unused=True) if given else [None] * len(leaves)
    return tuple(torch.zeros_like(leaf) if g is None else g.detach()
                 for leaf, g in zip(leaves, grads))


def metric_tensors_grad_peer(grad_outputs: Sequence[Tensor | None], q: Tensor,
                             q_mask: Tensor | None, weights: dict[str, Tensor],
                             eps_ln: float = reference.LN_EPS,
                             eps_adj: float = reference.EPS_ADJ) -> tuple[Tensor, ...]:
    """The metric learner's gradients as a user gets them in plain PyTorch: autograd of the
    reference in fp32 (the op's only compute dtype), grad_q rounded to q's dtype."""
    grads = metric_tensors_grads(grad_outputs, q, q_mask, weights, eps_ln, eps_adj,
                                 dtype=torch.float32)
    return (grads[0].to(q.dtype), *grads[1:])


# --------------------------------------------------------------------------------------------
# The rule applied to each op
# --------------------------------------------------------------------------------------------
def _double(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.double()


def check_g_attention(out: Tensor, lse: Tensor | None, q: Tensor, k: Tensor, v: Tensor,
                      G: Tensor | None = None, key_mask: Tensor | None = None,
                      causal: bool = False, scale: float | None = None, *,
                      oracle: tuple[Tensor, Tensor] | None = None,
                      peer: tuple[Tensor, Tensor] | None = None) -> Verdict:
    """``pldr::g_attention``'s ``(out, lse)`` (``lse`` None: not judged) against the fp64
    reference: fp32 rule for fp32 inputs, peer rule (:func:`g_attention_peer`) otherwise. A query
    row with no visible key must be exactly 0 with lse −inf. The oracle sums P·V over each row's
    visible keys (``visible_only``), so inputs with NaN or Inf are judged by the NaN rule too
    (:func:`check_nonfinite`). ``oracle``/``peer`` may be passed precomputed (the benchmark
    computes a large oracle in chunks)."""
    if oracle is None:
        oracle = reference.g_attention(q.double(), k.double(), v.double(), _double(G), key_mask,
                                       causal, scale, visible_only=True)
    if q.dtype != torch.float32 and peer is None:
        peer = g_attention_peer(q, k, v, G, key_mask, causal, scale)
    ref_out, ref_lse = oracle
    parts = [compare(out, ref_out, None if peer is None else peer[0], name="out")]
    if lse is not None:
        parts.append(compare(lse, ref_lse, None if peer is None else peer[1], name="lse"))
    empty = torch.isneginf(ref_lse.cpu())
    if bool(empty.any()):
        rows_zero = bool((out.detach().cpu().permute(0, 2, 1, 3)[empty] == 0).all())
        parts.append(Verdict("rows without a visible key", rows_zero,
                             0.0 if rows_zero else math.inf, 0.0, "exactly 0 (and lse -inf)"))
    return Verdict.combine("g_attention", parts)


def check_g_attention_decode(out: Tensor, q: Tensor, k_cache: Tensor, v_cache: Tensor,
                             cache_seqlens: Tensor, k_new: Tensor | None = None,
                             v_new: Tensor | None = None,
                             cache_start: Tensor | None = None, G: Tensor | None = None,
                             scale: float | None = None, *,
                             oracle: Tensor | None = None) -> Verdict:
    """One decode step's ``out`` against ``reference.g_attention_decode`` in fp64 (visible keys
    only, as :func:`check_g_attention`). ``k_cache`` / ``v_cache`` are the caches *before* the
    step (they are not modified here)."""
    if oracle is None:
        oracle = reference.g_attention_decode(
            q.double(), k_cache.double(), v_cache.double(), cache_seqlens, _double(k_new),
            _double(v_new), cache_start, _double(G), scale, visible_only=True)
    peer = None
    if q.dtype != torch.float32:
        peer = g_attention_decode_peer(q, k_cache, v_cache, cache_seqlens, k_new, v_new,
                                       cache_start, G, scale)
    return Verdict.combine("g_attention_decode", [compare(out, oracle, peer, name="out")])


def check_metric_tensors(out: Sequence[Tensor], q: Tensor, q_mask: Tensor | None,
                         weights: dict[str, Tensor], eps_ln: float = reference.LN_EPS,
                         eps_adj: float = reference.EPS_ADJ, *,
                         oracle: Sequence[Tensor] | None = None) -> Verdict:
    """``pldr::metric_tensors``'s ``(A, A_LM, G)`` against the fp64 reference on the same
    (upcast) inputs.

    A and A_LM: the fp32 rule end to end. G cannot meet it end to end, for any fp32 evaluation:
    G = a·A_LM^pw + ba with exponents of both signs, and A_LM ≈ z²/2 wherever z = W·A + b
    cancels, so a few-ulp error of A or A_LM becomes a large relative error of a tiny A_LM that a
    negative pw turns into the largest entries of G (docs/spec.md §5.1). So the power stage is
    judged stage by stage, each stage against fp64 applied to the kernel's own input of it:
      * A_LM from the kernel's A (steps 9–10): fp32 rule;
      * G from the kernel's A_LM (steps 11–12): fp32 rule.
    A kernel that also sums W·A in fp64 (the CPU one) meets more: see
    :func:`check_metric_g_from_a`.
    """
    A, A_LM, G = (t.detach().cpu() for t in out)
    if oracle is None:
        oracle = reference.metric_tensors(q.double(), q_mask, *metric_args(weights, torch.float64),
                                          eps_ln=eps_ln, eps_adj=eps_adj)
    ref_A, ref_A_LM, _ = (t.detach().cpu() for t in oracle)
    w64 = _power_stage_weights(weights)
    A_LM_given_A = reference.g_from_metric(A.double(), *w64, eps_adj=eps_adj)[0]
    _, _, pw, a, ba = w64
    G_given_A_LM = torch.matmul(a, torch.pow(A_LM.double(), pw)) + ba
    return Verdict.combine("metric_tensors", [
        compare(A, ref_A, name="A"),
        compare(A_LM, ref_A_LM, name="A_LM"),
        compare(A_LM, A_LM_given_A, name="A_LM (steps 9-10 given its own A)"),
        compare(G, G_given_A_LM, name="G (steps 11-12 given its own A_LM)"),
    ])


def _power_stage_weights(weights: dict[str, Tensor]) -> tuple[Tensor, ...]:
    return tuple(weights[k].detach().double().cpu() for k in ("W", "b", "pw", "a", "ba"))


def check_metric_g_from_a(out: Sequence[Tensor], q: Tensor, q_mask: Tensor | None,
                          weights: dict[str, Tensor], eps_ln: float = reference.LN_EPS,
                          eps_adj: float = reference.EPS_ADJ, *,
                          oracle: Sequence[Tensor] | None = None) -> Verdict:
    """More than :func:`check_metric_tensors` asks, met by a kernel that sums W·A in fp64 (the
    CPU one): an fp32 W·A rounds A_LM by an ulp, which the power stage amplifies; summed in fp64,
    steps 9–12 from the kernel's own A meet the fp32 rule at once, and so
      * G from the kernel's A (steps 9–12): fp32 rule;
      * G end to end: ≤ 2 × PyTorch-fp32's end-to-end error + the G error that the kernel's A
        error alone causes (evaluated in fp64; A itself is held to the fp32 rule) + 1e-5·max|G|.
    """
    A, _, G = (t.detach().cpu() for t in out)
    if oracle is None:
        oracle = reference.metric_tensors(q.double(), q_mask, *metric_args(weights, torch.float64),
                                          eps_ln=eps_ln, eps_adj=eps_adj)
    ref_G = oracle[2].detach().cpu()
    G_given_A = reference.g_from_metric(A.double(), *_power_stage_weights(weights),
                                        eps_adj=eps_adj)[1]
    finite = torch.isfinite(ref_G)
    propagated = _max_abs((G_given_A - ref_G)[finite])
    floor = 1e-5 * _max_abs(ref_G[finite])
    G_peer = metric_tensors_peer(q, q_mask, *metric_args(weights), eps_ln=eps_ln,
                                 eps_adj=eps_adj)[2]
    return Verdict.combine("metric_tensors G from A", [
        compare(G, G_given_A, name="G (steps 9-12 given its own A)"),
        compare(G, ref_G, G_peer, floor=floor + propagated, name="G (end to end)"),
    ])


# --------------------------------------------------------------------------------------------
# Gradients (docs/design.md §4.5)
# --------------------------------------------------------------------------------------------
def _attention_grads(forward, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, G: Tensor | None,
                     key_mask: Tensor | None, causal: bool, scale: float | None,
                     dtype: torch.dtype | None) -> tuple[Tensor | None, ...]:
    """``(dq, dk, dv, dG)`` of ``forward``'s out under autograd for the loss ⟨out, dout⟩, the
    activations cast to ``dtype`` (G to fp64 when dtype is fp64, else kept fp32)."""
    g_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    G_leaf = None if G is None else G.detach().to(g_dtype).requires_grad_()
    out, _ = forward(*leaves, G_leaf, key_mask, causal, scale)
    out.backward(dout.to(out.dtype))
    return tuple(None if t is None else t.grad for t in (*leaves, G_leaf))


def g_attention_grad_oracle(dout: Tensor, q: Tensor, k: Tensor, v: Tensor,
                            G: Tensor | None = None, key_mask: Tensor | None = None,
                            causal: bool = False, scale: float | None = None
                            ) -> tuple[Tensor | None, ...]:
    """``(dq, dk, dv, dG)``: fp64 autograd of ``reference.g_attention`` for the incoming gradient
    ``dout`` of out (dG None without G)."""
    return _attention_grads(reference.g_attention, dout.double(), q, k, v, G, key_mask, causal,
                            scale, torch.float64)


def g_attention_grad_peer(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, G: Tensor | None = None,
                          key_mask: Tensor | None = None, causal: bool = False,
                          scale: float | None = None) -> tuple[Tensor | None, ...]:
    """The peer of the gradients: PyTorch autograd of :func:`g_attention_peer` (the same math in
    q's dtype, G in fp32) for ``dout``; ``(dq, dk, dv, dG)``."""
    return _attention_grads(g_attention_peer, dout, q, k, v, G, key_mask, causal, scale, q.dtype)


def check_g_attention_grads(grads: Sequence[Tensor | None], dout: Tensor, q: Tensor, k: Tensor,
                            v: Tensor, G: Tensor | None = None, key_mask: Tensor | None = None,
                            causal: bool = False, scale: float | None = None, *,
                            oracle: Sequence[Tensor | None] | None = None,
                            peer: Sequence[Tensor | None] | None = None) -> Verdict:
    """``(dq, dk, dv, dG)`` of ``g_attention`` for ``dout`` against fp64 autograd of the reference
    (:func:`g_attention_grad_oracle`), each by the peer rule with :func:`g_attention_grad_peer` as
    the peer, in every dtype (an fp32 gradient can be exactly 0 in fp64, e.g. dk with one visible
    key, where a relative bound is 0). Exact, beyond the rule: a query row that sees no key gets
    dq = 0, a key that no query sees gets dk = dv = 0. dG must be None exactly when G is."""
    if oracle is None:
        oracle = g_attention_grad_oracle(dout, q, k, v, G, key_mask, causal, scale)
    if peer is None:
        peer = g_attention_grad_peer(dout, q, k, v, G, key_mask, causal, scale)
    parts = []
    for name, got, want, same_dtype in zip(("dq", "dk", "dv", "dG"), grads, oracle, peer):
        if want is None:
            parts.append(Verdict(name, got is None, 0.0 if got is None else math.inf, 0.0,
                                 "None without G"))
        elif got is None:
            parts.append(Verdict(name, False, math.inf, 0.0, "missing"))
        else:
            parts.append(compare(got, want, same_dtype, name=name))
    B, Sq, H, _ = q.shape
    Sk = k.shape[1]
    mask = None if key_mask is None else key_mask.cpu()
    visible = reference.masked_softmax(torch.zeros(B, 1, Sq, Sk), mask, causal)[0][:, 0] > 0
    for name, got, hidden in (("dq", grads[0], ~visible.any(2)), ("dk", grads[1], ~visible.any(1)),
                              ("dv", grads[2], ~visible.any(1))):
        if got is not None and bool(hidden.any()):
            zero = bool((got.detach().cpu()[hidden] == 0).all())
            what = "query rows without a visible key" if name == "dq" else "keys no query sees"
            parts.append(Verdict(f"{name} of {what}", zero, 0.0 if zero else math.inf, 0.0,
                                 "exactly 0"))
    return Verdict.combine("g_attention gradients", parts)


# --------------------------------------------------------------------------------------------
# Gradients of the metric learner (docs/design.md §4.5)
# --------------------------------------------------------------------------------------------
METRIC_GRAD_NAMES = ("q", *METRIC_WEIGHT_ORDER)


def _grad_outputs64(grad_outputs: Sequence[Tensor | None]) -> tuple[Tensor | None, ...]:
    return tuple(None if g is None else g.detach().double().cpu() for g in grad_outputs)


def check_metric_tensors_grads(grads: Sequence[Tensor], grad_outputs: Sequence[Tensor | None],
                               q: Tensor, q_mask: Tensor | None, weights: dict[str, Tensor],
                               eps_ln: float = reference.LN_EPS,
                               eps_adj: float = reference.EPS_ADJ, *,
                               oracle: Sequence[Tensor] | None = None,
                               peer: Sequence[Tensor] | None = None) -> Verdict:
    """``pldr::metric_tensors_backward``'s gradients (``METRIC_GRAD_NAMES`` order) against fp64
    autograd of the reference, each by the peer rule: max error ≤ 2 × that of PyTorch's fp32
    autograd (:func:`metric_tensors_grad_peer`) + ``FP32_REL_TOL`` · max|oracle|; the rows of
    grad_q that q_mask leaves out exactly 0.

    A case-by-case rule for losses through A and A_LM. Through G it is not: there the gradients
    inherit the power stage's amplification of every rounding of A (docs/spec.md §5.1), in the
    kernel as in PyTorch, and which of the two is closer varies with the seed; judge those by
    :func:`check_metric_tensors_grads_over_seeds` (and the CPU kernel also by
    :func:`check_metric_grads_given_a`)."""
    if oracle is None:
        oracle = metric_tensors_grads(_grad_outputs64(grad_outputs), q.cpu(), _cpu(q_mask),
                                      _cpu_weights(weights), eps_ln, eps_adj)
    if peer is None:
        peer = metric_tensors_grad_peer(grad_outputs, q, q_mask, weights, eps_ln, eps_adj)
    parts = []
    for name, got, want, same_math in zip(METRIC_GRAD_NAMES, grads, oracle, peer):
        if tuple(got.shape) != tuple(want.shape):
            parts.append(Verdict(f"grad_{name}", False, math.inf, 0.0,
                                 f"shape {tuple(got.shape)}, want {tuple(want.shape)}"))
            continue
        floor = FP32_REL_TOL * _max_abs(want.detach().double().cpu())
        parts.append(compare(got, want, same_math, floor=floor, name=f"grad_{name}"))
    if q_mask is not None:
        pad = ~q_mask.cpu()
        zero = bool((grads[0].detach().cpu()[pad] == 0).all())
        parts.append(Verdict("grad_q of rows left out by q_mask", zero, 0.0 if zero else math.inf,
                             0.0, "exactly 0"))
    return Verdict.combine("metric_tensors_backward", parts)


def metric_grad_errors(grads: Sequence[Tensor], oracle: Sequence[Tensor]) -> dict[str, float]:
    """Each gradient's max abs error against the oracle relative to max|oracle| (0 when both are
    zero): the per-seed samples of :func:`check_metric_tensors_grads_over_seeds`."""
    errors = {}
    for name, got, want in zip(METRIC_GRAD_NAMES, grads, oracle):
        want64 = want.detach().double().cpu()
        err = _max_abs(got.detach().double().cpu() - want64)
        errors[name] = err / _max_abs(want64) if err else 0.0
    return errors


def check_metric_tensors_grads_over_seeds(errors: Sequence[dict[str, float]],
                                          peer_errors: Sequence[dict[str, float]]) -> Verdict:
    """The statistical form of the peer rule for losses through G (docs/design.md §4.5), over
    cases drawn with different seeds: for each gradient, the median over the cases of the kernel's
    relative error (:func:`metric_grad_errors`) ≤ 2 × the median of PyTorch fp32 autograd's +
    ``FP32_REL_TOL``. Per case either one may be the closer (the power stage amplifies the few-ulp
    differences of A by up to ~1e3 either way), so one case decides nothing."""
    if len(errors) != len(peer_errors) or len(errors) < 5:
        raise ValueError(f"need the same number (>= 5) of kernel and peer samples, got "
                         f"{len(errors)} and {len(peer_errors)}")
    parts = []
    for name in METRIC_GRAD_NAMES:
        err = statistics.median(e[name] for e in errors)
        peer_err = statistics.median(e[name] for e in peer_errors)
        bound = 2 * peer_err + FP32_REL_TOL
        worst = max(e[name] for e in errors)
        parts.append(Verdict(f"grad_{name}", err <= bound, err, bound,
                             f"median over {len(errors)} seeds of the error relative to "
                             f"max|oracle| <= 2 x PyTorch fp32's median {peer_err:.3e} + "
                             f"{FP32_REL_TOL:g}", f"largest {worst:.3e}"))
    return Verdict.combine("metric_tensors_backward over seeds", parts)


def check_metric_grads_given_a(grads: Sequence[Tensor], grad_outputs: Sequence[Tensor | None],
                               q: Tensor, q_mask: Tensor | None, weights: dict[str, Tensor],
                               A: Tensor, eps_ln: float = reference.LN_EPS,
                               eps_adj: float = reference.EPS_ADJ) -> Verdict:
    """The backward stage by stage from the kernel's own A (the A its forward returns, which its
    backward recomputes bit for bit), per case, for losses through G too — met by a kernel that
    reverses the power stage in fp64 (the CPU one), as its forward sums W·A in fp64
    (:func:`check_metric_g_from_a`):
      * W, b, pw, a, ba: fp64 autograd of steps 9–12 from that A, the fp32 rule;
      * q and the residual network's weights: fp64 autograd of steps 6–8 whose A receives the
        gradient that steps 9–12 send back from that A (plus grad_A), by the peer rule of
        :func:`check_metric_tensors_grads` with that same upstream gradient.
    """
    grad_A, grad_A_LM, grad_G = _grad_outputs64(grad_outputs)
    A64 = A.detach().double().cpu().requires_grad_()
    head = [w.requires_grad_() for w in _power_stage_weights(weights)]
    with torch.enable_grad():
        A_LM, G = reference.g_from_metric(A64, *head, eps_adj=eps_adj)
        given = [(o, g) for o, g in ((A_LM, grad_A_LM), (G, grad_G)) if g is not None]
        if given:
            back = torch.autograd.grad([o for o, _ in given], [A64, *head],
                                       [g for _, g in given], allow_unused=True)
        else:
            back = [None] * (1 + len(head))
    back = [torch.zeros_like(t) if g is None else g for t, g in zip([A64, *head], back)]
    upstream = back[0] if grad_A is None else back[0] + grad_A
    parts = [compare(got, want, name=f"grad_{name} (steps 9-12 given its own A)")
             for name, got, want in zip(METRIC_GRAD_NAMES[11:], grads[11:], back[1:])]
    q_cpu, mask_cpu, w_cpu = q.cpu(), _cpu(q_mask), _cpu_weights(weights)
    network = check_metric_tensors_grads(
        [g.cpu() for g in grads[:11]], (upstream.float(), None, None), q_cpu, mask_cpu, w_cpu,
        eps_ln, eps_adj,
        oracle=metric_tensors_grads((upstream, None, None), q_cpu, mask_cpu, w_cpu, eps_ln,
                                    eps_adj)[:11],
        peer=metric_tensors_grad_peer((upstream.float(), None, None), q_cpu, mask_cpu, w_cpu,
                                      eps_ln, eps_adj)[:11])
    for part in network.parts:
        parts.append(Verdict(f"{part.name} (steps 6-8 given the gradient reaching its own A)",
                             part.ok, part.max_abs_err, part.bound, part.rule, part.worst))
    return Verdict.combine("metric_tensors_backward given its own A", parts)


def _cpu(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.cpu()


def _cpu_weights(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu() for k, v in weights.items()}


# --------------------------------------------------------------------------------------------
# linear_small / swiglu_small (docs/design.md §3.9)
# --------------------------------------------------------------------------------------------
def random_linear_small_weight(rows: int, K: int, kind: str = "float32",
                               generator=None) -> tuple[Tensor, Tensor | None, Tensor]:
    """(weight [rows, K] as ``pldr::linear_small`` takes it, of ``kind`` "float32", "bfloat16" or
    "int8"; its per-row fp32 scale for int8, else None; the weight's exact values in fp64)."""
    w = torch.randn(rows, K, generator=generator) / K**0.5
    if kind == "int8":
        scale = w.abs().amax(dim=1) / 127
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return q, scale, q.double() * scale.double()[:, None]
    w = w.to(getattr(torch, kind))
    return w, None, w.double()


def check_linear_small(out: Tensor, x: Tensor, weight64: Tensor, bias: Tensor | None = None, *,
                       swiglu: bool = False, name: str | None = None) -> Verdict:
    """``pldr::linear_small`` (``swiglu=True``: ``swiglu_small``) of ``x`` against fp64 on
    ``weight64``, the weight's exact values (int8: dequantised), by the peer rule: the peer is
    ``F.linear`` on those weights in x's dtype, fp32 included (its error sets the bound of a
    kernel that may sum K products in another order)."""
    F = torch.nn.functional
    oracle = F.linear(x.double(), weight64, _double(bias))
    peer = F.linear(x, weight64.to(x.dtype), None if bias is None else bias.to(x.dtype))
    if swiglu:
        gate, up = oracle.chunk(2, dim=-1)
        oracle = F.silu(gate) * up
        p_gate, p_up = peer.chunk(2, dim=-1)
        peer = F.silu(p_gate) * p_up
    return compare(out, oracle, peer,
                   name=name or ("swiglu_small" if swiglu else "linear_small"))


# --------------------------------------------------------------------------------------------
# cross_entropy_forward / cross_entropy_backward (docs/design.md §3.10)
# --------------------------------------------------------------------------------------------
def cross_entropy_rows_math(logits: Tensor, targets: Tensor,
                            ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """``(lse, nll)`` of the rows in PyTorch, in the logits' dtype (fp64: the oracle)."""
    kept = targets != ignore_index
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, targets.masked_fill(~kept, 0)[:, None])[:, 0]
    return lse, (lse - picked).masked_fill(~kept, 0.0)


def cross_entropy_grad_math(logits: Tensor, targets: Tensor, grad_nll: Tensor, start: int,
                            end: int, grad_logits: Tensor | None = None,
                            ignore_index: int = -100) -> Tensor:
    """The gradient of ``Σ grad_nll·nll`` for the columns ``[start, end)`` in PyTorch, in the
    logits' dtype: ``(softmax − one_hot)·grad_nll``, 0 in the left-out rows, + grad_logits."""
    kept = targets != ignore_index
    one_hot = torch.nn.functional.one_hot(targets.masked_fill(~kept, 0), logits.shape[1])
    softmax = torch.softmax(logits, dim=-1)
    g = (softmax - one_hot.to(logits.dtype)) * grad_nll.to(logits.dtype)[:, None]
    g = torch.where(kept[:, None], g, 0.0)[:, start:end]
    return g if grad_logits is None else g + grad_logits.to(logits.dtype)[:, start:end]


def check_cross_entropy(lse: Tensor, nll: Tensor, logits: Tensor, targets: Tensor,
                        ignore_index: int = -100) -> Verdict:
    """``pldr::cross_entropy_forward``'s ``(lse, nll)`` against fp64, the peer
    :func:`cross_entropy_rows_math` in fp32."""
    oracle = cross_entropy_rows_math(logits.double(), targets, ignore_index)
    peer = cross_entropy_rows_math(logits, targets, ignore_index)
    return Verdict.combine("cross_entropy_forward", [
        compare(lse, oracle[0], peer[0], name="lse"), compare(nll, oracle[1], peer[1], name="nll")])


def check_cross_entropy_grad(grad: Tensor, logits: Tensor, targets: Tensor, grad_nll: Tensor,
                             start: int, end: int, grad_logits: Tensor | None = None,
                             ignore_index: int = -100) -> Verdict:
    """``pldr::cross_entropy_backward`` against fp64, the peer :func:`cross_entropy_grad_math`
    in fp32."""
    args = (targets, grad_nll, start, end)
    oracle = cross_entropy_grad_math(logits.double(), *args, _double(grad_logits), ignore_index)
    peer = cross_entropy_grad_math(logits, *args, grad_logits, ignore_index)
    return compare(grad, oracle, peer, name=f"cross_entropy_backward [{start}, {end})")


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------
def available_backends(op: str, *, need_device: bool = True) -> tuple[str, ...]:
    """The devices ("cpu", "cuda") on which this build runs ``pldr::<op>``.

    "cuda" needs a build with CUDA kernels (a CPU-only build registers a stub on the CUDA key that
    explains how to rebuild) and, unless ``need_device=False``, a visible CUDA device."""
    if op not in OPS + BACKWARD_OPS + CPU_OPS:
        raise ValueError(f"op must be one of {OPS + BACKWARD_OPS + CPU_OPS}, got {op!r}")
    from . import ops

    if ops._LOAD_ERROR is not None:
        return ()
    backends = []
    if torch._C._dispatch_has_kernel_for_dispatch_key(f"pldr::{op}", "CPU"):
        backends.append("cpu")
    # A backward op's CUDA kernel may come from Python (Triton) in a build without CUDA kernels.
    if ((ops.built_with_cuda() or op in BACKWARD_OPS)
            and (not need_device or torch.cuda.is_available())
            and torch._C._dispatch_has_kernel_for_dispatch_key(f"pldr::{op}", "CUDA")):
        backends.append("cuda")
    return tuple(backends)
