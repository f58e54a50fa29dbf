"""Shim for tests that still ``from testing import assert_close_to_reference`` (test_model.py,
test_nn.py): the rule lives in pldr_kernels.testing. Remove once they import it from there."""
from __future__ import annotations

from pldr_kernels.testing import FP32_REL_TOL, LOW_PRECISION_FLOOR, assert_close


def assert_close_to_reference(out, ref64, peer=None, name="out", rel_tol=FP32_REL_TOL,
                              floor=LOW_PRECISION_FLOOR):
    assert_close(out, ref64, peer, name=name, rel_tol=rel_tol, floor=floor)
