"""tools/cuda_wheel.py: when tools/gpu_check.sh may use the carried wheel instead of building, and
what unpacking it puts into a tree. Synthetic wheels in a temporary tree; no CUDA needed."""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import zipfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("cuda_wheel",
                                               os.path.join(ROOT, "tools", "cuda_wheel.py"))
cuda_wheel = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cuda_wheel)

SO_BYTES = b"\x7fELF not really an extension"


def fitting_info(**overrides) -> dict:
    info = {"with_cuda": True, "cuda_archs": "9.0a", "built_with_torch": torch.__version__,
            "built_with_cuda": torch.version.cuda,
            "cpu_flags": "runtime ISA avx512/avx2/portable"}
    info.update(overrides)
    return info


def make_wheel(directory, info: dict, tags: str = "cp311-abi3") -> str:
    path = os.path.join(directory, f"pldr_kernels-0.1.0-{tags}-linux_{platform.machine()}.whl")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("pldr_kernels/__init__.py", "")
        z.writestr("pldr_kernels/_C.abi3.so", SO_BYTES)
        z.writestr("pldr_kernels/_build_info.py", f"BUILD_INFO = {info!r}\n")
    return path


@pytest.fixture
def tree(tmp_path):
    """A tree with the extension's sources (csrc/, setup.py) and a pldr_kernels/ to unpack into."""
    root = tmp_path / "tree"
    shutil.copytree(os.path.join(ROOT, "csrc"), root / "csrc")
    shutil.copy(os.path.join(ROOT, "setup.py"), root / "setup.py")
    (root / "pldr_kernels").mkdir()
    (root / ".whl").mkdir()
    return str(root)


def test_a_recorded_wheel_for_this_torch_fits(tree):
    wheel = make_wheel(os.path.join(tree, ".whl"), fitting_info())
    rec = cuda_wheel.record(wheel, tree)
    assert rec["source_sha256"] == cuda_wheel.source_hash(tree)
    assert cuda_wheel.mismatches(wheel, tree) == []


@pytest.mark.parametrize("overrides, reason", [
    ({"built_with_torch": "2.11.0+cu130-other"}, "built with torch 2.11.0+cu130-other"),
    ({"built_with_cuda": "12.1"}, "built with CUDA 12.1"),
    ({"with_cuda": False}, "no CUDA kernels"),
    ({"cpu_flags": "-march=native"}, "not for any x86-64 CPU"),
])
def test_a_wheel_built_otherwise_does_not_fit(tree, overrides, reason):
    wheel = make_wheel(os.path.join(tree, ".whl"), fitting_info(**overrides))
    cuda_wheel.record(wheel, tree)
    why = cuda_wheel.mismatches(wheel, tree)
    assert len(why) == 1 and reason in why[0], why


def test_changed_sources_or_a_missing_record_do_not_fit(tree):
    wheel = make_wheel(os.path.join(tree, ".whl"), fitting_info())
    assert any("sources are unknown" in w for w in cuda_wheel.mismatches(wheel, tree))
    cuda_wheel.record(wheel, tree)
    with open(os.path.join(tree, "csrc", "ops.cpp"), "a") as f:
        f.write("// an edit after the wheel was built\n")
    why = cuda_wheel.mismatches(wheel, tree)
    assert len(why) == 1 and "built from other sources" in why[0], why


def test_a_record_of_another_wheel_file_does_not_fit(tree):
    wheel = make_wheel(os.path.join(tree, ".whl"), fitting_info())
    cuda_wheel.record(wheel, tree)
    with open(cuda_wheel.sidecar(wheel)) as f:
        rec = json.load(f)
    rec["wheel_sha256"] = "0" * 64
    with open(cuda_wheel.sidecar(wheel), "w") as f:
        json.dump(rec, f)
    assert any("describes another wheel file" in w for w in cuda_wheel.mismatches(wheel, tree))


def test_a_wheel_for_another_python_does_not_fit(tree):
    wheel = make_wheel(os.path.join(tree, ".whl"), fitting_info(), tags="cp39-cp39")
    cuda_wheel.record(wheel, tree)
    why = cuda_wheel.mismatches(wheel, tree)
    assert len(why) == 1 and "wheel is for cp39" in why[0], why


def test_unpack_replaces_the_trees_extension_and_build_info(tree):
    stale = os.path.join(tree, "pldr_kernels", "_C.cpython-312-x86_64-linux-gnu.so")
    open(stale, "wb").close()
    wheel = make_wheel(os.path.join(tree, ".whl"), fitting_info())
    cuda_wheel.unpack(wheel, tree)
    unpacked = sorted(os.listdir(os.path.join(tree, "pldr_kernels")))
    assert unpacked == ["_C.abi3.so", "_build_info.py"]
    with open(os.path.join(tree, "pldr_kernels", "_C.abi3.so"), "rb") as f:
        assert f.read() == SO_BYTES
    assert cuda_wheel.wheel_build_info(wheel) == fitting_info()
