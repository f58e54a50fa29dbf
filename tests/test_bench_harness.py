"""The benchmark harness itself (pldr_kernels.bench): statistics, the timing loop, the agreement
check before timing, memory measurement, the checks before a run, rendering from the JSON, and a
tiny end-to-end run of the CLI."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from pldr_kernels import reference
from pldr_kernels.bench import __main__ as cli
from pldr_kernels.bench import generate_suite, measure, ops_suite, report, train_suite
from pldr_kernels.bench.measure import Clock, measure_interleaved, summarize

TINY_MODEL = ["num_hidden_layers=1", "hidden_size=128", "num_attention_heads=2",
              "intermediate_size=64", "vocab_size=64", "A_dff=16", "num_reslayerA=1",
              "num_denseA=1", "max_position_embeddings=64"]


# ---- statistics and timing -------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 7, 20])
def test_quantiles_match_numpy(n):
    xs = torch.rand(n, dtype=torch.float64).tolist()
    s = summarize(xs)
    assert list(s) == ["p10", "p20", "p50", "p80", "p90"]
    for q in (10, 20, 50, 80, 90):
        assert s[f"p{q}"] == pytest.approx(float(np.percentile(xs, q)), abs=1e-12)


def test_summary_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="no samples"):
        summarize([])


def test_clock_measures_at_least_the_sleep():
    assert Clock("cpu").time_ms(lambda: time.sleep(0.003)) >= 3.0  # sleep never returns early


def test_measure_interleaved_rotates_the_order_and_counts():
    calls = []
    contestants = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    result = measure_interleaved(contestants, Clock("cpu"), warmup=2, repeats=6, min_sample_ms=0)
    assert all(len(m.samples_ms) == 6 and m.inner == 1 for m in result.values())
    timed = calls[2 * 3 + 3:]  # after 2 warm-up rounds and one calibration call each
    rounds = [timed[i:i + 3] for i in range(0, len(timed), 3)]
    assert [r[0] for r in rounds] == ["a", "b", "c", "a", "b", "c"]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)


def test_fixed_inner_skips_calibration_and_tiny_calls_are_batched():
    calls = []
    fixed = measure_interleaved({"a": lambda: calls.append(1)}, Clock("cpu"), warmup=1,
                                repeats=3, min_sample_ms=1e9, inner=4)
    assert fixed["a"].inner == 4 and len(calls) == 1 + 3 * 4
    calibrated = measure_interleaved({"noop": lambda: None}, Clock("cpu"), warmup=0, repeats=2,
                                     min_sample_ms=0.5)
    assert calibrated["noop"].inner > 1


# ---- the agreement check before timing ---------------------------------------------------------
def tiny_ops_config(**kw):
    return ops_suite.OpsConfig(**{**ops_suite.QUICK, "repeats": 2, "warmup": 0, "memory": False,
                                  **kw})


def test_a_disagreeing_contestant_is_shouted_and_marked_invalid(monkeypatch, capsys):
    case = ops_suite.OpCase("g_attention", 1, 16, 16, 2, 64, "bfloat16", True)
    real_prepare = ops_suite.prepare

    def with_a_wrong_contestant(case, device, cfg, seed=0):
        contestants, judge = real_prepare(case, device, cfg, seed)
        wrong = contestants["reference"]() * 1.02
        # The fastest contestant of all: were invalid rows not excluded, it would be best_other.
        return {**contestants, "wrong": lambda: wrong}, judge
    monkeypatch.setattr(ops_suite, "prepare", with_a_wrong_contestant)
    rows = ops_suite.run_case(case, torch.device("cpu"), tiny_ops_config(), Clock("cpu"), [])
    by_impl = {r["impl"]: r for r in rows}
    assert not by_impl["wrong"]["valid"] and "peer rule" in by_impl["wrong"]["agreement"]
    assert all(r["valid"] for name, r in by_impl.items() if name != "wrong")
    assert "DISAGREEMENT in g_attention B1 S16 H2 d64 bfloat16: wrong" in capsys.readouterr().err
    assert "INVALID" in report.table(report.OPS_COLUMNS, rows, markdown=False)
    assert by_impl["pldr_kernels"]["best_other"] in ("eager", "sdpa_flash", "sdpa_math")


def test_prefill_rows_carry_their_share_of_torch_mm(monkeypatch):
    case = ops_suite.OpCase("g_attention", 1, 16, 16, 2, 64, "float32", True)
    cfg = tiny_ops_config(contestants=("pldr_kernels", "reference"))
    square = []
    real_square_mm = ops_suite.square_mm
    monkeypatch.setattr(ops_suite, "square_mm",
                        lambda flops, device: square.append(flops) or real_square_mm(flops, device))
    rows = ops_suite.run_case(case, torch.device("cpu"), cfg, Clock("cpu"), [])
    flops, _ = ops_suite.work(case)
    assert square == [flops]  # one torch.mm per case, timed with its contestants
    n = rows[0]["mm_n"]
    assert abs(2 * n ** 3 - flops) <= 2 * ((n + 1) ** 3 - n ** 3)  # the same FLOPs, to within n
    for r in rows:
        assert r["mm_tflops"] == rows[0]["mm_tflops"] > 0
        assert r["mm_fraction"] == pytest.approx(r["tflops"] / r["mm_tflops"])
    text = report.render({"env": {"cpu": "a CPU", "threads": 2, "device": "cpu",
                                  "build_info": {}, "torch": "t", "pldr_kernels": "p",
                                  "git_commit": "c"}, "results": rows})
    assert "x mm" in text and f"torch.mm fp32 {n}x{n} (same FLOPs)" in text
    decode = ops_suite.OpCase("g_attention_decode", 1, 1, 16, 2, 64, "float32", False)
    assert all(r["mm_fraction"] is None for r in ops_suite.run_case(
        decode, torch.device("cpu"), cfg, Clock("cpu"), []))


def test_metric_contestants_are_judged_by_the_rule():
    case = ops_suite.OpCase("metric_tensors", 1, 16, 16, 2, 64, "float32", False)
    rows = {r["impl"]: r for r in ops_suite.run_case(case, torch.device("cpu"), tiny_ops_config(),
                                                     Clock("cpu"), [])}
    for impl in ("pldr_kernels", "reference"):
        assert rows[impl]["valid"] and "metric_tensors: ok" in rows[impl]["agreement"], rows[impl]


def test_contestant_patterns():
    assert ops_suite.selected("sdpa_flash", None)
    assert not ops_suite.selected("sdpa_flash_qg_given", None)
    assert ops_suite.selected("sdpa_flash_qg_given", ["pldr_kernels", "sdpa_*"])
    assert not ops_suite.selected("reference", ["pldr_kernels", "sdpa_*"])


def test_oracle_by_head_chunks_equals_the_whole(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 8, 5, 64, generator=gen, dtype=torch.float64) for _ in range(3))
    G = torch.randn(1, 5, 64, 64, generator=gen, dtype=torch.float64)
    whole = reference.g_attention(q, k, v, G, None, True)
    monkeypatch.setattr(ops_suite, "ORACLE_CHUNK_ELEMENTS", 2 * 8 * 8)  # two heads per chunk
    chunked = ops_suite.by_heads(reference.g_attention, q, k, v, G, True)
    assert torch.equal(chunked[0], whole[0]) and torch.equal(chunked[1], whole[1])


# ---- the train suite: judged before timing, like the others ----------------------------------
def tiny_train_config(**kw):
    fields = dict(repeats=2, warmup=0, memory=False, heads=2, seqlens=(24,),
                  model_config=[cli.field_value(f) for f in TINY_MODEL])
    return train_suite.TrainConfig(**{**fields, **kw})


@pytest.mark.parametrize("part", train_suite.PARTS)
def test_train_contestants_are_judged_before_timing(part):
    cfg = tiny_train_config(train_parts=(part,))
    models = train_suite.load_models(cfg, torch.device("cpu")) if part == "model" else None
    (case,) = train_suite.cases(cfg)
    rows = {r["impl"]: r for r in train_suite.run_case(case, torch.device("cpu"), cfg,
                                                       Clock("cpu"), [], models)}
    want = {"g_attention": {"pldr_kernels", "reference", "eager", "sdpa_flash", "sdpa_math"},
            "metric_tensors": {"pldr_kernels", "reference"},
            "model": {"pldr_kernels", "reference"}}[part]
    assert set(rows) == want
    for r in rows.values():
        assert r["valid"], r["agreement"]
        assert len(r["samples_ms"]) == 2 and r["time_ms_p50"] > 0
    agreement = rows["pldr_kernels"]["agreement"]
    assert {"g_attention": "g_attention gradients: ok",
            "metric_tensors": "given its own A: ok",
            "model": "gradients on 1 window of 24 tokens"}[part] in agreement, agreement
    if part == "model":
        assert rows["pldr_kernels"]["tokens_per_s"] == pytest.approx(
            24 / (rows["pldr_kernels"]["time_ms_p50"] * 1e-3))


def test_the_model_gradients_are_judged_on_disjoint_windows():
    ids = torch.arange(1024)[None]
    n = train_suite.MODEL_GRAD_CHECK_LEN
    windows = train_suite.check_windows(ids)
    assert len(windows) == train_suite.MODEL_GRAD_CHECK_WINDOWS
    assert [w[0, 0].item() for w in windows] == [i * n for i in range(len(windows))]
    assert all(w.shape == (1, n) for w in windows)
    (short,) = train_suite.check_windows(ids[:, :24])
    assert torch.equal(short, ids[:, :24])


def test_a_wrong_gradient_is_shouted_and_marked_invalid(monkeypatch, capsys):
    real = train_suite.attention_grads

    def one_wrong(forward, q, k, v, G, dout):
        run = real(forward, q, k, v, G, dout)
        if forward.__name__ != "forward":  # not SDPA: the lambdas of pldr_kernels, eager, ...
            return run
        return lambda: tuple(g * 1.01 if i == 3 else g for i, g in enumerate(run()))
    monkeypatch.setattr(train_suite, "attention_grads", one_wrong)
    cfg = tiny_train_config(train_parts=("g_attention",))
    rows = {r["impl"]: r for r in train_suite.run_case(train_suite.cases(cfg)[0],
                                                       torch.device("cpu"), cfg, Clock("cpu"),
                                                       [])}
    assert not rows["sdpa_flash"]["valid"] and "dG" in rows["sdpa_flash"]["agreement"]
    assert rows["pldr_kernels"]["valid"] and rows["eager"]["valid"]
    assert "DISAGREEMENT in train g_attention B1 S24 H2 d64 float32: sdpa_flash" in \
        capsys.readouterr().err
    assert rows["pldr_kernels"]["best_other"] == "eager"  # invalid rows are no rival


def test_train_attention_memory_is_below_eager():
    """Peak extra memory of one forward + backward (gradients included) is measured for each
    contestant: eager keeps S×S scores and probabilities for its backward, the kernel none."""
    cfg = tiny_train_config(train_parts=("g_attention",), seqlens=(512,), memory=True,
                            contestants=("pldr_kernels", "eager"), repeats=1)
    rows = {r["impl"]: r for r in train_suite.run_case(train_suite.cases(cfg)[0],
                                                       torch.device("cpu"), cfg, Clock("cpu"),
                                                       [])}
    ours, theirs = rows["pldr_kernels"]["peak_extra_bytes"], rows["eager"]["peak_extra_bytes"]
    assert theirs >= 2 * 2 * 512 * 512 * 4  # at least fp32 scores and probabilities of 2 heads
    assert ours < theirs, (ours, theirs)
    assert "profiler" in rows["pldr_kernels"]["memory_method"]
    assert rows["eager"]["pldr_kernels_memory_ratio"] == pytest.approx(ours / theirs)


# ---- memory and work counts -------------------------------------------------------------------
def test_cpu_peak_memory_sees_a_temporary_and_restores_the_threads():
    n = 1 << 20  # 4 MiB of fp32, freed before the call returns
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        def temp_then_small():
            big = torch.ones(n)
            return big[:4].clone()
        _, nbytes, method = measure.run_with_peak(temp_then_small)
        assert torch.get_num_threads() == 2  # measured on 1 thread, then put back
    finally:
        torch.set_num_threads(before)
    assert 4 * n <= nbytes < 4 * n + 4096 and "profiler" in method


def test_memory_check_sees_the_reference_scores():
    rows = {r["impl"]: r for r in ops_suite.memory_check(torch.device("cpu"), H=2, S=256)}
    assert rows["reference"]["peak_extra_bytes"] >= 2 * 256 * 256 * 4  # fp32 S×S of 2 heads
    assert rows["sdpa_flash"]["peak_extra_bytes"] < rows["reference"]["peak_extra_bytes"]


def test_visible_pairs_and_copy_bandwidth():
    assert ops_suite.visible_pairs(4, 4, True) == 10
    assert ops_suite.visible_pairs(2, 5, True) == 4 + 5  # bottom-right aligned
    assert ops_suite.visible_pairs(3, 5, False) == 15
    row = ops_suite.copy_bandwidth(torch.device("cpu"), Clock("cpu"), repeats=2)
    assert row["gbps"] == pytest.approx(2 * row["bytes"] / (row["time_ms_p50"] * 1e-3) / 1e9)


def test_decode_copy_bandwidth_is_the_fastest_copy_over_all_rounds(monkeypatch):
    """generate's copy column: rounds of copies spread over the run, the fastest one kept, and
    topped up to COPY_REPEATS copies per size if the rounds were fewer."""
    times = iter([4.0, 1.0, 3.0, 2.0, 5.0] + [9.0] * 100)  # ms of successive copies
    monkeypatch.setattr(measure.Clock, "time_ms", lambda self, fn, inner=1: next(times))
    meter = generate_suite.CopyBandwidth([1 << 20], torch.device("cpu"))
    meter.sample(2)  # 4 ms, 1 ms
    meter.sample(3)  # 3, 2, 5 ms
    assert meter.copies[1 << 20] == 5
    gbps = meter.gbps(1 << 20)  # tops up with 10 copies of 9 ms: the 1 ms copy stays the best
    assert meter.copies[1 << 20] == generate_suite.COPY_REPEATS
    assert gbps == pytest.approx(2 * (1 << 20) / 1e-3 / 1e9)


# ---- the CLI: checks before the run, then a tiny run, then rendering from the JSON -----------
def test_checks_fail_before_the_run(monkeypatch, tmp_path, capsys):
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setattr(cli, "measure", lambda *a: pytest.fail("measured before the check"))
    for argv, message in ((["--plot", str(tmp_path / "x.png")], "--plot needs matplotlib"),
                          (["--json", str(tmp_path / "no" / "x.json")], "does not exist"),
                          (["generate", "--cuda-graph"], "--cuda-graph needs --device cuda"),
                          (["--checkpoint", str(tmp_path / "missing")], "no such file"),
                          (["--model-config", "layers"], "expects FIELD=VALUE")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, argv
    monkeypatch.setattr(cli.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tqdm" else real(name, *a))
    with pytest.raises(SystemExit):
        cli.main(["ops"])
    assert "pldr-kernels[bench]" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_cuda_without_a_device_is_refused(capsys):
    with pytest.raises(SystemExit):
        cli.main(["ops", "--device", "cuda"])
    assert "no CUDA device is visible" in capsys.readouterr().err


def test_options_work_before_and_after_the_subcommand():
    parser = cli.build_parser()
    a = parser.parse_args(["--quick", "ops", "--threads", "1"])
    b = parser.parse_args(["ops", "--quick", "--threads", "1"])
    assert a.quick and b.quick and a.threads == b.threads == 1 and a.suite == b.suite == "ops"


def test_options_set_the_config_fields_over_the_quick_preset():
    args = cli.build_parser().parse_args(
        ["--quick", "--repeats", "4", "--seqlens", "8", "--no-flex", "--no-memory", "--batch", "3",
         "2", "--model-config", "num_hidden_layers=1", "custom_G_type=None", "name=x"])
    ops, gen = cli.ops_config(args), cli.generate_config(args)
    assert (ops.repeats, ops.seqlens, ops.metric_seqlens, ops.batch) == (4, [8], [8], [3, 2])
    assert ops.cache_lens == ops_suite.QUICK["cache_lens"] and ops.warmup == 1  # from --quick
    assert ops.flex_skip_reason == "--no-flex" and not ops.memory and not gen.memory
    assert (gen.repeats, gen.batch_size, gen.new_tokens) == (4, 3, 6)
    assert gen.model_config == [("num_hidden_layers", 1), ("custom_G_type", None), ("name", "x")]
    full = cli.ops_config(cli.build_parser().parse_args(["ops", "--flex"]))
    assert full.flex_skip_reason is None and full.repeats == 15 and full.memory


def test_tiny_run_writes_json_and_renders_markdown_and_plot_from_it(tmp_path, capsys):
    out = {ext: tmp_path / f"run.{ext}" for ext in ("json", "md", "png")}
    argv = ["all", "--quick", "--no-progress", "--seqlens", "32", "--cache-lens", "64",
            "--heads", "2", "--dtypes", "float32", "--repeats", "2", "--memory-check-len", "128",
            "--prompt-lens", "8", "16", "--new-tokens", "4", "--gen-dtypes", "float32",
            "bfloat16", "--model-config", *TINY_MODEL, "--json", str(out["json"]),
            "--markdown", str(out["md"]), "--plot", str(out["png"])]
    assert cli.main(argv) == 0, capsys.readouterr().out
    printed = capsys.readouterr().out
    data = json.loads(out["json"].read_text())
    env, results = data["env"], data["results"]
    assert env["cpu"] == measure.cpu_model() and env["threads"] == torch.get_num_threads()
    gen = [r for r in results if r["bench"] == "generate"]
    assert {(r["impl"], r["dtype"]) for r in gen} == {
        ("reference", "float32"), ("pldr_kernels", "float32"), ("pldr_kernels", "bfloat16")}
    assert {r["mode"] for r in gen} == {"none", "kv", "kvg"}
    assert {r["prompt_len"] for r in gen} == {8, 16}
    for r in gen:
        assert r["valid"] and r["ttft_ms"] > 0 and r["per_token_ms_p50"] > 0
        assert len(r["step_ms"]) == 2 and all(len(s) == 3 for s in r["step_ms"])  # raw samples
        if r["impl"] == "pldr_kernels":
            assert ("greedy tokens" if r["dtype"] == "float32" else "peer rule") in r["agreement"]
    ops = [r for r in results if r["bench"] == "ops"]
    assert {r["op"] for r in ops} == {"g_attention", "g_attention_decode", "metric_tensors"}
    assert all(len(r["samples_ms"]) == 2 and r["valid"] for r in ops)
    assert any(r["bench"] == "ops_memory" for r in results)
    train = [r for r in results if r["bench"] == "train"]
    assert {(r["part"], r["impl"]) for r in train} >= {
        ("g_attention", "pldr_kernels"), ("g_attention", "sdpa_flash"),
        ("metric_tensors", "pldr_kernels"), ("model", "pldr_kernels"), ("model", "reference")}
    assert all(r["valid"] and r["S"] == 32 and r["peak_extra_bytes"] for r in train)
    # Every table names the CPU and the thread count.
    assert printed.count(f"on {env['cpu']}, {env['threads']} threads:") == 3
    assert "Cache-mode ordering" in printed and "| impl | dtype | mode |" in out["md"].read_text()
    assert "| part | shape |" in out["md"].read_text() and "train model B1 S32" in printed
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The saved JSON renders the same Markdown again.
    again = tmp_path / "again.md"
    assert cli.main(["--from-json", str(out["json"]), "--markdown", str(again),
                     "--plot", str(tmp_path / "again.png")]) == 0
    assert again.read_text() == out["md"].read_text()


def test_ordering_check_fails_when_a_cache_does_not_help():
    env = {"cpu": "CPU X", "threads": 3, "device": "cpu", "device_name": "CPU X"}
    rows = [{"bench": "generate", "impl": "pldr_kernels", "dtype": "float32", "prompt_len": 8,
             "new_tokens": 4, "mode": mode, "per_token_ms_p50": t}
            for mode, t in (("none", 5.0), ("kv", 6.0), ("kvg", 1.0))]
    assert "[FAIL: kvg <= kv < none]" in report.ordering_lines(rows)[1]
    assert report.machine(env) == "CPU X, 3 threads"


# ---- the busy-machine warning ------------------------------------------------------------------
def test_busy_machine_warning():
    cores = os.cpu_count() or 1
    assert measure.busy_machine_warning(2, competing=0.0) is None
    assert "other runnable threads" in measure.busy_machine_warning(2, competing=cores + 3.0)


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux /proc/stat")
def test_competing_runnable_sees_a_busy_process():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        assert measure.competing_runnable(samples=5, interval_s=0.01) >= 1.0
    finally:
        busy.kill()
        busy.wait()
