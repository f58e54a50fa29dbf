"""Property-based fuzzing of the three ops (hypothesis; docs/design.md §4.4): random shapes, dtypes,
views and strides, masks with empty rows, causal, shared and per-batch G, decode with random cache
lengths, starts, split counts and invalid rows, each call judged against the fp64 reference by
``pldr_kernels.testing``'s checks, and the decode caches byte for byte.

The cases are drawn by tests/fuzz_strategies.py. Runs are deterministic (the ``pldr-ci``
hypothesis profile of tests/conftest.py: derandomized, no example database). Size of a run:
``PLDR_FUZZ_EXAMPLES`` (default 150) examples per attention property on cpu and cuda, the other
properties in proportion (``SHARE`` below: the emulator runs a few); e.g.
``PLDR_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz.py``. ``--hypothesis-profile=pldr-explore``
draws other examples on every run."""
from __future__ import annotations

import math
import os
from dataclasses import replace

import pytest

pytest.importorskip("hypothesis")

import torch  # noqa: E402
from backends import EMU, backends  # noqa: E402
from fuzz_strategies import attention_cases, decode_cases, metric_cases  # noqa: E402
from hypothesis import given, settings  # noqa: E402

from pldr_kernels import reference  # noqa: E402
from pldr_kernels.testing import (  # noqa: E402
    check_g_attention,
    check_g_attention_decode,
    check_metric_g_from_a,
    check_metric_tensors,
    check_nonfinite,
    compare,
    g_attention_decode_peer,
    g_attention_peer,
    metric_args,
)

Tensor = torch.Tensor
BASE_EXAMPLES = int(os.environ.get("PLDR_FUZZ_EXAMPLES", "150"))
# Examples per property as a share of BASE_EXAMPLES, sized so that the default run (455 examples)
# takes under a minute on 2 cores (~40 s measured, the emulator ~11 s of it): a CPU example costs
# 10–70 ms with its fp64 oracle, an emulator call ~0.3 s (one CUDA thread per host thread), an
# emulated metric learner ~1.5 s.
SHARE = {("cpu", "g_attention"): 1.0, ("cpu", "g_attention_decode"): 1.0,
         ("cpu", "g_attention nonfinite"): 1 / 3, ("cpu", "g_attention_decode nonfinite"): 1 / 3,
         ("cpu", "metric_tensors"): 1 / 6,
         ("emu", "g_attention"): 1 / 16, ("emu", "g_attention_decode"): 1 / 16,
         ("emu", "g_attention nonfinite"): 1 / 40, ("emu", "g_attention_decode nonfinite"): 1 / 40,
         ("emu", "metric_tensors"): 1 / 75}


def examples(backend, op: str) -> int:
    """How many examples property ``op`` (an op, or "<op> nonfinite") draws on ``backend`` (cuda
    as cpu)."""
    kind = "emu" if backend is EMU else "cpu"
    return max(1, math.ceil(BASE_EXAMPLES * SHARE[kind, op]))


def fuzz(backend, op: str):
    """``@settings`` of one property on one backend (the rest comes from the active profile)."""
    return settings(max_examples=examples(backend, op))


def storage_of(t: Tensor) -> Tensor:
    """Every element of ``t``'s storage, flat, on the CPU (what a view lives in)."""
    flat = torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage())
    return flat.cpu()


def same_storage_bytes(a: Tensor, b: Tensor) -> bool:
    """Byte equality of two whole storages (NaN bits included)."""
    return a.numel() == b.numel() and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def copy_view(t: Tensor) -> Tensor:
    """The same view of a copy of ``t``'s whole storage."""
    storage = storage_of(t).clone()
    return storage.as_strided(t.shape, t.stride(), t.storage_offset())


def bits(t: Tensor) -> Tensor:
    return t.contiguous().view(torch.uint8)


def same_rows(a: Tensor, b: Tensor) -> Tensor:
    """Which rows (all but the last dim) of two fp64 tensors are equal, NaN equal to NaN."""
    return ((a == b) | (a.isnan() & b.isnan())).all(-1)


def assert_untouched_rows_bitwise(got: Tensor, clean: Tensor, untouched: Tensor, name: str):
    """``got`` equals the run without the injection, bitwise, in every ``untouched`` row."""
    if bool(untouched.any()):
        assert torch.equal(bits(got[untouched]), bits(clean[untouched])), (
            f"{name}: a row that no injected value reaches differs from the run without them")


# --------------------------------------------------------------------------------------------
# g_attention
# --------------------------------------------------------------------------------------------
def run_g_attention(backend, case, inputs):
    q, k, v, G, mask = inputs
    out, lse = backend.g_attention(*backend.to(q, k, v, G, mask), case.causal, case.scale)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == (case.B, case.H, case.Sq) and lse.dtype == torch.float32
    return out.cpu(), lse.cpu()


def g_attention_oracle(case, inputs):
    q, k, v, G, mask = inputs
    return reference.g_attention(q.double(), k.double(), v.double(),
                                 None if G is None else G.double(), mask, case.causal, case.scale,
                                 visible_only=True)


@pytest.mark.parametrize("backend", backends("g_attention"))
def test_g_attention(backend):
    @fuzz(backend, "g_attention")
    @given(case=attention_cases(tiny=backend is EMU))
    def prop(case):
        inputs = q, k, v, G, mask = case.inputs()
        out, lse = run_g_attention(backend, case, inputs)
        oracle = g_attention_oracle(case, inputs)
        check_g_attention(out, lse, q, k, v, G, mask, case.causal, case.scale,
                          oracle=oracle).assert_ok()
        if backend.guarantees("g_attention lse at the fp32 rule"):
            compare(lse, oracle[1], name="lse (fp32 rule, CPU extra)").assert_ok()

    prop()


@pytest.mark.parametrize("backend", backends("g_attention"))
def test_g_attention_nonfinite(backend):
    """NaN / ±Inf injected at random into q, k, v or G: the NaN rule (testing.check_nonfinite
    against the oracle without the keys a row does not see), and every (batch, query, head) row
    that no injected value reaches in the oracle is bitwise the run without the injections."""
    @fuzz(backend, "g_attention nonfinite")
    @given(case=attention_cases(tiny=backend is EMU, nonfinite=True))
    def prop(case):
        inputs = q, k, v, G, mask = case.inputs()
        got = run_g_attention(backend, case, inputs)
        oracle = g_attention_oracle(case, inputs)
        peer = None
        if q.dtype != torch.float32:
            peer = g_attention_peer(q, k, v, G, mask, case.causal, case.scale)
        check_nonfinite(got, oracle, peer).assert_ok()
        clean_inputs = replace(case, injections=()).inputs()
        clean = run_g_attention(backend, case, clean_inputs)
        clean_oracle = g_attention_oracle(case, clean_inputs)
        untouched = same_rows(oracle[0], clean_oracle[0]) & (
            (oracle[1] == clean_oracle[1]) | (oracle[1].isnan() & clean_oracle[1].isnan())
        ).permute(0, 2, 1)
        assert_untouched_rows_bitwise(got[0], clean[0], untouched, "out")
        assert_untouched_rows_bitwise(got[1].permute(0, 2, 1)[..., None],
                                      clean[1].permute(0, 2, 1)[..., None], untouched, "lse")

    prop()


# --------------------------------------------------------------------------------------------
# g_attention_decode
# --------------------------------------------------------------------------------------------
def appended(cache: Tensor, new: Tensor | None, lens: list[int], rows: list[int]) -> Tensor:
    """A copy of ``cache`` (the whole storage) with ``new[b]`` written at rows
    ``lens[b] … lens[b] + Sn − 1`` of each batch row b in ``rows``, and nothing else."""
    out = copy_view(cache)
    if new is not None:
        for b in rows:
            out[b, lens[b]:lens[b] + new.shape[1]] = new[b]
    return out


def run_decode(backend, case, inputs) -> Tensor | None:
    """The step on ``backend``, on copies of the caches of ``inputs``; the copies after it checked
    byte for byte: the input caches with exactly the appended rows of the valid batch rows
    written, nothing else of the storage around the views touched. A row with invalid lengths
    (``case.invalid``): on the CPU the call raises naming it and writes nothing (returns None);
    on CUDA (and the emulator) that row is not written and its outputs are NaN."""
    q, k_before, v_before, lens, k_new, v_new, starts, G = inputs  # left as they are
    kc, vc = backend.to(copy_view(k_before), copy_view(v_before))
    args = (backend.to(q), kc, vc, *backend.to(lens, k_new, v_new, starts, G), case.scale,
            case.splits)
    bad_row = None if case.invalid is None else case.invalid[0]
    if bad_row is not None and backend.checks_cache_bounds_on_host:
        name = "cache_start" if case.invalid[1] == "late_start" else "cache_seqlens"
        with pytest.raises(RuntimeError, match=rf"{name}\[{bad_row}\]"):
            backend.g_attention_decode(*args)
        assert same_storage_bytes(storage_of(kc), storage_of(k_before)), "k_cache written"
        assert same_storage_bytes(storage_of(vc), storage_of(v_before)), "v_cache written"
        return None
    out = backend.g_attention_decode(*args)
    assert out.shape == q.shape and out.dtype == q.dtype
    out = out.cpu()
    rows = [b for b in range(case.B) if b != bad_row]
    for name, after, before, new in (("k_cache", kc, k_before, k_new),
                                     ("v_cache", vc, v_before, v_new)):
        want = appended(before, new, list(case.lens), rows)
        assert same_storage_bytes(storage_of(after), storage_of(want)), (
            f"{name} after the step is not the input with exactly the appended rows written")
    if bad_row is not None:
        assert torch.isnan(out[bad_row]).all(), f"row {bad_row} ({case.invalid[1]}): not NaN"
    return out


def decode_rows(inputs, rows: list[int]):
    """The decode inputs of batch rows ``rows`` only."""
    q, k_cache, v_cache, lens, k_new, v_new, starts, G = inputs

    def sub(t):
        return None if t is None else t[rows]

    return (q[rows], k_cache[rows], v_cache[rows], lens[rows], sub(k_new), sub(v_new),
            sub(starts), G if G is None or G.shape[0] == 1 else G[rows])


def decode_oracle(case, inputs) -> Tensor:
    q, k_cache, v_cache, lens, k_new, v_new, starts, G = inputs

    def dbl(t):
        return None if t is None else t.double()

    return reference.g_attention_decode(dbl(q), dbl(k_cache), dbl(v_cache), lens, dbl(k_new),
                                        dbl(v_new), starts, dbl(G), case.scale,
                                        visible_only=True)


@pytest.mark.parametrize("backend", backends("g_attention_decode"))
def test_g_attention_decode(backend):
    """One step by the rule, the caches byte for byte (``run_decode``), invalid rows included."""
    @fuzz(backend, "g_attention_decode")
    @given(case=decode_cases(tiny=backend is EMU, any_view=backend.runs("general strides")))
    def prop(case):
        inputs = case.inputs()
        out = run_decode(backend, case, inputs)
        rows = [b for b in range(case.B) if case.invalid is None or b != case.invalid[0]]
        if out is None or not rows:
            return
        check_g_attention_decode(out[rows], *decode_rows(inputs, rows),
                                 case.scale).assert_ok()

    prop()


@pytest.mark.parametrize("backend", backends("g_attention_decode"))
def test_g_attention_decode_nonfinite(backend):
    """NaN / ±Inf injected at random into q, k_new, v_new, G or the caches: the NaN rule
    (testing.check_nonfinite), the caches byte for byte, and every (batch, query, head) row that
    no injected value reaches in the oracle bitwise the step without the injections."""
    @fuzz(backend, "g_attention_decode nonfinite")
    @given(case=decode_cases(tiny=backend is EMU, any_view=backend.runs("general strides"),
                             nonfinite=True))
    def prop(case):
        inputs = q, k_cache, v_cache, lens, k_new, v_new, starts, G = case.inputs()
        out = run_decode(backend, case, inputs)
        oracle = decode_oracle(case, inputs)
        peer = None
        if q.dtype != torch.float32:
            peer = g_attention_decode_peer(*inputs, case.scale)
        check_nonfinite(out, oracle, peer, names=("out",)).assert_ok()
        clean_inputs = replace(case, injections=()).inputs()
        clean = run_decode(backend, case, clean_inputs)
        untouched = same_rows(oracle, decode_oracle(case, clean_inputs))
        assert_untouched_rows_bitwise(out, clean, untouched, "out")

    prop()


# --------------------------------------------------------------------------------------------
# metric_tensors
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", backends("metric_tensors"))
def test_metric_tensors(backend):
    @fuzz(backend, "metric_tensors")
    @given(case=metric_cases(tiny=backend is EMU, any_view=backend.runs("general strides")))
    def prop(case):
        q, q_mask, weights = case.inputs()
        eps = dict(eps_ln=case.eps[0], eps_adj=case.eps[1])
        out = backend.metric_tensors(*backend.to(q, q_mask), *backend.to(*metric_args(weights)),
                                     **eps)
        for name, t in zip(("A", "A_LM", "G"), out):
            assert t.dtype == torch.float32 and t.shape == (case.B, case.H, case.d, case.d), name
            assert torch.isfinite(t).all(), f"{name}: finite inputs must give finite outputs"
        oracle = reference.metric_tensors(q.double(), q_mask,
                                          *metric_args(weights, torch.float64), **eps)
        check_metric_tensors(out, q, q_mask, weights, **eps, oracle=oracle).assert_ok()
        if backend.guarantees("metric_tensors G from A"):
            check_metric_g_from_a(out, q, q_mask, weights, **eps, oracle=oracle).assert_ok()

    prop()
