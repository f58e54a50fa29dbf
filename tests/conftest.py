"""Shared pytest setup: the tests directory on sys.path (backends.py, cases.py), a fixed seed,
the build report and the backends this machine runs in the header, and a ``device`` fixture.

Nothing here touches a GPU at import: whether CUDA is usable is asked when the header is printed
and when a test needs it, so collection works on any machine."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def device():
    """The device a single-device test runs on: "cuda" when the ops can run there, else "cpu"
    (Liger-Kernel's infer_device)."""
    from backends import infer_device
    return infer_device()


def pytest_report_header(config):
    from backends import BACKENDS

    import pldr_kernels.__main__ as m

    lines = m.report().splitlines()
    for b in BACKENDS:
        reason = b.skip_reason("g_attention")
        lines.append(f"backend {b.name}: " + ("runs" if reason is None else f"skipped ({reason})"))
    return lines
