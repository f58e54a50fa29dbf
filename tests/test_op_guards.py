"""The ops refuse what would give a silently wrong result (docs/design.md §3.5): decode caches that
overlap themselves, each other or another argument; caches that require grad; a backward through
the decode step; a scale or epsilon that the kernels' fp32 cannot hold. And the decode append is
visible to autograd (version counters).

Validation is host code of the ops (csrc/common/checks.h), so those tests run on the backends with
``input validation`` (cpu, cuda); the fake kernels' copy of the checks is held to the same words by
tests/test_fake_kernels.py. Where a limit is about what the device code computes (the largest
accepted scale, eps_adj = 0), the emulator runs it too.
"""
from __future__ import annotations

import math
import re
import struct

import pytest
import torch
from backends import backends
from cases import i32

from pldr_kernels import _checks, reference
from pldr_kernels.testing import (
    check_g_attention,
    check_g_attention_decode,
    check_metric_tensors,
    make_metric_weights,
    metric_args,
    random_g,
)

DECODE, ATTENTION, METRIC = "g_attention_decode", "g_attention", "metric_tensors"
B, H, D, SMAX = 2, 2, 64, 8


def randn(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, device=device).to(dtype)


def decode_args(device, **changes):
    """A valid decode step on ``device`` (append at rows 3 and 5) with ``changes`` applied (made
    on ``device``: moving views one by one would lose their aliasing)."""
    a = dict(q=randn(B, 1, H, D, device=device), k_cache=randn(B, SMAX, H, D, device=device),
             v_cache=randn(B, SMAX, H, D, device=device), cache_seqlens=i32([3, 5], device),
             k_new=randn(B, 1, H, D, device=device), v_new=randn(B, 1, H, D, device=device),
             cache_start=i32([0, 1], device), G=random_g(B, H, D, device=device), scale=None,
             num_splits=0)
    return a | changes


def decode(backend, a):
    return backend.g_attention_decode(a["q"], a["k_cache"], a["v_cache"], a["cache_seqlens"],
                                      a["k_new"], a["v_new"], a["cache_start"], a["G"], a["scale"],
                                      a["num_splits"])


def refused(backend, a, match):
    """The call raises ``match`` and leaves both caches as they were."""
    before = [a[c].clone() for c in ("k_cache", "v_cache")]
    with pytest.raises(RuntimeError, match=match):
        decode(backend, a)
    for cache, old in zip(("k_cache", "v_cache"), before):
        assert torch.equal(a[cache], old), f"{cache} was written by a refused call"


# --------------------------------------------------------------------------------------------
# Overlapping decode arguments (item 3)
# --------------------------------------------------------------------------------------------
def _shared_cache(device):
    c = randn(B, SMAX, H, D, device=device)
    return dict(k_cache=c, v_cache=c)


def _second_view(device):
    c = randn(B, SMAX, H, D, device=device)
    return dict(k_cache=c, v_cache=c.view(B, SMAX, H, D))


def _expanded(device):  # one row for the whole batch: row 0's append is overwritten by row 1's
    return dict(k_cache=randn(1, SMAX, H, D, device=device).expand(B, SMAX, H, D),
                v_cache=randn(1, SMAX, H, D, device=device).expand(B, SMAX, H, D),
                cache_seqlens=i32([3, 3], device))


def _rows_overlap(device):  # stride(1) == stride(2): token s + 1 of head 0 is token s of head 1
    base = randn(B * SMAX * H * D, device=device)
    return dict(k_cache=base.as_strided((B, SMAX, H, D), (SMAX * H * D, D, D, 1)))


def _shifted_by_a_row(device):  # v_cache is k_cache one token later: they share SMAX - 1 rows
    base = randn(B, SMAX + 1, H, D, device=device)
    return dict(k_cache=base[:, :SMAX], v_cache=base[:, 1:])


def _irregular(device, dtype=torch.bfloat16, smax=16384):
    """k_cache on the even token rows of a buffer, v_cache on rows 6j + 1: disjoint (parity), but
    the strides do not nest, and the exact search needs more than its budget of steps."""
    rows = 6 * smax + 2
    base = randn(rows * D, dtype=dtype, device=device)
    return dict(q=randn(1, 1, 1, D, dtype=dtype, device=device),
                k_cache=base.as_strided((1, smax, 1, D), (rows * D, 2 * D, D, 1)),
                v_cache=base.as_strided((1, smax, 1, D), (rows * D, 6 * D, D, 1), D),
                cache_seqlens=i32([0], device), k_new=randn(1, 1, 1, D, dtype=dtype, device=device),
                v_new=randn(1, 1, 1, D, dtype=dtype, device=device), cache_start=None, G=None)


ALIASED_CACHES = {
    "k_cache is v_cache": (_shared_cache, r"k_cache and v_cache must not overlap in memory .*"
                           r"got views that share memory"),
    "v_cache a second view of k_cache": (_second_view, "k_cache and v_cache must not overlap"),
    "expanded caches (stride 0)": (_expanded, r"k_cache must not overlap itself in memory .*"
                                   r"strides \[0, 128, 64, 1\], where different elements share"),
    "rows overlapping (as_strided)": (_rows_overlap, r"k_cache must not overlap itself in memory"
                                      r" .*strides \[1024, 64, 64, 1\], where different"),
    "v_cache shifted by a row of k_cache": (_shifted_by_a_row,
                                            "k_cache and v_cache must not overlap in memory"),
    "too irregular to check": (_irregular, r"k_cache and v_cache must not overlap in memory .*got"
                               r" views too irregular to prove that they do not share memory"),
}


@pytest.mark.parametrize("case", list(ALIASED_CACHES))
@pytest.mark.parametrize("backend", backends(DECODE, "input validation"))
def test_overlapping_caches_are_refused(backend, case):
    make, message = ALIASED_CACHES[case]
    refused(backend, decode_args(backend.device, **make(backend.device)), message)


def _view_of(cache: torch.Tensor, arg: str) -> torch.Tensor:
    """``arg`` as a view into ``cache``'s memory: the rows being written for q/k_new/v_new, the
    start of the storage (reinterpreted) for the others."""
    if arg in ("q", "k_new", "v_new"):
        return cache[:, 3:4]
    flat = cache.view(-1)
    if arg == "G":
        return flat[:H * D * D].view(1, H, D, D)
    return flat.view(torch.int32)[:B]  # cache_seqlens / cache_start


@pytest.mark.parametrize("cache", ["k_cache", "v_cache"])
@pytest.mark.parametrize("arg", ["q", "k_new", "v_new", "cache_seqlens", "cache_start", "G"])
@pytest.mark.parametrize("backend", backends(DECODE, "input validation"))
def test_an_argument_overlapping_a_cache_is_refused(backend, arg, cache):
    smax = H * D  # room for a G of [1, H, d, d] in the cache
    dev = backend.device
    a = decode_args(dev, k_cache=randn(B, smax, H, D, device=dev),
                    v_cache=randn(B, smax, H, D, device=dev))
    a[arg] = _view_of(a[cache], arg)
    if arg in ("cache_seqlens", "cache_start"):
        a[arg].zero_()  # valid lengths: only the overlap is wrong
    refused(backend, a, rf"{arg} must not overlap {cache} in memory \(g_attention_decode writes "
            rf"into {cache} in place while it reads {arg}\), got views that share memory. Pass a "
            rf"separate tensor, e.g. {arg}.clone\(\).")


@pytest.mark.parametrize("backend", backends(DECODE, "input validation"))
def test_disjoint_views_of_one_buffer_are_accepted(backend):
    """A fused KV buffer [B, Smax, 2, H, d] (k and v interleaved per token, never sharing a
    byte), and q/k_new/v_new as views of one fused projection, are valid caches and inputs."""
    kv = randn(B, SMAX, 2, H, D, device=backend.device)
    qkv = randn(B, 1, 3, H, D, device=backend.device)
    a = decode_args(backend.device, k_cache=kv[:, :, 0], v_cache=kv[:, :, 1], q=qkv[:, :, 0],
                    k_new=qkv[:, :, 1], v_new=qkv[:, :, 2])
    cpu = {name: t.cpu().clone() if isinstance(t, torch.Tensor) else t for name, t in a.items()}
    out = decode(backend, a)
    check_g_attention_decode(out.cpu(), cpu["q"], cpu["k_cache"], cpu["v_cache"],
                             cpu["cache_seqlens"], cpu["k_new"], cpu["v_new"], cpu["cache_start"],
                             cpu["G"]).assert_ok()
    reference.g_attention_decode(cpu["q"], cpu["k_cache"], cpu["v_cache"], cpu["cache_seqlens"],
                                 cpu["k_new"], cpu["v_new"])  # the append, on the copies
    assert torch.equal(kv.cpu(), torch.stack([cpu["k_cache"], cpu["v_cache"]], dim=2))


def _brute_force(n: int, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[bool, ...]:
    """(k_cache overlaps itself, v_cache overlaps itself, they share an element), by listing the
    storage elements of each view (one dtype, so sharing a byte is sharing an element)."""
    index = torch.arange(n)
    k, v = (index.as_strided(t.shape, t.stride(), t.storage_offset()).flatten()
            for t in (k_cache, v_cache))
    return (k.unique().numel() < k.numel(), v.unique().numel() < v.numel(),
            bool(torch.isin(k, v).any()))


def _random_view(base: torch.Tensor, shape, gen: torch.Generator) -> torch.Tensor:
    """A strided view of ``base`` of cache shape [b, s, h, d] (last dim contiguous), its strides
    mixing whole rows, parts of rows and 0."""
    def pick(choices):
        return choices[int(torch.randint(len(choices), (1,), generator=gen))]

    strides = [pick((0, 7, 32, 96, 200) + (D, 2 * D, 3 * D, 5 * D, 6 * D, 9 * D) * 2)
               for _ in range(3)]
    span = sum((n - 1) * s for n, s in zip(shape[:3], strides)) + D
    offset = int(torch.randint(0, base.numel() - span + 1, (1,), generator=gen))
    return base.as_strided(shape, (*strides, 1), offset - offset % pick((1, D)))


@pytest.mark.parametrize("backend", backends(DECODE, "input validation"))
def test_overlap_decisions_match_brute_force(backend):
    """Random strided cache pairs in one storage: the op refuses exactly the pairs where an
    element is shared (within a cache or between them), and _checks (the fake kernels) decides
    each part alike."""
    gen = torch.Generator().manual_seed(9)
    n = 64 * D
    outcomes = {"accepted": 0, "refused": 0}
    for _ in range(150):
        base = torch.randn(n, device=backend.device)
        shape = [int(torch.randint(1, 4, (1,), generator=gen)) for _ in range(3)] + [D]
        k_cache, v_cache = _random_view(base, shape, gen), _random_view(base, shape, gen)
        truth = _brute_force(n, k_cache, v_cache)
        decided = (_checks.self_overlap(k_cache), _checks.self_overlap(v_cache),
                   _checks.overlap_between(k_cache, v_cache))
        assert decided == tuple(_checks.Overlap.YES if t else _checks.Overlap.NO for t in truth)
        b, _, h, _ = shape
        a = decode_args(backend.device, q=randn(b, 1, h, D, device=backend.device),
                        k_cache=k_cache, v_cache=v_cache,
                        cache_seqlens=i32([0] * b, backend.device),
                        k_new=randn(b, 1, h, D, device=backend.device),
                        v_new=randn(b, 1, h, D, device=backend.device), cache_start=None, G=None)
        if any(truth):
            with pytest.raises(RuntimeError, match="must not overlap"):
                decode(backend, a)
            outcomes["refused"] += 1
        else:
            decode(backend, a)
            outcomes["accepted"] += 1
    assert min(outcomes.values()) >= 20, outcomes  # both outcomes well represented


# --------------------------------------------------------------------------------------------
# Autograd (item 4)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", backends(DECODE, "dispatcher"))
def test_a_tensor_saved_for_backward_that_the_append_overwrites_fails_autograds_check(backend):
    """w · k_cache saves k_cache for backward; the append then overwrites a row of it, so the
    gradient w.r.t. w would be computed from the new cache. Autograd must refuse that backward,
    which it can only if the append bumps the cache's version counter; a refused call bumps
    nothing."""
    a = decode_args(backend.device)
    w = torch.randn(B, SMAX, H, D, device=backend.device, requires_grad=True)
    loss = (w * a["k_cache"]).sum()
    versions = a["k_cache"]._version, a["v_cache"]._version
    with pytest.raises(RuntimeError, match="num_splits must be >= 0"):
        decode(backend, a | dict(num_splits=-1))
    assert (a["k_cache"]._version, a["v_cache"]._version) == versions
    decode(backend, a)
    assert a["k_cache"]._version > versions[0] and a["v_cache"]._version > versions[1]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("grad_mode", ["grad", "no_grad"])
@pytest.mark.parametrize("how", ["leaf", "non-leaf"])
@pytest.mark.parametrize("cache", ["k_cache", "v_cache"])
@pytest.mark.parametrize("backend", backends(DECODE, "input validation"))
def test_a_cache_that_requires_grad_is_refused(backend, cache, how, grad_mode):
    a = decode_args(backend.device)
    leaf = a[cache].clone().requires_grad_()
    a[cache] = leaf if how == "leaf" else leaf * 1.0
    with torch.set_grad_enabled(grad_mode == "grad"):
        refused(backend, a, rf"{cache} must not require grad: g_attention_decode writes into it "
                r"in place and has no backward \(docs/design.md §3.5\). Allocate the cache with "
                "requires_grad=False.")


@pytest.mark.parametrize("arg", ["q", "k_new", "v_new", "G"])
@pytest.mark.parametrize("backend", backends(DECODE, "dispatcher"))
def test_backward_through_the_decode_step_says_it_has_none(backend, arg):
    """In grad mode the step runs (same bits) and its output requires grad; a backward through it
    raises words that name the op and point to g_attention (before: a warning and a gradient
    that silently left the step out)."""
    plain = decode_args(backend.device)
    want = decode(backend, {**plain, "k_cache": plain["k_cache"].clone(),
                            "v_cache": plain["v_cache"].clone()})
    a = {**plain, arg: plain[arg].clone().requires_grad_()}
    out = decode(backend, a)
    assert out.requires_grad and torch.equal(out.detach(), want)
    with pytest.raises(RuntimeError, match=r"pldr::g_attention_decode has no backward: .*"
                       r"pldr::g_attention \(pldr_kernels.g_attention\)"):
        (out.sum() + a[arg].sum()).backward()
    with torch.no_grad():
        assert not decode(backend, a).requires_grad


# --------------------------------------------------------------------------------------------
# Scale and epsilons in the kernels' fp32 (item 5)
# --------------------------------------------------------------------------------------------
def _double_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _largest_accepted_scale() -> float:
    """The largest double that checks.h's check_scale accepts (bisection on the bit patterns;
    positive doubles order like their bits)."""
    def accepted(bits: int) -> bool:
        try:
            _checks.check_scale(struct.unpack("<d", struct.pack("<q", bits))[0])
        except RuntimeError:
            return False
        return True

    lo, hi = _double_bits(1e38), _double_bits(1e39)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if accepted(mid) else (lo, mid)
    return struct.unpack("<d", struct.pack("<q", lo))[0]


MAX_SCALE = _largest_accepted_scale()
OVERFLOWING_SCALES = [1e39, -1e39, 3e38, math.nextafter(MAX_SCALE, math.inf)]


@pytest.mark.parametrize("scale", OVERFLOWING_SCALES, ids=lambda s: f"{s:.17g}")
@pytest.mark.parametrize("backend", backends(ATTENTION, "input validation"))
def test_a_scale_that_overflows_fp32_is_refused(backend, scale):
    """Finite as a double, but scale·log2(e) is not in fp32: before, out = 0 and lse = −inf."""
    q, k, v = (randn(1, n, H, D).to(backend.device) for n in (3, 4, 4))
    message = (rf"scale = {re.escape(f'{scale:g}')} overflows fp32, where the kernels use it: "
               r"\|scale\| · log2\(e\) must be finite in fp32")
    with pytest.raises(RuntimeError, match=message):
        backend.g_attention(q, k, v, None, None, False, scale)
    refused(backend, decode_args(backend.device, scale=scale), message)
    assert 2.3586e38 < MAX_SCALE < 2.3587e38  # FLT_MAX / log2(e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scale", [MAX_SCALE, -MAX_SCALE], ids=["max", "-max"])
@pytest.mark.parametrize("backend", backends(ATTENTION))
def test_the_largest_accepted_scale_computes_like_the_reference(backend, scale, dtype):
    """At the bound the kernels' fp32 scale·log2(e) is finite, so prefill and decode match the
    reference (q and k small, so that the scores themselves stay finite). This is the device-side
    evidence for the bound of check_scale: the emulator runs the CUDA device code at it."""
    gen = torch.Generator().manual_seed(5)
    q, k = (torch.randn(1, n, H, D, generator=gen).mul(1e-18).to(dtype) for n in (5, 7))
    v = torch.randn(1, 7, H, D, generator=gen).to(dtype)
    out, lse = backend.g_attention(*backend.to(q, k, v), None, None, False, scale)
    check_g_attention(out.cpu(), lse.cpu(), q, k, v, None, None, False, scale).assert_ok()
    lens = i32([5])
    out = backend.g_attention_decode(*backend.to(q[:, :1], k.clone(), v.clone(), lens), None,
                                     None, None, None, scale, 0)
    check_g_attention_decode(out.cpu(), q[:, :1], k, v, lens, scale=scale).assert_ok()


def metric_call(backend, eps_ln=reference.LN_EPS, eps_adj=reference.EPS_ADJ):
    weights = make_metric_weights(d=D, H=H, R=1, Gd=1, F=8)
    q = randn(B, 5, H, D)
    out = backend.metric_tensors(*backend.to(q, None), *backend.to(*metric_args(weights)),
                                 eps_ln=eps_ln, eps_adj=eps_adj)
    return out, q, weights


BAD_EPSILONS = [("eps_ln", math.nan), ("eps_ln", -1e-6), ("eps_ln", 0.0), ("eps_ln", math.inf),
                ("eps_ln", 1e39), ("eps_ln", 1e-50), ("eps_adj", math.nan), ("eps_adj", -1e-9),
                ("eps_adj", -math.inf), ("eps_adj", 1e39), ("eps_adj", 1e-50)]


@pytest.mark.parametrize("name, value", BAD_EPSILONS, ids=[f"{n}={v:g}" for n, v in BAD_EPSILONS])
@pytest.mark.parametrize("backend", backends(METRIC, "input validation"))
def test_an_epsilon_the_kernels_cannot_use_is_refused(backend, name, value):
    """NaN, negative, overflowing, or positive but 0 in fp32 (1e-50): before, accepted (NaN G,
    or a floor silently dropped)."""
    with pytest.raises(RuntimeError, match=rf"{name} must be .*finite in fp32, where the kernels "
                       rf"use it.*got {re.escape(f'{value:g}')}\."):
        metric_call(backend, **{name: value})


SMALLEST_EPS_ADJ = [pytest.param(*p.values, eps_adj, id=f"{p.id}-{name}", marks=p.marks)
                    for p in backends(METRIC)
                    for eps_adj, name in ((0.0, "0 (no floor)"), (1e-44, "fp32 subnormal"))
                    if p.id != "emu" or eps_adj == 0.0]  # the emulator: one case (~6 s)


@pytest.mark.parametrize("backend, eps_adj", SMALLEST_EPS_ADJ)
def test_eps_adj_zero_or_subnormal_computes_like_the_reference(backend, eps_adj):
    """The smallest eps_adj values still accepted: 0 (no floor) and a positive value that fp32
    holds only as a subnormal, computed by the kernels like the reference."""
    out, q, weights = metric_call(backend, eps_adj=eps_adj)
    check_metric_tensors(out, q, None, weights, eps_adj=eps_adj).assert_ok()
