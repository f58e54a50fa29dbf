"""Drop-in modules built on the pldr ops: MetricLearner, GCachedAttention, PowerLawGraphAttention.

Parameter names follow the authors' modules (docs/spec.md §4), so ``PowerLawGraphAttention`` loads
an ``mha1`` state dict as is. Weights that the ops take packed (the metric learner's ``[R,Gd,F,d]``
stacks, the fused q/k/v projection, SwiGLU's gluw1/gluw2) are packed once: the parameters become
views into the packed tensor (:class:`ParameterPack`), so in-place updates (``load_state_dict``,
optimiser steps) need no copy.

The G path (metric learner → G) stays fp32 when the module is cast to bf16/fp16: ``.to(bfloat16)``
converts the projections but keeps the metric learner parameters in fp32 (docs/spec.md §5).

Inside a model, each attention layer owns its generation cache (:class:`KVCache`, attached by
``PLDRForCausalLM.setup_caches``) and runs one step of the model through :meth:`forward_step`, with
the per-step inputs every layer shares (:class:`StepInputs`).

Training (docs/design.md §3.4.2): with autograd on, the modules run the same ops, whose registered
autograd formulas give the gradients; the packed weights are then stacked from the parameters in
the forward (:meth:`ParameterPack.get`), so gradients reach the parameters. Under
``torch.autocast`` the attention op gets q/k/v in the autocast dtype while the G path (the metric
learner's weights, A, A_LM and G) stays fp32.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import ops, reference
from .layers import GLUVariant, PlgaLayer, ResLayerA, apply_linear, linear

Tensor = torch.Tensor
METRIC_CHILDREN = ("plgatt_layer", "reslayerAs", "layernorm1")
LOW_PRECISION = (torch.bfloat16, torch.float16)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype ``torch.autocast`` gives matmuls on ``device`` here, or None outside autocast."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _keep_fp32(fn):
    """Wrap a ``Module._apply`` function so fp32 tensors are moved but never cast to bf16/fp16."""
    def apply(t: Tensor) -> Tensor:
        out = fn(t)
        if t.dtype == torch.float32 and out.dtype in LOW_PRECISION:
            return t.to(device=out.device)
        return out
    return apply


# --------------------------------------------------------------------------------------------
# Linears of a few rows: pldr::linear_small (docs/design.md §3.9)
# --------------------------------------------------------------------------------------------
SMALL_ROWS = 8  # at most this many rows of x take the weight-streaming kernels
SMALL_ROW_DTYPES = (torch.float32, torch.bfloat16)


def takes_small_rows(x: Tensor, weight: Tensor) -> bool:
    """Whether ``x·weightᵀ`` runs on ``pldr::linear_small``: a CPU tensor of at most
    :data:`SMALL_ROWS` rows and, when it has a sequence dim (``[B, S, K]``), one position per row
    (the decode step, the prefill's last-position LM head), fp32/bf16, nothing to differentiate,
    outside autocast. Otherwise :func:`~pldr_kernels.layers.linear` (prefill, training, CUDA
    tensors): a short prompt takes the GEMM of a long one (other kernels, other bits, which the
    ill-conditioned G path would amplify: design §4.3)."""
    return (x.device.type == "cpu" and ops._LOAD_ERROR is None and x.dim() >= 1
            and x.shape[-1] > 0 and x.numel() <= SMALL_ROWS * x.shape[-1]
            and (x.dim() < 3 or x.shape[-2] == 1)
            and x.dtype in SMALL_ROW_DTYPES and weight.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and not torch.is_autocast_enabled("cpu"))


def dequantize(weight: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """An int8 weight ``[N, K]`` with per-row fp32 ``scale [N]`` as ``dtype`` values."""
    return (weight.float() * scale[:, None]).to(dtype)


def linear_rows(x: Tensor, weight: Tensor, bias: Tensor | None,
                scale: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` (weight fp/bf16, or int8 with its per-row ``scale``): on
    ``pldr::linear_small`` for a few CPU rows (:func:`takes_small_rows`), else
    :func:`~pldr_kernels.layers.linear` (oneDNN for CPU fp32, else torch's) — an
    int8 weight dequantised to x's dtype for it."""
    if takes_small_rows(x, weight):
        return ops.linear_small(x, weight, bias, scale)
    if scale is not None:
        weight = dequantize(weight, scale, x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
    return linear(x, weight, bias)


class SmallRowsLinear(nn.Linear):
    """``nn.Linear`` whose forward takes :func:`linear_rows` (same parameters, init and
    state-dict keys): the model's ``dense``, ``gluw3`` and ``final_layer``."""

    computes_linear = True  # layers.is_plain_linear: training may take its own GEMMs for it

    def forward(self, x: Tensor) -> Tensor:
        return linear_rows(x, self.weight, self.bias)


# --------------------------------------------------------------------------------------------
# Packed parameters, and the one place that keeps them packed and the G path fp32
# --------------------------------------------------------------------------------------------
class _PackOfParameters(torch.autograd.Function):
    """The pack as a function of the parameters that are views into it: the forward returns the
    pack itself (no copy), the backward gives each parameter its slice of the pack's gradient."""

    @staticmethod
    def forward(ctx, packed: Tensor, *params: Tensor) -> Tensor:
        ctx.shapes = [p.shape for p in params]
        return packed

    @staticmethod
    def backward(ctx, grad: Tensor):
        slices = grad.reshape(len(ctx.shapes), -1).unbind(0)
        return None, *(g.view(shape) for g, shape in zip(slices, ctx.shapes))


def _child(obj, name: str):
    """``getattr(obj, name)``, read straight from a module's parameter/buffer/submodule dicts when
    it is there: ``Module.__getattr__`` costs ~1 µs a name, and every decode step resolves each
    pack's paths (~20 packs a step). Module's setattr/register_* keep those names out of the
    instance and class attributes, so the dicts give what getattr would."""
    if isinstance(obj, nn.Module):
        for registry in (obj._parameters, obj._buffers, obj._modules):
            if name in registry:
                return registry[name]
    return getattr(obj, name)


class ParameterPack:
    """Parameters of equal shape stored as views into one packed tensor of ``shape``.

    In-place updates of the parameters (optimiser steps, ``load_state_dict``) are seen by the pack
    for free. What replaces a parameter's storage — ``.to()``/``.cuda()``, ``load_state_dict(
    assign=True)``, a re-assigned parameter — is repaired by :meth:`ensure` (called by
    :class:`PackedModule` after each of the first two, and by :meth:`get` in eager mode).

    With autograd on, the pack itself is not a leaf of the graph: :meth:`get` returns it through
    :class:`_PackOfParameters`, so its gradient reaches each parameter without a copy of the
    weights. Parameters that are not views of the pack are stacked per call instead (a copy,
    which autograd differentiates too). In a ``torch.distributed`` run :meth:`get` never repacks,
    because a wrapper may own the parameter storage (FSDP2's unsharded parameters are views of its
    all-gather buffers, which a repack would detach from the gathered values): a stale pack is
    dropped and the parameters are stacked per call."""

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
                obj = _child(obj, name)
            params.append(obj)
        return params

    def _valid(self, params: list[Tensor] | None = None) -> bool:
        return self.packed is not None and all(
            p.data_ptr() == ptr and p.dtype == self.packed.dtype
            for p, ptr in zip(params or self.get_params(), self._ptrs))

    def stacked(self, params: list[Tensor] | None = None) -> Tensor:
        """The parameters stacked into ``shape`` (a copy, differentiable)."""
        return torch.stack(params or self.get_params()).view(self.shape)

    def repack(self) -> Tensor:
        params = self.get_params()
        # Never pack inside inference_mode: parameters must stay usable by autograd afterwards.
        with torch.inference_mode(False), torch.no_grad():
            if params[0].is_meta:  # a model built for loading: the meta torch.stack would
                # import torch._dynamo (~2 s of a CLI's start-up, docs/design.md §2)
                flat = params[0].new_empty((len(params), *params[0].shape))
            else:
                flat = torch.stack([p.detach() for p in params])
            for i, p in enumerate(params):
                p.data = flat[i]
        self.packed = flat.view(self.shape)
        self._ptrs = [p.data_ptr() for p in params]
        return self.packed

    def ensure(self) -> None:
        params = self.get_params()
        if any(type(p) not in (Tensor, nn.Parameter) for p in params):
            self.packed = None  # e.g. FSDP2's DTensor shards: no pack of them, get() stacks
        elif not self._valid(params):
            self.repack()

    def get(self) -> Tensor:
        """The packed tensor the ops read: the pack (no copy; with autograd on, differentiable
        with respect to the parameters), or the parameters stacked when they are not its views."""
        params = self.get_params()
        # torch.compile cannot trace data_ptr(): a compiled forward trusts the pack, which
        # PackedModule keeps valid across .to() and load_state_dict(assign=True).
        if not torch.compiler.is_compiling() and not self._valid(params):
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                self.packed = None  # the parameters live elsewhere now: free the stale copy
            else:
                self.repack()
        if self.packed is None:
            return self.stacked(params)
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return _PackOfParameters.apply(self.packed, *params)
        return self.packed


class PackedModule(nn.Module):
    """Base of the modules here that hold packed weights or tensors that must stay fp32.

    Two rules, one place. (1) ``fp32_children`` (child names) and ``fp32_own`` (this module's own
    tensors) stay fp32 when the module is cast to bf16/fp16 (docs/spec.md §5). (2) After a cast or
    move, every :class:`ParameterPack` in ``packs`` is re-packed.

    Why an override of the private ``Module._apply`` and not hooks: PyTorch has no public hook
    around ``.to()``/``.cuda()``/``.half()``, which all funnel through ``_apply``, and rule (1) has
    to change what the cast does, not repair it afterwards (casting the metric learner to bf16 and
    back would lose its bits). The alternative to views — the packed tensors as the parameters, with
    state-dict hooks translating the authors' keys — would keep the keys but rename the parameters
    (``named_parameters``, optimiser groups, gradients), and a derived pack refreshed from
    ``_version`` counters would cost a copy after each optimiser step. Views are updated in place
    by any optimiser, so they stay correct without either. ``load_state_dict(assign=True)``, which
    swaps parameters, has a public hook and uses it."""

    fp32_children: tuple[str, ...] = ()
    fp32_own: bool = False

    def __init__(self):
        super().__init__()
        self.packs: dict[str, ParameterPack] = {}
        self.register_load_state_dict_post_hook(_ensure_packs_after_load)

    def _apply(self, fn, recurse=True):
        if recurse:
            for name, child in self.named_children():
                child._apply(_keep_fp32(fn) if name in self.fp32_children else fn)
        super()._apply(_keep_fp32(fn) if self.fp32_own else fn, recurse=False)
        for pack in self.packs.values():
            pack.ensure()
        return self


def _ensure_packs_after_load(module: PackedModule, incompatible_keys) -> None:
    for pack in module.packs.values():
        pack.ensure()


# --------------------------------------------------------------------------------------------
# RoPE with precomputed tables
# --------------------------------------------------------------------------------------------
class RotaryEmbedding(PackedModule):
    """``reference.apply_rope`` with cached fp32 cos/sin tables (non-persistent, grown on demand).

    ``interleaved=True``: v51/torchtune pairs (2j, 2j+1), computed in fp32 and cast back.
    ``interleaved=False``: v52/HF Llama rotate_half, cos/sin cast to the activation dtype first."""

    fp32_own = True

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

    def reserve(self, n: int) -> None:
        """Grow the tables to cover positions ``0 … n-1`` (done before a compiled or captured step,
        which must not grow them)."""
        if n > self.cos.shape[0]:
            self._build(max(n, 2 * self.cos.shape[0]), self.cos.device)

    def tables(self, positions: Tensor, max_position: int | None = None) -> tuple[Tensor, Tensor]:
        """fp32 ``(cos, sin)`` of ``positions [B, S]``: ``[B, S, 1, d/2]`` (interleaved: one angle
        per pair) or ``[B, S, 1, d]`` (rotate_half: the angles twice), what
        ``pldr::decode_layer`` takes.

        ``max_position`` is a host bound on ``positions`` (the model knows one from the shapes);
        without it the bound is read from the device in eager mode, and under torch.compile the
        positions must lie within the tables already built (``max_positions``, :meth:`reserve`)."""
        if max_position is None and not torch.compiler.is_compiling():
            max_position = int(positions.max()) if positions.numel() else -1
        if max_position is not None:
            self.reserve(max_position + 1)
        flat = positions.reshape(-1)
        shape = (*positions.shape, 1, -1)
        cos = self.cos.index_select(0, flat).view(shape)
        sin = self.sin.index_select(0, flat).view(shape)
        if self.interleaved:
            return cos, sin
        return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)

    def rotation(self, positions: Tensor, max_position: int | None = None):
        """The rotation for ``positions [B, S]``, computed once per step and shared by all layers:
        complex ``cos + i·sin`` ``[B, S, 1, d/2]`` (interleaved) or fp32 ``(cos, sin)``
        ``[B, S, 1, d]`` (rotate_half); ``max_position`` as in :meth:`tables`."""
        cos, sin = self.tables(positions, max_position)
        return torch.complex(cos, sin) if self.interleaved else (cos, sin)

    def forward(self, x: Tensor, rotation) -> Tensor:
        """Rotate ``x [B, S, n, d]`` by a :meth:`rotation`; the math of ``reference.apply_rope``."""
        if self.interleaved:  # (x0 + i·x1)(cos + i·sin): the adjacent-pair rotation, in fp32
            # The casts only when they cast: a no-op .float()/.to() is still a dispatched op.
            x32 = x if x.dtype == torch.float32 else x.float()
            xc = torch.view_as_complex(x32.unflatten(-1, (-1, 2)))
            out = torch.view_as_real(xc * rotation).flatten(-2)
            return out if out.dtype == x.dtype else out.to(x.dtype)
        cos, sin = rotation[0].to(x.dtype), rotation[1].to(x.dtype)
        half = self.head_dim // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin


# --------------------------------------------------------------------------------------------
# One model step: what the layers share, and each attention layer's cache
# --------------------------------------------------------------------------------------------
CACHE_USES = ("off", "write", "read_G", "decode", "decode_G_from_A")


@dataclass
class StepInputs:
    """What every layer of a model shares in one forward step (built once per step).

    ``cache_use`` says what the attention layers do with their :class:`KVCache`:
    'off' (no cache: a plain forward), 'write' (full sequence; store its k/v, when the cache has
    room for them, and its metric tensors), 'read_G' (full sequence with the cached G, nothing
    written: cache mode 'g'), 'decode' (append this step's k/v at ``cache_seqlens`` and attend with
    the cached G) or 'decode_G_from_A' (the same with G recomputed from the cached A: mode 'kv')."""
    rotation: Tensor | tuple[Tensor, Tensor]
    key_mask: Tensor | None = None  # [B, S] bool, False = pad key (full-sequence steps)
    q_mask: Tensor | None = None  # [B, S] bool, False = row left out of QᵀQ
    cache_use: str = "off"
    cache_seqlens: Tensor | None = None  # decode: int32 [B], rows already in the cache
    cache_start: Tensor | None = None  # decode: int32 [B], first real row; None without padding

    def __post_init__(self):
        if self.cache_use not in CACHE_USES:
            raise ValueError(f"cache_use must be one of {CACHE_USES}, got {self.cache_use!r}")
        if self.cache_use in ("decode", "decode_G_from_A") and self.cache_seqlens is None:
            raise ValueError(f"cache_use={self.cache_use!r} needs cache_seqlens")

    @property
    def decoding(self) -> bool:
        return self.cache_use in ("decode", "decode_G_from_A")


@dataclass
class KVCache:
    """One attention layer's generation cache: static ``k, v [B, Smax, H, d]`` in the model dtype
    (None in the cache modes without a KV-cache; on the CPU each head's rows are contiguous,
    ``allocate`` says why), and the metric tensors in use ``A, A_LM, G``,
    fp32 ``[rows, H, d, d]`` (rows = B, or 1 when one G serves the batch). Written in place, so the
    tensors keep their addresses (CUDA-graph replay, torch.compile)."""
    k: Tensor | None
    v: Tensor | None
    A: Tensor
    A_LM: Tensor
    G: Tensor

    @classmethod
    def allocate(cls, batch_size: int, max_length: int | None, num_heads: int, head_dim: int,
                 metric_rows: int, dtype: torch.dtype, device: torch.device) -> KVCache:
        kv_shape = (batch_size, max_length, num_heads, head_dim)
        metric_shape = (metric_rows, num_heads, head_dim, head_dim)

        def kv():
            if max_length is None:
                return None
            if torch.device(device).type == "cpu":
                # Each head's rows contiguous underneath ([B, H, Smax, d] seen as [B, Smax, H, d];
                # the op takes any row stride): a CPU decode step streams every head's K and V
                # rows, and rows H·d apart defeat the prefetchers (Intel Xeon, 2 threads, cache
                # length 4096: 8.8 GB/s in the [B, Smax, H, d] layout, 16.8 in this one).
                heads_outer = (batch_size, num_heads, max_length, head_dim)
                return torch.zeros(heads_outer, dtype=dtype, device=device).transpose(1, 2)
            return torch.zeros(kv_shape, dtype=dtype, device=device)

        def metric():
            return torch.zeros(metric_shape, dtype=torch.float32, device=device)
        return cls(k=kv(), v=kv(), A=metric(), A_LM=metric(), G=metric())

    @property
    def max_length(self) -> int:
        return 0 if self.k is None else self.k.shape[1]

    def write(self, k: Tensor, v: Tensor, A: Tensor, A_LM: Tensor, G: Tensor) -> None:
        """Store a full sequence's k/v (rows 0 … S-1, when there is a KV-cache) and metric tensors
        (their first ``rows`` batch rows)."""
        if self.k is not None:
            S = k.shape[1]
            self.k[:, :S] = k
            self.v[:, :S] = v
        rows = self.G.shape[0]
        self.A.copy_(A[:rows])
        self.A_LM.copy_(A_LM[:rows])
        self.G.copy_(G[:rows])


# --------------------------------------------------------------------------------------------
# Metric learner
# --------------------------------------------------------------------------------------------
class MetricLearner(PackedModule):
    """The deep PLGA network (docs/spec.md §2 steps 6–12): post-RoPE ``q [B,S,H,d]`` → fp32
    (A, A_LM, G).

    Children (authors' names): ``layernorm1`` (LN over rows of QᵀQ), ``reslayerAs.{r}.denseAs.{g}``
    (SwiGLUs) with ``reslayerAs.{r}.layernormA``, and ``plgatt_layer.{Wlst,blst,pwlst,alst,balst}``.
    """

    fp32_children = METRIC_CHILDREN

    def __init__(self, head_dim: int, num_heads: int, A_dff: int = 170, num_reslayerA: int = 8,
                 num_denseA: int = 2, eps: float = 1e-6, glu_bias: bool = True):
        PackedModule.__init__(self)
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

        def stack(name: str, linear_name: str, what: str, shape) -> None:
            if what == "bias" and not glu_bias:
                return  # the op takes zero biases (packed_metric_weights)
            self.packs[name] = ParameterPack(
                self, [f"{g}.{linear_name}.{what}" for g in glus], shape)

        stack("w1", "gluw1", "weight", (R, Gd, A_dff, d))
        stack("b1", "gluw1", "bias", (R, Gd, A_dff))
        stack("w2", "gluw2", "weight", (R, Gd, A_dff, d))
        stack("b2", "gluw2", "bias", (R, Gd, A_dff))
        stack("w3", "gluw3", "weight", (R, Gd, d, A_dff))
        stack("b3", "gluw3", "bias", (R, Gd, d))
        self.packs["lnA_w"] = ParameterPack(
            self, [f"reslayerAs.{r}.layernormA.weight" for r in range(R)], (R, d))
        self.packs["lnA_b"] = ParameterPack(
            self, [f"reslayerAs.{r}.layernormA.bias" for r in range(R)], (R, d))
        self._zero_biases = {"b1": (R, Gd, A_dff), "b2": (R, Gd, A_dff), "b3": (R, Gd, d)}
        for pack in self.packs.values():
            pack.repack()

    def packed_metric_weights(self) -> list[Tensor]:
        """Weights in the positional order of ``pldr::metric_tensors`` (after q, q_mask)."""
        w = {}
        for name in ("w1", "b1", "w2", "b2", "w3", "b3", "lnA_w", "lnA_b"):
            if name in self.packs:
                w[name] = self.packs[name].get()
            else:  # glu_bias=False: the op takes zero biases
                w[name] = torch.zeros(self._zero_biases[name], device=self.layernorm1.weight.device)
        plga = self.plgatt_layer
        return [self.layernorm1.weight, self.layernorm1.bias, w["w1"], w["b1"], w["w2"], w["b2"],
                w["w3"], w["b3"], w["lnA_w"], w["lnA_b"], plga.Wlst, plga.blst, plga.pwlst,
                plga.alst, plga.balst]

    def metric_tensors(self, q: Tensor, q_mask: Tensor | None = None
                       ) -> tuple[Tensor, Tensor, Tensor]:
        """``q [B,S,H,d]`` (post-RoPE), ``q_mask [B,S]`` bool (False rows left out of QᵀQ) →
        fp32 ``(A, A_LM, G)`` ``[B,H,d,d]``.

        The op reads q in its own dtype and computes in fp32 (docs/spec.md §5.1); its weights
        are fp32 parameters. It has no autocast kernel, so ``torch.autocast`` passes it every
        argument unchanged: the G path stays fp32 under autocast, forward and backward."""
        return ops.metric_tensors(q, q_mask, *self.packed_metric_weights(),
                                  eps_ln=self.metric_eps)

    def g_from_metric(self, A: Tensor) -> tuple[Tensor, Tensor]:
        """Steps 9–12 on a cached metric tensor ``A`` → fp32 ``(A_LM, G)`` (the 'kv' cache mode);
        fp32 under autocast too, like the op."""
        with torch.autocast(A.device.type, enabled=False):
            return self.plgatt_layer.g_from_metric(A.float())

    forward = metric_tensors


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------
class GCachedAttention(PackedModule):
    """Multi-head attention with a given G (``softmax((q·G)kᵀ/√d)v``): projections ``wq, wk, wv``
    (fused into one GEMM), RoPE, ``pldr::g_attention`` / ``pldr::g_attention_decode``, ``dense``.

    G ``[B or 1, H, d, d]`` fp32; None = identity (plain SDPA). ``kv_cache`` is this layer's
    generation cache inside a model (None otherwise)."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int = 64, bias: bool = True,
                 interleaved_rope: bool = True, rope_theta: float = 10000.0,
                 max_positions: int = 1024, rope: RotaryEmbedding | None = None):
        PackedModule.__init__(self)
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
        self.dense = SmallRowsLinear(D, D, bias=bias)
        # A model passes one RotaryEmbedding shared by its layers (non-persistent tables only).
        self.rope = rope if rope is not None else RotaryEmbedding(head_dim, rope_theta,
                                                                  interleaved_rope, max_positions)
        self.kv_cache: KVCache | None = None
        projections = ("wq", "wk", "wv")
        self.packs["qkv_weight"] = ParameterPack(self, [f"{p}.weight" for p in projections],
                                                 (3 * D, D))
        if bias:
            self.packs["qkv_bias"] = ParameterPack(self, [f"{p}.bias" for p in projections],
                                                   (3 * D,))
        self.packs["qkv_weight"].repack()
        if bias:
            self.packs["qkv_bias"].repack()

    def project(self, x: Tensor, rotation) -> tuple[Tensor, Tensor, Tensor]:
        """``x [B,S,D]`` → post-RoPE q, k and v ``[B,S,H,d]`` (views; the last dim contiguous)."""
        B, S, _ = x.shape
        H, d = self.num_heads, self.head_dim
        bias = self.packs["qkv_bias"].get() if "qkv_bias" in self.packs else None
        scale = self.packs["qkv_scale"].get() if "qkv_scale" in self.packs else None  # int8
        qkv = linear_rows(x, self.packs["qkv_weight"].get(), bias, scale).view(B, S, 3, H, d)
        # split (views): its backward concatenates the two gradients, where slicing would
        # zero-fill a qkv-sized gradient for each part and add them.
        qk, v = qkv.split((2, 1), dim=2)
        qk, v = qk.reshape(B, S, 2 * H, d), v.view(B, S, H, d)
        if v.requires_grad:  # the attention op saves v: a view would keep all of qkv alive
            v = v.contiguous()
        # split, not two slices: its backward is one cat, where each slice's backward would
        # zero-fill a qk-sized gradient
        q, k = self.rope(qk, rotation).split(H, dim=2)
        return q, k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, G: Tensor | None,
               key_mask: Tensor | None = None, causal: bool = True) -> Tensor:
        """Full-sequence G-attention ``[B,S,H,d]`` (prefill / uncached forward).

        The op has no autocast kernel (autocast passes its arguments unchanged), so under
        ``torch.autocast`` q/k/v are cast here to the autocast dtype, as a matmul's inputs would
        be, and G stays fp32 (q·G is formed in fp32 inside the op)."""
        low = autocast_dtype(q.device)
        if low is not None:
            q, k, v = q.to(low), k.to(low), v.to(low)
        return ops.g_attention(q, k, v, G, key_mask, causal)[0]

    def output(self, o: Tensor) -> Tensor:
        B, S = o.shape[:2]
        return apply_linear(self.dense, o.reshape(B, S, self.num_heads * self.head_dim))

    def rotation_of(self, x: Tensor, positions: Tensor | None):
        """The RoPE rotation for ``x [B,S,D]`` at ``positions [B,S]`` (default 0 … S-1, whose bound
        is known on the host, so no device read)."""
        B, S, _ = x.shape
        if positions is None:
            positions = torch.arange(S, device=x.device)[None].expand(B, S)
            return self.rope.rotation(positions, S - 1)
        return self.rope.rotation(positions)

    def forward(self, x: Tensor, G: Tensor | None, positions: Tensor | None = None,
                key_mask: Tensor | None = None, causal: bool = True) -> Tensor:
        """Uncached attention of ``x [B,S,D]`` with a given G; positions default to 0..S-1."""
        q, k, v = self.project(x, self.rotation_of(x, positions))
        return self.output(self.attend(q, k, v, G, key_mask, causal))

    # ---- one step of a model, with this layer's cache -----------------------------------------
    def forward_step(self, x: Tensor, inputs: StepInputs,
                     metric: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
        """One model step of ``x [B,S,D]`` (S = 1 when decoding), causal; ``metric`` is the given
        (A, A_LM, G) of a predefined-G model (None: computed, for the metric learner)."""
        q, k, v = self.project(x, inputs.rotation)
        cache = self.kv_cache
        if inputs.cache_use != "off" and cache is None:
            raise RuntimeError(f"cache_use={inputs.cache_use!r} needs this layer's kv_cache; "
                               f"set it up first (PLDRForCausalLM.setup_caches)")
        if inputs.decoding:
            G = self._decode_G(cache, inputs.cache_use)
            o = ops.g_attention_decode(q, cache.k, cache.v, inputs.cache_seqlens, k, v,
                                       inputs.cache_start, G)
            return self.output(o)
        if inputs.cache_use == "read_G":
            G = cache.G
        else:
            A, A_LM, G = self._metric(q, inputs.q_mask, metric)
            if inputs.cache_use == "write":
                cache.write(k, v, A, A_LM, G)
        return self.output(self.attend(q, k, v, G, inputs.key_mask, causal=True))

    def _metric(self, q: Tensor, q_mask: Tensor | None, metric):
        """(A, A_LM, G) of a full-sequence step: the given ones (identity G when None)."""
        return metric if metric is not None else (None, None, None)

    def _decode_G(self, cache: KVCache, cache_use: str) -> Tensor:
        return cache.G  # no metric learner to recompute G with: the cached G serves both modes


class PowerLawGraphAttention(GCachedAttention, MetricLearner):
    """The PLGA block (``mha1``): projections, RoPE, metric learner → G, G-attention, ``dense``.

    State-dict keys are those of the authors' ``plgMultiHeadAttention``: ``wq, wk, wv, dense``,
    ``plgatt_layer.*``, ``layernorm1.*``, ``reslayerAs.*``."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int = 64, A_dff: int = 170,
                 num_reslayerA: int = 8, num_denseA: int = 2, eps: float = 1e-6,
                 bias: bool = True, glu_bias: bool = True, interleaved_rope: bool = True,
                 rope_theta: float = 10000.0, max_positions: int = 1024,
                 rope: RotaryEmbedding | None = None):
        PackedModule.__init__(self)
        self._build_attention(hidden_size, num_heads, head_dim, bias, interleaved_rope,
                              rope_theta, max_positions, rope)
        self._build_metric_learner(head_dim, num_heads, A_dff, num_reslayerA, num_denseA, eps,
                                   glu_bias)

    def forward(self, x: Tensor, positions: Tensor | None = None,
                attention_mask: Tensor | None = None, include_pad_in_g: bool = False,
                return_metric: bool = False):
        """Uncached PLGA of ``x [B,S,D]``. ``attention_mask [B,S]`` (1 = token, 0 = pad) masks pad
        keys and, unless ``include_pad_in_g``, leaves pad rows out of QᵀQ."""
        q, k, v = self.project(x, self.rotation_of(x, positions))
        key_mask = None if attention_mask is None else attention_mask.bool()
        q_mask = None if include_pad_in_g else key_mask
        A, A_LM, G = self.metric_tensors(q, q_mask)
        out = self.output(self.attend(q, k, v, G, key_mask, causal=True))
        return (out, (A, A_LM, G)) if return_metric else out

    def _metric(self, q: Tensor, q_mask: Tensor | None, metric):
        return self.metric_tensors(q, q_mask)

    def _decode_G(self, cache: KVCache, cache_use: str) -> Tensor:
        if cache_use == "decode_G_from_A":
            return self.g_from_metric(cache.A)[1]
        return cache.G


class _SiluTimes(torch.autograd.Function):
    """``silu(gate) · up`` that keeps only its inputs for the backward, which recomputes
    silu(gate) (one elementwise pass) instead of holding it: one [tokens, intermediate] tensor less
    per FFN in a training step (47 MiB of a 110M model's step at S = 1024). The backward is
    autograd's for ``F.silu(gate) * up`` operation for operation, so the gradients are bitwise
    the same."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0]:
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        if ctx.needs_input_grad[1]:
            grad_up = grad * F.silu(gate)
        return grad_gate, grad_up


def silu_times(gate: Tensor, up: Tensor) -> Tensor:
    """``F.silu(gate) * up``; under autograd without keeping silu(gate) (:class:`_SiluTimes`)."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SiluTimes.apply(gate, up)
    return F.silu(gate) * up


class SwiGLU(GLUVariant, PackedModule):
    """The authors' ``GLUVariant`` (``gluw3(silu(gluw1(x)) * gluw2(x))``) with gluw1/gluw2 fused
    into one GEMM at inference."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, bias: bool = True):
        super().__init__(d_in, d_hidden, d_out, bias, linear=SmallRowsLinear)
        self.packs["w12"] = ParameterPack(self, ["gluw1.weight", "gluw2.weight"],
                                          (2 * d_hidden, d_in))
        if bias:
            self.packs["b12"] = ParameterPack(self, ["gluw1.bias", "gluw2.bias"], (2 * d_hidden,))
        for pack in self.packs.values():
            pack.repack()

    def forward(self, x: Tensor) -> Tensor:
        w12 = self.packs["w12"].get()
        small_rows = takes_small_rows(x, w12)
        if small_rows or "s12" in self.packs:
            return self.forward_small_rows_or_int8(x, w12, small_rows)
        bias = self.packs["b12"].get() if "b12" in self.packs else None
        h = linear(x, w12, bias)
        gate, up = h.chunk(2, dim=-1)
        return apply_linear(self.gluw3, silu_times(gate, up))

    def forward_small_rows_or_int8(self, x: Tensor, w12: Tensor,
                                   small_rows: bool | None = None) -> Tensor:
        """Inference: silu(gate)·up in one pass over gluw1/gluw2 (``pldr::swiglu_small``, fp32
        inside) for a few CPU rows; an int8 FFN (``quantize_weights``) dequantised for more.
        ``small_rows``: :func:`takes_small_rows` of (x, w12) when the caller has it already."""
        bias = self.packs["b12"].get() if "b12" in self.packs else None
        scale = self.packs["s12"].get() if "s12" in self.packs else None
        if small_rows is None:
            small_rows = takes_small_rows(x, w12)
        if small_rows:
            h = ops.swiglu_small(x, w12, bias, scale)
        else:
            gate, up = linear_rows(x, w12, bias, scale).chunk(2, dim=-1)
            h = F.silu(gate) * up
        return self.gluw3(h)
