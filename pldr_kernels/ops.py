"""Thin Python entry points of the pldr ops and their fake (meta) kernels for torch.compile.

The ops are defined and validated in C++ (csrc/ops.cpp, csrc/common/checks.h); nothing here
re-checks inputs, so these calls cost what ``torch.ops.pldr.*`` costs.
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor

try:
    from . import _C  # noqa: F401  (static initialisers register torch.ops.pldr.*)
    _LOAD_ERROR: BaseException | None = None
except ImportError as exc:  # keep `import pldr_kernels` (and the reference) usable without a build
    _LOAD_ERROR = exc


def require_built() -> None:
    """Raise a clear error when the compiled extension is missing."""
    if _LOAD_ERROR is not None:
        raise RuntimeError(
            "pldr_kernels._C is not built or failed to load "
            f"({type(_LOAD_ERROR).__name__}: {_LOAD_ERROR}). Build it from the repository root with "
            "`pip install --no-build-isolation -e .` (or `make build`).") from _LOAD_ERROR


def built_with_cuda() -> bool:
    """Whether this build of ``_C`` holds CUDA kernels (setup.py records it in _build_info)."""
    try:
        from ._build_info import BUILD_INFO
    except ImportError:
        return False
    return bool(BUILD_INFO.get("with_cuda"))


def metric_tensors(q: Tensor, q_mask: Tensor | None, ln0_w: Tensor, ln0_b: Tensor, w1: Tensor,
                   b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor, b3: Tensor, lnA_w: Tensor,
                   lnA_b: Tensor, W: Tensor, b: Tensor, pw: Tensor, a: Tensor, ba: Tensor,
                   eps_ln: float = 1e-6, eps_adj: float = 1e-9) -> tuple[Tensor, Tensor, Tensor]:
    """Fused metric learner: ``q [B,S,H,d]`` → fp32 ``(A, A_LM, G)`` ``[B,H,d,d]`` (DESIGN §3.1)."""
    return torch.ops.pldr.metric_tensors(q, q_mask, ln0_w, ln0_b, w1, b1, w2, b2, w3, b3, lnA_w,
                                         lnA_b, W, b, pw, a, ba, eps_ln, eps_adj)


def g_attention(q: Tensor, k: Tensor, v: Tensor, G: Tensor | None = None,
                key_mask: Tensor | None = None, causal: bool = False,
                scale: float | None = None) -> tuple[Tensor, Tensor]:
    """``softmax((q·G)·kᵀ·scale + mask)·v`` → ``(out [B,Sq,H,d], lse [B,H,Sq])`` (DESIGN §3.2)."""
    return torch.ops.pldr.g_attention(q, k, v, G, key_mask, causal, scale)


def g_attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                       k_new: Tensor | None = None, v_new: Tensor | None = None,
                       cache_start: Tensor | None = None, G: Tensor | None = None,
                       scale: float | None = None, num_splits: int = 0) -> Tensor:
    """Decode step over a KV-cache, appending ``k_new/v_new`` in place first (DESIGN §3.3)."""
    return torch.ops.pldr.g_attention_decode(q, k_cache, v_cache, cache_seqlens, k_new, v_new,
                                             cache_start, G, scale, num_splits)


if _LOAD_ERROR is None:

    @torch.library.register_fake("pldr::metric_tensors")
    def _metric_tensors_fake(q, q_mask, ln0_w, ln0_b, w1, b1, w2, b2, w3, b3, lnA_w, lnA_b, W, b,
                             pw, a, ba, eps_ln=1e-6, eps_adj=1e-9):
        B, _, H, d = q.shape
        return tuple(q.new_empty((B, H, d, d), dtype=torch.float32) for _ in range(3))

    @torch.library.register_fake("pldr::g_attention")
    def _g_attention_fake(q, k, v, G=None, key_mask=None, causal=False, scale=None):
        B, Sq, H, d = q.shape
        out = q.new_empty((B, Sq, H, d))
        lse = q.new_empty((B, H, Sq), dtype=torch.float32)
        return out, lse

    @torch.library.register_fake("pldr::g_attention_decode")
    def _g_attention_decode_fake(q, k_cache, v_cache, cache_seqlens, k_new=None, v_new=None,
                                 cache_start=None, G=None, scale=None, num_splits=0):
        return q.new_empty(q.shape)
