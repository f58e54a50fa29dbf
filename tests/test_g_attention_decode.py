"""pldr::g_attention_decode (docs/design.md §3.3) on every backend (tests/backends.py) against
the fp64 reference, by the rule of pldr_kernels.testing (docs/design.md §4), and against full
causal attention.

Cache rows that a step must not read (past ``cache_seqlens``, before ``cache_start``) hold NaN:
reading one would show. One body per property, the backend a parameter; the cases are defined
once, below, each sized for the backends that run it."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch
from backends import (
    CUDA,
    EMU,
    backend_cases,
    backend_dtypes,
    backends,
    emu_g_attention_decode,
    needs_cuda_kernels,
)
from cases import DTYPE_NAMES, generator, i32, param_case, same_bits

from pldr_kernels import reference
from pldr_kernels.testing import (
    DTYPES,
    check_g_attention_decode,
    compare,
    g_attention_peer,
    randn,
    random_g,
    random_kv_cache,
)

OP = "g_attention_decode"
NAN = float("nan")


def nan_cache(B, Smax, H, d, dtype):
    return torch.full((B, Smax, H, d), NAN).to(dtype), torch.full((B, Smax, H, d), NAN).to(dtype)


def check_step(out, k_after, v_after, q, k_cache, v_cache, lens, k_new=None, v_new=None,
               starts=None, G=None, scale=None):
    """One step by the rule (``k_cache``/``v_cache``: the caches before the step, CPU), and the
    caches after it: the reference's append, bitwise, every other row untouched."""
    assert out.shape == q.shape and out.dtype == q.dtype
    out = out.cpu()
    check_g_attention_decode(out, q, k_cache, v_cache, lens, k_new, v_new, starts, G,
                             scale).assert_ok()
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    reference.g_attention_decode(q, k_ref, v_ref, lens, k_new, v_new, starts, G, scale)
    assert same_bits(k_after, k_ref), "k_cache after the step differs from the reference append"
    assert same_bits(v_after, v_ref), "v_cache after the step differs from the reference append"
    return out


def run_step(backend, q, k_cache, v_cache, lens, k_new=None, v_new=None, starts=None, G=None,
             scale=None, num_splits=0):
    """The step on ``backend`` from CPU inputs; returns ``(out, k_cache, v_cache)`` after it (the
    arguments are not modified). The append must happen in place: same storage after the step;
    and on the emulator, whose driver reports it, an explicit split count must be the one used."""
    kc, vc = backend.to(k_cache.clone(), v_cache.clone())
    ptrs = kc.data_ptr(), vc.data_ptr()
    args = (backend.to(q), kc, vc, *backend.to(lens, k_new, v_new, starts, G), scale, num_splits)
    if backend is EMU:
        out, used = emu_g_attention_decode(*args)
        assert num_splits == 0 or used == num_splits, f"asked {num_splits} splits, used {used}"
    else:
        out = backend.g_attention_decode(*args)
    assert (kc.data_ptr(), vc.data_ptr()) == ptrs, "the caches must be appended in place"
    return out, kc.cpu(), vc.cpu()


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    dtype: torch.dtype
    d: int
    H: int
    Smax: int
    Sn: int
    lens: tuple[int, ...]              # cache_seqlens (with append: before it)
    append: bool = True                # k_new/v_new given (else the new tokens are in the cache)
    starts: tuple[int, ...] | None = None
    G: str = "batch"                   # "none", "batch" or "shared"
    splits: int = 0
    size: str = "medium"

    @property
    def B(self) -> int:
        return len(self.lens)

    @property
    def id(self) -> str:
        parts = [f"B{self.B}", f"Sn{self.Sn}", f"Smax{self.Smax}", f"H{self.H}", f"d{self.d}",
                 DTYPE_NAMES[self.dtype], "append" if self.append else "incache",
                 "lens" + "_".join(map(str, self.lens))]
        if self.starts is not None:
            parts.append("start" + "_".join(map(str, self.starts)))
        return "-".join(parts + [f"G{self.G}", f"splits{self.splits}"])

    def inputs(self):
        """``q, k_cache, v_cache, lens, k_new, v_new, starts, G`` on the CPU; cache rows outside
        each row's visible range are NaN."""
        gen = generator(self.id)
        B, Sn, H, d = self.B, self.Sn, self.H, self.d
        q = randn((B, Sn, H, d), self.dtype, generator=gen)
        k_cache, v_cache = random_kv_cache(B, self.Smax, H, d, self.lens, self.dtype, self.starts,
                                           generator=gen)
        k_new = v_new = None
        if self.append:
            k_new, v_new = (randn((B, Sn, H, d), self.dtype, generator=gen) for _ in range(2))
        G = {"none": None, "batch": self.B, "shared": 1}[self.G]
        G = None if G is None else random_g(G, H, d, generator=gen)
        starts = None if self.starts is None else i32(self.starts)
        return q, k_cache, v_cache, i32(self.lens), k_new, v_new, starts, G


CASES = list({c.id: c for c in [
    # Tiny enough for the emulator: one or more query chunks of 4, ragged lengths including an
    # empty cache, left padding (cache_start), new tokens already in the cache, several splits.
    Case(torch.float32, 64, 2, 40, 1, (17, 39), splits=1, G="none", size="tiny"),
    Case(torch.float32, 64, 2, 40, 3, (21, 30), starts=(0, 5), splits=3, size="tiny"),
    Case(torch.float32, 64, 2, 40, 5, (0, 33), starts=(0, 2), G="shared", splits=2, size="tiny"),
    Case(torch.bfloat16, 64, 3, 40, 1, (38, 7), G="shared", splits=3, size="tiny"),
    Case(torch.float16, 64, 2, 40, 3, (12, 40), append=False, starts=(1, 0), splits=1,
         size="tiny"),
    Case(torch.bfloat16, 128, 2, 40, 3, (25, 3), append=False, splits=3, size="tiny"),
    Case(torch.float16, 128, 2, 40, 1, (9, 26), starts=(4, 0), G="none", splits=3, size="tiny"),
    Case(torch.float32, 128, 2, 40, 2, (37, 15), G="shared", splits=3, size="tiny"),
    Case(torch.bfloat16, 64, 2, 130, 1, (100, 129), starts=(3, 0), size="tiny"),  # auto splits
    # Every dtype: two new tokens appended at ragged lengths; three new tokens already in the
    # cache; a long cache with ragged lengths (1 key and 300 keys) over many splits.
    *(Case(dt, 64, 2, 16, 2, (3, 5), G="none", size="tiny") for dt in DTYPES),
    *(Case(dt, 64, 2, 32, 3, (20, 9), append=False, size="tiny") for dt in DTYPES),
    *(Case(torch.float32, 128, 2, 320, 1, (0, 299), G="none", splits=n) for n in (1, 3, 8)),
    # GPU-sized: long caches at three lengths, every split mode and query-chunk count.
    *(Case(dt, d, 3, 1025, Sn, (97, 1000, 5 if append else 7), append, (0, 13, 2), "batch",
           splits, size="large")
      for dt, d, splits, (Sn, append) in itertools.product(
          DTYPES, (64, 128), (1, 3, 0), [(1, True), (3, True), (3, False), (6, True)])),
    *(Case(torch.bfloat16, 64, 14, 8192, 1, (8191,), G=g, size="large")
      for g in ("none", "shared")),
]}.values())


@pytest.mark.parametrize("backend,case", backend_cases(OP, CASES))
def test_step_matches_reference(backend, case):
    q, k_cache, v_cache, lens, k_new, v_new, starts, G = inputs = case.inputs()
    out, k_after, v_after = run_step(backend, *inputs, num_splits=case.splits)
    check_step(out, k_after, v_after, q, k_cache, v_cache, lens, k_new, v_new, starts, G)


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------
STEPS_CASES = [param_case("tiny" if (dt, d, g) in {(torch.float32, 64, "none"),
                                                     (torch.bfloat16, 128, "shared")} else "medium",
                          dtype=dt, d=d, G=g)
               for dt, d, g in itertools.product(DTYPES, (64, 128), ("none", "batch", "shared"))]


@pytest.mark.parametrize("backend,case", backend_cases(OP, STEPS_CASES))
def test_steps_equal_full_causal_attention(backend, case):
    """A prompt in the cache, then steps of 1 and 3 new tokens: every step equals full causal
    attention over the whole sequence so far, and the reference decode."""
    B, H, P, Smax, d, dtype = 2, 2, 20, 40, case.d, case.dtype
    steps = [1, 1, 3, 1]
    total = P + sum(steps)
    G = {"none": None, "batch": random_g(B, H, d), "shared": random_g(1, H, d)}[case.G]
    q_all, k_all, v_all = (randn((B, total, H, d), dtype) for _ in range(3))
    k_cache, v_cache = nan_cache(B, Smax, H, d, dtype)
    k_cache[:, :P], v_cache[:, :P] = k_all[:, :P], v_all[:, :P]
    full = reference.g_attention(q_all.double(), k_all.double(), v_all.double(),
                                 None if G is None else G.double(), None, True)[0]
    kc, vc = backend.to(k_cache, v_cache)
    pos = P
    for Sn in steps:
        now = slice(pos, pos + Sn)
        q_now, k_now, v_now = (t[:, now].contiguous() for t in (q_all, k_all, v_all))
        lens = i32([pos] * B)
        before = kc.cpu().clone(), vc.cpu().clone()
        out = backend.g_attention_decode(backend.to(q_now), kc, vc,
                                         *backend.to(lens, k_now, v_now), None, backend.to(G))
        check_step(out, kc, vc, q_now, *before, lens, k_now, v_now, None, G)
        peer = None
        if dtype != torch.float32:
            peer = g_attention_peer(q_all[:, :pos + Sn], k_all[:, :pos + Sn], v_all[:, :pos + Sn],
                                    G, None, True)[0][:, now]
        compare(out.cpu(), full[:, now], peer, name=f"step at {pos} vs full attention").assert_ok()
        pos += Sn


@pytest.mark.parametrize("backend,dtype", backend_dtypes(OP, DTYPES))
def test_left_padded_row_with_cache_start_equals_row_alone(backend, dtype):
    """Row 1 is left-padded by 7 garbage rows: with cache_start it equals the row run alone
    without the padding."""
    H, d, Smax, pad, L0 = 2, 64, 48, 7, 30
    k_cache, v_cache = random_kv_cache(2, Smax, H, d, [L0, L0], dtype, starts=[0, pad])
    lens, starts = i32([L0, L0]), i32([0, pad])
    q, k_new, v_new = (randn((2, 1, H, d), dtype) for _ in range(3))
    G = random_g(2, H, d)
    out, k_after, v_after = run_step(backend, q, k_cache, v_cache, lens, k_new, v_new, starts, G)
    check_step(out, k_after, v_after, q, k_cache, v_cache, lens, k_new, v_new, starts, G)
    kc1, vc1 = nan_cache(1, Smax, H, d, dtype)
    kc1[0, :L0 - pad], vc1[0, :L0 - pad] = k_cache[1, pad:L0], v_cache[1, pad:L0]
    alone, _, _ = run_step(backend, q[1:], kc1, vc1, i32([L0 - pad]), k_new[1:], v_new[1:], None,
                           G[1:])
    torch.testing.assert_close(out[1:].cpu(), alone.cpu(), rtol=1e-5, atol=1e-5)


SPLITS_CASES = [param_case("tiny" if (dt, Sn) == (torch.bfloat16, 5) else "medium", dtype=dt, Sn=Sn)
                for dt, Sn in itertools.product(DTYPES, (1, 5))]


@pytest.mark.parametrize("backend,case", backend_cases(OP, SPLITS_CASES))
def test_num_splits_agree(backend, case):
    """B = 1, one head, a long cache: 1, 2, 7 splits, auto and more splits than key tiles
    (empty splits must not matter) all give the reference result, and each other's within the
    dtype's rounding."""
    dtype, Sn = case.dtype, case.Sn
    H, d, L = 1, 64, backend.sized(100, 1000)
    k_cache, v_cache = random_kv_cache(1, L + 24, H, d, [L], dtype)
    lens, q, G = i32([L]), randn((1, Sn, H, d), dtype), random_g(1, H, d)
    outs = []
    # 7 splits of 100 keys leave some empty on the emulator; 1000 (clamped) costs it ~30 s.
    for n in backend.sized((1, 2, 7, 0), (1, 2, 7, 0, 1000)):
        out, k_after, v_after = run_step(backend, q, k_cache, v_cache, lens, G=G, num_splits=n)
        outs.append(check_step(out, k_after, v_after, q, k_cache, v_cache, lens, G=G))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=tol, atol=tol)


@pytest.mark.parametrize("backend,dtype", backend_dtypes(OP, (torch.float32, torch.bfloat16),
                                                         emu_dtypes=(torch.bfloat16,)))
def test_deterministic_bitwise(backend, dtype):
    """Run after run, and on the CPU at any thread count: the automatic split count depends on
    the shapes and lengths only (docs/design.md §3.5)."""
    H, d = 2, 64
    L = backend.sized([33, 12], [700, 300])
    Smax = L[0] + 8
    k_cache, v_cache = backend.to(randn((2, Smax, H, d), dtype), randn((2, Smax, H, d), dtype))
    q, G, lens = backend.to(randn((2, 2, H, d), dtype), random_g(2, H, d), i32(L))
    for splits in (0, 3):
        a = backend.g_attention_decode(q, k_cache, v_cache, lens, None, None, None, G, None, splits)
        b = backend.g_attention_decode(q, k_cache, v_cache, lens, None, None, None, G, None, splits)
        assert torch.equal(a, b)
        if backend.runs("thread count"):
            threads = torch.get_num_threads()
            try:
                for n in (1, 2, 5):
                    torch.set_num_threads(n)
                    at_n = backend.g_attention_decode(q, k_cache, v_cache, lens, None, None, None,
                                                      G, None, splits)
                    assert torch.equal(a, at_n), f"num_splits={splits}: {n} threads differ"
            finally:
                torch.set_num_threads(threads)


@pytest.mark.parametrize("backend,dtype", backend_dtypes(OP, (torch.float32, torch.bfloat16)))
def test_head_slice_views(backend, dtype):
    """Only the last dim must be contiguous: q, k_new, v_new and the caches as head slices
    t[:, :, :H] of wider tensors are read and written through their strides; the heads outside
    the views stay untouched."""
    B, Sn, H, pad, d, Smax = 2, 2, 2, 1, 64, 40
    wide = [randn((B, n, H + pad, d), dtype) for n in (Sn, Smax, Smax, Sn, Sn)]
    q, k_cache, v_cache, k_new, v_new = (t[:, :, :H] for t in wide)
    lens, starts, G = i32([11, 30]), i32([0, 4]), random_g(B, H, d)
    kc_wide, vc_wide = backend.to(wide[1].clone(), wide[2].clone())
    out = backend.g_attention_decode(backend.to(q), kc_wide[:, :, :H], vc_wide[:, :, :H],
                                     *backend.to(lens, k_new, v_new, starts, G))
    assert same_bits(kc_wide[:, :, H:], wide[1][:, :, H:])
    assert same_bits(vc_wide[:, :, H:], wide[2][:, :, H:])
    check_step(out, kc_wide[:, :, :H], vc_wide[:, :, :H], q, k_cache, v_cache, lens, k_new, v_new,
               starts, G)


@pytest.mark.parametrize("backend,dtype", backend_dtypes(OP, (torch.float32, torch.bfloat16),
                                                         "general strides"))
def test_fused_qkv_views(backend, dtype):
    """q, k_new, v_new sliced from a fused qkv projection output, the caches every other head
    block of a wider cache."""
    B, H, d, Smax = 2, 2, 64, 64
    qkv = randn((B, 1, 3, H, d), dtype)
    q, k_new, v_new = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    big_k, big_v = randn((B, Smax, 2 * H, d), dtype), randn((B, Smax, 2 * H, d), dtype)
    k_cache, v_cache = big_k[:, :, H:], big_v[:, :, H:]
    lens, G = i32([10, 33]), random_g(1, H, d)
    big_k_dev, big_v_dev = backend.to(big_k.clone(), big_v.clone())
    out = backend.g_attention_decode(backend.to(q), big_k_dev[:, :, H:], big_v_dev[:, :, H:],
                                     *backend.to(lens, k_new, v_new, None, G))
    assert same_bits(big_k_dev[:, :, :H], big_k[:, :, :H])
    check_step(out, big_k_dev[:, :, H:], big_v_dev[:, :, H:], q, k_cache, v_cache, lens, k_new,
               v_new, None, G)


# --------------------------------------------------------------------------------------------
# Cache bounds: the one contract difference between backends (tests/backends.py)
# --------------------------------------------------------------------------------------------
# Rows whose lengths would write past the cache or ask for rows that are not there: each entry
# says whether the step appends, the faulty row's cache_seqlens / cache_start, and the CPU's error
# when that row is row 0.
SN_BOUNDS, SMAX_BOUNDS = 3, 40
CACHE_BOUNDS = {
    "append_past_the_end": (True, dict(lens=39), r"cache_seqlens\[0\] \+ Sn .* exceeds the "
                                                 r"cache length Smax = 40.*left untouched"),
    "start_after_first_new_token": (True, dict(start=21),
                                    r"cache_start\[0\] = 21 must lie in \[0, 20\]"),
    "negative_length": (True, dict(lens=-1), r"cache_seqlens\[0\] must be >= 0"),
    "fewer_rows_than_new_tokens": (False, dict(lens=2),
                                   r"cache_seqlens\[0\] = 2 must be >= Sn = 3"),
    "start_past_the_new_tokens": (False, dict(start=28),
                                  r"cache_start\[0\] = 28 must lie in \[0, 17\]"),
}


def bounds_inputs(dtype, append, faults, B):
    """B rows of length 20 (start 0) but for ``faults``: row → dict(lens=..., start=...)."""
    lens, starts = [20] * B, [0] * B
    for row, fault in faults.items():
        lens[row] = fault.get("lens", lens[row])
        starts[row] = fault.get("start", starts[row])
    H, d = 2, 64
    q = randn((B, SN_BOUNDS, H, d), dtype)
    k_cache, v_cache = randn((B, SMAX_BOUNDS, H, d), dtype), randn((B, SMAX_BOUNDS, H, d), dtype)
    k_new = v_new = None
    if append:
        k_new, v_new = randn((B, SN_BOUNDS, H, d), dtype), randn((B, SN_BOUNDS, H, d), dtype)
    return q, k_cache, v_cache, i32(lens), k_new, v_new, i32(starts)


@pytest.mark.parametrize("backend,dtype", backend_dtypes(OP, (torch.float32, torch.bfloat16),
                                                         emu_dtypes=(torch.bfloat16,)))
def test_cache_bounds(backend, dtype):
    """On the CPU (lengths read on the host) a faulty row raises naming it, and neither cache is
    written. On CUDA (lengths stay on the device: no host sync, CUDA-graph safe) a faulty row is
    not written and its outputs are NaN; the last row, valid, is appended and computed normally,
    at any number of splits."""
    if backend.checks_cache_bounds_on_host:
        for name, (append, fault, message) in CACHE_BOUNDS.items():
            q, k_cache, v_cache, lens, k_new, v_new, starts = bounds_inputs(dtype, append,
                                                                            {0: fault}, 2)
            kc, vc = k_cache.clone(), v_cache.clone()
            with pytest.raises(RuntimeError, match=message):
                backend.g_attention_decode(q, kc, vc, lens, k_new, v_new, starts)
            assert same_bits(kc, k_cache) and same_bits(vc, v_cache), f"{name}: cache written"
        return
    for append in (True, False):
        faults = dict(enumerate(f for a, f, _ in CACHE_BOUNDS.values() if a == append))
        B = len(faults) + 1
        q, k_cache, v_cache, lens, k_new, v_new, starts = bounds_inputs(dtype, append, faults, B)
        for splits in (1, 3):
            out, k_after, v_after = run_step(backend, q, k_cache, v_cache, lens, k_new, v_new,
                                             starts, num_splits=splits)
            out = out.cpu()
            for row, fault in faults.items():
                assert torch.isnan(out[row]).all(), f"row {row} ({fault}): outputs must be NaN"
                assert same_bits(k_after[row], k_cache[row]), f"row {row} ({fault}): k written"
                assert same_bits(v_after[row], v_cache[row]), f"row {row} ({fault}): v written"
            last = slice(B - 1, B)
            check_step(out[last], k_after[last], v_after[last], q[last], k_cache[last],
                       v_cache[last], lens[last], None if k_new is None else k_new[last],
                       None if v_new is None else v_new[last], starts[last])


# --------------------------------------------------------------------------------------------
# Bad inputs: every class raises an error that names the argument (values of cache_seqlens /
# cache_start: test_cache_bounds above).
# --------------------------------------------------------------------------------------------
def good_args(device):
    B, Sn, H, d, Smax = 2, 1, 2, 64, 8

    def r(*shape):
        return torch.randn(*shape, device=device)

    return dict(q=r(B, Sn, H, d), k_cache=r(B, Smax, H, d), v_cache=r(B, Smax, H, d),
                cache_seqlens=i32([3, 7], device), k_new=r(B, Sn, H, d), v_new=r(B, Sn, H, d),
                cache_start=i32([0, 2], device), G=random_g(B, H, d, device=device), scale=None,
                num_splits=0)


def call(backend, a):
    return backend.g_attention_decode(a["q"], a["k_cache"], a["v_cache"], a["cache_seqlens"],
                                      a["k_new"], a["v_new"], a["cache_start"], a["G"], a["scale"],
                                      a["num_splits"])


def _randn(a, *shape):
    return torch.randn(*shape, device=a["q"].device)


BAD_INPUTS = {
    "q_dtype": (lambda a: a.update(q=a["q"].double()), "q must be float32"),
    "cache_dtype": (lambda a: a.update(k_cache=a["k_cache"].half()),
                    "q, k_cache and v_cache must have the same dtype"),
    "q_rank": (lambda a: a.update(q=a["q"][:, 0]), "q must be a 4-D tensor"),
    "k_cache_rank": (lambda a: a.update(k_cache=a["k_cache"][0]), "k_cache must be a 4-D tensor"),
    "head_dim_32": (lambda a: a.update(q=a["q"][..., :32], k_cache=a["k_cache"][..., :32],
                                       v_cache=a["v_cache"][..., :32], k_new=None, v_new=None,
                                       G=None), r"q.shape\[-1\] \(head dim d\) must be 64 or 128"),
    "head_dim_96": (lambda a: a.update(q=_randn(a, 2, 1, 2, 96), k_cache=_randn(a, 2, 8, 2, 96),
                                       v_cache=_randn(a, 2, 8, 2, 96), k_new=None, v_new=None,
                                       G=None),
                    r"q.shape\[-1\] \(head dim d\) must be 64 or 128, got 96"),
    "k_cache_heads": (lambda a: a.update(k_cache=_randn(a, 2, 8, 3, 64)),
                      r"k_cache.shape\[2\] \(key/value heads H_kv\) must divide"),
    "v_cache_shape": (lambda a: a.update(v_cache=_randn(a, 2, 9, 2, 64)),
                      "v_cache must have shape"),
    "q_last_dim_strided": (lambda a: a.update(q=_randn(a, 2, 1, 2, 128)[..., ::2]),
                           "q must be contiguous in its last dimension"),
    "k_cache_last_dim_strided": (lambda a: a.update(k_cache=_randn(a, 2, 8, 2, 128)[..., ::2]),
                                 "k_cache must be contiguous in its last dimension"),
    "seqlens_dtype": (lambda a: a.update(cache_seqlens=a["cache_seqlens"].long()),
                      "cache_seqlens must have dtype Int"),
    "seqlens_shape": (lambda a: a.update(cache_seqlens=a["cache_seqlens"][:1]),
                      r"cache_seqlens.shape\[0\] \(batch\)"),
    "k_new_without_v_new": (lambda a: a.update(v_new=None),
                            "k_new and v_new must be given together"),
    "k_new_dtype": (lambda a: a.update(k_new=a["k_new"].bfloat16()), "k_new must have dtype Float"),
    "v_new_shape": (lambda a: a.update(v_new=_randn(a, 2, 2, 2, 64)), "v_new must have shape"),
    "cache_start_dtype": (lambda a: a.update(cache_start=a["cache_start"].long()),
                          "cache_start must have dtype Int"),
    "G_dtype": (lambda a: a.update(G=a["G"].half()), "G must have dtype Float"),
    "G_shape": (lambda a: a.update(G=_randn(a, 2, 2, 128, 128)), r"G.shape\[2\] \(head dim\)"),
    "num_splits_negative": (lambda a: a.update(num_splits=-1), "num_splits must be >= 0"),
    "more_new_tokens_than_the_cache": (
        lambda a: a.update(q=_randn(a, 2, 9, 2, 64), k_new=_randn(a, 2, 9, 2, 64),
                           v_new=_randn(a, 2, 9, 2, 64), cache_seqlens=a["cache_seqlens"] * 0,
                           cache_start=None),
        r"q.shape\[1\] \(new tokens Sn = 9\) exceeds the cache length Smax = 8"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("backend", backends(OP, "input validation"))
def test_bad_input_raises_naming_the_argument(backend, case):
    mutate, message = BAD_INPUTS[case]
    call(backend, good_args(backend.device))  # the unmutated call is fine
    args = good_args(backend.device)
    mutate(args)
    k_before = args["k_cache"].clone()
    with pytest.raises(RuntimeError, match=message):
        call(backend, args)
    assert torch.equal(args["k_cache"], k_before)  # nothing written on a failed call


@needs_cuda_kernels(OP, "a mixed-device call")
@pytest.mark.parametrize("anchor", ["cpu", "cuda"])
@pytest.mark.parametrize("name", ["k_cache", "cache_seqlens", "k_new", "cache_start", "G"])
def test_mixed_devices_are_refused(anchor, name):
    args = good_args(anchor)
    args[name] = args[name].to("cuda" if anchor == "cpu" else "cpu")
    with pytest.raises(RuntimeError, match=f"{name} must be on the same device as q"):
        call(CUDA, args)


# --------------------------------------------------------------------------------------------
# Dispatcher contract (docs/design.md §3.5)
# --------------------------------------------------------------------------------------------
def sample_inputs(device):
    B, H, d, Smax = 2, 2, 64, 16
    lens = i32([3, 9], device)
    samples = {}
    for dtype in (torch.float32, torch.float16):
        kc, vc = (torch.randn(B, Smax, H, d, device=device).to(dtype) for _ in range(2))
        q, kn, vn = (torch.randn(B, 1, H, d, device=device).to(dtype) for _ in range(3))
        name = DTYPE_NAMES[dtype]
        samples[f"{name}-append-G-splits2"] = ((q, kc, vc, lens, kn, vn),
                                               dict(G=random_g(B, H, d, device=device),
                                                    num_splits=2))
        samples[f"{name}-incache-start"] = ((q, kc, vc, lens),
                                            dict(cache_start=i32([1, 0], device)))
    return samples


@pytest.mark.parametrize("sample", list(sample_inputs("cpu")))
@pytest.mark.parametrize("backend", backends(OP, "dispatcher"))
def test_opcheck(backend, sample):
    args, kwargs = sample_inputs(backend.device)[sample]
    # the op mutates its caches: give opcheck fresh clones
    args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.pldr.g_attention_decode.default, args, kwargs)


@pytest.mark.parametrize("backend", backends(OP, "dispatcher"))
def test_torch_compile_fullgraph_matches_eager(backend):
    """The compiled step gives the eager bits and appends in place too."""
    import pldr_kernels

    def step(q, k_cache, v_cache, lens, k_new, v_new, G):
        return pldr_kernels.g_attention_decode(q, k_cache, v_cache, lens, k_new, v_new, G=G) + 1.0

    torch._dynamo.reset()
    B, S, H, d, Smax = 2, 11, 2, 64, 16
    q, k_new, v_new = backend.to(*(randn((B, 1, H, d)) for _ in range(3)))
    G, lens = backend.to(random_g(B, H, d), i32([S, S - 3]))
    prompt_k, prompt_v = randn((B, S, H, d)), randn((B, S, H, d))

    def fresh_caches():
        kc, vc = torch.zeros(B, Smax, H, d), torch.zeros(B, Smax, H, d)
        kc[:, :S], vc[:, :S] = prompt_k, prompt_v
        return backend.to(kc, vc)

    kc_e, vc_e = fresh_caches()
    eager = step(q, kc_e, vc_e, lens, k_new, v_new, G)
    kc_c, vc_c = fresh_caches()
    compiled = torch.compile(step, fullgraph=True, backend="inductor")(q, kc_c, vc_c, lens, k_new,
                                                                        v_new, G)
    assert torch.equal(compiled, eager)
    assert torch.equal(kc_c, kc_e) and torch.equal(vc_c, vc_e)
    assert torch.equal(kc_c[1, S - 3], k_new[1, 0])


@pytest.mark.parametrize("backend", backends(OP, "dispatcher"))
def test_append_bumps_version_counters(backend):
    a = good_args(backend.device)
    k_version, v_version = a["k_cache"]._version, a["v_cache"]._version
    call(backend, a)
    assert a["k_cache"]._version > k_version and a["v_cache"]._version > v_version


@pytest.mark.parametrize("backend", backends(OP, only=("cuda",)))
def test_cuda_graph_replays_with_new_lengths(backend):
    """Bitwise-identical runs; a captured step replays correctly with other cache_seqlens values
    (the grid depends on shapes only)."""
    B, H, d, Smax, dtype = 1, 14, 64, 1024, torch.bfloat16
    q, k_cache, v_cache = backend.to(randn((B, 1, H, d), dtype), randn((B, Smax, H, d), dtype),
                                     randn((B, Smax, H, d), dtype))
    G, k_new, v_new = backend.to(random_g(1, H, d), randn((B, 1, H, d), dtype),
                                 randn((B, 1, H, d), dtype))
    lens = backend.to(i32([500]))
    first = backend.g_attention_decode(q, k_cache, v_cache, lens, None, None, None, G)
    assert torch.equal(first, backend.g_attention_decode(q, k_cache, v_cache, lens, None, None,
                                                         None, G))
    kc, vc = k_cache.clone(), v_cache.clone()
    static_lens = backend.to(i32([0]))
    backend.g_attention_decode(q, kc, vc, static_lens, k_new, v_new, None, G)  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.g_attention_decode(q, kc, vc, static_lens, k_new, v_new, None, G)
    for n in (10, 700, Smax - 1):
        static_lens.fill_(n)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(kc[0, n], k_new[0, 0])
        check_g_attention_decode(out.cpu(), q.cpu(), kc.cpu(), vc.cpu(), i32([n + 1]),
                                 G=G.cpu()).assert_ok()


# --------------------------------------------------------------------------------------------
# What only the emulator shows: its driver reports the split count it used and can turn off the
# vector loads, which the op does not expose.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", backends(OP, only=("emu",)))
def test_emu_auto_splits(backend):
    """Auto (num_splits = 0) splits a long cache at small batch, and its choice depends on the
    shapes only, not on cache_seqlens (CUDA-graph capture). (Explicit counts: run_step.)"""
    B, H, d, Smax = 1, 2, 64, 200
    q = randn((B, 1, H, d))
    k_cache, v_cache = randn((B, Smax, H, d)), randn((B, Smax, H, d))
    used = {emu_g_attention_decode(q, k_cache, v_cache, i32([n]))[1] for n in (1, 150)}
    assert len(used) == 1 and used.pop() > 1
    two_rows = next(c for c in CASES if c.size == "tiny" and c.Smax == 130)
    assert emu_g_attention_decode(*two_rows.inputs())[1] > 1


@pytest.mark.parametrize("backend", backends(OP, only=("emu",)))
def test_emu_scalar_loads(backend):
    """The scalar path (rows not 16-byte aligned, which the CUDA API detects) gives the vector
    path's bits."""
    case = Case(torch.float32, 128, 2, 40, 2, (37, 15), G="shared", splits=3, size="tiny")
    q, k_cache, v_cache, lens, k_new, v_new, starts, G = case.inputs()
    kc, vc = k_cache.clone(), v_cache.clone()
    out, _ = emu_g_attention_decode(q, kc, vc, lens, k_new, v_new, starts, G, None, 3,
                                    force_scalar=True)
    check_step(out, kc, vc, q, k_cache, v_cache, lens, k_new, v_new, starts, G)
    vector = EMU.g_attention_decode(q, k_cache.clone(), v_cache.clone(), lens, k_new, v_new,
                                    starts, G, None, 3)
    assert torch.equal(out, vector)

