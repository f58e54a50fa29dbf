"""pldr::transpose_2d (docs/design.md §3.11): x.t().contiguous() bit for bit, on the ISA path this
process selected (tests/test_isa.py runs every path): shapes on and off the 8 × 8 blocks and the
64 × 64 tiles, strided rows, empty tensors, thread counts, NaN / inf carried as they are, bad
input, opcheck; and the weight gradients of the training step's linears that use it."""
from __future__ import annotations

import pytest
import torch

from pldr_kernels import ops

pytestmark = pytest.mark.skipif(ops._LOAD_ERROR is not None, reason=f"{ops._LOAD_ERROR}")


@pytest.mark.parametrize("R, C", [(1, 1), (1, 9), (9, 1), (7, 13), (8, 8), (64, 64), (65, 130),
                                  (200, 71), (2048, 128), (128, 2048)])
def test_the_transpose_of_x_bit_for_bit(R, C):
    x = torch.randn(R, C, generator=torch.Generator().manual_seed(R * 1000 + C))
    out = ops.transpose_2d(x)
    assert out.is_contiguous() and out.shape == (C, R)
    assert torch.equal(out, x.t())


def test_rows_any_stride_apart_and_empty_tensors():
    wide = torch.randn(70, 300)
    x = wide[:, 10:150]  # rows 300 apart
    assert torch.equal(ops.transpose_2d(x), x.t())
    for shape in ((0, 5), (5, 0), (0, 0)):
        assert ops.transpose_2d(torch.empty(shape)).shape == shape[::-1]


def test_nan_inf_and_signed_zeros_are_copied_as_they_are():
    x = torch.randn(19, 23)
    x[3, 4], x[5, 6], x[7, 8], x[9, 10] = float("nan"), float("inf"), float("-inf"), -0.0
    out = ops.transpose_2d(x)
    assert torch.equal(out.view(torch.int32), x.t().contiguous().view(torch.int32))


def test_the_same_bits_at_any_thread_count():
    x = torch.randn(300, 517)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(ops.transpose_2d(x))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(results[0], r) for r in results[1:])


@pytest.mark.parametrize("bad, message", [
    (torch.randn(4, 5).double(), "x must have dtype Float, got Double."),
    (torch.randn(4, 5, 6), "x must be a 2-D tensor [rows, columns], got 3-D tensor"),
    (torch.randn(4, 10)[:, ::2], "x must be contiguous in its last dimension (stride 1)"),
])
def test_bad_input_is_refused_with_words_naming_the_argument(bad, message):
    with pytest.raises(RuntimeError) as info:
        ops.transpose_2d(bad)
    assert message in str(info.value)


def test_opcheck():
    torch.library.opcheck(torch.ops.pldr.transpose_2d.default, (torch.randn(37, 70),))


def test_the_linears_weight_gradient_through_it_is_torchs_bit_for_bit_in_values():
    """layers._weight_grad forms gradᵀ (or xᵀ) with transpose_2d: the same operands as torch's
    transposed copy gave, so the same oneDNN result."""
    from pldr_kernels import layers

    if not layers.ONEDNN_MATMUL:
        pytest.skip("oneDNN's matmul is not in this torch build")
    gen = torch.Generator().manual_seed(5)
    for N, out, inner in ((300, 40, 16), (300, 16, 40), (64, 2000, 128)):
        grad, x = torch.randn(N, out, generator=gen), torch.randn(N, inner, generator=gen)
        want = (layers._onednn_mm(x.t().contiguous(), grad.t()).t().contiguous()
                if N * inner + inner * out < N * out
                else layers._onednn_mm(grad.t().contiguous(), x.t()))
        assert torch.equal(layers._weight_grad(grad, x), want)
