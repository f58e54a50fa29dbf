"""Shared test helpers: tolerance rule of DESIGN.md §4, realistic inputs and weights."""
from __future__ import annotations

import torch

import pldr_kernels  # noqa: F401  (loads torch.ops.pldr)

# Realistic inputs live in the package (the benchmark uses them too); re-exported for the tests.
from pldr_kernels.testing import (  # noqa: F401
    METRIC_WEIGHT_ORDER,
    make_metric_weights,
    metric_args,
    random_g,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FP32_REL_TOL = 1e-5
LOW_PRECISION_FLOOR = 1e-5
HAS_CUDA_KERNELS = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "pldr::g_attention", "CUDA")


def max_abs_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def assert_close_to_reference(out: torch.Tensor, ref64: torch.Tensor,
                              peer: torch.Tensor | None = None, name: str = "out",
                              rel_tol: float = FP32_REL_TOL, floor: float = LOW_PRECISION_FLOOR):
    """DESIGN.md §4: compare a kernel output with the fp64 oracle.

    fp32 (peer None): max |out − ref| ≤ rel_tol · max |ref| (a norm-wise relative error).
    Low precision: max |out − ref| ≤ 2 · max |peer − ref| + floor, where ``peer`` is the same math
    done by PyTorch in the kernel's dtype.
    """
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    finite = torch.isfinite(ref64)
    assert torch.equal(torch.isfinite(out.double()), finite), f"{name}: non-finite entries differ"
    o, r = out.double()[finite], ref64.double()[finite]
    err = max_abs_err(o, r)
    if peer is None:
        scale = r.abs().max().item() if r.numel() else 0.0
        bound = rel_tol * max(scale, 1e-30)
        detail = f"rel_tol {rel_tol} x max|ref| {scale:.3e}"
    else:
        peer_err = max_abs_err(peer.double()[finite], r)
        bound = 2 * peer_err + floor
        detail = f"2 x PyTorch-same-dtype error {peer_err:.3e} + {floor}"
    if not err <= bound:
        diff = (o - r).abs()
        idx = torch.topk(diff.flatten(), min(5, diff.numel())).indices
        worst = ", ".join(f"[{i}] got {o.flatten()[i].item():.6g} want {r.flatten()[i].item():.6g}"
                          for i in idx.tolist())
        raise AssertionError(f"{name}: max abs error {err:.3e} > bound {bound:.3e} ({detail}); "
                             f"worst: {worst}")
