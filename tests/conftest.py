"""Shared pytest setup: the tests directory on sys.path (backends.py, cases.py), the hypothesis
profiles of the fuzz suite, a fixed seed, the build report and the backends this machine runs in
the header, and a ``device`` fixture.

Nothing here touches a GPU at import: whether CUDA is usable is asked when the header is printed
and when a test needs it, so collection works on any machine."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

try:  # the fuzz suite's profiles (tests/test_fuzz.py skips where hypothesis is not installed)
    from hypothesis import settings
except ImportError:
    pass
else:
    # pldr-ci, the default: the same examples on every run and machine (derandomized, no example
    # database), no per-example deadline (a first call may compile an emulator driver), the blob
    # that replays a failure in its report. pldr-explore (pytest's
    # `--hypothesis-profile=pldr-explore`): new random examples on every run.
    _fuzz = dict(deadline=None, database=None, print_blob=True)
    settings.register_profile("pldr-ci", derandomize=True, **_fuzz)
    settings.register_profile("pldr-explore", derandomize=False, **_fuzz)
    settings.load_profile("pldr-ci")


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
