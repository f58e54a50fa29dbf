"""Shared by the emulated and the real-CUDA g_attention tests: the PyTorch same-dtype peer of the
DESIGN §4 tolerance rule and the comparison against the fp64 reference."""
from __future__ import annotations

import math

import torch
from testing import assert_close_to_reference

from pldr_kernels import reference


def same_dtype_attention(q, k, v, G=None, key_mask=None, causal=False, scale=None):
    """What PyTorch gives in q's dtype for the same math (the peer of DESIGN §4).

    q̃ = q·G formed in fp32 and rounded once to q's dtype (as the kernel does; see the numerics
    note in csrc/cuda/g_attention_kernel.cuh), scores from a dtype matmul (rounded to the dtype),
    softmax in fp32, P rounded to the dtype, P·V as a dtype matmul.
    """
    dt = q.dtype
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qt = reference.apply_g(q, G).to(dt).permute(0, 2, 1, 3)
    scores = torch.matmul(qt, k.permute(0, 2, 3, 1)).float() * scale
    p, lse = reference.masked_softmax(scores, key_mask, causal)
    out = torch.matmul(p.to(dt), v.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)
    return out, lse


def check_against_reference(out, lse, q, k, v, G=None, key_mask=None, causal=False, scale=None):
    """DESIGN §4: fp32 → relative 1e-5; bf16/fp16 → ≤ 2 × the same-dtype PyTorch error + floor."""
    ref_out, ref_lse = reference.g_attention(
        q.double(), k.double(), v.double(), None if G is None else G.double(), key_mask, causal,
        scale)
    ref_lse = ref_lse.double()
    if q.dtype == torch.float32:
        assert_close_to_reference(out, ref_out, name="out")
        assert_close_to_reference(lse, ref_lse, name="lse")
    else:
        peer_out, peer_lse = same_dtype_attention(q, k, v, G, key_mask, causal, scale)
        assert_close_to_reference(out, ref_out, peer_out, name="out")
        assert_close_to_reference(lse, ref_lse, peer_lse, name="lse")
    # Rows that see no key: exactly 0 and -inf, as in the reference.
    empty = torch.isinf(ref_lse)
    if empty.any():
        assert torch.all(lse[empty] == float("-inf"))
        assert torch.all(out.permute(0, 2, 1, 3)[empty] == 0)


def random_inputs(B, Sq, Sk, H, d, dtype, gen: torch.Generator | None = None, device="cpu"):
    q = torch.randn(B, Sq, H, d, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(B, Sk, H, d, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(B, Sk, H, d, generator=gen).to(device=device, dtype=dtype)
    return q, k, v
