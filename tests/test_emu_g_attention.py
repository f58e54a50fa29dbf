"""pldr::g_attention's CUDA kernels (csrc/cuda/g_attention_kernel.cuh) run on the CPU through the
emulator, against the fp64 reference (DESIGN §4 rule). Shapes are tiny and awkward: partial tiles
(Sq, Sk not multiples of 64), Sq ≠ Sk, fully masked rows, strided views."""
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from emu_common import DTYPE_CODE, run, skip_without_compiler
from g_attention_cases import check_against_reference
from testing import random_g

DRIVER = Path(__file__).parent / "emu" / "g_attention_driver.cpp"
pytestmark = [pytest.mark.emulation, skip_without_compiler]


def raw(t):
    """The whole contiguous buffer behind view ``t`` as numpy (16-bit types as raw bits)."""
    base = t if t._base is None else t._base
    assert base.is_contiguous()
    flat = base.reshape(-1)
    if flat.dtype in (torch.bfloat16, torch.float16):
        return flat.view(torch.int16).numpy().view(np.uint16)
    if flat.dtype == torch.bool:
        return flat.numpy().astype(np.uint8)
    return flat.numpy()


def emulated_g_attention(q, k, v, G=None, key_mask=None, causal=False, scale=None):
    B, Sq, H, d = q.shape
    Sk = k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    params = dict(dtype=DTYPE_CODE[q.dtype], d=d, B=B, H=H, Sq=Sq, Sk=Sk, causal=int(causal),
                  scale_bits=struct.unpack("<I", struct.pack("<f", scale))[0],
                  has_G=int(G is not None), has_mask=int(key_mask is not None))
    inputs = {}
    for name, t in (("q", q), ("k", k), ("v", v)):
        inputs[name] = raw(t)
        params.update({f"{name}_len": inputs[name].size, f"{name}_offset": t.storage_offset(),
                       f"{name}_sb": t.stride(0), f"{name}_ss": t.stride(1),
                       f"{name}_sh": t.stride(2)})
    if G is not None:
        inputs["G"] = raw(G)
        params.update(G_len=inputs["G"].size, G_offset=G.storage_offset(),
                      G_sb=G.stride(0) if G.shape[0] > 1 else 0, G_sh=G.stride(1),
                      G_sr=G.stride(2))
    if key_mask is not None:
        inputs["key_mask"] = raw(key_mask)
        params.update(mask_len=inputs["key_mask"].size, mask_offset=key_mask.storage_offset(),
                      mask_sb=key_mask.stride(0), mask_sk=key_mask.stride(1))
    out_np = np.uint16 if q.dtype != torch.float32 else np.float32
    res = run(DRIVER, inputs, params,
                       {"out": ((B, Sq, H, d), out_np), "lse": ((B, H, Sq), np.float32)})
    out = torch.from_numpy(res["out"].copy())
    if q.dtype != torch.float32:
        out = out.view(torch.int16).view(q.dtype)
    return out, torch.from_numpy(res["lse"].copy())


def ragged_mask(B, Sk, gen):
    mask = torch.rand(B, Sk, generator=gen) > 0.3
    mask[0, : Sk // 2] = False  # left padding on row 0
    return mask


# (d, dtype, B, H, Sq, Sk, causal, G mode, key_mask)
CASES = [
    (64, torch.bfloat16, 2, 1, 70, 70, True, "batch", False),
    (64, torch.bfloat16, 1, 2, 7, 33, False, None, True),
    (64, torch.float16, 2, 1, 33, 70, True, "shared", True),
    (64, torch.float16, 1, 1, 70, 7, True, "batch", False),   # Sq > Sk: early rows see nothing
    (64, torch.bfloat16, 1, 4, 1, 70, True, "shared", False),  # one query row (decode-like)
    (128, torch.bfloat16, 1, 1, 70, 33, False, "batch", True),
    (128, torch.float16, 2, 1, 33, 70, True, None, False),
    (128, torch.bfloat16, 1, 1, 7, 7, True, "shared", False),
    (128, torch.float16, 2, 1, 33, 100, True, "batch", True),  # G in 2 chunks, 4 key tiles
    (64, torch.float32, 2, 1, 33, 70, True, "batch", True),
    (64, torch.float32, 1, 2, 70, 7, True, None, False),
    (128, torch.float32, 1, 1, 7, 33, False, "shared", True),
    (128, torch.float32, 1, 1, 33, 7, True, "batch", False),
]


@pytest.mark.parametrize("d,dtype,B,H,Sq,Sk,causal,g_mode,masked", CASES)
def test_matches_reference(d, dtype, B, H, Sq, Sk, causal, g_mode, masked):
    gen = torch.Generator().manual_seed(Sq * 1000 + Sk + d)
    q = torch.randn(B, Sq, H, d, generator=gen).to(dtype)
    k = torch.randn(B, Sk, H, d, generator=gen).to(dtype)
    v = torch.randn(B, Sk, H, d, generator=gen).to(dtype)
    G = None if g_mode is None else random_g(B if g_mode == "batch" else 1, H, d)
    key_mask = ragged_mask(B, Sk, gen) if masked else None
    out, lse = emulated_g_attention(q, k, v, G, key_mask, causal)
    check_against_reference(out, lse, q, k, v, G, key_mask, causal)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_strided_views_and_fully_masked_batch(dtype):
    """q, k, v as views of one packed [B, S, 3, H, d] buffer, G and key_mask non-contiguous, a
    custom scale, and a batch row whose keys are all masked (out 0, lse -inf)."""
    gen = torch.Generator().manual_seed(7)
    B, S, H, d = 2, 40, 2, 64
    qkv = torch.randn(B, S, 3, H, d, generator=gen).to(dtype)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    G = random_g(B, H, 2 * d)[:, :, ::2, :d]  # row stride 2d
    key_mask = (torch.rand(B, 2 * S, generator=gen) > 0.2)[:, ::2]
    key_mask[1] = False
    out, lse = emulated_g_attention(q, k, v, G, key_mask, causal=False, scale=0.3)
    check_against_reference(out, lse, q, k, v, G, key_mask, False, 0.3)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_negative_scale(dtype):
    """The softmax max is taken after scaling, so any finite scale works."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, n, 2, 64, generator=gen).to(dtype) for n in (33, 70, 70))
    G = random_g(1, 2, 64)
    out, lse = emulated_g_attention(q, k, v, G, None, causal=True, scale=-0.2)
    check_against_reference(out, lse, q, k, v, G, None, True, -0.2)
