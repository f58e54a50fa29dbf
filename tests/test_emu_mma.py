"""The emulated tensor-core instructions (tools/cuda_emu/mma_emu.h through csrc/cuda/ptx.cuh)
against a plain fp64 matmul and against the PTX ISA fragment layouts (docs/design.md §5.2.1)."""

import numpy as np
import pytest
import torch
from backends import EMULATOR_MARKS, run_driver

DRIVER = "mma_layout_driver.cpp"
pytestmark = EMULATOR_MARKS

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16}


def representable(shape, dtype, gen, scale=1.0):
    """Random fp32 values exactly representable in ``dtype``."""
    return (torch.randn(shape, generator=gen) * scale).to(dtype).float().numpy()


@pytest.mark.parametrize("name", ["bf16", "f16"])
@pytest.mark.parametrize("seed", [0, 1])
def test_mma_and_ldmatrix_match_matmul(name, seed):
    gen = torch.Generator().manual_seed(seed)
    A = representable((16, 16), DTYPES[name], gen)
    B = representable((16, 16), DTYPES[name], gen)
    C = torch.randn(16, 16, generator=gen).numpy().astype(np.float32)
    res = run_driver(DRIVER, {"A": A, "B": B, "C": C}, {"mode": 1, "bf16": int(name == "bf16")},
                     {n: ((16, 16), np.float32) for n in ("d_explicit", "d_ldmatrix", "d_trans")}
                     | {n: ((32, 4), np.uint32) for n in ("raw_a", "raw_a_trans")})
    ref = A.astype(np.float64) @ B.astype(np.float64) + C
    for key in ("d_explicit", "d_ldmatrix", "d_trans"):
        err = np.abs(res[key] - ref).max()
        # fp32 result of exact products: within a couple of fp32 ulps of the fp64 matmul
        assert err <= 4 * np.finfo(np.float32).eps * np.abs(ref).max(), (key, err)
    # The three operand paths must give the very same registers to the MMA.
    np.testing.assert_array_equal(res["d_explicit"], res["d_ldmatrix"])
    np.testing.assert_array_equal(res["d_explicit"], res["d_trans"])

    # Raw ldmatrix registers against the documented rule, computed here independently: lanes
    # 8j..8j+7 give the rows of matrix j; lane l's register j holds (row l>>2, columns
    # (l%4)*2, +1), or with .trans (rows (l%4)*2, +1, column l>>2).
    bits = torch.from_numpy(A).to(DTYPES[name]).view(torch.int16).numpy().astype(np.uint16)

    def row_of(j, r):  # A row and column of row r of matrix j, from the addresses lanes gave
        lane = 8 * j + r
        return (lane & 7) + 8 * ((lane >> 3) & 1), 8 * (lane >> 4)

    for lane in range(32):
        for j in range(4):
            r, c0 = row_of(j, lane >> 2)
            lo, hi = bits[r, c0 + (lane % 4) * 2], bits[r, c0 + (lane % 4) * 2 + 1]
            assert res["raw_a"][lane, j] == (int(lo) | int(hi) << 16), (lane, j)
            r0, c0 = row_of(j, (lane % 4) * 2)
            r1, _ = row_of(j, (lane % 4) * 2 + 1)
            lo, hi = bits[r0, c0 + (lane >> 2)], bits[r1, c0 + (lane >> 2)]
            assert res["raw_a_trans"][lane, j] == (int(lo) | int(hi) << 16), (lane, j, "trans")


def test_16bit_conversions_match_torch():
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([
        torch.randn(4000, generator=gen) * 10.0 ** torch.randint(-9, 6, (4000,), generator=gen),
        torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 65504.0, 65519.0, 65520.0, 1e6,
                      2.0 ** -24, 2.0 ** -25, 1.5 * 2.0 ** -25, 2.0 ** -26, 3 * 2.0 ** -25,
                      6.1e-5, 1e-40, 3.0e38, -3.4e38]),
        # ties: exactly halfway between neighbouring bf16 / fp16 values
        (torch.arange(1, 200, dtype=torch.float32) * 2 + 1) * 2.0 ** -9,
        (torch.arange(1, 200, dtype=torch.float32) * 2 + 1) * 2.0 ** -12,
    ]).float()
    res = run_driver(DRIVER, {"x": x.numpy()}, {"mode": 0, "n": x.numel()},
                     {"bf16": ((x.numel(),), np.uint16), "f16": ((x.numel(),), np.uint16),
                      "bf16_back": ((x.numel(),), np.float32),
                      "f16_back": ((x.numel(),), np.float32)})
    for name, dtype in DTYPES.items():
        want = x.to(dtype)
        np.testing.assert_array_equal(res[name], want.view(torch.int16).numpy().view(np.uint16),
                                      err_msg=name)
        np.testing.assert_array_equal(res[name + "_back"], want.float().numpy(), err_msg=name)
    nan = run_driver(DRIVER, {"x": np.array([np.nan], np.float32)}, {"mode": 0, "n": 1},
                     {"bf16_back": ((1,), np.float32), "f16_back": ((1,), np.float32)})
    assert np.isnan(nan["bf16_back"]).all() and np.isnan(nan["f16_back"]).all()


def test_cp_async_groups_and_zero_fill():
    """wait_group<1> retires all but the newest group; src-size 0 zero-fills the 16 bytes."""
    src = np.arange(1, 17, dtype=np.uint16)
    res = run_driver(DRIVER, {"src": src}, {"mode": 2},
                     {"after_wait1": ((16,), np.uint16), "after_wait0": ((16,), np.uint16)})
    np.testing.assert_array_equal(res["after_wait1"][:8], src[:8])
    np.testing.assert_array_equal(res["after_wait1"][8:], np.full(8, 0xBEEF, np.uint16))
    np.testing.assert_array_equal(res["after_wait0"][:8], src[:8])
    np.testing.assert_array_equal(res["after_wait0"][8:], np.zeros(8, np.uint16))
