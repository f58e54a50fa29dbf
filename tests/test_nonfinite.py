"""NaN and Inf in the inputs of the attention ops (docs/design.md §3.5, the NaN rule).

A NaN or Inf in any element a query row sees (its q row, G of its (batch, head), the K and V rows
of its visible keys) gives NaN — or the reference's ±Inf — in exactly the outputs the fp64 oracle
gives it in, with the keys the row does not see removed (``reference.g_attention(...,
visible_only=True)``, judged by ``testing.check_nonfinite``); every other (batch, head) and query
row stays bitwise what it is without the injection; masked and causally hidden keys never
contribute, whatever they hold.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from backends import backend_dtypes
from cases import DTYPE_NAMES, generator, i32, same_bits

from pldr_kernels import reference as ref
from pldr_kernels.testing import (
    check_nonfinite,
    g_attention_decode_peer,
    g_attention_peer,
    randn,
    random_attention_inputs,
    random_g,
    random_kv_cache,
)

Tensor = torch.Tensor

NAN, INF = math.nan, math.inf


# --------------------------------------------------------------------------------------------
# The oracle: the reference with the keys a row does not see removed
# --------------------------------------------------------------------------------------------
def _oracle_inputs(B=2, Sq=5, Sk=9, H=2, d=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, s, H, d, generator=gen, dtype=torch.float64) for s in (Sq, Sk, Sk))
    mask = torch.rand(B, Sk, generator=gen) > 0.3
    mask[0, 2] = False
    mask[1, :] = False  # batch row 1 sees nothing
    return q, k, v, mask


def test_visible_only_is_the_reference_on_finite_inputs():
    q, k, v, mask = _oracle_inputs()
    for causal in (False, True):
        plain = ref.g_attention(q, k, v, None, mask, causal)
        visible = ref.g_attention(q, k, v, None, mask, causal, visible_only=True)
        assert all(torch.equal(a, b) for a, b in zip(plain, visible, strict=True))


def test_visible_only_leaves_masked_v_rows_out():
    """A NaN or Inf in the V row of a masked or causally hidden key: the oracle equals the
    reference on V with that entry zeroed (finite, so the plain product is right there) in every
    query row that does not see the key."""
    q, k, v, mask = _oracle_inputs()
    # key-masked; in a batch row that sees nothing; causally hidden from query rows 0..3 (Sq 5,
    # Sk 9: row i sees keys <= i + 4), seen by row 4
    hidden = [(0, 2), (1, 0), (0, 8)]
    for value in (NAN, INF, -INF):
        poisoned, zeroed = v.clone(), v.clone()
        for b, j in hidden:
            poisoned[b, j, 1, 5] = value
            zeroed[b, j, 1, 5] = 0.0
        if value != value:  # the plain reference lets NaN through: what visible_only is for
            assert ref.g_attention(q, k, poisoned, None, mask, True)[0][:, :4].isnan().any()
        out, lse = ref.g_attention(q, k, poisoned, None, mask, True, visible_only=True)
        want_out, want_lse = ref.g_attention(q, k, zeroed, None, mask, True)
        assert torch.equal(lse, want_lse)
        assert torch.equal(out[:, :4], want_out[:, :4]) and torch.equal(out[1], want_out[1])
        seen = out[0, 4].clone()
        assert torch.equal(seen[1, 5], torch.tensor(value, dtype=seen.dtype)) or (
            value != value and seen[1, 5].isnan())
        seen[1, 5] = want_out[0, 4, 1, 5]
        assert torch.equal(seen, want_out[0, 4])


def test_visible_only_keeps_visible_nonfinite_v_per_element():
    """A visible V entry that is NaN makes exactly its column of the rows that see it NaN; +Inf
    makes it +Inf; +Inf and −Inf in one column give NaN."""
    q, k, v, mask = _oracle_inputs()
    mask[:] = True
    v[0, 6, 1, 3] = NAN  # seen by query rows 2.. (causal, Sk − Sq = 4)
    v[0, 1, 1, 7] = INF  # seen by every row
    v[0, 0, 1, 9], v[0, 3, 1, 9] = INF, -INF
    out, lse = ref.g_attention(q, k, v, None, mask, True, visible_only=True)
    want_nan = torch.zeros_like(out, dtype=torch.bool)
    want_nan[0, 2:, 1, 3] = True
    want_nan[0, :, 1, 9] = True
    assert torch.equal(out.isnan(), want_nan)
    want_inf = torch.zeros_like(want_nan)
    want_inf[0, :, 1, 7] = True
    assert torch.equal(out.isposinf(), want_inf) and not out.isneginf().any()
    assert torch.isfinite(lse).all()


def test_reference_row_with_nan_or_plus_inf_score_is_nan():
    """No softmax exists for a row with a NaN or +Inf visible score (inf/inf): out and lse are
    NaN there, and only there; a −Inf score is a zero weight."""
    q, k, v, mask = _oracle_inputs()
    mask[:] = True
    k[0, 4, 0, :] = 0.0
    k[0, 4, 0, 0] = INF  # +Inf score for q rows with q[..., 0] > 0, −Inf for q[..., 0] < 0
    k[1, 7, 1, 2] = NAN
    out, lse = ref.g_attention(q, k, v, None, mask, causal=False)
    plus = q[0, :, 0, 0] > 0
    assert torch.equal(lse[0, 0].isnan(), plus) and torch.equal(out[0, :, 0].isnan().all(-1), plus)
    assert torch.isfinite(out[0, ~plus, 0]).all()
    assert lse[1, 1].isnan().all() and out[1, :, 1].isnan().all()
    finite = torch.ones_like(lse, dtype=torch.bool)
    finite[0, 0], finite[1, 1] = ~plus, False
    assert torch.isfinite(lse[finite]).all()


def test_check_nonfinite_names_the_entries_that_differ():
    q, k, v, mask = _oracle_inputs()
    out, lse = ref.g_attention(q, k, v, None, mask, True, visible_only=True)
    assert check_nonfinite((out, lse), (out, lse))
    dropped = out.clone()
    dropped[1, 2, 0, 7] = NAN
    verdict = check_nonfinite((dropped, lse), (out, lse))
    assert not verdict and "[1, 2, 0, 7] got nan" in str(verdict)
    wrong_sign = lse.clone()
    wrong_sign[0, 1, 3] = INF
    assert not check_nonfinite((out, wrong_sign), (out, lse.masked_fill(wrong_sign.isinf(), -INF)))
    off = out.clone()
    off[0, 0, 0, 0] += 1.0
    assert not check_nonfinite(off, out)


# --------------------------------------------------------------------------------------------
# The kernels: NaN and Inf injected into q, k, v, G (and the decode caches / new tokens)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Injection:
    """``tensor[at(Sq, Sk)] = value`` (``at`` gives an index from the case's lengths)."""
    tensor: str
    at: Callable[[int, int], tuple]
    value: float


@dataclass(frozen=True)
class PrefillCase:
    name: str
    injections: tuple[Injection, ...]
    causal: bool = False
    G: str = "none"            # "none", "batch" or "shared"
    mask: bool = False         # key_mask: every third key of batch row 0 masked, row 1 all masked
    long_queries: bool = False  # Sq > Sk: the first Sq − Sk rows see no key under causal
    reaches_output: bool = True  # whether some injection is visible to some row
    d: int = 64

    @property
    def id(self) -> str:
        return self.name

    @property
    def setting(self) -> str:
        """What the clean inputs depend on: cases that share it share the clean run."""
        return (f"causal{int(self.causal)}-G{self.G}-mask{int(self.mask)}"
                f"-longq{int(self.long_queries)}-d{self.d}")

    def shape(self, backend) -> tuple[int, int]:
        """``(Sq, Sk)``: across key tiles (64 keys), tiny on the emulator; Sk − Sq = 60."""
        if self.long_queries:
            return backend.sized((20, 12), (70, 50))
        return backend.sized((20, 80), (70, 130))


MASKED_KEY = 4  # masked in batch row 0 (4 % 3 == 1)


def _shift(Sq: int, Sk: int) -> int:
    return Sk - Sq


def at(*index):
    """An index that does not depend on the lengths."""
    return lambda Sq, Sk: index


PREFILL_CASES = [
    PrefillCase("q-element-and-row-G", (
        Injection("q", at(0, 5, 1, 7), NAN),          # one element: its row (q·G mixes it in)
        Injection("q", at(1, 2, 0, slice(None)), INF),  # a whole row
    ), causal=True, G="batch"),
    PrefillCase("k-nan-seen-by-later-rows", (
        # key shift + Sq/2: seen by query rows >= Sq/2 only, in the middle of a key tile
        Injection("k", lambda Sq, Sk: (0, _shift(Sq, Sk) + Sq // 2, 1, 3), NAN),
        Injection("k", at(1, 51, 0, 0), NAN),  # the 64-key tile of issue 9's report
    ), causal=True, G="batch"),
    PrefillCase("k-inf-plus-for-some-rows", (
        # +inf scores for the rows whose q·G has a positive entry 0, −inf (weight 0) for the others
        Injection("k", at(0, 9, 1, slice(None)), 0.0),
        Injection("k", at(0, 9, 1, 0), INF),
        Injection("k", at(1, 5, 0, 5), -INF),  # ±inf by the sign of q·G entry 5
    ), causal=False),
    PrefillCase("v-seen-and-causally-hidden", (
        Injection("v", at(0, 10, 1, 4), NAN),        # seen by every row
        Injection("v", at(1, 30, 0, 9), INF),
        Injection("v", at(1, 31, 0, 11), -INF),
        # hidden from query rows < Sq/2 (in the same key tile as keys they see)
        Injection("v", lambda Sq, Sk: (0, _shift(Sq, Sk) + Sq // 2, 0, 6), NAN),
        Injection("v", lambda Sq, Sk: (1, Sk - 1, 1, slice(None)), NAN),  # the last row sees it
        Injection("k", at(0, 3, 1, 0), NAN),  # NaN scores: lse NaN, not −inf
    ), causal=True, G="shared"),
    PrefillCase("masked-keys", (
        Injection("k", at(0, MASKED_KEY, 0, slice(None)), NAN),
        Injection("v", at(0, MASKED_KEY, 1, slice(None)), INF),
        Injection("q", at(1, 4, 0, 0), NAN),           # batch row 1 sees no key: out 0, lse −inf
        Injection("v", at(1, 0, 1, slice(None)), NAN),
        Injection("k", at(1, 7, 1, 2), INF),
    ), mask=True, G="shared", reaches_output=False),
    PrefillCase("masked-and-seen", (
        Injection("v", at(0, MASKED_KEY, 1, 3), NAN),
        Injection("q", at(0, 3, 0, 1), NAN),
        Injection("G", at(0, 1, 5, 8), NAN),    # shared G: head 1 of every batch row
    ), mask=True, G="shared"),
    PrefillCase("G-per-batch", (
        Injection("G", at(0, 1, 3, 7), NAN),
        Injection("G", at(1, 0, 10, 20), INF),
    ), causal=True, G="batch"),
    PrefillCase("whole-head-no-visible-rows", (
        Injection("q", at(0, slice(None), 0, slice(None)), NAN),
        Injection("v", at(1, slice(None), 1, slice(None)), NAN),
        Injection("k", at(0, slice(None), 1, 3), -INF),
    ), causal=True, long_queries=True),
    PrefillCase("d128", (  # other tiles on CUDA (32 keys), G staged in chunks
        Injection("v", lambda Sq, Sk: (0, _shift(Sq, Sk) + Sq // 2, 1, 100), NAN),
        Injection("G", at(1, 0, 90, 3), INF),
        Injection("k", at(1, 40, 1, 120), NAN),
    ), causal=True, G="batch", d=128),
]


_CLEAN_PREFILL: dict[tuple, tuple[Tensor, Tensor]] = {}


def _prefill_inputs(case: PrefillCase, backend, dtype):
    B, H, d = 2, 2, case.d
    Sq, Sk = case.shape(backend)
    gen = generator(f"nonfinite-{case.setting}-{DTYPE_NAMES[dtype]}")
    q, k, v = random_attention_inputs(B, Sq, Sk, H, d, dtype, generator=gen)
    G = {"none": None, "batch": B, "shared": 1}[case.G]
    G = None if G is None else random_g(G, H, d, generator=gen)
    mask = None
    if case.mask:
        mask = torch.ones(B, Sk, dtype=torch.bool)
        mask[0, 1::3] = False
        mask[1] = False
    return {"q": q, "k": k, "v": v, "G": G, "key_mask": mask}


def _inject(inputs: dict, injections, Sq: int, Sk: int) -> dict:
    poisoned = {name: None if t is None else t.clone() for name, t in inputs.items()}
    for inj in injections:
        poisoned[inj.tensor][inj.at(Sq, Sk)] = inj.value
    return poisoned


def _unchanged_where_oracle_is(got: Tensor, clean: Tensor, want: Tensor,
                               want_clean: Tensor, what: str) -> None:
    """Every entry whose oracle the injection leaves exactly as it was (in fp64) is bitwise the
    kernel's output without the injection: nothing leaks into other (batch, head)s, rows or
    columns."""
    same = (want == want_clean).cpu()
    assert same_bits(got.cpu()[same], clean.cpu()[same]), (
        f"{what}: {int((got.cpu()[same] != clean.cpu()[same]).sum())} entries the injection must "
        "not touch changed")


def _judge(got, clean, want, want_clean, peer, reaches_output, names):
    check_nonfinite(got, want, peer, names=names).assert_ok()
    for g, c, w, wc, name in zip(got, clean, want, want_clean, names, strict=True):
        _unchanged_where_oracle_is(g, c, w, wc, name)
    reached = any(not torch.equal(w, wc) for w, wc in zip(want, want_clean, strict=True))
    assert reached == reaches_output, (
        "the case's injections should " + ("" if reaches_output else "not ") +
        "reach the oracle's outputs; the case is not testing what it says")


@pytest.mark.parametrize(("backend", "dtype"),
                         backend_dtypes("g_attention", (torch.float32, torch.bfloat16)))
@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: c.id)
def test_g_attention_nonfinite(backend, dtype, case):
    Sq, Sk = case.shape(backend)
    clean = _prefill_inputs(case, backend, dtype)
    poisoned = _inject(clean, case.injections, Sq, Sk)

    def run(x):
        out, lse = backend.g_attention(*backend.to(x["q"], x["k"], x["v"], x["G"], x["key_mask"]),
                                       causal=case.causal)
        return out.cpu(), lse.cpu()

    clean_key = (backend.name, dtype, case.setting)  # the emulator is slow: one clean run each
    if clean_key not in _CLEAN_PREFILL:
        _CLEAN_PREFILL[clean_key] = run(clean)

    def oracle(x):
        return ref.g_attention(x["q"].double(), x["k"].double(), x["v"].double(),
                               None if x["G"] is None else x["G"].double(), x["key_mask"],
                               case.causal, visible_only=True)

    got = run(poisoned)
    peer = None
    if dtype != torch.float32:
        peer = g_attention_peer(poisoned["q"], poisoned["k"], poisoned["v"], poisoned["G"],
                                poisoned["key_mask"], case.causal)
    _judge(got, _CLEAN_PREFILL[clean_key], oracle(poisoned), oracle(clean), peer,
           case.reaches_output, ("out", "lse"))
    if case.mask:  # batch row 1 sees no key: exactly 0 with lse −inf, whatever it holds
        assert (got[0][1] == 0).all() and got[1][1].isneginf().all()


@dataclass(frozen=True)
class DecodeCase:
    name: str
    injections: tuple[Injection, ...]
    Sn: int = 1
    starts: tuple[int, int] | None = None
    G: str = "none"
    splits: tuple[int, ...] = (0,)
    lens: tuple[int, int] = (150, 70)  # across key tiles of 64 (CPU) and splits
    Smax: int = 160
    d: int = 64

    @property
    def id(self) -> str:
        return self.name


DECODE_CASES = [
    DecodeCase("cache-rows", (
        Injection("k_cache", at(0, 40, 1, 3), NAN),   # issue 9: lost with several splits
        Injection("v_cache", at(1, 10, 0, 5), INF),
        Injection("k_cache", at(1, 65, 1, slice(None)), NAN),
        Injection("q", at(0, 0, 0, 3), NAN),  # NaN scores only: the row once came out as 0
    ), splits=(1, 3, 0)),
    DecodeCase("query-and-G", (
        Injection("q", at(1, 0, 0, 5), NAN),
        Injection("G", at(0, 1, 2, 3), -INF),
    ), Sn=2, G="batch"),
    DecodeCase("new-block-hidden-keys", (
        Injection("v_new", at(0, 2, 1, 4), NAN),              # hidden from new queries 0, 1
        Injection("k_new", at(1, 1, 0, slice(None)), NAN),    # hidden from query 0
        Injection("v_new", at(1, 1, 1, slice(None)), INF),
    ), Sn=3, splits=(1, 3, 0)),
    DecodeCase("new-block-gemm-tile", (  # more new queries than the CPU row path takes
        Injection("v_new", at(0, 3, 1, slice(None)), -INF),
        Injection("k_new", at(1, 5, 0, 2), NAN),
    ), Sn=6, G="shared"),
    DecodeCase("cache-start", (
        Injection("k_cache", at(1, 6, 1, 0), NAN),  # in split 0 of the row's keys
        Injection("v_cache", at(1, 6, 0, 2), NAN),
        Injection("k_cache", at(0, 19, 1, slice(None)), INF),  # before cache_start: not seen
        Injection("v_cache", at(0, 19, 0, slice(None)), INF),
    ), starts=(20, 5), splits=(3,)),
    DecodeCase("d128", (  # two keys per warp on CUDA (16 lanes a key)
        Injection("k_cache", at(0, 100, 0, 127), NAN),
        Injection("q", at(1, 1, 1, 64), NAN),
        Injection("v_new", at(1, 2, 0, 5), INF),  # hidden from new queries 0, 1
    ), Sn=3, splits=(3,), d=128),
]


def _decode_inputs(case: DecodeCase, dtype):
    B, H, d, Sn = 2, 2, case.d, case.Sn
    gen = generator(f"nonfinite-{case.id}-{DTYPE_NAMES[dtype]}")
    q = randn((B, Sn, H, d), dtype, generator=gen)
    k_cache, v_cache = random_kv_cache(B, case.Smax, H, d, case.lens, dtype, case.starts,
                                       generator=gen)
    k_new, v_new = (randn((B, Sn, H, d), dtype, generator=gen) for _ in range(2))
    G = {"none": None, "batch": B, "shared": 1}[case.G]
    G = None if G is None else random_g(G, H, d, generator=gen)
    return {"q": q, "k_cache": k_cache, "v_cache": v_cache, "lens": i32(case.lens),
            "k_new": k_new, "v_new": v_new,
            "starts": None if case.starts is None else i32(case.starts), "G": G}


def _decode_params():
    """Every backend and dtype with every case and split count, but on the emulator (slow) bf16
    only — its NaN logic does not depend on the dtype, only its load width does — and no
    automatic split count (the driver's 8 SMs) where the case also runs explicit ones."""
    for bd in backend_dtypes("g_attention_decode", (torch.float32, torch.bfloat16),
                             emu_dtypes=(torch.bfloat16,)):
        backend, _ = bd.values
        for c in DECODE_CASES:
            for n in c.splits:
                if backend.name == "emu" and n == 0 and len(c.splits) > 1:
                    continue
                yield pytest.param(*bd.values, c, n, id=f"{c.id}-splits{n}-{bd.id}",
                                   marks=bd.marks)


@pytest.mark.parametrize(("backend", "dtype", "case", "num_splits"), list(_decode_params()))
def test_g_attention_decode_nonfinite(backend, dtype, case, num_splits):
    clean = _decode_inputs(case, dtype)
    poisoned = _inject(clean, case.injections, case.Sn, 0)

    def run(x):
        kc, vc = backend.to(x["k_cache"].clone(), x["v_cache"].clone())
        out = backend.g_attention_decode(
            backend.to(x["q"]), kc, vc, *backend.to(x["lens"], x["k_new"], x["v_new"],
                                                    x["starts"], x["G"]), num_splits=num_splits)
        return out.cpu()

    def oracle(x):
        def f64(t):
            return None if t is None else t.double()
        return ref.g_attention_decode(
            f64(x["q"]), f64(x["k_cache"]), f64(x["v_cache"]), x["lens"], f64(x["k_new"]),
            f64(x["v_new"]), x["starts"], f64(x["G"]), visible_only=True)

    got = run(poisoned)
    peer = None
    if dtype != torch.float32:
        peer = g_attention_decode_peer(*(poisoned[n] for n in (
            "q", "k_cache", "v_cache", "lens", "k_new", "v_new", "starts", "G")))
    _judge((got,), (run(clean),), (oracle(poisoned),), (oracle(clean),),
           None if peer is None else (peer,), True, ("out",))
