"""The pldr-bench invocations documented in pldr_kernels.bench's docstring, which replaced the
benchmarks/ scripts: each one parses, and each CPU one, shrunk to tiny shapes, measures what its
script used to report."""
import json
import os
import shlex

import pytest
import torch

import pldr_kernels.bench as bench
from pldr_kernels.bench import __main__ as cli

TINY = ["--seqlens", "32", "--cache-lens", "64", "--heads", "2", "--repeats", "2",
        "--memory-check-len", "128", "--no-progress"]
TINY_MODEL = ["--model-config", "num_hidden_layers=1", "hidden_size=128", "num_attention_heads=2",
              "intermediate_size=64", "vocab_size=64", "A_dff=16", "num_reslayerA=1",
              "num_denseA=1", "max_position_embeddings=64", "--prompt-lens", "8",
              "--new-tokens", "4", "--repeats", "2", "--no-progress"]


def invocations() -> list[tuple[str, list[str]]]:
    """``(what it measures, argv)`` for each invocation (``pldr-bench`` lines and their
    continuation lines) of the docstring."""
    out, what = [], ""
    for line in bench.__doc__.splitlines():
        if line.startswith("  ") and not line.startswith("    ") and line.endswith(":"):
            what = line.strip()
        elif line.startswith("    pldr-bench "):
            out.append((what, shlex.split(line)[1:]))
        elif line.startswith("      --") and out:
            out[-1][1].extend(shlex.split(line))
    return out


def find(words: str) -> list[str]:
    return next(argv for what, argv in invocations() if words in what)


def run(argv, tmp_path) -> list[dict]:
    path = tmp_path / "run.json"
    assert cli.main([*argv, "--json", str(path)]) == 0
    return json.loads(path.read_text())["results"]


def test_every_documented_invocation_parses():
    found = invocations()
    assert len(found) == 8
    parser = cli.build_parser()
    for _, argv in found:
        args = parser.parse_args(argv)
        cli.ops_config(args)
        cli.generate_config(args)
        cli.train_config(args)


def test_prefill_and_decode_vs_sdpa_and_eager(tmp_path):
    rows = [r for r in run(find("prefill vs SDPA") + TINY, tmp_path) if r["bench"] == "ops"]
    want = {"pldr_kernels", "eager", "sdpa_flash", "sdpa_math", "sdpa_flash_qg_given",
            "sdpa_math_qg_given"}
    for op in ("g_attention", "g_attention_decode"):
        assert {r["impl"] for r in rows if r["op"] == op} == want
    assert all(r["valid"] and r["dtype"] == "float32" for r in rows)
    best = {r["best_other"] for r in rows if r["impl"] == "pldr_kernels"}
    assert not any(b.endswith("_qg_given") for b in best)  # SDPA handed a free q̃ is no rival


def test_metric_learner_vs_eager(tmp_path):
    rows = [r for r in run(find("metric_tensors vs") + TINY, tmp_path) if r["bench"] == "ops"]
    assert {(r["op"], r["impl"]) for r in rows} == {("metric_tensors", "pldr_kernels"),
                                                    ("metric_tensors", "reference")}
    ours = next(r for r in rows if r["impl"] == "pldr_kernels")
    assert ours["valid"] and ours["speedup_vs_reference"] > 0


def test_model_prefill_and_kvg_decode_fp32_and_bf16(tmp_path):
    rows = run(find("the 110M model") + TINY_MODEL, tmp_path)
    assert {(r["impl"], r["dtype"], r["mode"]) for r in rows} == {
        ("reference", "float32", "kvg"), ("pldr_kernels", "float32", "kvg"),
        ("pldr_kernels", "bfloat16", "kvg")}
    for r in rows:
        assert r["valid"] and r["ttft_ms"] > 0 and r["speedup_vs_reference"] > 0


def test_training_fwd_bwd_and_the_model_step(tmp_path):
    rows = run(find("training:") + TINY + TINY_MODEL[:-7], tmp_path)
    assert {(r["part"], r["impl"]) for r in rows} == {
        ("g_attention", "pldr_kernels"), ("g_attention", "reference"), ("g_attention", "eager"),
        ("g_attention", "sdpa_flash"), ("g_attention", "sdpa_math"),
        ("metric_tensors", "pldr_kernels"), ("metric_tensors", "reference"),
        ("model", "pldr_kernels"), ("model", "reference")}
    for r in rows:
        assert r["valid"] and r["dtype"] == "float32" and r["speedup_vs_reference"] > 0
    model = [r for r in rows if r["part"] == "model"]
    assert all(r["tokens_per_s"] > 0 and r["peak_extra_bytes"] > 0 for r in model)


def test_cuda_invocations():
    parser = cli.build_parser()
    cuda = [argv for what, argv in invocations() if "CUDA" in what]
    assert len(cuda) == 4 and all(argv[argv.index("--device") + 1] == "cuda" for argv in cuda)
    train = cli.train_config(parser.parse_args(find("CUDA training")))
    assert train.train_parts == ["g_attention"] and min(train.seqlens) >= 2048
    assert list(train.dtypes) == ["bfloat16"] and train.head_dims == (64,)
    prefill = cli.ops_config(parser.parse_args(find("CUDA prefill")))
    assert prefill.ops == ["g_attention"] and list(prefill.dtypes) == ["bfloat16"]
    assert ops_selects(prefill, "sdpa_cudnn_qg_given") and not ops_selects(prefill, "reference")
    if not torch.cuda.is_available():
        for argv in cuda:
            with pytest.raises(SystemExit):
                cli.main(argv)


def ops_selects(cfg, name: str) -> bool:
    from pldr_kernels.bench.ops_suite import selected
    return selected(name, cfg.contestants)


# ---- wrong arguments: a message and exit status 2 before anything is measured ---------------
# (argv with {tmp} for a scratch directory, what stderr says): the list, then what else
# used to get through to a traceback (or to a run that ignored it).
BAD_INVOCATIONS = [
    ("--batch -1", "argument --batch: expected a positive integer, got '-1'"),
    ("--repeats 0", "argument --repeats: expected a positive integer, got '0'"),
    ("--threads -1", "argument --threads: expected a positive integer, got '-1'"),
    ("--device bogus", "argument --device: expected cpu, cuda or cuda:N, got 'bogus'"),
    ("--causal maybe", "argument --causal: invalid choice: 'maybe'"),
    ("--heads 0", "argument --heads: expected a positive integer, got '0'"),
    ("--model-config bogus_field=3", "argument --model-config: PLDRConfig has no field "
                                     "'bogus_field'"),
    ("--checkpoint {tmp}/no/such", "no such file or directory"),
    ("--new-tokens -4", "argument --new-tokens: expected a positive integer, got '-4'"),
    ("--prompt-lens 0", "argument --prompt-lens: expected a positive integer, got '0'"),
    ("--json {tmp}/no/run.json", "does not exist"),
    ("--markdown {tmp}/no/run.md", "does not exist"),
    ("--plot {tmp}/no/run.png", "does not exist"),
    ("--batch two", "argument --batch: expected a positive integer, got 'two'"),
    ("--warmup -1", "argument --warmup: expected an integer >= 0, got '-1'"),
    ("--device cuda:x", "argument --device: expected cpu, cuda or cuda:N"),
    ("--model-config hidden_size=130", "hidden_size (130) must equal"),
    ("--model-config rope_theta=1e999", "rope_theta must be a finite number > 0"),
    ("--checkpoint {tmp}/ckpt", "layer_norm_eps must be a finite number"),
    ("--checkpoint {tmp}/ckpt --model-config num_hidden_layers=1", "give one of the two"),
    ("--json {tmp}", "is a directory"),
    ("--plot {tmp}/run.nope", "matplotlib cannot write 'nope' files"),
    ("--from-json {tmp}/list.json", "expected a run that --json wrote"),
]


@pytest.mark.parametrize("argv, message", BAD_INVOCATIONS, ids=[a for a, _ in BAD_INVOCATIONS])
def test_wrong_arguments_end_with_a_message_before_the_run(argv, message, tmp_path, monkeypatch,
                                                           capsys):
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text('{"layer_norm_eps": 1e999}')
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(cli, "measure", lambda *a: pytest.fail("measured before the check"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--no-progress", *argv.format(tmp=tmp_path).split()])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "pldr-bench: error: " in err and message in err, err


def test_outputs_are_written_atomically(tmp_path, monkeypatch):
    """A plot (or JSON, Markdown) that fails midway leaves the old file and no temporary."""
    from pldr_kernels.bench import report
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    data = {"env": {"cpu": "cpu", "threads": 1, "device": "cpu", "torch": torch.__version__,
                    "pldr_kernels": "0", "git_commit": "0", "time_utc": "now"},
            "results": [{"bench": "ops", "op": "g_attention", "impl": "pldr_kernels",
                         "dtype": "float32", "causal": True, "B": 1, "Sq": S,
                         "time_ms_p20": 1.0, "time_ms_p50": 1.5, "time_ms_p80": 2.0}
                        for S in (32, 64)]}
    path = tmp_path / "run.png"
    report.write_plot(str(path), data)
    old = path.read_bytes()
    assert old[:8] == b"\x89PNG\r\n\x1a\n"

    def half_then_fail(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG half")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(Figure, "savefig", half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        report.write_plot(str(path), data)
    assert os.listdir(tmp_path) == ["run.png"] and path.read_bytes() == old
