"""Shared test helpers: tolerance rule of DESIGN.md §4, realistic inputs and weights."""
from __future__ import annotations

import math
from typing import Optional

import torch

import pldr_kernels  # noqa: F401  (loads torch.ops.pldr)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FP32_REL_TOL = 1e-5
LOW_PRECISION_FLOOR = 1e-5
HAS_CUDA_KERNELS = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "pldr::g_attention", "CUDA")


def max_abs_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def assert_close_to_reference(out: torch.Tensor, ref64: torch.Tensor,
                              peer: Optional[torch.Tensor] = None, name: str = "out",
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


def make_metric_weights(d: int = 64, H: int = 2, R: int = 8, Gd: int = 2, F: int = 170,
                        device="cpu", generator: Optional[torch.Generator] = None) -> dict:
    """fp32 metric-learner + PLGA weights in the packed layout of DESIGN §3.1.

    Linear weights are xavier-uniform like the authors' init; LayerNorm affines near (1, 0); the
    power exponents pw spread over both signs so the power stage is exercised (spec §5.1).
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


METRIC_WEIGHT_ORDER = ("ln0_w", "ln0_b", "w1", "b1", "w2", "b2", "w3", "b3", "lnA_w", "lnA_b", "W",
                       "b", "pw", "a", "ba")


def metric_args(weights: dict, dtype=None) -> list:
    """Weights in the positional order of pldr::metric_tensors (after q, q_mask)."""
    return [weights[k] if dtype is None else weights[k].to(dtype) for k in METRIC_WEIGHT_ORDER]


def random_g(B: int, H: int, d: int, device="cpu") -> torch.Tensor:
    """A well-conditioned G near the identity, as learned G_LM tends to be in scale."""
    return (torch.eye(d, device=device) + 0.3 * torch.randn(B, H, d, d, device=device) / math.sqrt(d)
            ).float()
