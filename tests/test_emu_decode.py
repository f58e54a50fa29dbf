"""g_attention_decode CUDA kernels run on the CPU through the emulator (DESIGN.md §5).

The real device code and launch logic of csrc/cuda/g_attention_decode_kernel.cuh run on tiny
shapes and are compared with reference.g_attention_decode in fp64 (DESIGN.md §4).
"""
from __future__ import annotations

import math

import pytest
import torch
from decode_cases import assert_decode_matches_reference, peer_same_dtype
from emu_common import DTYPE_CODE, from_raw, raw_spec, run, skip_without_compiler, to_raw
from testing import assert_close_to_reference, random_g

from pldr_kernels import reference

pytestmark = [pytest.mark.emulation, skip_without_compiler]


def run_decode(q, k_cache, v_cache, lens, k_new=None, v_new=None, starts=None, G=None,
               scale=None, num_splits=0, num_sms=8, force_scalar=False, pad_heads=0):
    """Runs the emulated step. With pad_heads > 0, q/k_new/v_new/caches hold H + pad_heads heads
    and the kernel is given strided views of the first H (out is [B, Sn, H, d])."""
    B, Sn, Hp, d = q.shape
    H = Hp - pad_heads
    Smax = k_cache.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    inputs = {"q": to_raw(q), "k_cache": to_raw(k_cache), "v_cache": to_raw(v_cache),
              "cache_seqlens": to_raw(torch.tensor(lens, dtype=torch.int32)),
              "scale": to_raw(torch.tensor([scale], dtype=torch.float32))}
    if k_new is not None:
        inputs["k_new"], inputs["v_new"] = to_raw(k_new), to_raw(v_new)
    if starts is not None:
        inputs["cache_start"] = to_raw(torch.tensor(starts, dtype=torch.int32))
    if G is not None:
        inputs["G"] = to_raw(G)
    params = dict(B=B, Sn=Sn, Smax=Smax, H=H, d=d, dtype=DTYPE_CODE[q.dtype],
                  num_splits=num_splits, num_sms=num_sms, has_new=int(k_new is not None),
                  has_start=int(starts is not None), G_batch=0 if G is None else G.shape[0],
                  force_scalar=int(force_scalar), pad_heads=pad_heads)
    outputs = {"out": raw_spec((B, Sn, H, d), q.dtype), "k_cache": raw_spec(k_cache.shape, q.dtype),
               "v_cache": raw_spec(k_cache.shape, q.dtype),
               "num_splits_used": raw_spec((1,), torch.int32)}
    res = run("decode_driver.cpp", inputs, params, outputs)
    return (from_raw(res["out"], q.dtype), from_raw(res["k_cache"], q.dtype),
            from_raw(res["v_cache"], q.dtype), int(res["num_splits_used"][0]))


CASES = [
    # dtype, d, H, Smax, Sn, append, starts, G mode, num_splits, lens, extra
    (torch.float32, 64, 2, 40, 1, True, None, None, 1, [17, 39], {}),
    (torch.float32, 64, 2, 40, 3, True, [0, 5], "batch", 3, [21, 30], {}),
    (torch.float32, 64, 2, 40, 5, True, [0, 2], "shared", 2, [0, 33], {}),  # two query chunks
    (torch.bfloat16, 64, 3, 40, 1, True, None, "shared", 3, [38, 7], {}),
    (torch.float16, 64, 2, 40, 3, False, [1, 0], "batch", 1, [12, 40], {}),
    (torch.bfloat16, 128, 2, 40, 3, False, None, "batch", 3, [25, 3], {}),
    (torch.float16, 128, 2, 40, 1, True, [4, 0], None, 3, [9, 26], {}),
    (torch.float32, 128, 2, 40, 2, True, None, "shared", 3, [37, 15], {"force_scalar": True}),
    (torch.bfloat16, 64, 2, 130, 1, True, [3, 0], "batch", 0, [100, 129], {}),  # auto: > 1 split
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{str(c[0])[6:]}-d{c[1]}-Sn{c[4]}-"
                         f"{'app' if c[5] else 'noapp'}-G{c[7]}-splits{c[8]}")
def test_decode_matches_reference(case):
    dtype, d, H, Smax, Sn, append, starts, g_mode, splits, lens, extra = case
    B = 2
    q = torch.randn(B, Sn, H, d).to(dtype)
    k_cache = torch.randn(B, Smax, H, d).to(dtype)
    v_cache = torch.randn(B, Smax, H, d).to(dtype)
    k_new = torch.randn(B, Sn, H, d).to(dtype) if append else None
    v_new = torch.randn(B, Sn, H, d).to(dtype) if append else None
    G = None if g_mode is None else random_g(B if g_mode == "batch" else 1, H, d)
    out, kc, vc, used = run_decode(q, k_cache, v_cache, lens, k_new, v_new, starts, G,
                                   num_splits=splits, **extra)
    if splits > 0:
        assert used == splits
    else:
        assert used > 1, "auto should split a long cache at small batch"

    # Expected cache: the append done by the reference in the cache dtype (bitwise).
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    reference.g_attention_decode(q, kc_ref, vc_ref, torch.tensor(lens, dtype=torch.int32), k_new,
                                 v_new, None if starts is None else torch.tensor(starts,
                                                                                 dtype=torch.int32), G)
    assert torch.equal(kc.view(torch.int16 if dtype != torch.float32 else dtype),
                       kc_ref.view(torch.int16 if dtype != torch.float32 else dtype))
    assert torch.equal(vc.view(torch.int16 if dtype != torch.float32 else dtype),
                       vc_ref.view(torch.int16 if dtype != torch.float32 else dtype))

    assert_decode_matches_reference(out, q, k_cache, v_cache, lens, k_new, v_new, starts, G,
                                    kc_ref, vc_ref)


@pytest.mark.parametrize("splits", [1, 3])
def test_decode_past_the_end_leaves_cache_and_gives_nan(splits):
    """Differs from the CPU backend, which raises: the CUDA kernel cannot read cache_seqlens on
    the host without a sync, so a row whose append would pass Smax is not written (its cache rows
    stay bitwise untouched) and its outputs are NaN; the other rows are computed normally."""
    B, H, d, Smax, Sn = 2, 2, 64, 40, 3
    dtype = torch.bfloat16
    lens = [Smax - 1, 20]  # row 0: 39 + 3 > 40
    q = torch.randn(B, Sn, H, d).to(dtype)
    k_cache = torch.randn(B, Smax, H, d).to(dtype)
    v_cache = torch.randn(B, Smax, H, d).to(dtype)
    k_new = torch.randn(B, Sn, H, d).to(dtype)
    v_new = torch.randn(B, Sn, H, d).to(dtype)
    out, kc, vc, _ = run_decode(q, k_cache, v_cache, lens, k_new, v_new, num_splits=splits)
    assert torch.isnan(out[0]).all()
    assert torch.equal(kc[0].view(torch.int16), k_cache[0].view(torch.int16))
    assert torch.equal(vc[0].view(torch.int16), v_cache[0].view(torch.int16))
    # Row 1 is unaffected: appended and correct.
    assert torch.equal(kc[1, 20:23].view(torch.int16), k_new[1].view(torch.int16))
    ref64 = reference.g_attention_decode(q[1:].double(), k_cache[1:].double(),
                                         v_cache[1:].double(), torch.tensor([20], dtype=torch.int32),
                                         k_new[1:].double(), v_new[1:].double())
    kc1, vc1 = k_cache[1:].clone(), v_cache[1:].clone()
    reference.g_attention_decode(q[1:], kc1, vc1, torch.tensor([20], dtype=torch.int32),
                                 k_new[1:], v_new[1:])
    peer = peer_same_dtype(q[1:], kc1, vc1, [20], Sn, True, [0], None, 1.0 / math.sqrt(d))
    assert_close_to_reference(out[1:], ref64, peer=peer)


def test_decode_invalid_lengths_without_append_give_nan():
    """cache_seqlens < Sn without k_new, or cache_start past the first new token: NaN, no write."""
    B, H, d, Smax, Sn = 2, 2, 64, 40, 3
    q = torch.randn(B, Sn, H, d)
    k_cache, v_cache = torch.randn(B, Smax, H, d), torch.randn(B, Smax, H, d)
    out, kc, vc, _ = run_decode(q, k_cache, v_cache, [2, 30], starts=[0, 28], num_splits=3)
    assert torch.isnan(out[0]).all()  # 2 < Sn
    assert torch.isnan(out[1]).all()  # start 28 > 30 - 3
    assert torch.equal(kc, k_cache) and torch.equal(vc, v_cache)


def test_auto_splits_depend_only_on_shapes():
    """The grid must not depend on cache_seqlens (CUDA-graph capture): same split count for
    different lengths of the same shapes."""
    B, H, d, Smax = 1, 2, 64, 200
    q = torch.randn(B, 1, H, d)
    k_cache, v_cache = torch.randn(B, Smax, H, d), torch.randn(B, Smax, H, d)
    used = {run_decode(q, k_cache, v_cache, [n], num_splits=0)[3] for n in (1, 150)}
    assert len(used) == 1 and used.pop() > 1


def test_decode_strided_views():
    """Only the last dim must be contiguous: q/k_new/v_new as head-slices of a wider tensor (fused
    qkv) and caches as head-slices of a wider cache are read and written through their strides;
    the heads outside the view stay untouched."""
    B, Sn, H, pad, d, Smax = 2, 2, 2, 1, 64, 40
    dtype = torch.bfloat16
    q_full = torch.randn(B, Sn, H + pad, d).to(dtype)
    kc_full = torch.randn(B, Smax, H + pad, d).to(dtype)
    vc_full = torch.randn(B, Smax, H + pad, d).to(dtype)
    kn_full = torch.randn(B, Sn, H + pad, d).to(dtype)
    vn_full = torch.randn(B, Sn, H + pad, d).to(dtype)
    lens, starts = [11, 30], [0, 4]
    G = random_g(B, H, d)
    out, kc, vc, _ = run_decode(q_full, kc_full, vc_full, lens, kn_full, vn_full, starts, G,
                                num_splits=3, pad_heads=pad)
    bits = lambda t: t.view(torch.int16)  # noqa: E731
    assert torch.equal(bits(kc[:, :, H:]), bits(kc_full[:, :, H:]))
    assert torch.equal(bits(vc[:, :, H:]), bits(vc_full[:, :, H:]))
    q, k_new, v_new = q_full[:, :, :H], kn_full[:, :, :H], vn_full[:, :, :H]
    kc_ref, vc_ref = kc_full[:, :, :H].clone(), vc_full[:, :, :H].clone()
    starts_t = torch.tensor(starts, dtype=torch.int32)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    reference.g_attention_decode(q, kc_ref, vc_ref, lens_t, k_new, v_new, starts_t, G)
    assert torch.equal(bits(kc[:, :, :H].contiguous()), bits(kc_ref))
    assert torch.equal(bits(vc[:, :, :H].contiguous()), bits(vc_ref))
    ref64 = reference.g_attention_decode(q.double(), kc_full[:, :, :H].double(),
                                         vc_full[:, :, :H].double(), lens_t, k_new.double(),
                                         v_new.double(), starts_t, G.double())
    peer = peer_same_dtype(q, kc_ref, vc_ref, lens, Sn, True, starts, G, 1.0 / math.sqrt(d))
    assert_close_to_reference(out, ref64, peer=peer)
