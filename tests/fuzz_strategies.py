"""Hypothesis strategies of the fuzz suite (tests/test_fuzz.py).

A strategy draws a *case*: a small frozen dataclass of shapes, dtypes, flags, layout names and a
seed, which prints readably in a failure report and rebuilds exactly the same tensors from its
fields (``case.inputs()``). The tensors themselves come from ``pldr_kernels.testing``'s
generators, seeded by the case; hypothesis only chooses the structure, so shrinking a failure
shrinks the shapes and flags.

Every tensor is placed in a view of a larger buffer (``LAYOUTS``) whose elements outside the view
are NaN (or, for bool masks, random), so a kernel that reads outside the view, or writes there,
shows it. Views never alias each other (aliasing is refused by the ops, not fuzzed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from cases import DTYPE_NAMES
from hypothesis import strategies as st

from pldr_kernels.testing import (
    DTYPES,
    make_metric_weights,
    randn,
    random_attention_inputs,
    random_g,
)

Tensor = torch.Tensor
NAN = math.nan

# Views of a [B, S, H, d] tensor (activations, caches). "heads_prefix" is t[:, :, :H] of a
# contiguous tensor with more heads, the one non-contiguous view the emulator's decode and metric
# drivers take (tests/backends.py).
LAYOUTS = ("contiguous", "heads_prefix", "heads_middle", "token_stride", "bhsd", "wide_d",
           "offset", "batch_broadcast")
WRITABLE_LAYOUTS = tuple(x for x in LAYOUTS if x != "batch_broadcast")  # caches: no overlap
EMU_DECODE_LAYOUTS = ("contiguous", "heads_prefix")
G_LAYOUTS = ("contiguous", "heads_middle", "row_padded", "batch_broadcast", "row_broadcast")
MASK_LAYOUTS = ("contiguous", "offset", "strided", "batch_broadcast")
INT_LAYOUTS = ("contiguous", "strided")


def _nan_buffer(shape, dtype) -> Tensor:
    return torch.full(shape, NAN, dtype=torch.float32).to(dtype)


def place(values: Tensor, layout: str) -> Tensor:
    """``values [B,S,H,d]`` as a view laid out as ``layout`` (one of ``LAYOUTS``), in a buffer that
    is NaN outside the view. ``batch_broadcast`` keeps batch row 0 and expands it (stride 0), so
    the view's values are row 0's in every row."""
    B, S, H, d = values.shape
    dt = values.dtype
    if layout == "contiguous":
        return values.clone()
    if layout == "batch_broadcast":
        return values[:1].clone().expand(B, S, H, d)
    if layout == "heads_prefix":
        view = _nan_buffer((B, S, H + 2, d), dt)[:, :, :H]
    elif layout == "heads_middle":
        view = _nan_buffer((B, S, H + 2, d), dt)[:, :, 1:H + 1]
    elif layout == "token_stride":
        view = _nan_buffer((B, 2 * S, H, d), dt)[:, ::2]
    elif layout == "bhsd":
        view = _nan_buffer((B, H, S, d), dt).transpose(1, 2)
    elif layout == "wide_d":  # rows start 3 elements in: not 16-byte aligned
        view = _nan_buffer((B, S, H, d + 16), dt)[..., 3:3 + d]
    elif layout == "offset":
        view = _nan_buffer((values.numel() + 5,), dt)[5:].view(B, S, H, d)
    else:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    view.copy_(values)
    return view


def place_g(G: Tensor, layout: str) -> Tensor:
    """``G [Bg,H,d,d]`` laid out as ``layout`` (one of ``G_LAYOUTS``). ``batch_broadcast`` expands
    batch row 0 over the batch (stride 0), ``row_broadcast`` repeats each head's row 0 over its d
    rows (row stride 0: the kernels copy such a G once, docs/design.md §3)."""
    Bg, H, d, _ = G.shape
    if layout == "contiguous":
        return G.clone()
    if layout == "batch_broadcast":
        return G[:1].clone().expand(Bg, H, d, d)
    if layout == "row_broadcast":
        return G[:, :, :1].clone().expand(Bg, H, d, d)
    if layout == "heads_middle":
        view = torch.full((Bg, H + 1, d, d), NAN)[:, 1:]
    elif layout == "row_padded":
        view = torch.full((Bg, H, d, d + 8), NAN)[..., 2:2 + d]
    else:
        raise ValueError(f"G layout must be one of {G_LAYOUTS}, got {layout!r}")
    view.copy_(G)
    return view


def place_rows(values: Tensor, layout: str, gen: torch.Generator) -> Tensor:
    """A ``[B, S]`` bool mask or a ``[B]`` int32 vector as a view laid out as ``layout``
    (``MASK_LAYOUTS`` / ``INT_LAYOUTS``); the buffer outside the view holds random values."""
    if layout == "contiguous":
        return values.clone()
    if layout == "batch_broadcast":
        return values[:1].clone().expand(values.shape)

    def noise(shape):
        if values.dtype == torch.bool:
            return torch.rand(shape, generator=gen) > 0.5
        return torch.randint(-(2**30), 2**30, shape, generator=gen, dtype=values.dtype)

    if layout == "strided":
        shape = (*values.shape[:-1], 2 * values.shape[-1])
        view = noise(shape)[..., ::2]
    elif layout == "offset":
        view = noise((values.numel() + 3,))[3:].view(values.shape)
    else:
        raise ValueError(f"layout must be one of {MASK_LAYOUTS}, got {layout!r}")
    view.copy_(values)
    return view


def key_mask_values(kind: str, B: int, S: int, gen: torch.Generator) -> Tensor | None:
    """A ``[B, S]`` bool mask (True = attend / keep): ``none`` (None), ``holes`` (30 % random
    holes), ``left_pad`` (each row left-padded by a random amount, an empty row possible),
    ``empty_rows`` (holes, and every other row from row 0 all False)."""
    if kind == "none":
        return None
    if kind == "left_pad":
        pad = torch.randint(0, S + 1, (B,), generator=gen)
        return torch.arange(S)[None, :] >= pad[:, None]
    mask = torch.rand(B, S, generator=gen) > 0.3
    if kind == "empty_rows":
        mask[::2] = False
    elif kind != "holes":
        raise ValueError(f"mask kind must be none, holes, left_pad or empty_rows, got {kind!r}")
    return mask


MASK_KINDS = ("none", "holes", "left_pad", "empty_rows")


@dataclass(frozen=True)
class Injection:
    """A NaN or ±Inf written into one input before it is placed in its layout: one element, or a
    whole row of d (``where``), chosen by ``index`` modulo how many the tensor has. A target the
    case does not have (G when there is none) is left alone."""
    target: str      # "q", "k", "v", "G"; decode: "q", "k_new", "v_new", "k_cache", "v_cache", "G"
    where: str       # "element" or "row"
    index: int
    value: float

    def __repr__(self) -> str:
        return f"{self.value}@{self.target}.{self.where}[{self.index}]"


def inject(tensors: dict[str, Tensor | None], injections: tuple[Injection, ...]) -> None:
    """Apply ``injections`` in place to the named (unplaced, contiguous) tensors."""
    for inj in injections:
        t = tensors.get(inj.target)
        if t is None:
            continue
        if inj.where == "row":
            rows = t.view(-1, t.shape[-1])
            rows[inj.index % rows.shape[0]] = inj.value
        else:
            t.view(-1)[inj.index % t.numel()] = inj.value


def nonfinite_injections(targets: tuple[str, ...]) -> st.SearchStrategy[tuple[Injection, ...]]:
    """One to three NaN / ±Inf injections into ``targets``."""
    one = st.builds(Injection, target=st.sampled_from(targets),
                    where=st.sampled_from(("element", "row")), index=st.integers(0, 2**31 - 1),
                    value=st.sampled_from((NAN, math.inf, -math.inf)))
    return st.lists(one, min_size=1, max_size=3).map(tuple)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _g_values(mode: str, B: int, H: int, d: int, gen: torch.Generator) -> Tensor | None:
    rows = {"none": None, "batch": B, "shared": 1}[mode]
    return None if rows is None else random_g(rows, H, d, generator=gen)


# --------------------------------------------------------------------------------------------
# g_attention
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionCase:
    B: int
    Sq: int
    Sk: int
    H: int
    d: int
    dtype: torch.dtype
    causal: bool
    G: str                       # "none", "batch" (one G per batch row), "shared" (one for all)
    G_layout: str
    mask: str                    # MASK_KINDS
    mask_layout: str
    layouts: tuple[str, str, str]  # q, k, v
    scale: float | None
    seed: int
    injections: tuple[Injection, ...] = ()

    def __repr__(self) -> str:
        return (f"AttentionCase(B={self.B}, Sq={self.Sq}, Sk={self.Sk}, H={self.H}, d={self.d}, "
                f"{DTYPE_NAMES[self.dtype]}, causal={self.causal}, G={self.G}/{self.G_layout}, "
                f"mask={self.mask}/{self.mask_layout}, layouts={self.layouts}, "
                f"scale={self.scale}, seed={self.seed}, injections={self.injections})")

    def inputs(self):
        """``q, k, v, G, key_mask`` (CPU), each in its drawn layout, the injections applied."""
        gen = _generator(self.seed)
        q, k, v = random_attention_inputs(self.B, self.Sq, self.Sk, self.H, self.d, self.dtype,
                                          generator=gen)
        G = _g_values(self.G, self.B, self.H, self.d, gen)
        inject(dict(q=q, k=k, v=v, G=G), self.injections)
        q, k, v = (place(t, lay) for t, lay in zip((q, k, v), self.layouts))
        G = None if G is None else place_g(G, self.G_layout)
        mask = key_mask_values(self.mask, self.B, self.Sk, gen)
        mask = None if mask is None else place_rows(mask, self.mask_layout, gen)
        return q, k, v, G, mask


def _lengths(top: int, edges: tuple[int, ...]) -> st.SearchStrategy[int]:
    """A length in [1, top], often one at a tile edge."""
    return st.one_of(st.sampled_from([e for e in edges if e <= top]), st.integers(1, top))


TILE_EDGES = (1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129)
seeds = st.integers(0, 2**31 - 1)
scales = st.one_of(st.none(), st.floats(-0.5, 0.5, allow_nan=False, width=32))


@st.composite
def attention_cases(draw, *, tiny: bool, nonfinite: bool = False) -> AttentionCase:
    """Cases of ``g_attention``; ``tiny`` for the emulator (B, H ≤ 2, lengths ≤ 70), else up to
    B 3, H 3 and 200 queries/keys (several 64-row tiles); ``nonfinite``: with NaN / ±Inf
    injected into q, k, v or G."""
    top = 70 if tiny else 200
    G = draw(st.sampled_from(("none", "batch", "shared")))
    mask = draw(st.sampled_from(MASK_KINDS))
    return AttentionCase(
        B=draw(st.integers(1, 2 if tiny else 3)), Sq=draw(_lengths(top, TILE_EDGES)),
        Sk=draw(_lengths(top, TILE_EDGES)), H=draw(st.integers(1, 2 if tiny else 3)),
        d=draw(st.sampled_from((64, 128))), dtype=draw(st.sampled_from(DTYPES)),
        causal=draw(st.booleans()), G=G,
        G_layout=draw(st.sampled_from(G_LAYOUTS)) if G != "none" else "contiguous",
        mask=mask,
        mask_layout=draw(st.sampled_from(MASK_LAYOUTS)) if mask != "none" else "contiguous",
        layouts=tuple(draw(st.sampled_from(LAYOUTS)) for _ in range(3)),
        scale=draw(scales), seed=draw(seeds),
        injections=draw(nonfinite_injections(("q", "k", "v", "G"))) if nonfinite else ())


# --------------------------------------------------------------------------------------------
# g_attention_decode
# --------------------------------------------------------------------------------------------
# Ways a row's lengths can be invalid (docs/design.md §3.3); the CPU raises, CUDA leaves the row
# unwritten and returns NaN for it.
INVALID_KINDS = ("past_end", "negative", "short", "late_start")


@dataclass(frozen=True)
class DecodeCase:
    dtype: torch.dtype
    d: int
    H: int
    Smax: int
    Sn: int
    lens: tuple[int, ...]          # cache_seqlens (with append: before it)
    append: bool                   # k_new/v_new given (else the new tokens are in the cache)
    starts: tuple[int, ...] | None
    G: str
    G_layout: str
    splits: int
    cache_layout: str              # both caches (separate buffers)
    io_layout: str                 # q, k_new, v_new
    lens_layout: str               # cache_seqlens and cache_start
    scale: float | None
    invalid: tuple[int, str] | None  # (row, kind): that row's lengths are invalid
    seed: int
    injections: tuple[Injection, ...] = ()

    @property
    def B(self) -> int:
        return len(self.lens)

    def __repr__(self) -> str:
        return (f"DecodeCase({DTYPE_NAMES[self.dtype]}, d={self.d}, H={self.H}, "
                f"Smax={self.Smax}, Sn={self.Sn}, lens={self.lens}, append={self.append}, "
                f"starts={self.starts}, G={self.G}/{self.G_layout}, splits={self.splits}, "
                f"cache={self.cache_layout}, io={self.io_layout}, lens_layout={self.lens_layout}, "
                f"scale={self.scale}, invalid={self.invalid}, seed={self.seed}, "
                f"injections={self.injections})")

    def inputs(self):
        """``q, k_cache, v_cache, cache_seqlens, k_new, v_new, cache_start, G`` (CPU). Row b of a
        cache holds standard normal keys/values in [start, len) (clipped to the cache) and NaN
        everywhere else, the buffer around the view included; the injections applied."""
        gen = _generator(self.seed)
        B, Sn, H, d, dt = self.B, self.Sn, self.H, self.d, self.dtype
        q = randn((B, Sn, H, d), dt, generator=gen)
        caches = []
        for _ in range(2):
            values = _nan_buffer((B, self.Smax, H, d), dt)
            for b, n in enumerate(self.lens):
                s0 = 0 if self.starts is None else self.starts[b]
                s0, s1 = max(0, min(s0, self.Smax)), max(0, min(n, self.Smax))
                if s1 > s0:
                    values[b, s0:s1] = randn((s1 - s0, H, d), dt, generator=gen)
            caches.append(values)
        k_new = v_new = None
        if self.append:
            k_new, v_new = (randn((B, Sn, H, d), dt, generator=gen) for _ in range(2))
        G = _g_values(self.G, B, H, d, gen)
        inject(dict(q=q, k_cache=caches[0], v_cache=caches[1], k_new=k_new, v_new=v_new, G=G),
               self.injections)
        q = place(q, self.io_layout)
        caches = [place(c, self.cache_layout) for c in caches]
        if self.append:
            k_new, v_new = place(k_new, self.io_layout), place(v_new, self.io_layout)
        G = None if G is None else place_g(G, self.G_layout)
        lens = place_rows(torch.tensor(self.lens, dtype=torch.int32), self.lens_layout, gen)
        starts = None
        if self.starts is not None:
            starts = place_rows(torch.tensor(self.starts, dtype=torch.int32), self.lens_layout,
                                gen)
        return q, caches[0], caches[1], lens, k_new, v_new, starts, G


@st.composite
def decode_cases(draw, *, tiny: bool, any_view: bool, nonfinite: bool = False) -> DecodeCase:
    """Cases of ``g_attention_decode``: ragged cache lengths (an empty cache included), left
    padding (``cache_start``), new tokens appended or already in the cache, explicit and automatic
    splits (more splits than key tiles included), and in one case in eight one row with invalid
    lengths. ``tiny``: for the emulator (B, H ≤ 2, caches ≤ 70 keys); ``any_view`` False: the
    layouts the emulator driver takes (contiguous, or all of q / caches / k_new / v_new head
    prefixes with one padding). ``nonfinite``: valid lengths, and NaN / ±Inf injected into q,
    k_new, v_new, G or the caches (anywhere: in a visible row, or in one already NaN)."""
    B = draw(st.integers(1, 2 if tiny else 3))
    Sn = draw(st.integers(1, 5 if tiny else 6))
    append = draw(st.booleans())
    top = 70 if tiny else 300
    low = 0 if append else Sn
    lens = [draw(st.one_of(st.sampled_from((low, top)), st.integers(low, top)))
            for _ in range(B)]
    added = Sn if append else 0
    Smax = max(max(lens) + added, Sn) + draw(st.integers(0, 5))
    starts = None
    if draw(st.booleans()):
        starts = [draw(st.integers(0, L + added - Sn)) for L in lens]
    invalid = None
    # one case in eight; hypothesis shrinks towards 0, so towards valid rows
    if not nonfinite and draw(st.integers(0, 7)) == 7:
        row = draw(st.integers(0, B - 1))
        kinds = ["past_end" if append else "short", "negative"]
        if starts is not None:
            kinds.append("late_start")
        kind = draw(st.sampled_from(kinds))
        if kind == "past_end":
            lens[row] = draw(st.integers(Smax - Sn + 1, Smax))
        elif kind == "short":
            lens[row] = draw(st.integers(0, Sn - 1))
        elif kind == "negative":
            lens[row] = draw(st.integers(-3, -1))
        else:
            starts[row] = draw(st.integers(lens[row] + added - Sn + 1, lens[row] + added))
        invalid = (row, kind)
    G = draw(st.sampled_from(("none", "batch", "shared")))
    if any_view:
        cache_layout = draw(st.sampled_from(WRITABLE_LAYOUTS))
        io_layout = draw(st.sampled_from(LAYOUTS))
        G_layout = draw(st.sampled_from(G_LAYOUTS)) if G != "none" else "contiguous"
    else:
        cache_layout = io_layout = draw(st.sampled_from(EMU_DECODE_LAYOUTS))
        G_layout = "contiguous"
    return DecodeCase(
        dtype=draw(st.sampled_from(DTYPES)), d=draw(st.sampled_from((64, 128))),
        H=draw(st.integers(1, 2 if tiny else 3)), Smax=Smax, Sn=Sn, lens=tuple(lens),
        append=append, starts=None if starts is None else tuple(starts), G=G, G_layout=G_layout,
        splits=draw(st.one_of(st.just(0), st.integers(1, 8))), cache_layout=cache_layout,
        io_layout=io_layout, lens_layout=draw(st.sampled_from(INT_LAYOUTS)),
        scale=draw(scales), invalid=invalid, seed=draw(seeds),
        injections=draw(nonfinite_injections(("q", "k_new", "v_new", "k_cache", "v_cache", "G")))
        if nonfinite else ())


# --------------------------------------------------------------------------------------------
# metric_tensors
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MetricCase:
    B: int
    S: int
    H: int
    d: int
    dtype: torch.dtype
    mask: str                    # MASK_KINDS (q_mask, True = keep)
    mask_layout: str
    q_layout: str
    mlp: tuple[int, int, int]    # R, Gd, F
    eps: tuple[float, float]     # eps_ln, eps_adj
    seed: int

    def __repr__(self) -> str:
        return (f"MetricCase(B={self.B}, S={self.S}, H={self.H}, d={self.d}, "
                f"{DTYPE_NAMES[self.dtype]}, mask={self.mask}/{self.mask_layout}, "
                f"q={self.q_layout}, R,Gd,F={self.mlp}, eps={self.eps}, seed={self.seed})")

    def inputs(self):
        """``q, q_mask, weights`` (CPU). Rows that q_mask leaves out hold large garbage: they must
        not reach the result."""
        gen = _generator(self.seed)
        q = randn((self.B, self.S, self.H, self.d), generator=gen)
        mask = key_mask_values(self.mask, self.B, self.S, gen)
        if mask is not None:
            q[~mask] = 1e3 * randn((int((~mask).sum()), self.H, self.d), generator=gen)
        R, Gd, F = self.mlp
        weights = make_metric_weights(d=self.d, H=self.H, R=R, Gd=Gd, F=F, generator=gen)
        q = place(q.to(self.dtype), self.q_layout)
        mask = None if mask is None else place_rows(mask, self.mask_layout, gen)
        return q, mask, weights


@st.composite
def metric_cases(draw, *, tiny: bool, any_view: bool) -> MetricCase:
    """Cases of ``metric_tensors``: random S (several 64-position chunks on the CPU), pad masks
    with empty rows, q views, metric learners of 1–2 residual layers and hidden widths on both
    sides of the kernels' staging chunks (F > 256 takes two passes). ``tiny``: for the emulator
    (one residual layer, S ≤ 40, F ≤ 48: each is seconds there)."""
    mask = draw(st.sampled_from(MASK_KINDS))
    layouts = [x for x in LAYOUTS if x != "batch_broadcast"] if any_view else ["contiguous",
                                                                                "heads_prefix"]
    F = draw(st.sampled_from((16, 40, 48) if tiny else (16, 40, 170, 300)))
    return MetricCase(
        B=draw(st.integers(1, 2 if tiny else 3)),
        S=draw(_lengths(40 if tiny else 200, TILE_EDGES)), H=draw(st.integers(1, 2 if tiny else 3)),
        d=draw(st.sampled_from((64, 128))), dtype=draw(st.sampled_from(DTYPES)), mask=mask,
        mask_layout=draw(st.sampled_from(MASK_LAYOUTS)) if mask != "none" else "contiguous",
        q_layout=draw(st.sampled_from(layouts)),
        mlp=(1 if tiny else draw(st.integers(1, 2)), draw(st.integers(1, 2)), F),
        eps=draw(st.sampled_from(((1e-6, 1e-9), (1e-5, 1e-7), (1e-3, 1e-4)))), seed=draw(seeds))
