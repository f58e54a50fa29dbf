import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    import pldr_kernels.__main__ as m
    return m.report().splitlines()
