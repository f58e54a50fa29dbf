"""Grouped-query and multi-query attention (docs/design.md §3.2, §3.3, §3.4.1): k and v (the
decode's caches and new tokens) with H_kv heads, H_kv dividing H, query head h reading kv head
h // (H / H_kv). Every op on every backend that runs it (cpu; emu = the CUDA kernels run by the
emulator; the Triton kernels under their interpreter), judged against the fp64 reference
(``reference.repeat_kv``) by the rule of pldr_kernels.testing, plus the errors for a bad H_kv."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from backends import backend_cases, backends
from cases import generator, i32, param_case, ragged_key_mask, same_bits
from torch._subclasses.fake_tensor import FakeTensorMode

import pldr_kernels  # noqa: F401  (registers the ops' autograd)
from pldr_kernels import reference
from pldr_kernels.testing import (
    check_g_attention,
    check_g_attention_decode,
    check_g_attention_grads,
    randn,
    random_attention_inputs,
    random_g,
    random_kv_cache,
)

H = 4
KV_HEADS = (1, 2, H)  # multi-query, grouped-query, multi-head


def _forward_cases():
    cases = []
    for H_kv in KV_HEADS:
        cases.append(param_case("tiny", H_kv=H_kv, dtype=torch.float32, causal=True, mask=False))
        cases.append(param_case("tiny", H_kv=H_kv, dtype=torch.bfloat16, causal=False, mask=True))
    return cases


@pytest.mark.parametrize("backend,case", backend_cases("g_attention", _forward_cases()))
def test_forward_matches_reference(backend, case):
    """out and lse of every query head against the fp64 reference with repeat_kv, a shared G
    per head, causal or with a ragged key mask; Sq, Sk cross tile boundaries on the CPU."""
    gen = generator(case.id)
    B, S = 2, backend.sized(37, 150)
    q, k, v = random_attention_inputs(B, S, S, H, 64, case.dtype, generator=gen,
                                      kv_heads=case.H_kv)
    G = random_g(B, H, 64, generator=gen)
    mask = ragged_key_mask(B, S, gen) if case.mask else None
    out, lse = backend.g_attention(*backend.to(q, k, v, G, mask), case.causal, None)
    check_g_attention(out.cpu(), lse.cpu(), q, k, v, G, mask, case.causal).assert_ok()


@pytest.mark.parametrize("backend", backends("g_attention"))
def test_forward_equals_repeated_heads(backend):
    """GQA is bitwise the same call with k and v repeated to H heads (the kernels read the same
    rows; nothing else changes)."""
    gen = generator("repeat")
    q, k, v = random_attention_inputs(1, 21, 30, H, 64, torch.bfloat16, generator=gen,
                                      kv_heads=2)
    G = random_g(1, H, 64, generator=gen)
    grouped = backend.g_attention(*backend.to(q, k, v, G), None, True, None)
    repeated = backend.g_attention(*backend.to(q, reference.repeat_kv(k, H),
                                               reference.repeat_kv(v, H), G), None, True, None)
    for a, b in zip(grouped, repeated):
        assert same_bits(a, b)


def _decode_cases():
    return [param_case("tiny", H_kv=H_kv, dtype=dt, splits=splits)
            for H_kv in KV_HEADS for dt in (torch.float32, torch.bfloat16)
            for splits in ((1, 3, 0) if dt == torch.float32 else (0,))]


@pytest.mark.parametrize("backend,case", backend_cases("g_attention_decode", _decode_cases()))
def test_decode_matches_reference(backend, case):
    """A step of 2 new tokens appended to caches of H_kv heads, left padding (cache_start), at
    1 and 3 splits and the automatic count: out against the fp64 reference, and exactly the new
    tokens written into the caches (each kv head once, whatever its number of query heads)."""
    gen = generator(case.id)
    B, Sn, d = 2, 2, 64
    lens = backend.sized([40, 23], [300, 129])
    starts = [5, 0]
    Smax = max(lens) + Sn + 3
    k_cache, v_cache = random_kv_cache(B, Smax, case.H_kv, d, lens, case.dtype, starts=starts,
                                       generator=gen)
    q = randn((B, Sn, H, d), case.dtype, generator=gen)
    k_new, v_new = (randn((B, Sn, case.H_kv, d), case.dtype, generator=gen) for _ in range(2))
    G = random_g(B, H, d, generator=gen)
    kc, vc = backend.to(k_cache.clone(), v_cache.clone())
    out = backend.g_attention_decode(backend.to(q), kc, vc, backend.to(i32(lens)),
                                     *backend.to(k_new, v_new, i32(starts), G), None, case.splits)
    check_g_attention_decode(out.cpu(), q, k_cache, v_cache, i32(lens), k_new, v_new,
                             i32(starts), G).assert_ok()
    want_k, want_v = k_cache.clone(), v_cache.clone()
    for b in range(B):
        want_k[b, lens[b]:lens[b] + Sn] = k_new[b]
        want_v[b, lens[b]:lens[b] + Sn] = v_new[b]
    assert same_bits(kc.cpu(), want_k) and same_bits(vc.cpu(), want_v)


def _backward_cases():
    return [param_case("medium", H_kv=H_kv, dtype=dt, causal=causal)
            for H_kv in KV_HEADS for dt, causal in ((torch.float32, True),
                                                   (torch.bfloat16, False))]


@pytest.mark.parametrize("backend,case", backend_cases("g_attention_backward", _backward_cases(),
                                                       "backward"))
def test_backward_matches_reference(backend, case):
    """dq, dk, dv, dG through autograd of pldr::g_attention against fp64 autograd of the
    reference (dk, dv of a kv head summed over its query heads), with a ragged key mask; run
    twice for the same bits (the group sum has a fixed order)."""
    gen = generator(case.id)
    B, Sq, Sk, d = 2, 70, 83, 64
    q, k, v = random_attention_inputs(B, Sq, Sk, H, d, case.dtype, generator=gen,
                                      kv_heads=case.H_kv)
    dout = randn((B, Sq, H, d), case.dtype, generator=gen)
    G = random_g(1, H, d, generator=gen)
    mask = ragged_key_mask(B, Sk, gen)

    def grads():
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, G)]
        out, _ = torch.ops.pldr.g_attention(*leaves, mask, case.causal, None)
        out.backward(dout)
        return [t.grad for t in leaves]

    first = grads()
    assert first[1].shape == k.shape and first[2].shape == v.shape
    check_g_attention_grads(first, dout, q, k, v, G, mask, case.causal).assert_ok()
    assert all(same_bits(a, b) for a, b in zip(first, grads()))


# --------------------------------------------------------------------------------------------
# Triton (its interpreter here; compiled where a GPU is visible)
# --------------------------------------------------------------------------------------------
def _triton_kernels():
    if importlib.util.find_spec("triton") is None:
        return None, "the Triton kernels need triton (pip install triton)"
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported (design §3.7)
    import importlib as _il
    module = _il.import_module("pldr_kernels.triton_kernels.attention")
    if module.INTERPRETED == torch.cuda.is_available():
        module = _il.reload(module)
    if module.INTERPRETED and module._TRITON_IMPORTED_COMPILED:
        return None, "triton was imported before TRITON_INTERPRET=1 could be set"
    return module, None


TRITON, TRITON_SKIP = _triton_kernels()
TRITON_DEVICE = "cpu" if TRITON is None or TRITON.INTERPRETED else "cuda"


@pytest.mark.skipif(TRITON_SKIP is not None, reason=TRITON_SKIP or "")
@pytest.mark.parametrize("H_kv", (1, 2))
def test_triton_forward_and_backward(H_kv):
    """The Triton forward's (out, lse) and backward's gradients with H_kv kv heads against the
    fp64 reference (fp32, causal, per-batch G, a ragged mask)."""
    gen = generator(f"triton-H_kv{H_kv}")
    B, Sq, Sk, d = 2, 37, 45, 64
    q, k, v = random_attention_inputs(B, Sq, Sk, H, d, torch.float32, generator=gen,
                                      kv_heads=H_kv)
    G = random_g(B, H, d, generator=gen)
    mask = ragged_key_mask(B, Sk, gen)
    dout = randn((B, Sq, H, d), generator=gen)
    dev = [t.to(TRITON_DEVICE) for t in (q, k, v, G, mask, dout)]
    out, lse = TRITON.g_attention_forward(*dev[:5], True)
    check_g_attention(out.cpu(), lse.cpu(), q, k, v, G, mask, True).assert_ok()
    grads = TRITON.g_attention_backward(dev[5], *dev[:4], out, lse, dev[4], True, None)
    assert grads[1].shape == k.shape
    check_g_attention_grads([g.cpu() for g in grads], dout, q, k, v, G, mask,
                            True).assert_ok()


# --------------------------------------------------------------------------------------------
# Bad H_kv: one clear error, the same from the kernels and from the fake kernels
# --------------------------------------------------------------------------------------------
def _bad_calls():
    d = 64
    q, k3 = randn((1, 5, H, d)), randn((1, 5, 3, d))
    k2 = randn((1, 5, 2, d))
    cache3, cache2 = torch.zeros(1, 9, 3, d), torch.zeros(1, 9, 2, d)
    lens = i32([4])
    return {
        "g_attention k heads": (lambda: torch.ops.pldr.g_attention(q, k3, k3.clone()),
                                "k.shape[2] (key/value heads H_kv) must divide the query heads "
                                "H = 4", "got 3"),
        "g_attention v heads differ": (
            lambda: torch.ops.pldr.g_attention(q, k2, randn((1, 5, 1, d))),
            "v must have shape [1, 5, 2, 64]", "got [1, 5, 1, 64]"),
        "decode cache heads": (lambda: torch.ops.pldr.g_attention_decode(
            q[:, :1], cache3, cache3.clone(), lens), "k_cache.shape[2] (key/value heads H_kv) "
            "must divide the query heads H = 4", "got 3"),
        "decode k_new heads": (lambda: torch.ops.pldr.g_attention_decode(
            q[:, :1], cache2, cache2.clone(), lens, randn((1, 1, H, d)), randn((1, 1, H, d))),
            "k_new must have shape [1, 1, 2, 64]", "got [1, 1, 4, 64]"),
        "backward k heads": (lambda: torch.ops.pldr.g_attention_backward(
            q, q, k3, k3.clone(), None, q, torch.zeros(1, H, 5), None, False, None),
            "k.shape[2] (key/value heads H_kv) must divide", "got 3"),
    }


@pytest.mark.parametrize("name", list(_bad_calls()))
def test_bad_kv_heads_refused(name):
    call, *phrases = _bad_calls()[name]
    with pytest.raises(RuntimeError) as real:
        call()
    for phrase in phrases:
        assert phrase in str(real.value)
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(RuntimeError) as fake:
        call()
    assert str(real.value).splitlines()[0] in str(fake.value)


def test_reference_repeat_kv_order():
    """repeat_kv is transformers' order (query head h uses kv head h // (H / H_kv)) and refuses
    an H_kv that does not divide H."""
    x = torch.arange(2.0).view(1, 1, 2, 1).expand(1, 1, 2, 64)
    assert reference.repeat_kv(x, 6)[0, 0, :, 0].tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="H_kv = 4 must divide the query heads H = 6"):
        reference.repeat_kv(torch.zeros(1, 1, 4, 64), 6)
