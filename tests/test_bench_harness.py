"""Fast tests of the benchmark harness itself (pldr_kernels.bench): statistics, timing loop,
agreement check, memory measurement, the JSON shape and a tiny end-to-end run of the CLI."""
import json
import os
import time

import numpy as np
import pytest
import torch

from pldr_kernels.bench import __main__ as cli
from pldr_kernels.bench import ops_suite, report
from pldr_kernels.bench.agreement import DisagreementError, check_agreement
from pldr_kernels.bench.contestants import Contestant
from pldr_kernels.bench.memory import peak_extra_bytes
from pldr_kernels.bench.timing import (
    Clock,
    Measurement,
    Progress,
    measure_interleaved,
    percentile,
    summarize,
)

TINY_MODEL = ["num_hidden_layers=1", "hidden_size=128", "num_attention_heads=2",
              "intermediate_size=64", "vocab_size=64", "A_dff=16", "num_reslayerA=1",
              "num_denseA=1", "max_position_embeddings=64"]


# ---- statistics and timing -------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 7, 20])
def test_percentiles_match_numpy(n):
    xs = torch.rand(n, dtype=torch.float64).tolist()
    for q in (10, 20, 50, 80, 90):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), abs=1e-12)
    s = summarize(xs)
    assert s["n"] == n and s["p20"] <= s["p50"] <= s["p80"]


def test_percentile_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)


def test_clock_measures_at_least_the_sleep():
    # A lower bound only (sleep never returns early); no claim about speed.
    assert Clock("cpu").time_ms(lambda: time.sleep(0.003)) >= 3.0


def test_measure_interleaved_round_robin_and_counts():
    calls = []
    contestants = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    result = measure_interleaved(contestants, Clock("cpu"), warmup=2, repeats=6,
                                 min_sample_ms=0.0)
    assert set(result) == {"a", "b", "c"}
    assert all(len(m.samples_ms) == 6 and m.inner == 1 for m in result.values())
    timed = calls[6 + 3:]  # after 2 warm-up rounds and one calibration call each
    rounds = [timed[i:i + 3] for i in range(0, len(timed), 3)]
    assert [r[0] for r in rounds] == ["a", "b", "c", "a", "b", "c"]  # the order rotates
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)         # everyone once per round


def test_fixed_inner_skips_calibration():
    calls = []
    result = measure_interleaved({"a": lambda: calls.append("a")}, Clock("cpu"), warmup=1,
                                 repeats=3, min_sample_ms=1e9, inner=4)
    assert result["a"].inner == 4 and len(result["a"].samples_ms) == 3
    assert len(calls) == 1 + 3 * 4  # warm-up, then 4 calls per sample and no calibration calls


def test_median_band_uses_the_shared_percentiles():
    m = Measurement([5.0, 1.0, 4.0, 2.0, 3.0], inner=1)
    assert m.median_band_ms() == {"median_ms": 3.0, "p20_ms": percentile(m.samples_ms, 20),
                                  "p80_ms": percentile(m.samples_ms, 80)}
    assert m.median_band_ms()["p20_ms"] == pytest.approx(1.8)


def test_calibration_batches_tiny_calls():
    result = measure_interleaved({"noop": lambda: None}, Clock("cpu"), warmup=0, repeats=2,
                                 min_sample_ms=0.5)
    assert result["noop"].inner > 1


def test_progress_without_tqdm(monkeypatch, capsys):
    import builtins
    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name.startswith("tqdm"):
            raise ImportError("no tqdm")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    with Progress(3, "unit") as p:
        p.update(1, note="first")
    err = capsys.readouterr().err
    assert "unit: 1/3  first" in err


# ---- agreement --------------------------------------------------------------------------------
def test_agreement_fp32_rule():
    ref = torch.randn(4, 8, dtype=torch.float64)
    assert check_agreement(ref.float(), ref).ok
    bad = ref.clone()
    bad[1, 2] += 1e-3 * ref.abs().max()
    v = check_agreement(bad.float(), ref)
    assert not v.ok and ">" in v.detail
    with pytest.raises(DisagreementError, match="unit"):
        v.raise_if_bad("unit")


def test_agreement_low_precision_rule_uses_the_peer():
    ref = torch.randn(64, 64, dtype=torch.float64)
    peer = ref.to(torch.bfloat16)
    assert check_agreement(ref.to(torch.bfloat16), ref, peer).ok
    assert not check_agreement((ref + 0.5).to(torch.bfloat16), ref, peer).ok


def test_agreement_flags_nan_and_shape():
    ref = torch.ones(3, dtype=torch.float64)
    assert not check_agreement(torch.tensor([1.0, float("nan"), 1.0]), ref).ok
    assert not check_agreement(torch.ones(4), ref).ok


def test_disagreeing_contestant_is_marked_invalid(monkeypatch, capsys):
    case = ops_suite.OpCase("g_attention", 1, 16, 2, 64, "float32", True)
    cfg = ops_suite.quick_config()
    cfg.repeats, cfg.warmup, cfg.memory = 2, 0, False
    real_prepare = ops_suite.prepare

    def with_a_wrong_contestant(case, device, cfg, seed=0):
        prepared = real_prepare(case, device, cfg, seed)
        good = next(c for c in prepared.contestants if c.name == "reference")
        prepared.contestants.append(Contestant("wrong", lambda: good.fn() * 1.01))
        return prepared
    monkeypatch.setattr(ops_suite, "prepare", with_a_wrong_contestant)
    rows = ops_suite.run_case(case, torch.device("cpu"), cfg, Clock("cpu"), [])
    by_impl = {r["impl"]: r for r in rows}
    assert by_impl["wrong"]["valid"] is False
    assert by_impl["reference"]["valid"] and by_impl["eager"]["valid"]
    assert "DISAGREEMENT" in capsys.readouterr().err
    assert "INVALID" in report.format_table(report.OPS_HEADERS, report.ops_rows(rows))


# ---- memory -----------------------------------------------------------------------------------
def test_cpu_peak_memory_sees_a_temporary():
    n = 1 << 20  # 4 MiB of fp32, freed before the call returns

    def temp_then_small():
        big = torch.ones(n)
        small = big[:4].clone()
        del big
        return small
    nbytes, method = peak_extra_bytes(temp_then_small)
    assert 4 * n <= nbytes < 4 * n + 4096
    assert "profiler" in method
    assert torch.get_num_threads() >= 1  # thread count restored (not left at 1 by accident)


def test_memory_check_reference_materialises_scores():
    rows = ops_suite.memory_check(torch.device("cpu"), H=2, S=256)
    ref = next(r for r in rows if r["impl"] == "reference")
    assert ref["peak_extra_bytes"] >= 2 * 256 * 256 * 4  # the S×S fp32 scores of 2 heads
    flash = next(r for r in rows if r["impl"] == "sdpa_flash")
    assert flash["peak_extra_bytes"] < ref["peak_extra_bytes"]


# ---- work counts ------------------------------------------------------------------------------
def test_visible_pairs():
    assert ops_suite.visible_pairs(4, 4, True) == 10
    assert ops_suite.visible_pairs(2, 5, True) == 4 + 5  # bottom-right aligned
    assert ops_suite.visible_pairs(3, 5, False) == 15


# ---- the CLI end to end, tiny ------------------------------------------------------------------
def test_tiny_quick_run_writes_json_markdown_and_plot(tmp_path, capsys):
    pytest.importorskip("pldr_kernels.model", reason="the model branch has not landed")
    out_json, out_md, out_png = tmp_path / "b.json", tmp_path / "b.md", tmp_path / "b.png"
    argv = ["all", "--quick", "--no-progress", "--seqlens", "32", "--cache-lens", "64",
            "--heads", "2", "--dtypes", "float32", "--repeats", "2", "--memory-check-len", "128",
            "--prompt-lens", "8", "--new-tokens", "4", "--model-config", *TINY_MODEL,
            "--json", str(out_json), "--markdown", str(out_md), "--plot", str(out_png)]
    rc = cli.main(argv)
    printed = capsys.readouterr().out
    assert rc == 0, printed
    data = json.loads(out_json.read_text())
    assert set(data) == {"env", "results"}
    env = data["env"]
    for key in ("device_name", "torch", "build_info", "build_report", "threads", "cpu", "skipped"):
        assert key in env
    gen = [r for r in data["results"] if r["bench"] == "generate"]
    ops = [r for r in data["results"] if r["bench"] == "ops"]
    assert {r["mode"] for r in gen} == {"none", "kv", "kvg"}
    assert "reference" in {r["impl"] for r in gen}
    for r in gen:
        assert r["impl"] in ("reference", "pldr_kernels")
        assert isinstance(r["prompt_len"], int) and r["prompt_len"] == 8
        assert isinstance(r["new_tokens"], int) and r["new_tokens"] == 4
        for key in ("ttft_ms", "per_token_ms_p50", "per_token_ms_p90", "tokens_per_s"):
            assert isinstance(r[key], float) and r[key] > 0
        assert len(r["step_ms"]) == 2 and all(len(s) == 3 for s in r["step_ms"])  # raw samples
    assert {r["op"] for r in ops} == {"g_attention", "g_attention_decode", "metric_tensors"}
    for r in ops:
        assert len(r["samples_ms"]) == 2 and r["valid"]
        assert r["time_ms_p20"] <= r["time_ms_p50"] <= r["time_ms_p80"]
    assert any(r["bench"] == "ops_memory" for r in data["results"])
    assert "Cache-mode ordering" in printed and "| impl |" in out_md.read_text()
    if _has_matplotlib():
        assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_install(monkeypatch, tmp_path, capsys):
    import builtins
    real_import = builtins.__import__

    def no_mpl(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_mpl)
    assert report.write_plot(str(tmp_path / "x.png"), {}, []) is False
    assert "pip install matplotlib" in capsys.readouterr().err


def test_cli_refuses_cuda_graph_on_cpu(capsys):
    assert cli.main(["generate", "--cuda-graph"]) == 2
    assert "--cuda-graph needs --device cuda" in capsys.readouterr().err


def test_options_work_before_and_after_the_subcommand():
    parser = cli.build_parser()
    a = parser.parse_args(["--quick", "ops", "--threads", "1"])
    b = parser.parse_args(["ops", "--quick", "--threads", "1"])
    assert a.quick and b.quick and a.threads == b.threads == 1 and a.suite == b.suite == "ops"


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_cli_refuses_cuda_without_a_device(capsys):
    assert cli.main(["ops", "--device", "cuda"]) == 2
    assert "no CUDA device is visible" in capsys.readouterr().err


def test_busy_machine_warning_reads_competing_threads_now():
    from pldr_kernels.bench.env import busy_machine_warning, competing_runnable
    cores = os.cpu_count() or 1
    assert busy_machine_warning(2, competing=0.0) is None
    warning = busy_machine_warning(2, competing=cores + 3.0)
    assert warning is not None and "other runnable threads" in warning
    measured = competing_runnable(samples=3, interval_s=0.001)
    assert measured is None or measured >= 0
