"""Drop-in modules built on the pldr ops: MetricLearner, GCachedAttention, PowerLawGraphAttention.

Parameter names follow the authors' modules (pldr-spec §4), so ``PowerLawGraphAttention`` loads an
``mha1`` state dict as is. Weights that the ops take packed (the metric learner's ``[R,Gd,F,d]``
stacks, the fused q/k/v projection) are packed once: the parameters become views into the packed
tensor, so in-place updates (``load_state_dict``, optimiser steps) need no copy, and the pack is
rebuilt after ``.to()``/``.cuda()`` or when a parameter is re-assigned.

The G path (metric learner → G) stays fp32 when the module is cast to bf16/fp16: ``.to(bfloat16)``
converts the projections but keeps the metric learner parameters in fp32 (pldr-spec §5).

Training: the kernels have no backward yet, so when autograd needs gradients these modules compute
with the reference math (``reference.py`` / ``reference_model.py`` building blocks), with a one-time
warning.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import ops, reference
from .reference_model import GLUVariant, PlgaLayer, ResLayerA

Tensor = torch.Tensor
METRIC_CHILDREN = ("plgatt_layer", "reslayerAs", "layernorm1")
LOW_PRECISION = (torch.bfloat16, torch.float16)

_warned_training_fallback = False


def _warn_training_fallback() -> None:
    global _warned_training_fallback
    if not _warned_training_fallback:
        warnings.warn("pldr_kernels.nn: gradients requested; the pldr ops have no backward yet, so "
                      "this forward runs the reference PyTorch math (slower). Use torch.no_grad() "
                      "or torch.inference_mode() for the fused kernels.", stacklevel=3)
        _warned_training_fallback = True


def _needs_autograd(module: nn.Module, *inputs: Tensor | None) -> bool:
    if not torch.is_grad_enabled():
        return False
    if any(t is not None and t.requires_grad for t in inputs):
        return True
    return any(p.requires_grad for p in module.parameters())


def _keep_fp32(fn):
    """Wrap a ``Module._apply`` function so fp32 tensors are moved but never cast to bf16/fp16."""
    def apply(t: Tensor) -> Tensor:
        out = fn(t)
        if t.dtype == torch.float32 and out.dtype in LOW_PRECISION:
            return t.to(device=out.device)
        return out
    return apply


class ParameterPack:
    """Parameters of equal shape stored as views into one packed tensor of ``shape``.

    ``get()`` returns the packed tensor, rebuilding it (and re-pointing the parameters at it) when a
    parameter was re-assigned or moved; in-place updates of the parameters are seen for free."""

    def __init__(self, owner: nn.Module, paths: Sequence[str], shape: Sequence[int]):
        # Paths from the owner, not Parameter objects: load_state_dict(assign=True) may replace
        # the Parameters, and copy.deepcopy maps `owner` to the copy.
        self.owner = owner
        self.paths = [tuple(p.split(".")) for p in paths]
        self.shape = tuple(shape)
        self.packed: Tensor | None = None
        self._ptrs: list[int] = []

    def get_params(self) -> list[Tensor]:
        params = []
        for path in self.paths:
            obj = self.owner
            for name in path:
                obj = getattr(obj, name)
            params.append(obj)
        return params

    def _valid(self) -> bool:
        return self.packed is not None and all(
            p.data_ptr() == ptr and p.dtype == self.packed.dtype
            for p, ptr in zip(self.get_params(), self._ptrs))

    def repack(self) -> Tensor:
        params = self.get_params()
        # Never pack inside inference_mode: parameters must stay usable by autograd afterwards.
        with torch.inference_mode(False), torch.no_grad():
            flat = torch.stack([p.detach() for p in params])
            for i, p in enumerate(params):
                p.data = flat[i]
        self.packed = flat.view(self.shape)
        self._ptrs = [p.data_ptr() for p in params]
        return self.packed

    def get(self) -> Tensor:
        return self.packed if self._valid() else self.repack()


# --------------------------------------------------------------------------------------------
# RoPE with precomputed tables
# --------------------------------------------------------------------------------------------
class RotaryEmbedding(nn.Module):
    """``reference.apply_rope`` with cached fp32 cos/sin tables (non-persistent, grown on demand).

    ``interleaved=True``: v51/torchtune pairs (2j, 2j+1), computed in fp32 and cast back.
    ``interleaved=False``: v52/HF Llama rotate_half, cos/sin cast to the activation dtype first."""

    def __init__(self, head_dim: int, theta: float = 10000.0, interleaved: bool = True,
                 max_positions: int = 1024):
        super().__init__()
        self.head_dim, self.theta, self.interleaved = head_dim, theta, interleaved
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self._build(max_positions, torch.device("cpu"))

    def _build(self, n: int, device: torch.device) -> None:
        ang = reference.rope_angles(torch.arange(n, device=device), self.head_dim, self.theta)
        self.cos, self.sin = ang.cos(), ang.sin()

    def _apply(self, fn, recurse=True):
        return super()._apply(_keep_fp32(fn), recurse)

    def rotation(self, positions: Tensor, max_position: int | None = None):
        """The rotation for ``positions [B, S]``, computed once per step and shared by all layers:
        complex ``cos + i·sin`` ``[B, S, 1, d/2]`` (interleaved) or fp32 ``(cos, sin)``
        ``[B, S, 1, d]`` (rotate_half). ``max_position`` (host int) spares the device→host read of
        ``positions.max()`` (needed under CUDA-graph capture)."""
        if max_position is None:
            max_position = int(positions.max()) if positions.numel() else -1
        if max_position + 1 > self.cos.shape[0]:
            self._build(max(max_position + 1, 2 * self.cos.shape[0]), self.cos.device)
        flat = positions.reshape(-1)
        shape = (*positions.shape, 1, -1)
        cos = self.cos.index_select(0, flat).view(shape)
        sin = self.sin.index_select(0, flat).view(shape)
        if self.interleaved:
            return torch.complex(cos, sin)
        return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)

    def forward(self, x: Tensor, rotation) -> Tensor:
        """Rotate ``x [B, S, n, d]`` by a :meth:`rotation`; same math as ``reference.apply_rope``."""
        if self.interleaved:  # (x0 + i·x1)(cos + i·sin): the adjacent-pair rotation, in fp32
            xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
            return torch.view_as_real(xc * rotation).flatten(-2).to(x.dtype)
        cos, sin = rotation[0].to(x.dtype), rotation[1].to(x.dtype)
        half = self.head_dim // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin


# --------------------------------------------------------------------------------------------
# Metric learner
# --------------------------------------------------------------------------------------------
class MetricLearner(nn.Module):
    """The deep PLGA network (spec §2 steps 6–12): post-RoPE ``q [B,S,H,d]`` → fp32 (A, A_LM, G).

    Children (authors' names): ``layernorm1`` (LN over rows of QᵀQ), ``reslayerAs.{r}.denseAs.{g}``
    (SwiGLUs) with ``reslayerAs.{r}.layernormA``, and ``plgatt_layer.{Wlst,blst,pwlst,alst,balst}``.
    """

    def __init__(self, head_dim: int, num_heads: int, A_dff: int = 170, num_reslayerA: int = 8,
                 num_denseA: int = 2, eps: float = 1e-6, glu_bias: bool = True):
        nn.Module.__init__(self)
        self._build_metric_learner(head_dim, num_heads, A_dff, num_reslayerA, num_denseA, eps,
                                   glu_bias)

    def _build_metric_learner(self, head_dim, num_heads, A_dff, num_reslayerA, num_denseA, eps,
                              glu_bias):
        self.metric_eps = eps
        self.plgatt_layer = PlgaLayer(head_dim, num_heads)
        self.reslayerAs = nn.ModuleList([ResLayerA(head_dim, A_dff, num_denseA, eps, glu_bias)
                                         for _ in range(num_reslayerA)])
        self.layernorm1 = nn.LayerNorm(head_dim, eps=eps)
        R, Gd, d = num_reslayerA, num_denseA, head_dim
        glus = [f"reslayerAs.{r}.denseAs.{g}" for r in range(R) for g in range(Gd)]

        def stack(linear_name: str, what: str, shape) -> ParameterPack | None:
            if what == "bias" and not glu_bias:
                return None
            return ParameterPack(self, [f"{g}.{linear_name}.{what}" for g in glus], shape)

        self._metric_packs = {
            "w1": stack("gluw1", "weight", (R, Gd, A_dff, d)),
            "b1": stack("gluw1", "bias", (R, Gd, A_dff)),
            "w2": stack("gluw2", "weight", (R, Gd, A_dff, d)),
            "b2": stack("gluw2", "bias", (R, Gd, A_dff)),
            "w3": stack("gluw3", "weight", (R, Gd, d, A_dff)),
            "b3": stack("gluw3", "bias", (R, Gd, d)),
            "lnA_w": ParameterPack(self, [f"reslayerAs.{r}.layernormA.weight" for r in range(R)],
                                   (R, d)),
            "lnA_b": ParameterPack(self, [f"reslayerAs.{r}.layernormA.bias" for r in range(R)],
                                   (R, d)),
        }
        self._zero_biases = {"b1": (R, Gd, A_dff), "b2": (R, Gd, A_dff), "b3": (R, Gd, d)}
        for pack in self._metric_packs.values():
            if pack is not None:
                pack.repack()

    def _apply(self, fn, recurse=True):
        if recurse:
            for name, child in self.named_children():
                child._apply(_keep_fp32(fn) if name in METRIC_CHILDREN else fn)
        super()._apply(fn, recurse=False)
        for pack in self._metric_packs.values():
            if pack is not None:
                pack.repack()
        return self

    def packed_metric_weights(self) -> list[Tensor]:
        """Weights in the positional order of ``pldr::metric_tensors`` (after q, q_mask)."""
        w = {}
        for name, pack in self._metric_packs.items():
            if pack is not None:
                w[name] = pack.get()
            else:  # glu_bias=False: the op takes zero biases
                w[name] = torch.zeros(self._zero_biases[name], device=self.layernorm1.weight.device)
        plga = self.plgatt_layer
        return [self.layernorm1.weight, self.layernorm1.bias, w["w1"], w["b1"], w["w2"], w["b2"],
                w["w3"], w["b3"], w["lnA_w"], w["lnA_b"], plga.Wlst, plga.blst, plga.pwlst,
                plga.alst, plga.balst]

    def metric_tensors(self, q: Tensor, q_mask: Tensor | None = None
                       ) -> tuple[Tensor, Tensor, Tensor]:
        """``q [B,S,H,d]`` (post-RoPE), ``q_mask [B,S]`` bool (False rows left out of QᵀQ) →
        fp32 ``(A, A_LM, G)`` ``[B,H,d,d]``."""
        if _needs_autograd(self, q):
            _warn_training_fallback()
            return self._metric_tensors_autograd(q, q_mask)
        return ops.metric_tensors(q, q_mask, *self.packed_metric_weights(),
                                  eps_ln=self.metric_eps)

    def _metric_tensors_autograd(self, q: Tensor, q_mask: Tensor | None):
        qf = q.float()
        if q_mask is not None:
            qf = qf * q_mask.to(qf.dtype)[:, :, None, None]
        A = self.layernorm1(torch.einsum("bshi,bshj->bhij", qf, qf))
        for res in self.reslayerAs:
            A = res(A)
        A_LM, G = self.plgatt_layer.g_from_metric(A)
        return A, A_LM, G

    def g_from_metric(self, A: Tensor) -> tuple[Tensor, Tensor]:
        """Steps 9–12 on a cached metric tensor ``A`` → fp32 ``(A_LM, G)`` (the 'kv' cache mode)."""
        return self.plgatt_layer.g_from_metric(A.float())

    forward = metric_tensors


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------
class GCachedAttention(nn.Module):
    """Multi-head attention with a given G (``softmax((q·G)kᵀ/√d)v``): projections ``wq, wk, wv``
    (fused into one GEMM), RoPE, ``pldr::g_attention`` / ``pldr::g_attention_decode``, ``dense``.

    G ``[B or 1, H, d, d]`` fp32; None = identity (plain SDPA)."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int = 64, bias: bool = True,
                 interleaved_rope: bool = True, rope_theta: float = 10000.0,
                 max_positions: int = 1024, rope: RotaryEmbedding | None = None):
        nn.Module.__init__(self)
        self._build_attention(hidden_size, num_heads, head_dim, bias, interleaved_rope, rope_theta,
                              max_positions, rope)

    def _build_attention(self, hidden_size, num_heads, head_dim, bias, interleaved_rope,
                         rope_theta, max_positions, rope):
        if hidden_size != num_heads * head_dim:
            raise ValueError(f"hidden_size ({hidden_size}) must equal num_heads ({num_heads}) x "
                             f"head_dim ({head_dim})")
        D = hidden_size
        self.num_heads, self.head_dim = num_heads, head_dim
        self.wq = nn.Linear(D, D, bias=bias)
        self.wk = nn.Linear(D, D, bias=bias)
        self.wv = nn.Linear(D, D, bias=bias)
        self.dense = nn.Linear(D, D, bias=bias)
        # A model passes one RotaryEmbedding shared by its layers (non-persistent tables only).
        self.rope = rope if rope is not None else RotaryEmbedding(head_dim, rope_theta,
                                                                  interleaved_rope, max_positions)
        projections = ("wq", "wk", "wv")
        self._qkv_weight = ParameterPack(self, [f"{p}.weight" for p in projections], (3 * D, D))
        self._qkv_bias = (ParameterPack(self, [f"{p}.bias" for p in projections], (3 * D,))
                          if bias else None)
        self._repack_qkv()

    def _repack_qkv(self) -> None:
        self._qkv_weight.repack()
        if self._qkv_bias is not None:
            self._qkv_bias.repack()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._repack_qkv()
        return self

    def project(self, x: Tensor, rotation) -> tuple[Tensor, Tensor, Tensor]:
        """``x [B,S,D]`` → post-RoPE q, k and v ``[B,S,H,d]`` (views; only the last dim contiguous)."""
        B, S, _ = x.shape
        H, d = self.num_heads, self.head_dim
        if _needs_autograd(self, x):
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
            qk = torch.stack((q, k), dim=2).view(B, S, 2 * H, d)
            v = v.view(B, S, H, d)
        else:
            bias = self._qkv_bias.get() if self._qkv_bias is not None else None
            qkv = F.linear(x, self._qkv_weight.get(), bias).view(B, S, 3, H, d)
            qk, v = qkv[:, :, :2].reshape(B, S, 2 * H, d), qkv[:, :, 2]
        qk = self.rope(qk, rotation)
        return qk[:, :, :H], qk[:, :, H:], v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, G: Tensor | None,
               key_mask: Tensor | None = None, causal: bool = True) -> Tensor:
        """Full-sequence G-attention ``[B,S,H,d]`` (prefill / uncached forward)."""
        if _needs_autograd(self, q, k, v, G):
            _warn_training_fallback()
            return reference.g_attention(q, k, v, G, key_mask, causal)[0]
        return ops.g_attention(q, k, v, G, key_mask, causal)[0]

    def output(self, o: Tensor) -> Tensor:
        B, S = o.shape[:2]
        return self.dense(o.reshape(B, S, self.num_heads * self.head_dim))

    def forward(self, x: Tensor, G: Tensor | None, positions: Tensor | None = None,
                key_mask: Tensor | None = None, causal: bool = True) -> Tensor:
        """Uncached attention of ``x [B,S,D]`` with a given G; positions default to 0..S-1."""
        B, S, _ = x.shape
        if positions is None:
            positions = torch.arange(S, device=x.device)[None].expand(B, S)
        q, k, v = self.project(x, self.rope.rotation(positions))
        return self.output(self.attend(q, k, v, G, key_mask, causal))

    def decode(self, x: Tensor, G: Tensor | None, rotation, k_cache: Tensor,
               v_cache: Tensor, cache_seqlens: Tensor, cache_start: Tensor | None = None
               ) -> Tensor:
        """One generation step: append this step's k/v to the caches in place at ``cache_seqlens``
        and attend to rows ``cache_start … cache_seqlens`` (``pldr::g_attention_decode``)."""
        q, k, v = self.project(x, rotation)
        o = ops.g_attention_decode(q, k_cache, v_cache, cache_seqlens, k, v, cache_start, G)
        return self.output(o)


class PowerLawGraphAttention(GCachedAttention, MetricLearner):
    """The PLGA block (``mha1``): projections, RoPE, metric learner → G, G-attention, ``dense``.

    State-dict keys are those of the authors' ``plgMultiHeadAttention``: ``wq, wk, wv, dense``,
    ``plgatt_layer.*``, ``layernorm1.*``, ``reslayerAs.*``."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int = 64, A_dff: int = 170,
                 num_reslayerA: int = 8, num_denseA: int = 2, eps: float = 1e-6,
                 bias: bool = True, glu_bias: bool = True, interleaved_rope: bool = True,
                 rope_theta: float = 10000.0, max_positions: int = 1024,
                 rope: RotaryEmbedding | None = None):
        nn.Module.__init__(self)
        self._build_attention(hidden_size, num_heads, head_dim, bias, interleaved_rope,
                              rope_theta, max_positions, rope)
        self._build_metric_learner(head_dim, num_heads, A_dff, num_reslayerA, num_denseA, eps,
                                   glu_bias)

    def _apply(self, fn, recurse=True):
        MetricLearner._apply(self, fn, recurse)  # keeps the G path fp32, repacks its weights
        self._repack_qkv()
        return self

    def forward(self, x: Tensor, positions: Tensor | None = None,
                attention_mask: Tensor | None = None, include_pad_in_g: bool = False,
                return_metric: bool = False):
        """Uncached PLGA of ``x [B,S,D]``. ``attention_mask [B,S]`` (1 = token, 0 = pad) masks pad
        keys and, unless ``include_pad_in_g``, leaves pad rows out of QᵀQ."""
        B, S, _ = x.shape
        if positions is None:
            positions = torch.arange(S, device=x.device)[None].expand(B, S)
        q, k, v = self.project(x, self.rope.rotation(positions))
        key_mask = None if attention_mask is None else attention_mask.bool()
        q_mask = None if include_pad_in_g else key_mask
        A, A_LM, G = self.metric_tensors(q, q_mask)
        out = self.output(self.attend(q, k, v, G, key_mask, causal=True))
        return (out, (A, A_LM, G)) if return_metric else out


class SwiGLU(GLUVariant):
    """The authors' ``GLUVariant`` (``gluw3(silu(gluw1(x)) * gluw2(x))``) with gluw1/gluw2 fused
    into one GEMM at inference."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, bias: bool = True):
        super().__init__(d_in, d_hidden, d_out, bias)
        self._w12 = ParameterPack(self, ["gluw1.weight", "gluw2.weight"], (2 * d_hidden, d_in))
        self._b12 = (ParameterPack(self, ["gluw1.bias", "gluw2.bias"], (2 * d_hidden,))
                     if bias else None)
        self._repack()

    def _repack(self) -> None:
        self._w12.repack()
        if self._b12 is not None:
            self._b12.repack()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._repack()
        return self

    def forward(self, x: Tensor) -> Tensor:
        if _needs_autograd(self, x):
            return super().forward(x)
        h = F.linear(x, self._w12.get(), self._b12.get() if self._b12 is not None else None)
        gate, up = h.chunk(2, dim=-1)
        return self.gluw3(F.silu(gate) * up)
