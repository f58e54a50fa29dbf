"""The issue-specific benchmark scripts (benchmarks/*.py, run by hand and by tools/gpu_check.sh)
import and parse their command line without a GPU, and time through pldr_kernels.bench.timing."""
from __future__ import annotations

import importlib.util
import inspect
import pathlib

import pytest
import torch

from pldr_kernels.bench import timing

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = ["bench_attention_cuda", "bench_decode_metric_cuda", "bench_attention_cpu",
           "bench_metric_cpu", "bench_model_cpu"]


def load(name):
    spec = importlib.util.spec_from_file_location(f"_bench_script_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_imports_and_prints_help(name, monkeypatch, capsys):
    module = load(name)
    monkeypatch.setattr("sys.argv", [f"{name}.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["bench_attention_cuda", "bench_decode_metric_cuda"])
def test_cuda_scripts_take_json_out_and_time_with_the_package_clock(name, tmp_path):
    module = load(name)
    # tools/gpu_check.sh calls them as `script --json OUT`; without a GPU they stop with a reason.
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA device"):
            module.main(["--json", str(tmp_path / "out.json")])
    assert module.median_bands_ms is timing.median_bands_ms
    assert module.Clock is timing.Clock
    source = inspect.getsource(module.time_interleaved)
    assert 'Clock("cuda")' in source and "inner=1" in source
