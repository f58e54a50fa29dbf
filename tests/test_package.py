"""The installed package: the extension loads, ops are registered, the build report is truthful."""
import subprocess
import sys

import pytest
import torch

import pldr_kernels
from pldr_kernels import ops

OPS = ("metric_tensors", "g_attention", "g_attention_decode")


def test_extension_loaded_and_ops_registered():
    ops.require_built()
    for op in OPS:
        assert hasattr(torch.ops.pldr, op)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pldr::{op}", "CPU"), op


def test_cuda_key_always_has_a_kernel_or_rebuild_hint():
    # Real CUDA kernels in a CUDA build; otherwise a stub whose error says how to rebuild.
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pldr::{op}", "CUDA"), op


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_only_build_says_how_to_rebuild_on_cuda_tensors():
    from pldr_kernels._build_info import BUILD_INFO
    if BUILD_INFO["with_cuda"]:
        pytest.skip("this build has CUDA kernels")
    q = torch.randn(1, 4, 1, 64, device="cuda")
    with pytest.raises(RuntimeError, match="built without CUDA kernels.*Rebuild"):
        pldr_kernels.g_attention(q, q, q)


def test_build_report_runs_and_names_every_op():
    out = subprocess.run([sys.executable, "-m", "pldr_kernels"], capture_output=True, text=True,
                         check=True).stdout
    assert "torch" in out and "cuda kernels" in out
    for op in OPS:
        assert f"pldr::{op}" in out and "CPU" in out.split(f"pldr::{op}")[1].splitlines()[0]
