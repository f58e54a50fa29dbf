"""The pldr-bench invocations documented in pldr_kernels.bench's docstring, which replaced the
benchmarks/ scripts: each one parses, and each CPU one, shrunk to tiny shapes, measures what its
script used to report."""
import json
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
