"""Helpers shared by the emulation tests (tests/test_emu_*.py): torch <-> raw arrays for the
drivers run by tools/cuda_emu/harness.py."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "cuda_emu"))
import harness  # noqa: E402

EMU_DIR = Path(__file__).resolve().parent / "emu"
DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_RAW = {torch.float32: (np.float32, None), torch.bfloat16: (np.int16, torch.int16),
        torch.float16: (np.int16, torch.int16), torch.int32: (np.int32, None),
        torch.bool: (np.bool_, None)}


def to_raw(t: torch.Tensor) -> np.ndarray:
    """Contiguous numpy view of ``t``; 16-bit floats travel as their bit patterns."""
    t = t.detach().contiguous().cpu()
    np_dtype, view = _RAW[t.dtype]
    return (t.view(view) if view is not None else t).numpy()


def raw_spec(shape, dtype: torch.dtype):
    return tuple(shape), _RAW[dtype][0]


def from_raw(arr: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(np.array(arr))
    return t.view(dtype) if _RAW[dtype][1] is not None else t


def have_emulator() -> bool:
    return harness.have_compiler()


skip_without_compiler = pytest.mark.skipif(not have_emulator(),
                                           reason=f"no C++ compiler ({harness.CXX}) for the emulator")


def run(driver, inputs, params, outputs):
    """Run a driver (a file name under tests/emu/, or a path) through the emulator."""
    return harness.run_driver(EMU_DIR / driver, inputs, params, outputs)
