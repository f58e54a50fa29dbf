"""The SIMT emulation shim itself (tools/cuda_emu/cuda_cpu_shim.h): block barrier, early exit,
dynamic shared memory, warp shuffles (types, widths, idx/up/down), bf16/fp16 conversions."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from backends import EMULATOR_MARKS, run_driver

pytestmark = EMULATOR_MARKS

N = 96  # three warps


@pytest.fixture(scope="module")
def results():
    floats = np.array([0.0, -0.0, 1.0, 1.00390625, 1.005859375, 1.0029296875, 65504.0, 65520.0,
                       1e5, -3.14159, 1e-8, 6e-8, 2.9802322e-08, 1e-40, 3.0e38, np.inf, -np.inf,
                       np.nan, 0.1, -7.5e-5, 1.0009765625, 1.00048828125],
                      dtype=np.float32)
    n = len(floats)
    out_spec = {
        "xor5": ((N,), np.int32), "xor9_w8": ((N,), np.int32), "idx_w16": ((N,), np.float32),
        "down3_w8": ((N,), np.float64), "up2": ((N,), np.int32), "bcast": ((N,), np.int64),
        "rounds": ((N,), np.int32), "early": ((N,), np.int32), "dyn": ((2 * N,), np.int32),
        "bf16_bits": ((n,), np.int16), "fp16_bits": ((n,), np.int16),
        "bf16_back": ((n,), np.float32), "fp16_back": ((n,), np.float32)}
    res = run_driver("shim_driver.cpp", {"floats": floats}, {"n": n}, out_spec)
    res["floats"] = floats
    return res


def test_shuffles(results):
    t = np.arange(N)
    lane, base = t % 32, t - t % 32
    np.testing.assert_array_equal(results["xor5"], (base + (lane ^ 5)) * 10)
    # width 8: xor 9 reaches the previous segment (allowed) or the next one (own value returned)
    src = lane ^ 9
    expect = np.where(src // 8 > lane // 8, lane, src) + base
    np.testing.assert_array_equal(results["xor9_w8"], expect)
    np.testing.assert_array_equal(results["idx_w16"], base + (lane // 16) * 16 + 19 % 16 + 0.5)
    seg = lane % 8
    np.testing.assert_array_equal(results["down3_w8"], np.where(seg + 3 < 8, t + 3, t) * 1.25)
    np.testing.assert_array_equal(results["up2"], np.where(lane >= 2, t - 2, t))
    np.testing.assert_array_equal(results["bcast"], (base + 7).astype(np.int64) << 33)


def test_barriers_and_dynamic_shared_memory(results):
    t = np.arange(N)
    np.testing.assert_array_equal(results["rounds"], 1000 + ((t + 5) % N + 37) % N)
    early = results["early"]
    assert (early[:40] == sum(i * i for i in range(40))).all() and (early[40:] == -1).all()
    dyn = results["dyn"].reshape(2, N)
    for b in range(2):
        np.testing.assert_array_equal(dyn[b], 3 * (N - 1 - t) + b)


def test_bf16_fp16_conversions_round_to_nearest_even(results):
    f = torch.from_numpy(results["floats"])
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        want = f.to(dtype)
        got_bits = torch.from_numpy(results[f"{name}_bits"])
        nan = torch.isnan(want)
        assert torch.equal(got_bits[~nan], want.view(torch.int16)[~nan]), name
        assert torch.isnan(got_bits.view(dtype)[nan]).all()
        back = torch.from_numpy(results[f"{name}_back"])
        assert torch.equal(back[~nan], want.float()[~nan])
