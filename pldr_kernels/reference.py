"""Pure-PyTorch reference of the PLDR-LLM v510 math (docs/spec.md §2, §3).

This module is the single definition of correctness: every kernel test and every benchmark sanity
check compares against it, in fp64 for tests. It mirrors the authors' code line for line, favouring
clarity over speed (scores are materialised, each SwiGLU is an ``F.linear`` call).

Layout conventions follow the ops (docs/design.md §3): activations are ``[B, S, H, d]``; metric
tensors and G are ``[B, H, d, d]``; per-head PLGA parameters are ``[H, d, d]``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

LN_EPS = 1e-6
EPS_ADJ = 1e-9  # docs/spec.md §2 step 10: added *after* iSwiGLU
ROPE_THETA = 10000.0


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """fp64 when any input is fp64 (the test oracle), fp32 otherwise (docs/spec.md §5: never
    below fp32)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


# --------------------------------------------------------------------------------------------
# RoPE (docs/spec.md §2 step 4)
# --------------------------------------------------------------------------------------------
def rope_angles(positions: Tensor, head_dim: int, theta: float = ROPE_THETA) -> Tensor:
    """Angles ``pos * theta^(-2j/d)`` for j = 0..d/2-1, fp32, shape ``positions.shape + (d/2,)``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32,
                                             device=positions.device) / head_dim))
    return positions.to(torch.float32)[..., None] * inv_freq


def apply_rope(x: Tensor, positions: Tensor, interleaved: bool = True,
               theta: float = ROPE_THETA) -> Tensor:
    """Rotary embedding of ``x [B, S, H, d]`` at ``positions`` (``[S]`` or ``[B, S]``).

    ``interleaved=True`` is the v51 flavour (torchtune, ``reference_rope=True``): adjacent pairs
    (2j, 2j+1), computed in fp32 and cast back. ``interleaved=False`` is the v52 / HF Llama
    flavour: pairs (i, i + d/2) via rotate_half, with cos/sin cast to the activation dtype before
    the multiply.
    """
    B, S, H, d = x.shape
    if positions.dim() == 1:
        positions = positions[None, :].expand(B, S)
    ang = rope_angles(positions, d, theta)[:, :, None, :]  # [B, S, 1, d/2]
    cos, sin = ang.cos(), ang.sin()
    if interleaved:
        xf = x.float() if x.dtype != torch.float64 else x
        cos, sin = cos.to(xf.dtype), sin.to(xf.dtype)
        x0, x1 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
        return out.to(x.dtype)
    cos = torch.cat((cos, cos), dim=-1).to(x.dtype)
    sin = torch.cat((sin, sin), dim=-1).to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


# --------------------------------------------------------------------------------------------
# Metric learner: A, A_LM, G (docs/spec.md §2 steps 6-12)
# --------------------------------------------------------------------------------------------
def swiglu(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor,
           b3: Tensor) -> Tensor:
    """``(silu(x·W1ᵀ+b1) ⊙ (x·W2ᵀ+b2))·W3ᵀ + b3`` (the authors' GLUVariant)."""
    return F.linear(F.silu(F.linear(x, w1, b1)) * F.linear(x, w2, b2), w3, b3)


def iswiglu(z: Tensor) -> Tensor:
    """``z·silu(z)``, evaluated as PyTorch does (silu, then multiply; docs/spec.md §5.3)."""
    return z * F.silu(z)


def metric_tensors(q: Tensor, q_mask: Tensor | None, ln0_w: Tensor, ln0_b: Tensor,
                   w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor, b3: Tensor,
                   lnA_w: Tensor, lnA_b: Tensor, W: Tensor, b: Tensor, pw: Tensor, a: Tensor,
                   ba: Tensor, eps_ln: float = LN_EPS, eps_adj: float = EPS_ADJ
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """The deep PLGA network: ``q [B,S,H,d]`` → ``(A, A_LM, G)``, each ``[B,H,d,d]``.

    Weights are packed as in docs/design.md §3.1: ``w1, w2 [R,Gd,F,d]``, ``b1, b2 [R,Gd,F]``,
    ``w3 [R,Gd,d,F]``, ``b3 [R,Gd,d]``, ``lnA_* [R,d]``, ``W, b, pw, a, ba [H,d,d]``.
    ``q_mask [B,S]`` (True = real token) leaves masked rows out of QᵀQ; None keeps every row, as the
    authors' code does. Computed in fp32, or fp64 when any input is fp64.
    """
    ct = compute_dtype(q, ln0_w, W)
    qf = q.to(ct)
    if q_mask is not None:
        qf = qf * q_mask.to(ct)[:, :, None, None]
    A = torch.einsum("bshi,bshj->bhij", qf, qf)  # QᵀQ over all S positions (non-causal)
    d = A.shape[-1]
    A = F.layer_norm(A, (d,), ln0_w.to(ct), ln0_b.to(ct), eps_ln)
    R, Gd = w1.shape[0], w1.shape[1]
    for r in range(R):
        A_in = A
        for g in range(Gd):
            A = swiglu(A, w1[r, g].to(ct), b1[r, g].to(ct), w2[r, g].to(ct), b2[r, g].to(ct),
                       w3[r, g].to(ct), b3[r, g].to(ct))
        A = F.layer_norm(A + A_in, (d,), lnA_w[r].to(ct), lnA_b[r].to(ct), eps_ln)
    Z = torch.matmul(W.to(ct), A) + b.to(ct)  # W_h · A: per-head matrix on the left
    A_LM = iswiglu(Z) + eps_adj
    A_P = torch.pow(A_LM, pw.to(ct))
    G = torch.matmul(a.to(ct), A_P) + ba.to(ct)
    return A, A_LM, G


def g_from_metric(A: Tensor, W: Tensor, b: Tensor, pw: Tensor, a: Tensor, ba: Tensor,
                  eps_adj: float = EPS_ADJ) -> tuple[Tensor, Tensor]:
    """Steps 9-12 alone: a cached metric tensor ``A`` → ``(A_LM, G)`` (the "kv" cache mode)."""
    ct = compute_dtype(A, W)
    A_LM = iswiglu(torch.matmul(W.to(ct), A.to(ct)) + b.to(ct)) + eps_adj
    G = torch.matmul(a.to(ct), torch.pow(A_LM, pw.to(ct))) + ba.to(ct)
    return A_LM, G


# --------------------------------------------------------------------------------------------
# G-attention (docs/spec.md §2 steps 13-14)
# --------------------------------------------------------------------------------------------
def apply_g(q: Tensor, G: Tensor | None) -> Tensor:
    """``q̃ = q·G`` for ``q [B,S,H,d]`` and ``G [B|1,H,d,d]``, in the compute dtype."""
    ct = compute_dtype(q, G)
    if G is None:
        return q.to(ct)
    return torch.einsum("bshi,bhij->bshj", q.to(ct), G.to(ct))


def repeat_kv(x: Tensor, heads: int) -> Tensor:
    """``x [B,S,H_kv,d]`` with each kv head repeated for its H / H_kv query heads, in
    transformers' ``repeat_kv`` order: query head h uses kv head h // (H / H_kv) (grouped-query
    and multi-query attention, docs/design.md §3.2)."""
    H_kv = x.shape[2]
    if H_kv == heads:
        return x
    if H_kv < 1 or heads % H_kv:
        raise ValueError(f"key/value heads H_kv = {H_kv} must divide the query heads H = {heads}")
    return x.repeat_interleave(heads // H_kv, dim=2)


def g_attention(q: Tensor, k: Tensor, v: Tensor, G: Tensor | None = None,
                key_mask: Tensor | None = None, causal: bool = False,
                scale: float | None = None, *, visible_only: bool = False
                ) -> tuple[Tensor, Tensor]:
    """``softmax((q·G)·kᵀ·scale + mask)·v`` → ``(out [B,Sq,H,d] in q's dtype, lse [B,H,Sq] fp32)``.

    ``causal`` is bottom-right aligned (query i sees keys j ≤ i + Sk − Sq). ``key_mask [B,Sk]``:
    True = attend. A query row with no visible key gives out = 0 and lse = −inf. k and v may
    have fewer heads than q (grouped-query attention, :func:`repeat_kv`).

    Non-finite inputs (docs/design.md §3.5): a NaN score among a row's visible keys, or a +inf
    one, makes that row's out and lse NaN. ``visible_only=True`` sums P·V over each row's visible
    keys only, the semantics of the kernels (and the oracle of the NaN rule,
    ``testing.check_nonfinite``): a NaN or Inf in the V row of a masked or causally hidden key
    then never reaches the output, where the plain product gives 0·NaN = NaN. For finite inputs
    both are the same.
    """
    d = q.shape[-1]
    ct = compute_dtype(q, k, G)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qt = apply_g(q, G).permute(0, 2, 1, 3)  # [B,H,Sq,d]
    kt = repeat_kv(k.to(ct), q.shape[2]).permute(0, 2, 1, 3)
    vt = repeat_kv(v.to(ct), q.shape[2]).permute(0, 2, 1, 3)
    scores = torch.matmul(qt, kt.transpose(-1, -2)) * scale  # [B,H,Sq,Sk]
    p, lse = masked_softmax(scores, key_mask, causal)
    if visible_only:
        out = visible_weighted_sum(p, vt, visible_keys(scores, key_mask, causal))
    else:
        out = torch.matmul(p, vt)
    return out.permute(0, 2, 1, 3).to(q.dtype).contiguous(), lse.to(torch.float32)


def visible_keys(scores: Tensor, key_mask: Tensor | None = None,
                 causal: bool = False) -> Tensor:
    """Which keys each query row of ``scores [B,H,Sq,Sk]`` sees: bool ``[B,1,Sq,Sk]``
    (``causal`` bottom-right aligned, ``key_mask [B,Sk]`` True = attend)."""
    B, _, Sq, Sk = scores.shape
    device = scores.device
    visible = torch.ones(B, 1, Sq, Sk, dtype=torch.bool, device=device)
    if causal:
        i = torch.arange(Sq, device=device)[:, None]
        j = torch.arange(Sk, device=device)[None, :]
        visible = visible & (j <= i + (Sk - Sq))
    if key_mask is not None:
        visible = visible & key_mask[:, None, None, :].bool()
    return visible


def masked_softmax(scores: Tensor, key_mask: Tensor | None = None,
                   causal: bool = False) -> tuple[Tensor, Tensor]:
    """Softmax of ``scores [B,H,Sq,Sk]`` over the visible keys, and its log-sum-exp ``[B,H,Sq]``.

    Visibility as in ``g_attention`` (:func:`visible_keys`). A row with no visible key gives
    p = 0 and lse = −inf; a row with a NaN or a +inf visible score has no softmax (inf/inf):
    p and lse are NaN.
    """
    scores = scores.masked_fill(~visible_keys(scores, key_mask, causal), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf where nothing is visible
    lse = lse.masked_fill(torch.isposinf(lse), float("nan"))
    p = torch.exp(scores - torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)[..., None])
    return p, lse


def visible_weighted_sum(p: Tensor, v: Tensor, visible: Tensor) -> Tensor:
    """``p @ v`` (``p [B,H,Sq,Sk]``, ``v [B,H,Sk,d]``) with each row's sum over its ``visible``
    keys only (``[B,1,Sq,Sk]``), so that a non-finite v row of a key a row does not see stays
    out of it (the plain product gives 0·NaN = NaN there).

    Finite v: exactly ``p @ v``. Otherwise ``p @ v`` with the non-finite entries of v zeroed,
    plus, per output entry, what IEEE arithmetic gives its non-finite terms p·v over the visible
    keys: NaN for a NaN term, a zero weight on an Inf or Infs of both signs; else ±Inf."""
    finite = torch.isfinite(v)
    if bool(finite.all()):
        return torch.matmul(p, v)
    out = torch.matmul(p, torch.where(finite, v, torch.zeros_like(v)))
    seen = visible.to(p.dtype)

    def count(weights: Tensor, entries: Tensor) -> Tensor:  # visible terms with such an entry
        return torch.matmul(weights, entries.to(p.dtype)) > 0

    nan = count(seen, v.isnan()) | count(seen * (p == 0), v.isinf())
    pos, neg = count(seen * (p > 0), v.isposinf()), count(seen * (p > 0), v.isneginf())
    terms = torch.where(nan | (pos & neg), math.nan,
                        torch.where(pos, math.inf, torch.where(neg, -math.inf, 0.0)))
    return out + terms.to(p.dtype)


def g_attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                       k_new: Tensor | None = None, v_new: Tensor | None = None,
                       cache_start: Tensor | None = None, G: Tensor | None = None,
                       scale: float | None = None, *, visible_only: bool = False) -> Tensor:
    """One generation step over a KV-cache, with the semantics of ``pldr::g_attention_decode``.

    Writes ``k_new/v_new`` in place at rows ``cache_seqlens[b] … +Sn`` (refusing to pass the end),
    then attends query i of row b to keys ``cache_start[b] … cache_seqlens[b] + i``.
    ``visible_only`` as in :func:`g_attention` (it matters for the causally hidden keys of the
    new block).
    """
    B, Sn, H, d = q.shape
    Smax = k_cache.shape[1]
    lens = cache_seqlens.to(torch.int64).tolist()
    starts = [0] * B if cache_start is None else cache_start.to(torch.int64).tolist()
    if k_new is not None:
        for bi in range(B):
            if lens[bi] + Sn > Smax:
                raise ValueError(f"cache_seqlens[{bi}] + Sn = {lens[bi] + Sn} exceeds the cache "
                                 f"length Smax = {Smax}")
        for bi in range(B):
            k_cache[bi, lens[bi]:lens[bi] + Sn] = k_new[bi]
            v_cache[bi, lens[bi]:lens[bi] + Sn] = v_new[bi]
    total = [L + (Sn if k_new is not None else 0) for L in lens]
    out = torch.empty_like(q)
    for bi in range(B):
        s0, s1 = starts[bi], total[bi]
        Gb = None if G is None else G[bi if G.shape[0] > 1 else 0][None]
        o, _ = g_attention(q[bi:bi + 1], k_cache[bi:bi + 1, s0:s1], v_cache[bi:bi + 1, s0:s1],
                           Gb, causal=True, scale=scale, visible_only=visible_only)
        out[bi] = o[0]
    return out
