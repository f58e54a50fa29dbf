"""Pieces the op test modules share to define their cases: readable ids, a generator seeded by
the id (a case draws the same inputs wherever and in whatever order it runs), masks, bitwise
comparison."""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from pldr_kernels.testing import random_attention_inputs, random_g

Tensor = torch.Tensor
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
LOW_PRECISION = (torch.bfloat16, torch.float16)


def generator(case_id: str) -> torch.Generator:
    """A CPU generator seeded by the case id."""
    return torch.Generator().manual_seed(zlib.crc32(case_id.encode()))


def ragged_key_mask(B: int, Sk: int, gen: torch.Generator) -> Tensor:
    """Random holes (30 %) in every row, and row 0 left-padded over its first half."""
    mask = torch.rand(B, Sk, generator=gen) > 0.3
    mask[0, : Sk // 2] = False
    return mask


def holes_key_mask(B: int, Sk: int, gen: torch.Generator) -> Tensor:
    """Half the keys masked at random, and row 0 left-padded over 3/4 of its keys (whole key
    tiles of 64 fully masked when Sk ≥ 128)."""
    mask = torch.rand(B, Sk, generator=gen) > 0.5
    mask[0, : 3 * Sk // 4] = False
    return mask


def i32(values, device="cpu") -> Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Bitwise equality that also holds for NaN entries (garbage cache rows are NaN)."""
    def raw(t):
        return t.detach().cpu().contiguous().view(torch.uint8)

    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(raw(a), raw(b))


def param_case(size: str = "medium", **params) -> SimpleNamespace:
    """A property test's case: the ``params`` as attributes, the ``size`` it needs
    (backends.SIZES) and a readable ``id`` ("bf16-Sn5", "S37-d64")."""
    def show(name, value):
        return DTYPE_NAMES[value] if isinstance(value, torch.dtype) else f"{name}{value}"

    return SimpleNamespace(**params, size=size,
                           id="-".join(show(k, v) for k, v in params.items()))


@dataclass(frozen=True)
class AttentionCase:
    """One case of the g_attention tests, forward (tests/test_g_attention.py) and backward
    (tests/test_g_attention_backward.py); the id names it and seeds its inputs."""
    B: int
    Sq: int
    Sk: int
    H: int
    d: int
    dtype: torch.dtype
    causal: bool
    G: str = "batch"     # "none", "batch" (one G per batch row) or "shared" (one for all rows)
    mask: str = "none"   # "none", "ragged" (cases.ragged_key_mask) or "holes" (holes_key_mask)
    scale: float | None = None
    size: str = "medium"

    @property
    def id(self) -> str:
        parts = [f"B{self.B}", f"Sq{self.Sq}", f"Sk{self.Sk}", f"H{self.H}", f"d{self.d}",
                 DTYPE_NAMES[self.dtype], "causal" if self.causal else "full", f"G{self.G}"]
        if self.mask != "none":
            parts.append(f"mask{self.mask}")
        if self.scale is not None:
            parts.append(f"scale{self.scale:g}")
        return "-".join(parts)

    def inputs(self):
        """``q, k, v, G, key_mask`` on the CPU, drawn from a generator seeded by the id."""
        return self._draw(with_dout=False)[1:]

    def backward_inputs(self):
        """``dout, q, k, v, G, key_mask``: ``dout`` (like q) is drawn right after q, k, v."""
        return self._draw(with_dout=True)

    def _draw(self, with_dout: bool):
        gen = generator(self.id)
        q, k, v = random_attention_inputs(self.B, self.Sq, self.Sk, self.H, self.d, self.dtype,
                                          generator=gen)
        dout = torch.randn(q.shape, generator=gen).to(self.dtype) if with_dout else None
        G = {"none": None, "batch": self.B, "shared": 1}[self.G]
        G = None if G is None else random_g(G, self.H, self.d, generator=gen)
        mask = {"none": lambda: None, "ragged": lambda: ragged_key_mask(self.B, self.Sk, gen),
                "holes": lambda: holes_key_mask(self.B, self.Sk, gen)}[self.mask]()
        return dout, q, k, v, G, mask
