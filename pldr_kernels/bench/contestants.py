"""The contestants of each op: pldr_kernels, the reference, and what a user would otherwise write.

Every contestant takes the same inputs (model layout ``[B, S, H, d]``, fp32 ``G``) and returns the
same thing (the attention output as a contiguous ``[B, S, H, d]`` tensor in the working dtype, or
the metric learner's ``(A, A_LM, G)``), so the timed work is identical:
  * ``pldr_kernels``  — ``torch.ops.pldr.*`` (skipped with the reason when no kernel is registered
                        for the device yet);
  * ``reference``     — ``pldr_kernels.reference`` (the oracle's math, computed in fp32);
  * ``eager``         — the authors' formulation in the working dtype: ``q·G``, matmul, mask,
                        softmax (fp32, as the HF port's eager path), matmul;
  * ``sdpa_<backend>``— ``q̃ = q·G`` then ``F.scaled_dot_product_attention`` pinned to one backend
                        with ``torch.nn.attention.sdpa_kernel`` (each backend the device has);
  * ``flex_compiled`` — ``q̃`` then ``torch.compile(flex_attention)`` with a causal block mask.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import ops as pk_ops
from .. import reference

OP_NAMES = ("g_attention", "g_attention_decode", "metric_tensors")


@dataclass
class Contestant:
    name: str
    fn: Callable[[], object] | None = None
    skip_reason: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def available(self) -> bool:
        return self.fn is not None and self.skip_reason is None


def pldr_kernel_missing(op: str, device: torch.device) -> str | None:
    """Why ``torch.ops.pldr.<op>`` cannot run on ``device`` (None when it can)."""
    if pk_ops._LOAD_ERROR is not None:
        return f"pldr_kernels._C is not built ({pk_ops._LOAD_ERROR}); run `make build`"
    key = "CUDA" if device.type == "cuda" else "CPU"
    if device.type == "cuda":
        try:
            from .._build_info import BUILD_INFO
        except ImportError:
            BUILD_INFO = {}
        if not BUILD_INFO.get("with_cuda"):
            return "this build has no CUDA kernels (rebuild with a CUDA torch and nvcc on PATH)"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"pldr::{op}", key):
        return f"no {key} kernel registered for pldr::{op} yet"
    return None


# ---------------------------------------------------------------------------------------------
# Attention formulations
# ---------------------------------------------------------------------------------------------
def premultiply(q: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``q̃ = q·G`` in fp32, cast to q's dtype, as ``[B, H, S, d]`` (what a user feeds to SDPA)."""
    return torch.einsum("bshi,bhij->bhsj", q.float(), G).to(q.dtype)


def eager_g_attention(q, k, v, G, causal: bool, scale: float) -> torch.Tensor:
    """The authors' (HF eager) formulation in the working dtype; bottom-right causal mask."""
    Sq, Sk = q.shape[1], k.shape[1]
    qg = premultiply(q, G)
    scores = torch.matmul(qg, k.transpose(1, 2).transpose(-1, -2)) * scale
    if causal:
        blocked = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).triu(Sk - Sq + 1)
        scores = scores.masked_fill(blocked, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v.transpose(1, 2)).transpose(1, 2).contiguous()


def sdpa_backends(device: torch.device) -> dict[str, object]:
    """The SDPA backends worth trying on ``device``, by short name."""
    from torch.nn.attention import SDPBackend

    names = {"flash": "FLASH_ATTENTION", "math": "MATH"}
    if device.type == "cuda":
        names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
    return {short: getattr(SDPBackend, attr) for short, attr in names.items()
            if hasattr(SDPBackend, attr)}


def make_sdpa(backend, q, k, v, G, causal: bool, scale: float) -> Callable[[], torch.Tensor]:
    from torch.nn.attention import sdpa_kernel

    if causal and q.shape[1] != k.shape[1]:
        raise ValueError("SDPA's is_causal is top-left aligned; only Sq == Sk is compared")

    def run():
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(premultiply(q, G), k.transpose(1, 2),
                                                 v.transpose(1, 2), is_causal=causal, scale=scale)
        return out.transpose(1, 2).contiguous()
    return run


_FLEX = {}


def compiled_flex():
    """``torch.compile(flex_attention)``, built once per process (compilation is the slow part)."""
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def make_flex(q, k, v, G, causal: bool, scale: float) -> Callable[[], torch.Tensor]:
    from torch.nn.attention.flex_attention import create_block_mask

    Sq, Sk = q.shape[1], k.shape[1]
    block_mask = None
    if causal:
        offset = Sk - Sq

        def bottom_right_causal(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + offset
        block_mask = create_block_mask(bottom_right_causal, B=None, H=None, Q_LEN=Sq, KV_LEN=Sk,
                                       device=q.device)
    flex = compiled_flex()

    def run():
        out = flex(premultiply(q, G), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                   scale=scale)
        return out.transpose(1, 2).contiguous()
    return run


def attention_contestants(op: str, q, k, v, G, causal: bool, k_cache=None, v_cache=None,
                          cache_seqlens=None, with_flex: bool = True,
                          flex_skip_reason: str | None = None) -> list[Contestant]:
    """Contestants for ``g_attention`` (prefill) or ``g_attention_decode`` (``q`` has Sn = 1).

    Decode contestants read the first ``cache_seqlens`` rows of the cache and append nothing, so
    repeated calls do identical work (the append is a copy of 2·B·H·d values, the same for all).
    """
    device = q.device
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d)
    out: list[Contestant] = []
    missing = pldr_kernel_missing(op, device)
    if op == "g_attention":
        out.append(Contestant("pldr_kernels", None if missing else
                              (lambda: pk_ops.g_attention(q, k, v, G, None, causal)[0]), missing))
        out.append(Contestant("reference", lambda: reference.g_attention(q, k, v, G, None,
                                                                         causal)[0]))
    else:
        out.append(Contestant("pldr_kernels", None if missing else
                              (lambda: pk_ops.g_attention_decode(q, k_cache, v_cache,
                                                                 cache_seqlens, G=G)), missing))
        out.append(Contestant("reference", lambda: reference.g_attention_decode(
            q, k_cache, v_cache, cache_seqlens, G=G)))
    out.append(Contestant("eager", lambda: eager_g_attention(q, k, v, G, causal, scale)))
    for short, backend in sdpa_backends(device).items():
        out.append(Contestant(f"sdpa_{short}", make_sdpa(backend, q, k, v, G, causal, scale)))
    if not with_flex:
        out.append(Contestant("flex_compiled", None, flex_skip_reason or "disabled"))
    else:
        try:
            out.append(Contestant("flex_compiled", make_flex(q, k, v, G, causal, scale)))
        except Exception as exc:  # torch without flex, or a mask it cannot build here
            out.append(Contestant("flex_compiled", None,
                                  f"FlexAttention unavailable: {type(exc).__name__}: {exc}"))
    return out


def metric_contestants(q, weights: dict[str, torch.Tensor]) -> list[Contestant]:
    """``pldr_kernels`` against ``reference.metric_tensors`` — which *is* the authors' eager
    formulation (an ``F.linear`` per SwiGLU, fp32), so there is no separate eager row."""
    from .inputs import metric_args

    args = metric_args(weights)
    missing = pldr_kernel_missing("metric_tensors", q.device)
    return [
        Contestant("pldr_kernels", None if missing else
                   (lambda: pk_ops.metric_tensors(q, None, *args)), missing),
        Contestant("reference", lambda: reference.metric_tensors(q, None, *args)),
    ]


def timed_first_call(fn: Callable[[], object]):
    """``(result, seconds)`` of one call (used to report torch.compile's compile time)."""
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0
