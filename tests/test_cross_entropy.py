"""pldr::cross_entropy_forward / pldr::cross_entropy_backward (docs/design.md §3.10), the rows of
the LM head's loss on the CPU, against fp64 by the peer rule of docs/design.md §4
(testing.check_cross_entropy*), on the ISA path this process selected (tests/test_isa.py runs
every path): vocabularies that are no multiple of a vector, -100 rows, chunks of columns, NaN and
±inf, bad input, thread counts, opcheck."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pldr_kernels import ops, testing

pytestmark = pytest.mark.skipif(ops._LOAD_ERROR is not None, reason=f"{ops._LOAD_ERROR}")

SHAPES = [(1, 1), (5, 17), (33, 100), (64, 2000), (3, 32000)]


def inputs(N: int, V: int, seed: int = 0, spread: float = 4.0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=gen) * spread
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[::3] = -100
    return logits, targets


@pytest.mark.parametrize("N, V", SHAPES)
def test_forward_matches_fp64(N, V):
    logits, targets = inputs(N, V)
    lse, nll = ops.cross_entropy_forward(logits, targets)
    testing.check_cross_entropy(lse, nll, logits, targets).assert_ok()
    assert torch.all(nll[targets == -100] == 0)


@pytest.mark.parametrize("N, V", SHAPES)
@pytest.mark.parametrize("with_grad_logits", [False, True])
def test_backward_matches_fp64_for_every_chunk(N, V, with_grad_logits):
    logits, targets = inputs(N, V, seed=1)
    lse, _ = ops.cross_entropy_forward(logits, targets)
    grad_nll = torch.rand(N, generator=torch.Generator().manual_seed(2)) + 0.5
    extra = torch.randn(N, V) if with_grad_logits else None
    chunks = {(0, V), (0, V // 2), (V // 2, V), (V // 3, V // 3 + 17), (V - 1, V), (V // 2,) * 2}
    for start, end in sorted(c for c in chunks if 0 <= c[0] <= c[1] <= V):
        grad = ops.cross_entropy_backward(logits, lse, targets, grad_nll, start, end, extra)
        assert grad.shape == (N, end - start)
        testing.check_cross_entropy_grad(grad, logits, targets, grad_nll, start, end,
                                         extra).assert_ok()


def test_the_loss_and_gradient_of_a_mean_are_f_cross_entropys():
    """lse, nll and the chunked gradient make F.cross_entropy's mean loss and its gradient."""
    logits, targets = inputs(40, 300, seed=3)
    lse, nll = ops.cross_entropy_forward(logits, targets)
    count = (targets != -100).sum()
    x = logits.double().requires_grad_()
    want = F.cross_entropy(x, targets, ignore_index=-100)
    want.backward()
    grad_nll = torch.full((40,), 1.0) / count
    grad = torch.cat([ops.cross_entropy_backward(logits, lse, targets, grad_nll, c,
                                                 min(c + 64, 300)) for c in range(0, 300, 64)],
                     dim=1)
    torch.testing.assert_close(nll.sum().double() / count, want.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(grad.double(), x.grad, rtol=0, atol=1e-7)


def test_nan_and_inf_give_nan_where_f_cross_entropy_does():
    logits, _ = inputs(6, 50, seed=4)
    targets = torch.tensor([3, 7, 9, 11, 13, -100])
    logits[0, 20] = float("nan")          # NaN anywhere: lse and nll NaN
    logits[1, 5] = float("inf")           # +inf: inf − inf, NaN
    logits[2, 9] = float("-inf")          # the target at −inf: nll +inf
    logits[3, :] = float("-inf")          # every entry −inf: NaN
    logits[4, :10] = float("-inf")        # some −inf: finite
    logits[5, 0] = float("nan")           # a NaN in a row the loss leaves out: nll 0
    lse, nll = ops.cross_entropy_forward(logits, targets)
    want = F.cross_entropy(logits.double(), targets, ignore_index=-100, reduction="none")
    testing.compare(nll, want, name="nll").assert_ok()
    assert torch.isnan(lse[:2]).all() and torch.isfinite(lse[4])
    grad_nll = torch.ones(6)
    grad = ops.cross_entropy_backward(logits, lse, targets, grad_nll, 0, 50)
    assert torch.isnan(grad[:2]).all() and torch.isnan(grad[3]).all()
    assert torch.isfinite(grad[4]).all() and torch.all(grad[4, :10] == 0)
    assert torch.all(grad[5] == 0)  # nll of a left-out row is the constant 0, whatever it holds


def test_rows_left_out_get_exactly_grad_logits():
    logits, targets = inputs(9, 40, seed=5)
    lse, _ = ops.cross_entropy_forward(logits, targets)
    extra = torch.randn(9, 40)
    grad = ops.cross_entropy_backward(logits, lse, targets, torch.ones(9), 5, 30, extra)
    left_out = targets == -100
    assert torch.equal(grad[left_out], extra[left_out][:, 5:30])


def test_bitwise_the_same_at_any_thread_count():
    logits, targets = inputs(300, 2000, seed=6)
    grad_nll = torch.rand(300)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            lse, nll = ops.cross_entropy_forward(logits, targets)
            results.append((lse, nll, ops.cross_entropy_backward(logits, lse, targets, grad_nll,
                                                                 100, 1900)))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_strided_rows_and_an_expanded_grad_nll_are_read_through_their_strides():
    base, targets = inputs(8, 64, seed=7)
    wide = torch.randn(8, 100)
    wide[:, :64] = base
    logits = wide[:, :64]  # rows 100 apart
    lse, nll = ops.cross_entropy_forward(logits, targets)
    want = ops.cross_entropy_forward(base, targets)
    assert torch.equal(lse, want[0]) and torch.equal(nll, want[1])
    g = torch.tensor(0.25)
    grad = ops.cross_entropy_backward(logits, lse, targets, g.expand(8), 0, 64)
    assert torch.equal(grad, ops.cross_entropy_backward(base, lse, targets, g.repeat(8), 0, 64))


@pytest.mark.parametrize("bad, message", [
    (dict(targets=torch.tensor([0, 50, 1])), "targets[1] = 50 is not a column of logits "
     "(expected 0 <= target < 50 = logits.shape[1], or ignore_index = -100)."),
    (dict(targets=torch.tensor([0, -1, 1])), "targets[1] = -1 is not a column of logits"),
    (dict(targets=torch.tensor([0, 1, 2], dtype=torch.int32)), "targets must have dtype Long"),
    (dict(targets=torch.tensor([0, 1])), "targets must have shape [3], got [2]."),
    (dict(logits=torch.randn(3, 50).double()), "logits must have dtype Float, got Double."),
    (dict(logits=torch.randn(3, 50, 1)), "logits must be a 2-D tensor [rows, vocabulary]"),
    (dict(logits=torch.randn(3, 100)[:, ::2]), "logits must be contiguous in its last dimension"),
])
def test_bad_input_is_refused_with_words_naming_the_argument(bad, message):
    kwargs = dict(logits=torch.randn(3, 50), targets=torch.tensor([0, 49, -100])) | bad
    with pytest.raises(RuntimeError) as info:
        ops.cross_entropy_forward(**kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize("bad, message", [
    (dict(start=-1), "start and end must give columns of logits, 0 <= start <= end <= 50 = "
     "logits.shape[1], got start = -1, end = 50."),
    (dict(start=10, end=9), "got start = 10, end = 9."),
    (dict(end=51), "got start = 0, end = 51."),
    (dict(lse=torch.zeros(4)), "lse must have shape [3], got [4]."),
    (dict(grad_nll=torch.zeros(3).double()), "grad_nll must have dtype Float, got Double."),
    (dict(grad_logits=torch.zeros(3, 49)), "grad_logits must have shape [3, 50], got [3, 49]."),
])
def test_bad_backward_input_is_refused_with_words_naming_the_argument(bad, message):
    kwargs = dict(logits=torch.randn(3, 50), lse=torch.zeros(3), targets=torch.tensor([0, 1, 2]),
                  grad_nll=torch.ones(3), start=0, end=50) | bad
    with pytest.raises(RuntimeError) as info:
        ops.cross_entropy_backward(**kwargs)
    assert message in str(info.value)


def test_opcheck():
    logits, targets = inputs(7, 45, seed=8)
    lse, _ = ops.cross_entropy_forward(logits, targets)
    torch.library.opcheck(torch.ops.pldr.cross_entropy_forward.default, (logits, targets))
    torch.library.opcheck(torch.ops.pldr.cross_entropy_backward.default,
                          (logits, lse, targets, torch.rand(7), 3, 40, torch.randn(7, 45)))
