"""Realistic inputs: random activations, a G near the identity, packed metric-learner weights.

The one definition used by the benchmark harness, the benchmark scripts and the tests
(tests/testing.py re-exports these): the benchmark must run the kernels on data like the tests'
and the model's, not on degenerate values.
"""
from __future__ import annotations

import math

import torch

METRIC_WEIGHT_ORDER = ("ln0_w", "ln0_b", "w1", "b1", "w2", "b2", "w3", "b3", "lnA_w", "lnA_b", "W",
                       "b", "pw", "a", "ba")

# The paper's 110M model (pldr-spec.md §1): the metric learner's shape.
A_DFF, NUM_RESLAYER_A, NUM_DENSE_A = 170, 8, 2


def random_g(B: int, H: int, d: int, device="cpu", generator=None) -> torch.Tensor:
    """A well-conditioned fp32 G near the identity, as learned G_LM tends to be in scale.

    Drawn on the CPU (from ``generator``, else the global CPU RNG) and then moved, so a seed gives
    the same G on every device."""
    noise = torch.randn(B, H, d, d, generator=generator).to(device)
    return (torch.eye(d, device=device) + 0.3 * noise / math.sqrt(d)).float()


def make_metric_weights(d: int = 64, H: int = 14, R: int = NUM_RESLAYER_A, Gd: int = NUM_DENSE_A,
                        F: int = A_DFF, device="cpu",
                        generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
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


def metric_args(weights: dict[str, torch.Tensor], dtype=None) -> list:
    """Weights in the positional order of pldr::metric_tensors (after q, q_mask)."""
    return [weights[k] if dtype is None else weights[k].to(dtype) for k in METRIC_WEIGHT_ORDER]


def randn(shape, dtype, device, generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
