"""pldr::linear_small / pldr::swiglu_small (docs/design.md §3.9) against the fp64 oracle by the
peer rule of docs/design.md §4 (testing.check_linear_small), on the CPU path this process selected
(cpu/isa.h: once per process; tests/test_isa.py runs a compact set of these cases on every other
path this machine has, one process each), every weight dtype, rows B ∈ {1, 3, 8} (and 11: two
passes over the weights), and in/out features that are no multiple of a vector; int8 against its
dequantised weights in fp64; NaN and Inf where fp64 has them."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from pldr_kernels import ops
from pldr_kernels.__main__ import cpu_kernels_isa
from pldr_kernels.testing import check_linear_small, compare, random_linear_small_weight

pytestmark = pytest.mark.skipif(ops._LOAD_ERROR is not None, reason=f"{ops._LOAD_ERROR}")


@pytest.fixture(scope="module")
def isa() -> str:
    """The path this process runs, for the verdicts' names."""
    return cpu_kernels_isa().split()[0]


# K = 211: whole int8 groups (4 vectors per load), then whole vectors, then single weights, on
# AVX-512 (64-weight groups) and AVX2 (32).
CASES = [(1, 37, 19), (2, 211, 23), (3, 131, 45), (8, 70, 9), (11, 33, 17)]


@pytest.mark.parametrize("M,K,N", CASES)
@pytest.mark.parametrize("kind", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_small_matches_fp64(isa, M, K, N, kind, x_dtype, with_bias):
    gen = torch.Generator().manual_seed(M * 1000 + K + N)
    x = torch.randn(M, K, generator=gen).to(x_dtype)
    w, scale, w64 = random_linear_small_weight(N, K, kind, gen)
    bias = torch.randn(N, generator=gen) if with_bias else None
    out = ops.linear_small(x, w, bias, scale)
    assert out.dtype == x_dtype and out.shape == (M, N)
    check_linear_small(out, x, w64, bias, name=f"linear_small[{isa}]").assert_ok()


@pytest.mark.parametrize("M", [1, 2, 5])
@pytest.mark.parametrize("kind", ["float32", "bfloat16", "int8"])
def test_linear_small_gives_nan_and_inf_where_fp64_does(M, kind):
    """A NaN or Inf of x (in an int8 group, a whole vector, the scalar tail) or of the weight
    reaches the outputs fp64 gives them, never a finite value."""
    gen = torch.Generator().manual_seed(M + 17)
    K, N = 211, 23
    x = torch.randn(M, K, generator=gen)
    w, scale, w64 = random_linear_small_weight(N, K, kind, gen)
    x[0, 70] = float("nan")  # a group: every feature of row 0
    if M > 1:
        x[1, 200] = float("inf")  # a whole vector past the groups
    if M > 2:
        x[2, 209] = float("-inf")  # the scalar tail
    if kind != "int8":
        w[3, 5] = float("nan")  # feature 3 of every row
        w64 = w.double()
    out = ops.linear_small(x, w, None, scale)
    oracle = F.linear(x.double(), w64)
    assert torch.equal(out.isnan(), oracle.isnan())
    assert torch.equal(out.isposinf(), oracle.isposinf())
    assert torch.equal(out.isneginf(), oracle.isneginf())


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_strided_x_and_bias_are_read_through_their_strides(isa, x_dtype):
    """x rows further apart than K (a slice of a wider tensor) and a bias with a stride of 2, in
    fp32 and bf16: the same values as their contiguous copies give."""
    gen = torch.Generator().manual_seed(23)
    M, K, N = 3, 70, 21
    x = torch.randn(M, 2 * K, generator=gen).to(x_dtype)[:, 5:5 + K]
    w, scale, w64 = random_linear_small_weight(N, K, "bfloat16", gen)
    bias = torch.randn(2 * N, generator=gen).to(x_dtype)[::2]
    assert not x.is_contiguous() and bias.stride(0) == 2
    out = ops.linear_small(x, w, bias, scale)
    assert torch.equal(out, ops.linear_small(x.contiguous(), w, bias.contiguous(), scale))
    check_linear_small(out, x, w64, bias, name=f"linear_small[{isa}] strided").assert_ok()


@pytest.mark.parametrize("M,K,H", [(1, 37, 19), (3, 131, 13), (8, 45, 6)])
@pytest.mark.parametrize("kind", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_swiglu_small_matches_fp64(isa, M, K, H, kind, x_dtype, with_bias):
    gen = torch.Generator().manual_seed(M * 1000 + K + H)
    x = torch.randn(M, K, generator=gen).to(x_dtype)
    w, scale, w64 = random_linear_small_weight(2 * H, K, kind, gen)
    bias = torch.randn(2 * H, generator=gen) if with_bias else None
    out = ops.swiglu_small(x, w, bias, scale)
    assert out.dtype == x_dtype and out.shape == (M, H)
    check_linear_small(out, x, w64, bias, swiglu=True, name=f"swiglu_small[{isa}]").assert_ok()


def test_threads_split_features_and_leading_dims_kept(isa):
    """A layer big enough for every thread (≥ 64 KiB per share), x with two leading dims."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 1, 260, generator=gen)
    w = torch.randn(1001, 260, generator=gen) / 16
    bias = torch.randn(1001, generator=gen)
    out = ops.linear_small(x, w, bias)
    assert out.shape == (2, 1, 1001)
    oracle = x.double() @ w.double().T + bias.double()
    compare(out, oracle, F.linear(x, w, bias), name="linear_small threads").assert_ok()


def test_rows_of_x_may_be_strided_views():
    gen = torch.Generator().manual_seed(3)
    big = torch.randn(4, 2 * 40, generator=gen)
    x = big[:, :40]  # rows 80 apart
    w = torch.randn(24, 40, generator=gen)
    oracle = x.double() @ w.double().T
    compare(ops.linear_small(x, w), oracle, F.linear(x, w), name="strided x").assert_ok()


BAD = {
    "x dtype": (dict(x=torch.randn(1, 8, dtype=torch.float64)), "x must be float32 or bfloat16"),
    "weight dtype": (dict(weight=torch.randn(4, 8).half()), "weight must be float32, bfloat16 or "
                     "int8, got Half"),
    "weight rank": (dict(weight=torch.randn(4, 8, 1)), "weight must be a 2-D tensor"),
    "K mismatch": (dict(x=torch.randn(1, 9)), r"x.shape\[-1\] \(in_features\) must be weight"),
    "weight strided": (dict(weight=torch.randn(8, 4).T), "weight must be contiguous"),
    "bias shape": (dict(bias=torch.randn(5)), "bias must have shape"),
    "int8 without scale": (dict(weight=torch.zeros(4, 8, dtype=torch.int8)),
                           "scale is required with an int8 weight"),
    "scale with fp32": (dict(scale=torch.ones(4)), "scale is only for an int8 weight"),
    "scale dtype": (dict(weight=torch.zeros(4, 8, dtype=torch.int8),
                         scale=torch.ones(4, dtype=torch.float64)), "scale must have dtype Float"),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("swiglu", [False, True])
def test_bad_inputs_same_words_real_and_fake(case, swiglu):
    changes, words = BAD[case]
    kw = dict(x=torch.randn(1, 8), weight=torch.randn(4, 8), bias=None, scale=None) | changes
    op = torch.ops.pldr.swiglu_small if swiglu else torch.ops.pldr.linear_small
    with pytest.raises(RuntimeError, match=words) as real:
        op(**kw)
    with FakeTensorMode() as mode:
        fake = {k: None if v is None else mode.from_tensor(v) for k, v in kw.items()}
        with pytest.raises(RuntimeError) as faked:
            op(**fake)
    assert str(real.value).split("\n")[0] == str(faked.value).split("\n")[0]


def test_swiglu_needs_even_rows():
    with pytest.raises(RuntimeError, match=r"weight.shape\[0\] \(gate and up rows\) must be even"):
        ops.swiglu_small(torch.randn(1, 8), torch.randn(5, 8))


# The decode rows' prefetch distance (csrc/cpu/linear_small_cpu.cpp, row_prefetch_bytes): read once
# per process, so each setting runs in a fresh one. It moves when bytes arrive, never a bit.
PREFETCH_OUTPUTS = r"""
import sys, torch
from pldr_kernels import ops
from pldr_kernels.testing import random_linear_small_weight
gen = torch.Generator().manual_seed(0)
torch.set_num_threads(2)
outputs = {}
for kind in ("bfloat16", "int8"):
    for M, K, N in ((1, 896, 300), (3, 1000, 77), (8, 200, 64), (11, 131, 9)):
        w, scale, _ = random_linear_small_weight(2 * N, K, kind, gen)
        x = torch.randn(M, K, generator=gen)
        bias = torch.randn(2 * N, generator=gen)
        outputs[f"{kind} {M} {K} {N}"] = ops.linear_small(x, w, bias, scale)
        outputs[f"{kind} {M} {K} {N} swiglu"] = ops.swiglu_small(x, w, bias, scale)
torch.save(outputs, sys.argv[1])
"""


def run_with_row_prefetch(value: str | None, args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PLDR_KERNELS_ROW_PREFETCH"}
    if value is not None:
        env["PLDR_KERNELS_ROW_PREFETCH"] = value
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_row_prefetch_distance_changes_no_bit(tmp_path):
    results = {}
    for value in (None, "0", "64", "4096", "1048576"):  # 1 MiB: far past every weight's end
        path = tmp_path / f"{value}.pt"
        proc = run_with_row_prefetch(value, ["-c", PREFETCH_OUTPUTS, str(path)])
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[value] = torch.load(path, weights_only=True)
    for value, outputs in results.items():
        for case, y in outputs.items():
            assert torch.equal(y, results["0"][case]), (value, case)


def test_the_default_row_prefetch_follows_the_cpu_vendor_and_the_report_names_it():
    proc = run_with_row_prefetch(None, ["-m", "pldr_kernels"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("row prefetch"))
    try:
        intel = "GenuineIntel" in open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo to tell the CPU's vendor")
    expected = "4096 bytes ahead" if intel else "off"  # a portable build decides the same way
    assert line.startswith(f"row prefetch  {expected} ("), line
    proc = run_with_row_prefetch("0", ["-m", "pldr_kernels"])
    assert "row prefetch  off (" in proc.stdout, proc.stdout


@pytest.mark.parametrize("value", ["abc", "-1", "1048577", "12k"])
def test_an_invalid_row_prefetch_is_refused_by_name(value):
    script = """
import torch
from pldr_kernels import ops
try:
    ops.linear_small(torch.randn(1, 8), torch.randn(4, 8).bfloat16())
    print("ran")
except RuntimeError as e:
    print(str(e).splitlines()[0])
"""
    proc = run_with_row_prefetch(value, ["-c", script])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == (
        f"PLDR_KERNELS_ROW_PREFETCH={value}: expected a number of bytes from 0 to 1048576 (or "
        "unset: 4096 on Intel CPUs, 0 on others)"), proc.stdout
    proc = run_with_row_prefetch(value, ["-m", "pldr_kernels"])
    assert f"row prefetch  error: PLDR_KERNELS_ROW_PREFETCH must be a number of bytes from 0 to "\
           f"1048576, got '{value}'" in proc.stdout, proc.stdout
