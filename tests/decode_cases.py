"""Shared by the emulated and the real-CUDA g_attention_decode tests: the PyTorch same-dtype peer of
the DESIGN §4 tolerance rule and the comparison of a decode step against the fp64 reference."""
from __future__ import annotations

import math

import torch
from testing import assert_close_to_reference

from pldr_kernels import reference


def peer_same_dtype(q, k_cache, v_cache, lens, Sn, appending, starts, G, scale):
    """What a user would do in q's dtype (HF eager style): q̃ = q·G in fp32 cast to the dtype,
    scores and P·V in the dtype, softmax in fp32 — the peer of the low-precision tolerance rule.
    ``k_cache``/``v_cache`` already hold the appended rows."""
    B = q.shape[0]
    out = torch.empty_like(q)
    for b in range(B):
        end = lens[b] + (Sn if appending else 0)
        s0 = starts[b]
        Gb = None if G is None else G[b if G.shape[0] > 1 else 0][None]
        qt = reference.apply_g(q[b:b + 1], Gb).to(q.dtype).permute(0, 2, 1, 3)
        k = k_cache[b:b + 1, s0:end].permute(0, 2, 1, 3)
        v = v_cache[b:b + 1, s0:end].permute(0, 2, 1, 3)
        scores = torch.matmul(qt, k.transpose(-1, -2)) * scale
        i = torch.arange(Sn, device=q.device)[:, None]
        j = torch.arange(end - s0, device=q.device)[None, :]
        scores = scores.masked_fill(j > i + (end - s0 - Sn), float("-inf"))
        p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out[b] = torch.matmul(p, v).permute(0, 2, 1, 3)[0]
    return out


def assert_decode_matches_reference(out, q, k_cache, v_cache, lens, k_new, v_new, starts, G,
                                    kc_appended, vc_appended):
    """DESIGN §4 for one decode step: ``out`` against reference.g_attention_decode in fp64 on the
    caches before the step (``k_cache``/``v_cache``); fp32 → relative 1e-5, bf16/fp16 → ≤ 2 × the
    same-dtype peer's error (+ floor), the peer reading the reference-appended caches."""
    B, Sn, _, d = q.shape
    as_i32 = lambda values: torch.tensor(values, dtype=torch.int32, device=q.device)  # noqa: E731
    ref64 = reference.g_attention_decode(
        q.double(), k_cache.double(), v_cache.double(), as_i32(lens),
        None if k_new is None else k_new.double(), None if v_new is None else v_new.double(),
        None if starts is None else as_i32(starts), None if G is None else G.double())
    if q.dtype == torch.float32:
        assert_close_to_reference(out, ref64)
    else:
        peer = peer_same_dtype(q, kc_appended, vc_appended, lens, Sn, k_new is not None,
                               starts or [0] * B, G, 1.0 / math.sqrt(d))
        assert_close_to_reference(out, ref64, peer=peer)
