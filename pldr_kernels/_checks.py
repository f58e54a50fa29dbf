"""The input checks of csrc/common/checks.h, in Python, for the fake (meta) kernels in ops.py.

Under FakeTensor (torch.compile, opcheck, the meta device) the C++ checks never run, so each fake
kernel runs these first: a bad call fails at trace time with the error the real kernel would give,
word for word (tests/test_fake_kernels.py holds the two to that), instead of returning tensors of a
made-up shape. Same functions, same order, same messages as checks.h; ``torch._check`` so that
symbolic sizes become guards rather than errors. The one check left to the kernels is the value
check of the cache bounds (``check_cache_bounds_host``): a fake tensor has no values.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Tensor = torch.Tensor

# c10::ScalarType names, as TORCH_CHECK prints a dtype.
_SCALAR_TYPE_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
    torch.bfloat16: "BFloat16", torch.int8: "Char", torch.uint8: "Byte", torch.int16: "Short",
    torch.int32: "Int", torch.int64: "Long", torch.bool: "Bool", torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
}


def dtype_str(dtype: torch.dtype) -> str:
    return _SCALAR_TYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def seq_str(values: Sequence) -> str:
    """A size or stride list as c10 prints an IntArrayRef: ``[1, 4, 2, 64]``."""
    return "[" + ", ".join(str(v) for v in values) + "]"


def shape_str(t: Tensor) -> str:
    return seq_str(t.shape)


def head_dim_supported(d) -> bool:
    return d == 64 or d == 128


def check_device(t: Tensor, name: str, device: torch.device) -> None:
    torch._check(t.device == device, lambda: f"{name} must be on the same device as q ({device}), "
                 f"got {t.device}. Move it with .to(q.device).")


def check_dtype(t: Tensor, name: str, expected: torch.dtype, hint: str = "") -> None:
    torch._check(t.dtype == expected, lambda: f"{name} must have dtype {dtype_str(expected)}, got "
                 f"{dtype_str(t.dtype)}. {hint}")


def check_rank(t: Tensor, name: str, rank: int, layout: str) -> None:
    torch._check(t.dim() == rank, lambda: f"{name} must be a {rank}-D tensor {layout}, got "
                 f"{t.dim()}-D tensor of shape {shape_str(t)}.")


def check_dim(t: Tensor, name: str, dim: int, expected, what: str) -> None:
    torch._check(t.size(dim) == expected, lambda: f"{name}.shape[{dim}] ({what}) must be "
                 f"{expected}, got {t.size(dim)} (shape {shape_str(t)}).")


def check_shape(t: Tensor, name: str, expected: Sequence) -> None:
    torch._check(t.dim() == len(expected) and all(a == b for a, b in zip(t.shape, expected)),
                 lambda: f"{name} must have shape {seq_str(expected)}, got {shape_str(t)}.")


def check_last_dim_contiguous(t: Tensor, name: str) -> None:
    torch._check(t.size(-1) <= 1 or t.stride(-1) == 1, lambda: f"{name} must be contiguous in its "
                 f"last dimension (stride 1), got strides {seq_str(t.stride())}. Call "
                 ".contiguous() on it.")


def check_activation_dtype(t: Tensor, name: str) -> None:
    torch._check(t.dtype in (torch.float32, torch.bfloat16, torch.float16), lambda: f"{name} must "
                 f"be float32, bfloat16 or float16, got {dtype_str(t.dtype)}.")


def check_head_dim(d, name: str) -> None:
    torch._check(head_dim_supported(d), lambda: f"{name}.shape[-1] (head dim d) must be 64 or 128, "
                 f"got {d}. pldr-kernels is instantiated for d = 64 (every published PLDR-LLM) and "
                 "d = 128.")


def check_scale(scale: float | None) -> None:
    if scale is not None:
        torch._check(math.isfinite(scale),
                     lambda: f"scale must be a finite float or None, got {scale}.")


def check_G(G: Tensor | None, device: torch.device, B, H, d) -> None:
    if G is None:
        return
    check_device(G, "G", device)
    check_dtype(G, "G", torch.float32, "The G path is fp32 (docs/spec.md §5.1): pass G.float().")
    check_rank(G, "G", 4, "[B or 1, H, d, d]")
    torch._check(G.size(0) == B or G.size(0) == 1, lambda: f"G.shape[0] (batch) must be {B} or 1 "
                 f"(shared by the batch), got {G.size(0)} (shape {shape_str(G)}).")
    check_dim(G, "G", 1, H, "heads")
    check_dim(G, "G", 2, d, "head dim")
    check_dim(G, "G", 3, d, "head dim")
    check_last_dim_contiguous(G, "G")


def check_g_attention_inputs(q: Tensor, k: Tensor, v: Tensor, G: Tensor | None,
                             key_mask: Tensor | None, scale: float | None) -> None:
    check_rank(q, "q", 4, "[B, Sq, H, d]")
    check_rank(k, "k", 4, "[B, Sk, H, d]")
    check_rank(v, "v", 4, "[B, Sk, H, d]")
    check_activation_dtype(q, "q")
    device = q.device
    check_device(k, "k", device)
    check_device(v, "v", device)
    torch._check(k.dtype == q.dtype and v.dtype == q.dtype, lambda: "q, k and v must have the same "
                 f"dtype, got q {dtype_str(q.dtype)}, k {dtype_str(k.dtype)}, v "
                 f"{dtype_str(v.dtype)}.")
    B, Sk, H, d = q.size(0), k.size(1), q.size(2), q.size(3)
    check_head_dim(d, "q")
    check_dim(k, "k", 0, B, "batch")
    check_dim(k, "k", 2, H, "heads")
    check_dim(k, "k", 3, d, "head dim")
    check_shape(v, "v", k.shape)
    check_last_dim_contiguous(q, "q")
    check_last_dim_contiguous(k, "k")
    check_last_dim_contiguous(v, "v")
    check_G(G, device, B, H, d)
    if key_mask is not None:
        check_device(key_mask, "key_mask", device)
        check_dtype(key_mask, "key_mask", torch.bool, "True = attend; pass mask.bool().")
        check_rank(key_mask, "key_mask", 2, "[B, Sk]")
        check_dim(key_mask, "key_mask", 0, B, "batch")
        check_dim(key_mask, "key_mask", 1, Sk, "keys")
    check_scale(scale)


def check_g_attention_decode_inputs(q: Tensor, k_cache: Tensor, v_cache: Tensor,
                                    cache_seqlens: Tensor, k_new: Tensor | None,
                                    v_new: Tensor | None, cache_start: Tensor | None,
                                    G: Tensor | None, scale: float | None, num_splits: int) -> None:
    check_rank(q, "q", 4, "[B, Sn, H, d]")
    check_rank(k_cache, "k_cache", 4, "[B, Smax, H, d]")
    check_rank(v_cache, "v_cache", 4, "[B, Smax, H, d]")
    check_activation_dtype(q, "q")
    device = q.device
    check_device(k_cache, "k_cache", device)
    check_device(v_cache, "v_cache", device)
    torch._check(k_cache.dtype == q.dtype and v_cache.dtype == q.dtype, lambda: "q, k_cache and "
                 f"v_cache must have the same dtype, got q {dtype_str(q.dtype)}, k_cache "
                 f"{dtype_str(k_cache.dtype)}, v_cache {dtype_str(v_cache.dtype)}.")
    B, Sn, Smax, H, d = q.size(0), q.size(1), k_cache.size(1), q.size(2), q.size(3)
    check_head_dim(d, "q")
    torch._check(Sn >= 1, lambda: f"q.shape[1] (new tokens Sn) must be at least 1, got {Sn}.")
    check_dim(k_cache, "k_cache", 0, B, "batch")
    check_dim(k_cache, "k_cache", 2, H, "heads")
    check_dim(k_cache, "k_cache", 3, d, "head dim")
    check_shape(v_cache, "v_cache", k_cache.shape)
    check_last_dim_contiguous(q, "q")
    check_last_dim_contiguous(k_cache, "k_cache")
    check_last_dim_contiguous(v_cache, "v_cache")
    check_device(cache_seqlens, "cache_seqlens", device)
    check_dtype(cache_seqlens, "cache_seqlens", torch.int32, "Pass cache_seqlens.int().")
    check_rank(cache_seqlens, "cache_seqlens", 1, "[B]")
    check_dim(cache_seqlens, "cache_seqlens", 0, B, "batch")
    torch._check((k_new is None) == (v_new is None), lambda: "k_new and v_new must be given "
                 "together (both or neither), got k_new "
                 f"{'None' if k_new is None else 'given'} and v_new "
                 f"{'None' if v_new is None else 'given'}.")
    if k_new is not None:
        for t, name in ((k_new, "k_new"), (v_new, "v_new")):
            check_device(t, name, device)
            check_dtype(t, name, q.dtype, "It must match q and the cache.")
            check_rank(t, name, 4, "[B, Sn, H, d]")
            check_shape(t, name, q.shape)
            check_last_dim_contiguous(t, name)
        torch._check(Sn <= Smax, lambda: f"q.shape[1] (new tokens Sn = {Sn}) exceeds the cache "
                     f"length Smax = {Smax}.")
    if cache_start is not None:
        check_device(cache_start, "cache_start", device)
        check_dtype(cache_start, "cache_start", torch.int32, "Pass cache_start.int().")
        check_rank(cache_start, "cache_start", 1, "[B]")
        check_dim(cache_start, "cache_start", 0, B, "batch")
    check_G(G, device, B, H, d)
    check_scale(scale)
    torch._check(num_splits >= 0, lambda: "num_splits must be >= 0 (0 = choose automatically), got "
                 f"{num_splits}.")


def check_metric_tensors_inputs(q: Tensor, q_mask: Tensor | None, ln0_w: Tensor, ln0_b: Tensor,
                                w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor,
                                b3: Tensor, lnA_w: Tensor, lnA_b: Tensor, W: Tensor, b: Tensor,
                                pw: Tensor, a: Tensor, ba: Tensor) -> None:
    check_rank(q, "q", 4, "[B, S, H, d]")
    check_activation_dtype(q, "q")
    check_last_dim_contiguous(q, "q")
    device = q.device
    B, S, H, d = q.shape
    check_head_dim(d, "q")
    if q_mask is not None:
        check_device(q_mask, "q_mask", device)
        check_dtype(q_mask, "q_mask", torch.bool, "True = real token; pass mask.bool().")
        check_rank(q_mask, "q_mask", 2, "[B, S]")
        check_dim(q_mask, "q_mask", 0, B, "batch")
        check_dim(q_mask, "q_mask", 1, S, "sequence")
    check_rank(w1, "w1", 4, "[R, Gd, F, d]")
    R, Gd, F = w1.size(0), w1.size(1), w1.size(2)
    torch._check(R >= 1 and Gd >= 1 and F >= 1, lambda: "w1 [R, Gd, F, d] must have R, Gd, F >= 1, "
                 f"got shape {shape_str(w1)}.")
    expects = (
        (ln0_w, "ln0_w", (d,)), (ln0_b, "ln0_b", (d,)), (w1, "w1", (R, Gd, F, d)),
        (b1, "b1", (R, Gd, F)), (w2, "w2", (R, Gd, F, d)), (b2, "b2", (R, Gd, F)),
        (w3, "w3", (R, Gd, d, F)), (b3, "b3", (R, Gd, d)), (lnA_w, "lnA_w", (R, d)),
        (lnA_b, "lnA_b", (R, d)), (W, "W", (H, d, d)), (b, "b", (H, d, d)),
        (pw, "pw", (H, d, d)), (a, "a", (H, d, d)), (ba, "ba", (H, d, d)),
    )
    for t, name, shape in expects:
        check_device(t, name, device)
        check_dtype(t, name, torch.float32, "Metric-learner weights are fp32 (docs/spec.md §5.1).")
        check_shape(t, name, shape)


# ---- g_attention_backward (docs/design.md §3.4) ------------------------------------------------
def check_g_attention_backward_inputs(dout: Tensor, q: Tensor, k: Tensor, v: Tensor,
                                      G: Tensor | None, out: Tensor, lse: Tensor,
                                      key_mask: Tensor | None, scale: float | None) -> None:
    check_g_attention_inputs(q, k, v, G, key_mask, scale)
    device = q.device
    for t, name in ((out, "out"), (dout, "dout")):
        check_device(t, name, device)
        check_dtype(t, name, q.dtype, "out is g_attention's first output and dout its gradient, "
                    "both in q's dtype.")
        check_rank(t, name, 4, "[B, Sq, H, d]")
        check_shape(t, name, q.shape)
        check_last_dim_contiguous(t, name)
    check_device(lse, "lse", device)
    check_dtype(lse, "lse", torch.float32, "lse is g_attention's second output (fp32).")
    check_rank(lse, "lse", 3, "[B, H, Sq]")
    check_shape(lse, "lse", (q.size(0), q.size(2), q.size(1)))


# ---- metric_tensors_backward (docs/design.md §3.4) ---------------------------------------------
def check_metric_tensors_backward_inputs(grad_A: Tensor | None, grad_A_LM: Tensor | None,
                                         grad_G: Tensor | None, q: Tensor, q_mask: Tensor | None,
                                         ln0_w: Tensor, ln0_b: Tensor, w1: Tensor, b1: Tensor,
                                         w2: Tensor, b2: Tensor, w3: Tensor, b3: Tensor,
                                         lnA_w: Tensor, lnA_b: Tensor, W: Tensor, b: Tensor,
                                         pw: Tensor, a: Tensor, ba: Tensor) -> None:
    check_metric_tensors_inputs(q, q_mask, ln0_w, ln0_b, w1, b1, w2, b2, w3, b3, lnA_w, lnA_b, W,
                                b, pw, a, ba)
    B, _, H, d = q.shape
    for grad, name in ((grad_A, "grad_A"), (grad_A_LM, "grad_A_LM"), (grad_G, "grad_G")):
        if grad is None:
            continue
        check_device(grad, name, q.device)
        check_dtype(grad, name, torch.float32,
                    "The gradients of metric_tensors' outputs are fp32, like the outputs.")
        check_shape(grad, name, (B, H, d, d))
