"""Do two contestants compute the same thing? The DESIGN.md §4 tolerance rule, for benchmarks.

Every contestant's output is compared with an oracle (the reference in fp64, or fp32 where fp64 is
too large); passing the rule against the same oracle bounds the contestants' distance from each
other. fp32: max|out − oracle| ≤ 1e-5 · max|oracle|. Lower precision, or math whose fp32 rounding is
amplified (the metric learner's power stage): max|out − oracle| ≤ 2 · max|peer − oracle| + floor,
where ``peer`` is the same math done by PyTorch in that dtype. (Same rule as
tests/testing.py:assert_close_to_reference, returning a verdict instead of raising.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FP32_REL_TOL = 1e-5
LOW_PRECISION_FLOOR = 1e-5


class DisagreementError(AssertionError):
    """A contestant's output is outside the tolerance: its timings must not be reported as valid."""


@dataclass
class Verdict:
    ok: bool
    max_abs_err: float
    bound: float
    detail: str

    def raise_if_bad(self, name: str) -> None:
        if not self.ok:
            raise DisagreementError(f"{name}: {self.detail}")


def _max_abs(x: torch.Tensor) -> float:
    return x.abs().max().item() if x.numel() else 0.0


def check_agreement(out: torch.Tensor, oracle: torch.Tensor, peer: torch.Tensor | None = None,
                    rel_tol: float = FP32_REL_TOL, floor: float = LOW_PRECISION_FLOOR) -> Verdict:
    """Apply the §4 rule to ``out`` (``peer`` None → the fp32 relative rule)."""
    if tuple(out.shape) != tuple(oracle.shape):
        return Verdict(False, float("inf"), 0.0,
                       f"shape {tuple(out.shape)} differs from the oracle's {tuple(oracle.shape)}")
    o, r = out.double(), oracle.double()
    finite = torch.isfinite(r)
    if not torch.equal(torch.isfinite(o), finite):
        bad = int((torch.isfinite(o) != finite).sum())
        return Verdict(False, float("inf"), 0.0, f"{bad} entries finite in one and not the other")
    err = _max_abs(o[finite] - r[finite])
    if peer is None:
        scale = _max_abs(r[finite])
        bound = rel_tol * max(scale, 1e-30)
        rule = f"rel_tol {rel_tol:g} x max|oracle| {scale:.3e}"
    else:
        peer_err = _max_abs(peer.double()[finite] - r[finite])
        bound = 2 * peer_err + floor
        rule = f"2 x PyTorch-same-dtype error {peer_err:.3e} + {floor:g}"
    ok = err <= bound
    return Verdict(ok, err, bound, f"max abs error {err:.3e} {'<=' if ok else '>'} bound "
                                   f"{bound:.3e} ({rule})")
