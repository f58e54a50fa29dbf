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
    compare,
    metric_args,
)

Tensor = torch.Tensor
BASE_EXAMPLES = int(os.environ.get("PLDR_FUZZ_EXAMPLES", "150"))
# Examples per property as a share of BASE_EXAMPLES, sized so that the default run takes about a
# minute on 2 cores: a CPU call costs ~0.1 s with its fp64 oracle (metric_tensors ~0.4 s), an
# emulator call ~0.3 s (one CUDA thread per host thread), an emulated metric learner ~2 s.
SHARE = {("cpu", "g_attention"): 1.0, ("cpu", "g_attention_decode"): 1.0,
         ("cpu", "metric_tensors"): 1 / 6,
         ("emu", "g_attention"): 1 / 12, ("emu", "g_attention_decode"): 1 / 12,
         ("emu", "metric_tensors"): 1 / 50}


def examples(backend, op: str) -> int:
    """How many examples property ``op`` draws on ``backend`` (cuda as cpu)."""
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


# --------------------------------------------------------------------------------------------
# g_attention
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", backends("g_attention"))
def test_g_attention(backend):
    @fuzz(backend, "g_attention")
    @given(case=attention_cases(tiny=backend is EMU))
    def prop(case):
        q, k, v, G, mask = case.inputs()
        out, lse = backend.g_attention(*backend.to(q, k, v, G, mask), case.causal, case.scale)
        assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
        assert lse.shape == (case.B, case.H, case.Sq) and lse.dtype == torch.float32
        out, lse = out.cpu(), lse.cpu()
        oracle = reference.g_attention(q.double(), k.double(), v.double(),
                                       None if G is None else G.double(), mask, case.causal,
                                       case.scale)
        check_g_attention(out, lse, q, k, v, G, mask, case.causal, case.scale,
                          oracle=oracle).assert_ok()
        if backend.guarantees("g_attention lse at the fp32 rule"):
            compare(lse, oracle[1], name="lse (fp32 rule, CPU extra)").assert_ok()

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


@pytest.mark.parametrize("backend", backends("g_attention_decode"))
def test_g_attention_decode(backend):
    """One step by the rule, and the caches after it byte for byte: the input caches with exactly
    the appended rows written (nothing else of the storage around the views touched). A row with
    invalid lengths: the CPU raises naming it and writes nothing; CUDA (and the emulator) leaves
    that row unwritten, returns NaN for it and computes the others."""
    @fuzz(backend, "g_attention_decode")
    @given(case=decode_cases(tiny=backend is EMU, any_view=backend.runs("general strides")))
    def prop(case):
        q, k_cache, v_cache, lens, k_new, v_new, starts, G = case.inputs()
        k_before, v_before = copy_view(k_cache), copy_view(v_cache)
        kc, vc = backend.to(k_cache, v_cache)
        args = (backend.to(q), kc, vc, *backend.to(lens, k_new, v_new, starts, G), case.scale,
                case.splits)
        B = case.B
        bad_row = None if case.invalid is None else case.invalid[0]
        if bad_row is not None and backend.checks_cache_bounds_on_host:
            name = "cache_start" if case.invalid[1] == "late_start" else "cache_seqlens"
            with pytest.raises(RuntimeError, match=rf"{name}\[{bad_row}\]"):
                backend.g_attention_decode(*args)
            assert same_storage_bytes(storage_of(kc), storage_of(k_before)), "k_cache written"
            assert same_storage_bytes(storage_of(vc), storage_of(v_before)), "v_cache written"
            return
        out = backend.g_attention_decode(*args)
        assert out.shape == q.shape and out.dtype == q.dtype
        out = out.cpu()
        rows = [b for b in range(B) if b != bad_row]
        for name, after, before, new in (("k_cache", kc, k_before, k_new),
                                         ("v_cache", vc, v_before, v_new)):
            want = appended(before, new, list(case.lens), rows)
            assert same_storage_bytes(storage_of(after), storage_of(want)), (
                f"{name} after the step is not the input with exactly the appended rows written")
        if bad_row is not None:
            assert torch.isnan(out[bad_row]).all(), f"row {bad_row} ({case.invalid[1]}): not NaN"
        if not rows:
            return

        def sub(t):
            return None if t is None else t[rows]

        G_rows = G if G is None or G.shape[0] == 1 else G[rows]
        check_g_attention_decode(out[rows], q[rows], k_before[rows], v_before[rows], lens[rows],
                                 sub(k_new), sub(v_new), sub(starts), G_rows,
                                 case.scale).assert_ok()

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
