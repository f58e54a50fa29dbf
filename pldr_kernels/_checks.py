"""The input checks of csrc/common/checks.h, in Python, for the fake (meta) kernels in ops.py.

Under FakeTensor (torch.compile, opcheck, the meta device) the C++ checks never run, so each fake
kernel runs these first: a bad call fails at trace time with the error the real kernel would give,
word for word (tests/test_fake_kernels.py holds the two to that), instead of returning tensors of a
made-up shape. Same functions, same order, same messages as checks.h; ``torch._check`` so that
symbolic sizes become guards rather than errors. The one check left to the kernels is the value
check of the cache bounds (``check_cache_bounds_host``): a fake tensor has no values.

A double is printed as C++'s ostream prints it (``%g``: ``f"{x:g}"``).
"""
from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from enum import Enum
from typing import NamedTuple

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


# The smallest magnitude a double rounds to inf at in fp32: FLT_MAX + half an ulp (the midpoint
# rounds to even, i.e. to inf).
_FP32_ROUNDS_TO_INF = float.fromhex("0x1.ffffffp127")
FP32_MAX = float.fromhex("0x1.fffffep127")


def fits_fp32(x: float) -> bool:
    """Whether the double ``x`` rounds to a finite fp32."""
    return abs(x) < _FP32_ROUNDS_TO_INF


def to_fp32(x: float) -> float:
    """``static_cast<float>(x)`` for an ``x`` that fits fp32 (round to nearest even)."""
    return struct.unpack("f", struct.pack("f", x))[0]


LOG2E = to_fp32(1.4426950408889634)  # csrc/common/numerics.h kLog2e


def check_scale(scale: float | None) -> None:
    if scale is None:
        return
    torch._check(math.isfinite(scale),
                 lambda: f"scale must be a finite float or None, got {scale:g}.")
    folds = (fits_fp32(scale) and fits_fp32(scale * LOG2E)
             and fits_fp32(to_fp32(scale) * LOG2E))
    torch._check(folds, lambda: f"scale = {scale:g} overflows fp32, where the kernels use it: "
                 f"|scale| · log2(e) must be finite in fp32 (|scale| <= {FP32_MAX / LOG2E:g}).")


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


def check_kv_heads(t: Tensor, name: str, H) -> None:
    """Grouped-query / multi-query attention (docs/design.md §3.2): ``t`` (k, v, the decode's
    caches) carries H_kv heads, H_kv dividing H; query head h reads kv head h // (H / H_kv)."""
    H_kv = t.size(2)
    torch._check(H_kv == H or (H_kv >= 1 and H % H_kv == 0), lambda: f"{name}.shape[2] "
                 f"(key/value heads H_kv) must divide the query heads H = {H} (grouped-query "
                 f"attention: query head h uses kv head h // (H / H_kv)), got {H_kv} (shape "
                 f"{shape_str(t)}).")


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
    check_kv_heads(k, "k", H)
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


# ---- memory overlap: the search of checks.h, step for step (docs/design.md §3.5) ---------------
class Overlap(Enum):
    NO = 0
    YES = 1
    TOO_IRREGULAR = 2


OVERLAP_SEARCH_BUDGET = 4096


class _Budget:
    def __init__(self) -> None:
        self.left = OVERLAP_SEARCH_BUDGET


def _sum_can_reach(digits: list[tuple[int, int, int]], t: int, rest_lo: list, rest_hi: list,
                   lo, hi, budget: _Budget) -> bool:
    """Whether Σ_{u >= t} coeff_u · x_u, x_u in [lo_u, hi_u], can land in [lo, hi]."""
    budget.left -= 1
    if budget.left < 0:
        return False
    if t == len(digits):
        return lo <= 0 <= hi
    coeff, digit_lo, digit_hi = digits[t]
    first = max(digit_lo, -((rest_hi[t + 1] - lo) // coeff))  # ceil((lo - rest_hi) / coeff)
    last = min(digit_hi, (hi - rest_lo[t + 1]) // coeff)
    for x in range(first, last + 1):
        if _sum_can_reach(digits, t + 1, rest_lo, rest_hi, lo - coeff * x, hi - coeff * x,
                          budget):
            return True
        if budget.left < 0:
            return False
    return False


def _search_overlap(digits: list[tuple[int, int, int]], lo, hi) -> Overlap:
    digits = sorted(digits, key=lambda g: g[0], reverse=True)
    n = len(digits)
    rest_lo, rest_hi = [0] * (n + 1), [0] * (n + 1)
    for t in reversed(range(n)):
        coeff, digit_lo, digit_hi = digits[t]
        rest_lo[t] = rest_lo[t + 1] + coeff * digit_lo
        rest_hi[t] = rest_hi[t + 1] + coeff * digit_hi
    budget = _Budget()
    if _sum_can_reach(digits, 0, rest_lo, rest_hi, lo, hi, budget):
        return Overlap.YES
    return Overlap.TOO_IRREGULAR if budget.left < 0 else Overlap.NO


def self_overlap(t: Tensor) -> Overlap:
    """Whether two different elements of ``t`` share a byte."""
    if t.numel() <= 1 or t.is_contiguous():
        return Overlap.NO
    item = t.element_size()
    dims = sorted(((t.stride(i) * item, -(t.size(i) - 1), t.size(i) - 1)
                   for i in range(t.dim()) if t.size(i) > 1), key=lambda g: g[0])
    for i, (coeff, _, _) in enumerate(dims):
        if coeff == 0 or (i > 0 and coeff == dims[i - 1][0]):
            return Overlap.YES
    for m in range(len(dims)):
        digits = dims[:m + 1]
        digits[m] = (digits[m][0], 1, digits[m][2])
        found = _search_overlap(digits, -(item - 1), item - 1)
        if found is not Overlap.NO:
            return found
    return Overlap.NO


def overlap_between(a: Tensor, b: Tensor) -> Overlap:
    """Whether ``a`` and ``b`` share a byte."""
    if a.numel() == 0 or b.numel() == 0 or not torch._C._is_alias_of(a, b):
        return Overlap.NO
    item_a, item_b = a.element_size(), b.element_size()
    begin_a, begin_b = a.storage_offset() * item_a, b.storage_offset() * item_b
    end_a, end_b = begin_a + item_a, begin_b + item_b
    digits = []
    for i in range(a.dim()):
        end_a += (a.size(i) - 1) * a.stride(i) * item_a
        if a.size(i) > 1 and a.stride(i) != 0:
            digits.append((a.stride(i) * item_a, 0, a.size(i) - 1))
    for i in range(b.dim()):
        end_b += (b.size(i) - 1) * b.stride(i) * item_b
        if b.size(i) > 1 and b.stride(i) != 0:
            digits.append((b.stride(i) * item_b, -(b.size(i) - 1), 0))
    if end_a <= begin_b or end_b <= begin_a:
        return Overlap.NO
    merged: list[tuple] = []  # one digit per coefficient: equal strides add their bounds
    for coeff, lo, hi in sorted(digits, key=lambda g: g[0], reverse=True):
        if merged and merged[-1][0] == coeff:
            merged[-1] = (coeff, merged[-1][1] + lo, merged[-1][2] + hi)
        else:
            merged.append((coeff, lo, hi))
    delta = begin_b - begin_a
    return _search_overlap(merged, delta - (item_a - 1), delta + (item_b - 1))


def check_no_self_overlap(cache: Tensor, name: str) -> None:
    found = self_overlap(cache)
    torch._check(found is Overlap.NO, lambda: f"{name} must not overlap itself in memory "
                 "(g_attention_decode writes into it in place), got shape "
                 f"{shape_str(cache)} with strides {seq_str(cache.stride())}"
                 + (", where different elements share memory" if found is Overlap.YES else
                    ", too irregular to prove that no two elements share memory")
                 + ". Allocate the cache with its full shape (e.g. torch.zeros(B, Smax, H, d)), "
                 "not as an expanded or overlapping view.")


def check_no_overlap(t: Tensor, name: str, cache: Tensor, cache_name: str,
                     both_written: bool) -> None:
    found = overlap_between(t, cache)
    got = ("got views that share memory" if found is Overlap.YES else
           "got views too irregular to prove that they do not share memory")
    if both_written:
        torch._check(found is Overlap.NO, lambda: f"{name} and {cache_name} must not overlap in "
                     f"memory (g_attention_decode writes into both in place), {got}. Pass two "
                     "separate caches.")
    else:
        torch._check(found is Overlap.NO, lambda: f"{name} must not overlap {cache_name} in "
                     f"memory (g_attention_decode writes into {cache_name} in place while it "
                     f"reads {name}), {got}. Pass a separate tensor, e.g. {name}.clone().")


def check_decode_caches_writable(q: Tensor, k_cache: Tensor, v_cache: Tensor,
                                 cache_seqlens: Tensor, k_new: Tensor | None,
                                 v_new: Tensor | None, cache_start: Tensor | None,
                                 G: Tensor | None) -> None:
    caches = ((k_cache, "k_cache"), (v_cache, "v_cache"))
    for cache, name in caches:
        torch._check(not cache.requires_grad, lambda name=name: f"{name} must not require grad: "
                     "g_attention_decode writes into it in place and has no backward "
                     "(docs/design.md §3.5). Allocate the cache with requires_grad=False.")
    for cache, name in caches:
        check_no_self_overlap(cache, name)
    check_no_overlap(k_cache, "k_cache", v_cache, "v_cache", both_written=True)
    reads = ((q, "q"), (k_new, "k_new"), (v_new, "v_new"), (cache_seqlens, "cache_seqlens"),
             (cache_start, "cache_start"), (G, "G"))
    for t, name in reads:
        if t is None:
            continue
        for cache, cache_name in caches:
            check_no_overlap(t, name, cache, cache_name, both_written=False)


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
    check_kv_heads(k_cache, "k_cache", H)
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
            check_rank(t, name, 4, "[B, Sn, H_kv, d]")
            check_shape(t, name, (B, Sn, k_cache.size(2), d))
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
    check_decode_caches_writable(q, k_cache, v_cache, cache_seqlens, k_new, v_new, cache_start, G)


def check_metric_eps(eps_ln: float, eps_adj: float) -> None:
    torch._check(fits_fp32(eps_ln) and eps_ln > 0 and to_fp32(eps_ln) > 0, lambda: "eps_ln must be "
                 "> 0 and finite in fp32, where the kernels use it (the LayerNorm epsilon), got "
                 f"{eps_ln:g}.")
    torch._check(fits_fp32(eps_adj) and eps_adj >= 0 and (eps_adj == 0 or to_fp32(eps_adj) > 0),
                 lambda: "eps_adj must be >= 0 and finite in fp32, where the kernels use it, and "
                 "not so small that it rounds to 0 there (the floor added to A_LM before the "
                 f"power, docs/spec.md §5.2; 0 = no floor), got {eps_adj:g}.")


def check_metric_tensors_inputs(q: Tensor, q_mask: Tensor | None, ln0_w: Tensor, ln0_b: Tensor,
                                w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor,
                                b3: Tensor, lnA_w: Tensor, lnA_b: Tensor, W: Tensor, b: Tensor,
                                pw: Tensor, a: Tensor, ba: Tensor, eps_ln: float,
                                eps_adj: float) -> None:
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
    check_metric_eps(eps_ln, eps_adj)


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
                                         pw: Tensor, a: Tensor, ba: Tensor, eps_ln: float,
                                         eps_adj: float) -> None:
    check_metric_tensors_inputs(q, q_mask, ln0_w, ln0_b, w1, b1, w2, b2, w3, b3, lnA_w, lnA_b, W,
                                b, pw, a, ba, eps_ln, eps_adj)
    B, _, H, d = q.shape
    for grad, name in ((grad_A, "grad_A"), (grad_A_LM, "grad_A_LM"), (grad_G, "grad_G")):
        if grad is None:
            continue
        check_device(grad, name, q.device)
        check_dtype(grad, name, torch.float32,
                    "The gradients of metric_tensors' outputs are fp32, like the outputs.")
        check_shape(grad, name, (B, H, d, d))


# ---- linear_small / swiglu_small (docs/design.md §3.9) ----------------------------------------
class LinearArgNames(NamedTuple):
    """checks.h ``LinearArgNames``: what the messages call a linear's weight, bias and scale."""
    weight: str = "weight"
    bias: str = "bias"
    scale: str = "scale"


def check_small_linear_weights(weight: Tensor, bias: Tensor | None, scale: Tensor | None,
                               device: torch.device, layout: str,
                               names: LinearArgNames) -> None:
    """checks.h ``check_small_linear_weights``."""
    w, b, s = names
    torch._check(weight.dtype in (torch.float32, torch.bfloat16, torch.int8),
                 lambda: f"{w} must be float32, bfloat16 or int8, got {dtype_str(weight.dtype)}.")
    check_rank(weight, w, 2, layout)
    torch._check(weight.device == device, lambda: f"{w} must be on the same device as x "
                 f"({device}), got {weight.device}.")
    torch._check(weight.is_contiguous(), lambda: f"{w} must be contiguous, got strides "
                 f"{seq_str(weight.stride())}. Call .contiguous() on it.")
    rows = weight.size(0)
    if bias is not None:
        torch._check(bias.device == device, lambda: f"{b} must be on the same device as x "
                     f"({device}), got {bias.device}.")
        torch._check(bias.dtype in (torch.float32, torch.bfloat16), lambda: f"{b} must be "
                     f"float32 or bfloat16, got {dtype_str(bias.dtype)}.")
        check_shape(bias, b, (rows,))
    if weight.dtype == torch.int8:
        torch._check(scale is not None, lambda: f"{s} is required with an int8 {w}: the fp32 "
                     f"scale of each output channel ({w} row), shape [{rows}].")
    else:
        torch._check(scale is None, lambda: f"{s} is only for an int8 {w}, got {w} of dtype "
                     f"{dtype_str(weight.dtype)}.")
    if scale is not None:
        torch._check(scale.device == device, lambda: f"{s} must be on the same device as x "
                     f"({device}), got {scale.device}.")
        check_dtype(scale, s, torch.float32)
        check_shape(scale, s, (rows,))


def check_linear_small_inputs(x: Tensor, weight: Tensor, bias: Tensor | None,
                              scale: Tensor | None, swiglu: bool) -> tuple[int, int]:
    """checks.h ``check_linear_small_inputs``; returns (rows of weight, output features)."""
    torch._check(x.dtype in (torch.float32, torch.bfloat16),
                 lambda: f"x must be float32 or bfloat16, got {dtype_str(x.dtype)}.")
    torch._check(x.dim() >= 1, lambda: "x must have at least 1 dimension [..., in_features], got "
                 "a 0-D tensor.")
    check_small_linear_weights(weight, bias, scale, x.device,
                               "[2 * hidden, in_features] (gate rows, then up rows)" if swiglu
                               else "[out_features, in_features]", LinearArgNames())
    K, rows = weight.size(1), weight.size(0)
    torch._check(x.size(-1) == K, lambda: f"x.shape[-1] (in_features) must be weight.shape[1] = "
                 f"{K}, got {x.size(-1)} (shape {shape_str(x)}).")
    check_last_dim_contiguous(x, "x")
    features = rows
    if swiglu:
        torch._check(rows % 2 == 0, lambda: f"weight.shape[0] (gate and up rows) must be even, "
                     f"got {rows}.")
        features = rows // 2
    return rows, features


# ---- cross_entropy_forward / cross_entropy_backward (docs/design.md §3.10) --------------------
def check_cross_entropy_inputs(logits: Tensor, targets: Tensor) -> None:
    """checks.h ``check_cross_entropy_inputs`` (the targets' values are the kernels' check)."""
    check_dtype(logits, "logits", torch.float32)
    check_rank(logits, "logits", 2, "[rows, vocabulary]")
    check_last_dim_contiguous(logits, "logits")
    check_dtype(targets, "targets", torch.int64)
    check_shape(targets, "targets", (logits.size(0),))
    torch._check(targets.device == logits.device, lambda: "targets must be on the same device as "
                 f"logits ({logits.device}), got {targets.device}.")


def check_cross_entropy_backward_inputs(logits: Tensor, lse: Tensor, targets: Tensor,
                                        grad_nll: Tensor, start: int, end: int,
                                        grad_logits: Tensor | None) -> None:
    """checks.h ``check_cross_entropy_backward_inputs``."""
    check_cross_entropy_inputs(logits, targets)
    N, V = logits.shape
    for t, name in ((lse, "lse"), (grad_nll, "grad_nll")):
        check_dtype(t, name, torch.float32)
        check_shape(t, name, (N,))
        torch._check(t.device == logits.device, lambda t=t, name=name: f"{name} must be on the "
                     f"same device as logits ({logits.device}), got {t.device}.")
    torch._check(0 <= start <= end <= V, lambda: "start and end must give columns of logits, "
                 f"0 <= start <= end <= {V} = logits.shape[1], got start = {start}, end = {end}.")
    if grad_logits is not None:
        check_dtype(grad_logits, "grad_logits", torch.float32)
        check_shape(grad_logits, "grad_logits", (N, V))
        check_last_dim_contiguous(grad_logits, "grad_logits")
        torch._check(grad_logits.device == logits.device, lambda: "grad_logits must be on the "
                     f"same device as logits ({logits.device}), got {grad_logits.device}.")


# ---- transpose_2d (docs/design.md §3.11) ------------------------------------------------------
def check_transpose_2d_input(x: Tensor) -> None:
    """checks.h ``check_transpose_2d_input``."""
    check_dtype(x, "x", torch.float32)
    check_rank(x, "x", 2, "[rows, columns]")
    check_last_dim_contiguous(x, "x")


# ---- decode_layer (docs/design.md §3.12) -------------------------------------------------------
class DecodeLayerLinear(NamedTuple):
    """checks.h ``DecodeLayerLinear``: one of the layer's linears and its argument names."""
    weight: Tensor
    bias: Tensor | None
    scale: Tensor | None
    names: LinearArgNames


def check_decode_layer_linear(linear: DecodeLayerLinear, device: torch.device, rows, cols,
                              layout: str) -> None:
    check_small_linear_weights(linear.weight, linear.bias, linear.scale, device, layout,
                               linear.names)
    check_shape(linear.weight, linear.names.weight, (rows, cols))


def check_decode_layer_norm(t: Tensor, name: str, x: Tensor) -> None:
    torch._check(t.device == x.device, lambda: f"{name} must be on the same device as x "
                 f"({x.device}), got {t.device}.")
    torch._check(t.dtype in (x.dtype, torch.float32), lambda: f"{name} must have x's dtype "
                 f"({dtype_str(x.dtype)}) or float32, got {dtype_str(t.dtype)}.")
    check_shape(t, name, (x.size(2),))


def check_rope_table(t: Tensor, name: str, device: torch.device, shape: tuple, what: str) -> None:
    torch._check(t.device == device, lambda: f"{name} must be on the same device as x ({device}), "
                 f"got {t.device}.")
    check_dtype(t, name, torch.float32, "The RoPE tables are fp32.")
    torch._check(t.dim() == 4 and all(a == b for a, b in zip(t.shape, shape)),
                 lambda: f"{name} must have shape {seq_str(shape)} ({what}), got {shape_str(t)}.")


def check_decode_layer_inputs(x: Tensor, qkv: DecodeLayerLinear, dense: DecodeLayerLinear,
                              ln1_weight: Tensor, ln1_bias: Tensor, ffn12: DecodeLayerLinear,
                              ffn3: DecodeLayerLinear, ln2_weight: Tensor, ln2_bias: Tensor,
                              k_cache: Tensor, rope_cos: Tensor, rope_sin: Tensor,
                              interleaved_rope: bool, eps: float) -> None:
    """checks.h ``check_decode_layer_inputs``."""
    check_rank(x, "x", 3, "[B, 1, D] (one new token per row)")
    torch._check(x.dtype in (torch.float32, torch.bfloat16),
                 lambda: f"x must be float32 or bfloat16, got {dtype_str(x.dtype)}.")
    torch._check(x.size(1) == 1, lambda: "x.shape[1] (new tokens) must be 1: decode_layer appends "
                 f"one token per row, got {x.size(1)} (shape {shape_str(x)}).")
    check_last_dim_contiguous(x, "x")
    check_rank(k_cache, "k_cache", 4, "[B, Smax, H, d]")
    B, D, H, d = x.size(0), x.size(2), k_cache.size(2), k_cache.size(3)
    torch._check(H * d == D, lambda: "x.shape[2] (hidden size D) must be k_cache's heads x head "
                 f"dim = {H} x {d} = {H * d}, got {D}.")
    device = x.device
    check_decode_layer_linear(qkv, device, 3 * D, D, "[3 * D, D] (q, k, v rows)")
    check_decode_layer_linear(dense, device, D, D, "[D, D]")
    gate_up = "[2 * intermediate, D] (gate rows, then up rows)"
    check_rank(ffn12.weight, ffn12.names.weight, 2, gate_up)
    rows12 = ffn12.weight.size(0)
    torch._check(rows12 % 2 == 0, lambda: f"{ffn12.names.weight}.shape[0] (gate and up rows) must "
                 f"be even, got {rows12}.")
    check_decode_layer_linear(ffn12, device, rows12, D, gate_up)
    check_decode_layer_linear(ffn3, device, D, rows12 // 2, "[D, intermediate]")
    check_decode_layer_norm(ln1_weight, "ln1_weight", x)
    check_decode_layer_norm(ln1_bias, "ln1_bias", x)
    check_decode_layer_norm(ln2_weight, "ln2_weight", x)
    check_decode_layer_norm(ln2_bias, "ln2_bias", x)
    table = d // 2 if interleaved_rope else d
    what = "one angle per pair: interleaved_rope" if interleaved_rope else "d angles: rotate_half"
    check_rope_table(rope_cos, "rope_cos", device, (B, 1, 1, table), what)
    check_rope_table(rope_sin, "rope_sin", device, (B, 1, 1, table), what)
    torch._check(math.isfinite(eps) and eps >= 0, lambda: "eps (the LayerNorms') must be finite "
                 f"and >= 0, got {eps:g}.")
