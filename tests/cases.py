"""Pieces the op test modules share to define their cases: readable ids, a generator seeded by
the id (a case draws the same inputs wherever and in whatever order it runs), masks, bitwise
comparison."""
from __future__ import annotations

import zlib
from types import SimpleNamespace

import torch

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
