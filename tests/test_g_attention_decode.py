"""pldr::g_attention_decode (DESIGN.md §3.3) against the fp64 reference and against full attention."""
from __future__ import annotations

import pytest
import torch
from test_g_attention import eager_same_dtype, reference64
from testing import DTYPES, assert_close_to_reference, random_g

from pldr_kernels import reference

decode = torch.ops.pldr.g_attention_decode


def make_cache(B, Smax, H, d, dtype):
    # Garbage beyond the valid rows must never be read: fill it with NaN.
    k_cache = torch.full((B, Smax, H, d), float("nan")).to(dtype)
    v_cache = torch.full((B, Smax, H, d), float("nan")).to(dtype)
    return k_cache, v_cache


def check_decode_step(q, k_cache, v_cache, lens, k_new, v_new, cache_start, G, scale=None,
                      num_splits=0):
    """Runs one decode step and checks it row by row against fp64 causal attention over the
    valid cache rows (and the PyTorch same-dtype peer for bf16/fp16)."""
    out = decode(q, k_cache, v_cache, lens, k_new, v_new, cache_start, G, scale, num_splits)
    assert out.shape == q.shape and out.dtype == q.dtype
    B, Sn = q.shape[:2]
    total = lens.long() + (Sn if k_new is not None else 0)
    for b in range(B):
        s0 = 0 if cache_start is None else int(cache_start[b])
        s1 = int(total[b])
        Gb = None if G is None else G[b if G.shape[0] > 1 else 0][None]
        args = (q[b:b + 1], k_cache[b:b + 1, s0:s1], v_cache[b:b + 1, s0:s1], Gb, None, True, scale)
        ref, _ = reference64(*args)
        peer = None if q.dtype == torch.float32 else eager_same_dtype(*args)
        assert_close_to_reference(out[b:b + 1], ref, peer, name=f"out[{b}]")
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("g_mode", ["none", "per_batch", "shared"])
def test_steps_equal_full_causal_attention(dtype, d, g_mode):
    """Prompt in the cache, then steps of 1 and 3 new tokens: every step equals full causal
    attention over the whole sequence so far (and the reference decode)."""
    B, H, P, Smax = 2, 2, 20, 40
    steps = [1, 1, 3, 1]
    total = P + sum(steps)
    G = {"none": None, "per_batch": random_g(B, H, d), "shared": random_g(1, H, d)}[g_mode]
    q_all, k_all, v_all = (torch.randn(B, total, H, d).to(dtype) for _ in range(3))
    k_cache, v_cache = make_cache(B, Smax, H, d, dtype)
    k_cache[:, :P], v_cache[:, :P] = k_all[:, :P], v_all[:, :P]
    full_ref, _ = reference64(q_all, k_all, v_all, G, None, True)
    pos = P
    for Sn in steps:
        sl = slice(pos, pos + Sn)
        lens = torch.full((B,), pos, dtype=torch.int32)
        out = decode(q_all[:, sl], k_cache, v_cache, lens, k_all[:, sl], v_all[:, sl], None, G,
                     None, 0)
        # equal to full causal attention over the whole sequence
        peer = None
        if dtype != torch.float32:
            peer = eager_same_dtype(q_all[:, :pos + Sn], k_all[:, :pos + Sn], v_all[:, :pos + Sn],
                                    G, None, True)[:, sl]
        assert_close_to_reference(out, full_ref[:, sl], peer, name=f"step at {pos}")
        # and to the reference decode on fresh copies of the caches
        ref_kc, ref_vc = k_cache.clone(), v_cache.clone()
        ref_kc[:, pos:pos + Sn], ref_vc[:, pos:pos + Sn] = float("nan"), float("nan")
        ref_out = reference.g_attention_decode(q_all[:, sl].double(), ref_kc.double(),
                                               ref_vc.double(), lens, k_all[:, sl].double(),
                                               v_all[:, sl].double(), None,
                                               None if G is None else G.double())
        assert_close_to_reference(out, ref_out, peer, name=f"decode reference at {pos}")
        pos += Sn


@pytest.mark.parametrize("dtype", DTYPES)
def test_append_is_in_place_and_visible(dtype):
    B, Sn, H, d, Smax = 2, 2, 2, 64, 16
    k_cache, v_cache = make_cache(B, Smax, H, d, dtype)
    k_cache[:, :5], v_cache[:, :5] = torch.randn(B, 5, H, d).to(dtype), torch.randn(B, 5, H, d).to(dtype)
    lens = torch.tensor([3, 5], dtype=torch.int32)
    q, k_new, v_new = (torch.randn(B, Sn, H, d).to(dtype) for _ in range(3))
    k_before, v_before = k_cache.clone(), v_cache.clone()
    k_ptr, v_ptr = k_cache.data_ptr(), v_cache.data_ptr()
    check_decode_step(q, k_cache, v_cache, lens, k_new, v_new, None, None)
    assert k_cache.data_ptr() == k_ptr and v_cache.data_ptr() == v_ptr
    for b, L in enumerate(lens.tolist()):
        assert torch.equal(k_cache[b, L:L + Sn], k_new[b]) and torch.equal(v_cache[b, L:L + Sn], v_new[b])
        rest = torch.ones(Smax, dtype=torch.bool)
        rest[L:L + Sn] = False
        # every other row is bitwise unchanged (compared as bytes: the garbage rows are NaN)
        assert torch.equal(k_cache[b, rest].view(torch.uint8), k_before[b, rest].view(torch.uint8))
        assert torch.equal(v_cache[b, rest].view(torch.uint8), v_before[b, rest].view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
def test_new_tokens_already_in_cache(dtype):
    """k_new/v_new None: cache_seqlens already counts the new tokens."""
    B, Sn, H, d, Smax = 2, 3, 2, 64, 32
    k_cache, v_cache = make_cache(B, Smax, H, d, dtype)
    k_cache[:, :20], v_cache[:, :20] = torch.randn(B, 20, H, d).to(dtype), torch.randn(B, 20, H, d).to(dtype)
    lens = torch.tensor([20, 9], dtype=torch.int32)
    q = torch.randn(B, Sn, H, d).to(dtype)
    G = random_g(B, H, d)
    k_before = k_cache.clone()
    out = check_decode_step(q, k_cache, v_cache, lens, None, None, None, G)
    assert torch.equal(k_cache.view(torch.uint8), k_before.view(torch.uint8))
    if dtype == torch.float32:
        ref = reference.g_attention_decode(q.double(), k_cache.double(), v_cache.double(), lens,
                                           G=G.double())
        assert_close_to_reference(out, ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cache_start_left_padded_rows(dtype):
    """Row 1 is left-padded by 7 rows of garbage: with cache_start it equals the row run alone."""
    H, d, Smax, pad = 2, 64, 48, 7
    L0 = 30
    k_cache, v_cache = make_cache(2, Smax, H, d, dtype)
    k_cache[:, :L0], v_cache[:, :L0] = torch.randn(2, L0, H, d).to(dtype), torch.randn(2, L0, H, d).to(dtype)
    k_cache[1, :pad], v_cache[1, :pad] = 1e4, -1e4  # would dominate if attended
    lens = torch.tensor([L0, L0], dtype=torch.int32)
    start = torch.tensor([0, pad], dtype=torch.int32)
    q, k_new, v_new = (torch.randn(2, 1, H, d).to(dtype) for _ in range(3))
    G = random_g(2, H, d)
    out = check_decode_step(q, k_cache, v_cache, lens, k_new, v_new, start, G)
    # the padded row alone, without padding
    kc1, vc1 = make_cache(1, Smax, H, d, dtype)
    kc1[0, :L0 - pad], vc1[0, :L0 - pad] = k_cache[1, pad:L0], v_cache[1, pad:L0]
    alone = decode(q[1:], kc1, vc1, torch.tensor([L0 - pad], dtype=torch.int32), k_new[1:],
                   v_new[1:], None, G[1:], None, 0)
    torch.testing.assert_close(out[1:], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Sn", [1, 5])
def test_num_splits_agree(dtype, Sn):
    """B=1, one head, a long cache: 1, 2, 7 splits and auto all give the reference result."""
    H, d, L, Smax = 1, 64, 1000, 1024
    k_cache, v_cache = make_cache(1, Smax, H, d, dtype)
    k_cache[:, :L], v_cache[:, :L] = torch.randn(1, L, H, d).to(dtype), torch.randn(1, L, H, d).to(dtype)
    lens = torch.tensor([L], dtype=torch.int32)
    q = torch.randn(1, Sn, H, d).to(dtype)
    G = random_g(1, H, d)
    outs = [check_decode_step(q, k_cache, v_cache, lens, None, None, None, G, num_splits=n)
            for n in (1, 2, 7, 0, 1000)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-5 if dtype == torch.float32 else 2e-2,
                                   atol=1e-5 if dtype == torch.float32 else 2e-2)


def test_splits_with_tiny_and_empty_ranges():
    """Ragged lengths (1 key and ~300 keys) with many splits: empty splits must not matter."""
    H, d, Smax = 2, 128, 320
    k_cache, v_cache = make_cache(2, Smax, H, d, torch.float32)
    k_cache[:, :300], v_cache[:, :300] = torch.randn(2, 300, H, d), torch.randn(2, 300, H, d)
    lens = torch.tensor([0, 299], dtype=torch.int32)
    q, k_new, v_new = (torch.randn(2, 1, H, d) for _ in range(3))
    for n in (1, 3, 8):
        kc, vc = k_cache.clone(), v_cache.clone()
        check_decode_step(q, kc, vc, lens, k_new, v_new, None, None, num_splits=n)


def test_deterministic_bitwise():
    H, d, L, Smax = 2, 64, 700, 800
    k_cache, v_cache = torch.randn(2, Smax, H, d), torch.randn(2, Smax, H, d)
    lens = torch.tensor([L, 300], dtype=torch.int32)
    q = torch.randn(2, 2, H, d)
    G = random_g(2, H, d)
    for splits in (0, 3):
        a = decode(q, k_cache, v_cache, lens, None, None, None, G, None, splits)
        b = decode(q, k_cache, v_cache, lens, None, None, None, G, None, splits)
        assert torch.equal(a, b)


def test_non_contiguous_query_and_new_tokens():
    """q/k_new/v_new sliced from a fused projection output; the cache a strided view too."""
    B, H, d, Smax = 2, 2, 64, 64
    qkv = torch.randn(B, 1, 3, H, d)
    q, k_new, v_new = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    big_k = torch.randn(B, Smax, 2 * H, d)
    big_v = torch.randn(B, Smax, 2 * H, d)
    k_cache, v_cache = big_k[:, :, :H], big_v[:, :, :H]  # every other head block: strided views
    lens = torch.tensor([10, 33], dtype=torch.int32)
    check_decode_step(q, k_cache, v_cache, lens, k_new, v_new, None, random_g(1, H, d))
    assert torch.equal(big_k[1, 33, :H], k_new[1, 0])


# ------------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------------
def good_args():
    B, Sn, H, d, Smax = 2, 1, 2, 64, 8
    return dict(q=torch.randn(B, Sn, H, d), k_cache=torch.randn(B, Smax, H, d),
                v_cache=torch.randn(B, Smax, H, d), cache_seqlens=torch.tensor([3, 7], dtype=torch.int32),
                k_new=torch.randn(B, Sn, H, d), v_new=torch.randn(B, Sn, H, d),
                cache_start=torch.tensor([0, 2], dtype=torch.int32), G=random_g(B, H, d),
                scale=None, num_splits=0)


def call(a):
    return decode(a["q"], a["k_cache"], a["v_cache"], a["cache_seqlens"], a["k_new"], a["v_new"],
                  a["cache_start"], a["G"], a["scale"], a["num_splits"])


BAD_INPUTS = {
    "q_dtype": (lambda a: a.update(q=a["q"].double()), "q must be float32"),
    "cache_dtype": (lambda a: a.update(k_cache=a["k_cache"].half()), "q, k_cache and v_cache must have the same dtype"),
    "q_rank": (lambda a: a.update(q=a["q"][:, 0]), "q must be a 4-D tensor"),
    "k_cache_rank": (lambda a: a.update(k_cache=a["k_cache"][0]), "k_cache must be a 4-D tensor"),
    "head_dim_96": (lambda a: a.update(q=torch.randn(2, 1, 2, 96), k_cache=torch.randn(2, 8, 2, 96),
                                       v_cache=torch.randn(2, 8, 2, 96), k_new=None, v_new=None, G=None),
                    r"q.shape\[-1\] \(head dim d\) must be 64 or 128, got 96"),
    "k_cache_heads": (lambda a: a.update(k_cache=torch.randn(2, 8, 3, 64)), r"k_cache.shape\[2\] \(heads\)"),
    "v_cache_shape": (lambda a: a.update(v_cache=torch.randn(2, 9, 2, 64)), "v_cache must have shape"),
    "q_last_dim_strided": (lambda a: a.update(q=torch.randn(2, 1, 2, 128)[..., ::2]),
                           "q must be contiguous in its last dimension"),
    "k_cache_last_dim_strided": (lambda a: a.update(k_cache=torch.randn(2, 8, 2, 128)[..., ::2]),
                                 "k_cache must be contiguous in its last dimension"),
    "seqlens_dtype": (lambda a: a.update(cache_seqlens=a["cache_seqlens"].long()),
                      "cache_seqlens must have dtype Int"),
    "seqlens_shape": (lambda a: a.update(cache_seqlens=torch.tensor([3], dtype=torch.int32)),
                      r"cache_seqlens.shape\[0\] \(batch\)"),
    "seqlens_negative": (lambda a: a.update(cache_seqlens=torch.tensor([-1, 3], dtype=torch.int32)),
                         r"cache_seqlens\[0\] must be >= 0"),
    "k_new_without_v_new": (lambda a: a.update(v_new=None), "k_new and v_new must be given together"),
    "k_new_dtype": (lambda a: a.update(k_new=a["k_new"].bfloat16()), "k_new must have dtype Float"),
    "v_new_shape": (lambda a: a.update(v_new=torch.randn(2, 2, 2, 64)), "v_new must have shape"),
    "cache_start_dtype": (lambda a: a.update(cache_start=a["cache_start"].long()),
                          "cache_start must have dtype Int"),
    "cache_start_after_new_token": (lambda a: a.update(cache_start=torch.tensor([0, 8], dtype=torch.int32)),
                                    r"cache_start\[1\] = 8 must lie in \[0, 7\]"),
    "G_dtype": (lambda a: a.update(G=a["G"].half()), "G must have dtype Float"),
    "G_shape": (lambda a: a.update(G=random_g(2, 2, 128)), r"G.shape\[2\] \(head dim\)"),
    "num_splits_negative": (lambda a: a.update(num_splits=-1), "num_splits must be >= 0"),
    "not_appending_too_short": (lambda a: a.update(k_new=None, v_new=None, q=torch.randn(2, 4, 2, 64),
                                                   cache_seqlens=torch.tensor([3, 7], dtype=torch.int32),
                                                   cache_start=None),
                                r"cache_seqlens\[0\] = 3 must be >= Sn = 4"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_naming_the_argument(case):
    mutate, message = BAD_INPUTS[case]
    args = good_args()
    call(args)  # the unmutated call is fine
    args = good_args()
    mutate(args)
    k_before = args["k_cache"].clone()
    with pytest.raises(RuntimeError, match=message):
        call(args)
    assert torch.equal(args["k_cache"], k_before)  # nothing written on a failed call


@pytest.mark.parametrize("dtype", DTYPES)
def test_append_past_end_raises_and_leaves_cache_untouched(dtype):
    a = good_args()
    Smax = a["k_cache"].shape[1]
    a["k_cache"], a["v_cache"] = a["k_cache"].to(dtype), a["v_cache"].to(dtype)
    a["q"], a["k_new"], a["v_new"] = a["q"].to(dtype), a["k_new"].to(dtype), a["v_new"].to(dtype)
    # row 0 fits, row 1 would pass the end: neither row may be written
    a["cache_seqlens"] = torch.tensor([2, Smax], dtype=torch.int32)
    a["cache_start"] = None
    k_before, v_before = a["k_cache"].clone(), a["v_cache"].clone()
    with pytest.raises(RuntimeError, match=r"cache_seqlens\[1\] \+ Sn .* exceeds the cache length Smax"):
        call(a)
    assert torch.equal(a["k_cache"].view(torch.uint8), k_before.view(torch.uint8))
    assert torch.equal(a["v_cache"].view(torch.uint8), v_before.view(torch.uint8))
    # more new tokens than the whole cache
    a["q"] = a["k_new"] = a["v_new"] = torch.randn(2, Smax + 1, 2, 64).to(dtype)
    a["cache_seqlens"] = torch.tensor([0, 0], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="exceeds the cache length"):
        call(a)
    assert torch.equal(a["k_cache"].view(torch.uint8), k_before.view(torch.uint8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a mixed-device call")
def test_wrong_device_raises():
    a = good_args()
    a["cache_seqlens"] = a["cache_seqlens"].cuda()
    with pytest.raises(RuntimeError, match="cache_seqlens must be on the same device as q"):
        call(a)
