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

import torch

from pldr_kernels import reference as ref
from pldr_kernels.testing import check_nonfinite

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
