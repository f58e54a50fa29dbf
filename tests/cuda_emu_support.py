"""Helpers for tests that run CUDA device code through the CPU emulator (tools/cuda_emu)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "cuda_emu"))
import harness  # noqa: E402

skip_without_compiler = pytest.mark.skipif(not harness.have_compiler(),
                                           reason=f"no C++ compiler ({harness.CXX}) for the emulator")


def run_emulated(driver, inputs, params, outputs):
    return harness.run_driver(Path(driver), inputs, params, outputs)
