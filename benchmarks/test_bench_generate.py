"""pytest-benchmark suite of end-to-end generation (not part of the default `pytest tests` run).

    pytest benchmarks/test_bench_generate.py --benchmark-only

Greedy generation of 8 tokens after a 32-token prompt with the paper's 110M configuration (random
weights, or PLDR_BENCH_CHECKPOINT=path), per cache mode, reference model vs pldr_kernels, grouped
by mode. Before timing, each implementation's tokens are compared with the reference's. The time to
first token and the per-token latencies of every round go to extra_info.
"""
import os

import pytest
import torch

from pldr_kernels.bench import generate_suite
from pldr_kernels.bench.timing import percentile

DEVICE = torch.device(os.environ.get("PLDR_BENCH_DEVICE", "cpu"))
PROMPT, NEW = 32, 8


@pytest.fixture(scope="module")
def setup():
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("PLDR_BENCH_DEVICE=cuda but no CUDA device is visible")
    cfg = generate_suite.GenerateConfig(prompt_lens=(PROMPT,), new_tokens=NEW,
                                        checkpoint=os.environ.get("PLDR_BENCH_CHECKPOINT"))
    models, skipped, config = generate_suite.load_models(cfg, DEVICE)
    if not models:
        pytest.skip("; ".join(s["reason"] for s in skipped))
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, config.vocab_size, (1, PROMPT), generator=gen).to(DEVICE)
    return models, {s["impl"]: s["reason"] for s in skipped}, ids


@pytest.mark.parametrize("impl", generate_suite.IMPLS)
@pytest.mark.parametrize("mode", generate_suite.MODES)
def test_generate(benchmark, setup, mode, impl):
    models, skipped, ids = setup
    if impl not in models:
        pytest.skip(skipped.get(impl, f"{impl} not loaded"))
    model = models[impl]
    out = model.generate(ids, NEW, cache=mode, do_sample=False)
    if impl != "reference" and "reference" in models:
        expected = models["reference"].generate(ids, NEW, cache=mode, do_sample=False)
        assert torch.equal(out.cpu(), expected.cpu()), f"{impl} tokens differ from the reference"
    ttft, steps = [], []

    def one_generation():
        _, t, s, _ = generate_suite.timed_generate(model, impl, ids, NEW, mode, cuda_graph=False)
        ttft.append(t)
        steps.extend(s)
    benchmark.group = f"generate cache={mode} prompt={PROMPT} new={NEW}"
    benchmark.pedantic(one_generation, rounds=3, warmup_rounds=0, iterations=1)
    benchmark.extra_info.update({"impl": impl, "mode": mode, "prompt_len": PROMPT,
                                 "new_tokens": NEW, "ttft_ms_p50": percentile(ttft, 50),
                                 "per_token_ms_p50": percentile(steps, 50),
                                 "per_token_ms_p90": percentile(steps, 90),
                                 "ttft_samples_ms": ttft, "per_token_samples_ms": steps})
