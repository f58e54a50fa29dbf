"""Dispatcher contract of pldr::g_attention / pldr::g_attention_decode (DESIGN.md §3.5):
torch.library.opcheck (schema, fake kernels, mutation annotations) and torch.compile(fullgraph)."""
from __future__ import annotations

import pytest
import torch
from testing import random_g

import pldr_kernels


def attention_samples():
    q, k, v = torch.randn(2, 7, 2, 64), torch.randn(2, 9, 2, 64), torch.randn(2, 9, 2, 64)
    mask = torch.rand(2, 9) > 0.3
    return [
        ((q, k, v), {}),
        ((q, k, v, random_g(2, 2, 64), mask, True, 0.2), {}),
        ((q.bfloat16(), k.bfloat16(), v.bfloat16()), dict(G=random_g(1, 2, 64), causal=True)),
        ((torch.randn(1, 5, 3, 2, 128)[:, :, 0], torch.randn(1, 5, 2, 128), torch.randn(1, 5, 2, 128)),
         dict(causal=False)),
    ]


def decode_samples():
    B, H, d, Smax = 2, 2, 64, 16
    lens = torch.tensor([3, 9], dtype=torch.int32)
    samples = []
    for dtype in (torch.float32, torch.float16):
        kc, vc = torch.randn(B, Smax, H, d).to(dtype), torch.randn(B, Smax, H, d).to(dtype)
        q, kn, vn = (torch.randn(B, 1, H, d).to(dtype) for _ in range(3))
        samples.append(((q, kc, vc, lens, kn, vn), dict(G=random_g(B, H, d), num_splits=2)))
        samples.append(((q, kc, vc, lens), dict(cache_start=torch.tensor([1, 0], dtype=torch.int32))))
    return samples


@pytest.mark.parametrize("i", range(4))
def test_opcheck_g_attention(i):
    args, kwargs = attention_samples()[i]
    torch.library.opcheck(torch.ops.pldr.g_attention.default, args, kwargs)


@pytest.mark.parametrize("i", range(4))
def test_opcheck_g_attention_decode(i):
    args, kwargs = decode_samples()[i]
    # the op mutates its caches: give opcheck fresh clones
    args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.pldr.g_attention_decode.default, args, kwargs)


def prefill_then_decode(q, k, v, G, q_new, k_new, v_new, k_cache, v_cache, lens):
    out, lse = pldr_kernels.g_attention(q, k, v, G, causal=True)
    step = pldr_kernels.g_attention_decode(q_new, k_cache, v_cache, lens, k_new, v_new, G=G)
    return out * 2.0, lse, step + 1.0


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    B, S, H, d, Smax = 2, 11, 2, 64, 16
    q, k, v = (torch.randn(B, S, H, d) for _ in range(3))
    q_new, k_new, v_new = (torch.randn(B, 1, H, d) for _ in range(3))
    G = random_g(B, H, d)
    lens = torch.tensor([S, S - 3], dtype=torch.int32)

    def fresh_caches():
        kc, vc = torch.zeros(B, Smax, H, d), torch.zeros(B, Smax, H, d)
        kc[:, :S], vc[:, :S] = k, v
        return kc, vc

    kc_e, vc_e = fresh_caches()
    eager = prefill_then_decode(q, k, v, G, q_new, k_new, v_new, kc_e, vc_e, lens)
    compiled_fn = torch.compile(prefill_then_decode, fullgraph=True, backend="inductor")
    kc_c, vc_c = fresh_caches()
    compiled = compiled_fn(q, k, v, G, q_new, k_new, v_new, kc_c, vc_c, lens)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    # the in-place append happened under compile too
    assert torch.equal(kc_c, kc_e) and torch.equal(vc_c, vc_e)
    assert torch.equal(kc_c[1, S - 3], k_new[1, 0])
