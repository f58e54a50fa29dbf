"""pytest-benchmark suite of the ops (not part of the default `pytest tests` run).

    pytest benchmarks/test_bench_ops.py --benchmark-only [--benchmark-json out.json]

One benchmark per (case, contestant), grouped by case so pytest-benchmark's table compares the
contestants of one shape side by side. Inputs, contestants and the agreement check are those of
`pldr-bench ops` (pldr_kernels.bench); each contestant's output is checked against the fp64
reference before it is timed. A contestant that is not available (e.g. an op without a CPU kernel
yet) is skipped with the reason. PLDR_BENCH_FLEX=1 adds torch.compile(flex_attention) (compiling
takes ~45 s on a 2-core CPU); PLDR_BENCH_DEVICE=cuda runs on the GPU.
"""
import os

import pytest
import torch

from pldr_kernels.bench import ops_suite
from pldr_kernels.bench.contestants import sdpa_backends
from pldr_kernels.bench.ops_suite import OpCase

DEVICE = torch.device(os.environ.get("PLDR_BENCH_DEVICE", "cpu"))
WITH_FLEX = os.environ.get("PLDR_BENCH_FLEX", "0") == "1"
H = 14  # the 110M model

CASES = [
    OpCase("g_attention", 1, 512, H, 64, "float32", True),
    OpCase("g_attention", 1, 512, H, 64, "bfloat16", True),
    OpCase("g_attention", 1, 2048, H, 64, "float32", True),
    OpCase("g_attention_decode", 1, 4096, H, 64, "float32", False),
    OpCase("g_attention_decode", 1, 4096, H, 64, "bfloat16", False),
    OpCase("metric_tensors", 1, 256, H, 64, "float32", False),
]


def label(case: OpCase) -> str:
    return f"{case.op}-{case.label().replace(' ', '_')}-{case.dtype}"


def impls_for(op: str):
    if op == "metric_tensors":  # reference.metric_tensors is the authors' eager formulation
        return ["pldr_kernels", "reference"]
    sdpa = [f"sdpa_{name}" for name in sdpa_backends(DEVICE)]
    return ["pldr_kernels", "reference", "eager", *sdpa, "flex_compiled"]


PAIRS = [pytest.param(case, impl, id=f"{label(case)}-{impl}")
         for case in CASES for impl in impls_for(case.op)]

_prepared = {}


def prepared(case: OpCase):
    if case not in _prepared:
        cfg = ops_suite.quick_config()
        cfg.with_flex = WITH_FLEX
        cfg.flex_skip_reason = "set PLDR_BENCH_FLEX=1 to include (torch.compile takes ~45 s)"
        _prepared.clear()  # keep one case's tensors alive at a time
        _prepared[case] = ops_suite.prepare(case, DEVICE, cfg)
    return _prepared[case]


@pytest.mark.parametrize("case,impl", PAIRS)
def test_op(benchmark, case, impl):
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("PLDR_BENCH_DEVICE=cuda but no CUDA device is visible")
    prep = prepared(case)
    contestant = next((c for c in prep.contestants if c.name == impl), None)
    if contestant is None:
        pytest.skip(f"{impl} is not a contestant of {case.op} on {DEVICE.type}")
    if not contestant.available:
        pytest.skip(contestant.skip_reason)
    try:
        outputs = {impl: contestant.fn()}
    except Exception as exc:  # e.g. an SDPA backend that refuses these inputs
        pytest.skip(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    if prep.peer_name and prep.peer_name not in outputs:
        peer = next(c for c in prep.contestants if c.name == prep.peer_name)
        outputs[prep.peer_name] = peer.fn()
    verdict = ops_suite.judge(outputs, prep)[impl]
    assert not verdict.startswith("!"), f"{impl} disagrees with the reference: {verdict[1:]}"
    flops, nbytes = ops_suite.work(case)
    benchmark.group = f"{case.op} {case.label()} {case.dtype}"
    benchmark.extra_info.update({"op": case.op, "impl": impl, "B": case.B, "S": case.S,
                                 "H": case.H, "d": case.d, "dtype": case.dtype,
                                 "causal": case.causal, "flops": flops, "bytes": nbytes,
                                 "agreement": verdict})
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)

    def call():
        contestant.fn()
        sync()
    benchmark.pedantic(call, rounds=7, warmup_rounds=1, iterations=1)
