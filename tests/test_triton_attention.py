"""The Triton kernels of pldr_kernels/triton_kernels (docs/design.md §3.7) against the fp64
reference by the rule of docs/design.md §4: the forward's (out, lse) by ``check_g_attention``, the
backward's (dq, dk, dv, dG) against fp64 autograd of ``reference.g_attention``, the peer being
PyTorch autograd of ``testing.g_attention_peer`` in the inputs' dtype (docs/design.md §4.5).

Where a GPU is visible the kernels run compiled, on CUDA tensors. Elsewhere they run on CPU
tensors through Triton's interpreter: this module sets ``TRITON_INTERPRET=1`` when it is collected,
before anything imports triton (see ``import_kernels``); on a GPU machine it leaves the variable
alone. The interpreter is slow, so the shapes are tiny (several tiles and partial ones still, since
the interpreter's tiles are 16–32 rows).
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import pytest
import torch
from cases import LOW_PRECISION, generator, same_bits
from test_g_attention import Case

from pldr_kernels import ops, reference, testing
from pldr_kernels import triton_kernels as tk

KERNELS = "pldr_kernels.triton_kernels.attention"


def import_kernels(interpret: bool):
    """The kernel module, compiled for the GPU or (``interpret``) run by Triton's interpreter.

    For the interpreter, ``TRITON_INTERPRET=1`` is set here, at collection, and stays set: Triton
    reads it when it decorates its own library (the first ``import triton``) and this module's
    kernels, and again when a launch first imports parts of triton lazily. Only machines without
    a GPU get it, where nothing else in the test run uses Triton."""
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    module = importlib.import_module(KERNELS)
    if module.INTERPRETED != interpret:
        module = importlib.reload(module)
    return module


def _kernels_or_skip_reason():
    if importlib.util.find_spec("triton") is None:
        return None, "the Triton kernels need triton (pip install triton)"
    module = import_kernels(interpret=not torch.cuda.is_available())
    if module.INTERPRETED and module._TRITON_IMPORTED_COMPILED:
        return None, ("triton was imported before this module could set TRITON_INTERPRET=1; run "
                      "TRITON_INTERPRET=1 python -m pytest tests/test_triton_attention.py")
    return module, None


kernels, SKIP_REASON = _kernels_or_skip_reason()
DEVICE = "cpu" if kernels is None or kernels.INTERPRETED else "cuda"
needs_kernels = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")


def on(*tensors):
    return [None if t is None else t.to(DEVICE) for t in tensors]


# --------------------------------------------------------------------------------------------
# The backward's rule
# --------------------------------------------------------------------------------------------
def autograd_grads(fn, dout, q, k, v, G, key_mask, causal, scale=None):
    """(dq, dk, dv, dG) of ``fn``'s out by PyTorch autograd, for the output gradient ``dout``."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    G_leaf = None if G is None else G.detach().clone().requires_grad_(True)
    out, _ = fn(*leaves, G_leaf, key_mask, causal, scale)
    out.backward(dout.to(out.dtype))
    return (*(t.grad for t in leaves), None if G_leaf is None else G_leaf.grad)


def check_grads(grads, dout, q, k, v, G, key_mask, causal, scale=None) -> testing.Verdict:
    """Each gradient against fp64 autograd of the reference: the fp32 rule for fp32 inputs, else
    the peer rule against autograd of the same-dtype peer (inputs: CPU tensors)."""
    oracle = autograd_grads(reference.g_attention, dout.double(), q.double(), k.double(),
                            v.double(), None if G is None else G.double(), key_mask, causal,
                            scale)
    peer = (None,) * 4 if q.dtype == torch.float32 else autograd_grads(
        testing.g_attention_peer, dout, q, k, v, G, key_mask, causal, scale)
    names = ("dq", "dk", "dv", "dG")
    assert (grads[3] is None) == (G is None)
    parts = [testing.compare(got.cpu(), want, p, name=name)
             for got, want, p, name in zip(grads, oracle, peer, names) if want is not None]
    return testing.Verdict.combine("g_attention_backward", parts)


def output_gradient(case: Case):
    return testing.randn(
        (case.B, case.Sq, case.H, case.d), case.dtype, generator=generator(case.id + "-dout"))


# --------------------------------------------------------------------------------------------
# Cases: tiny, each through several tiles of the interpreter's configuration
# --------------------------------------------------------------------------------------------
FORWARD_CASES = [
    Case(2, 37, 70, 2, 64, torch.float32, True, "batch", "ragged"),
    Case(1, 64, 64, 2, 64, torch.float32, False, "none"),
    Case(2, 33, 33, 1, 128, torch.float32, False, "shared", "holes", scale=0.3),
    Case(2, 64, 64, 2, 64, torch.float16, False, "shared"),
    Case(1, 1, 50, 2, 64, torch.float16, True, "batch", "ragged"),
    Case(2, 70, 37, 1, 64, torch.bfloat16, True, "none"),
    Case(2, 37, 70, 2, 64, torch.bfloat16, False, "batch", "holes"),
    Case(1, 33, 33, 1, 128, torch.bfloat16, True, "batch"),
]

BACKWARD_CASES = [
    Case(2, 37, 70, 2, 64, torch.float32, True, "batch", "ragged"),
    Case(1, 100, 100, 1, 64, torch.float32, True, "shared"),
    Case(2, 64, 33, 1, 64, torch.float32, False, "none", "holes"),
    Case(1, 33, 33, 1, 128, torch.float32, True, "batch", scale=-0.2),
    Case(2, 64, 64, 2, 64, torch.float16, False, "shared", "ragged"),
    Case(1, 70, 37, 2, 64, torch.float16, True, "batch"),
    Case(2, 37, 70, 1, 64, torch.bfloat16, True, "shared", "holes"),
    Case(2, 100, 64, 1, 64, torch.bfloat16, False, "batch"),
    Case(1, 33, 33, 1, 128, torch.bfloat16, False, "none", "ragged"),
]


@needs_kernels
@pytest.mark.parametrize("case", FORWARD_CASES, ids=lambda c: c.id)
def test_forward_matches_reference(case):
    q, k, v, G, mask = case.inputs()
    out, lse = kernels.g_attention_forward(*on(q, k, v, G, mask), case.causal, case.scale)
    assert out.dtype == q.dtype and out.shape == q.shape and out.device.type == DEVICE
    assert lse.dtype == torch.float32 and lse.shape == (case.B, case.H, case.Sq)
    testing.check_g_attention(out.cpu(), lse.cpu(), q, k, v, G, mask, case.causal,
                              case.scale).assert_ok()


@needs_kernels
@pytest.mark.parametrize("case", BACKWARD_CASES, ids=lambda c: c.id)
def test_backward_matches_fp64_autograd(case):
    q, k, v, G, mask = case.inputs()
    dout = output_gradient(case)
    args = on(q, k, v, G, mask)
    out, lse = kernels.g_attention_forward(*args, case.causal, case.scale)
    dq, dk, dv, dG = kernels.g_attention_backward(dout.to(DEVICE), *args[:4], out, lse, args[4],
                                                  case.causal, case.scale)
    for grad, like in ((dq, q), (dk, k), (dv, v)):
        assert grad.dtype == q.dtype and grad.shape == like.shape and grad.is_contiguous()
    if G is not None:
        assert dG.dtype == torch.float32 and dG.shape == G.shape
    check_grads((dq, dk, dv, dG), dout, q, k, v, G, mask, case.causal, case.scale).assert_ok()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_strided_views(dtype):
    """q, k, v as views of one fused projection, dout and out permuted views, G and key_mask
    slices of wider tensors, lse a view: every stride is honoured, forward and backward."""
    B, S, H, d = 2, 40, 2, 64
    gen = generator(f"strided-{dtype}")
    qkv = testing.randn((B, S, 3, H, d), dtype, generator=gen)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    G = testing.random_g(B, H, 2 * d, generator=gen)[..., :d, :d]
    mask = (torch.rand(B, 2 * S, generator=gen) > 0.3)[:, ::2]
    dout = testing.randn((B, H, S, d), dtype, generator=gen).permute(0, 2, 1, 3)
    assert not (q.is_contiguous() or G.is_contiguous() or mask.is_contiguous()
                or dout.is_contiguous())
    dev = on(q, k, v, G, mask, dout)
    out, lse = kernels.g_attention_forward(*dev[:5], True)
    testing.check_g_attention(out.cpu(), lse.cpu(), q, k, v, G, mask, True).assert_ok()
    out_view = out.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    lse_view = torch.cat([lse, lse], -1)[..., :S]
    grads = kernels.g_attention_backward(dev[5], *dev[:4], out_view, lse_view, dev[4], True, None)
    check_grads(grads, dout, q, k, v, G, mask, True).assert_ok()


@needs_kernels
def test_rows_and_keys_without_attention_get_exactly_zero():
    """A query row that sees no key: out 0, lse −inf, dq 0; a key no query sees: dk = dv = 0;
    dG gets nothing from such rows (its oracle is checked too)."""
    case = Case(2, 40, 40, 1, 64, torch.float16, True, "batch")
    q, k, v, G, _ = case.inputs()
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[0, :20] = False  # causal: queries 0..19 of row 0 see nothing, keys 0..19 are never seen
    mask[1] = False       # row 1 sees nothing at all
    dout = output_gradient(case)
    args = on(q, k, v, G, mask)
    out, lse = kernels.g_attention_forward(*args, True)
    dq, dk, dv, dG = kernels.g_attention_backward(dout.to(DEVICE), *args[:4], out, lse, args[4],
                                                  True, None)
    out, lse, dq, dk, dv, dG = (t.cpu() for t in (out, lse, dq, dk, dv, dG))
    assert torch.isneginf(lse[0, :, :20]).all() and torch.isneginf(lse[1]).all()
    for t in (out, dq):
        assert (t[0, :20] == 0).all() and (t[1] == 0).all()
    for t in (dk, dv):
        assert (t[0, :20] == 0).all() and (t[1] == 0).all()
        assert (t[0, 20:] != 0).any()
    assert (dG[1] == 0).all()
    check_grads((dq, dk, dv, dG), dout, q, k, v, G, mask, True).assert_ok()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_deterministic_bitwise(dtype):
    """Two runs give the same bits (no atomics; dG's partials summed in a fixed order, over the
    batch too for a shared G; several dq programs per (b, h))."""
    case = Case(2, 70, 70, 1, 64, dtype, True, "shared", "ragged")
    q, k, v, G, mask = on(*case.inputs())
    dout = output_gradient(case).to(DEVICE)
    runs = []
    for _ in range(2):
        out, lse = kernels.g_attention_forward(q, k, v, G, mask, True)
        runs.append((out, lse, *kernels.g_attention_backward(dout, q, k, v, G, out, lse, mask,
                                                             True, None)))
    assert all(same_bits(a, b) for a, b in zip(*runs))


@needs_kernels
def test_dq_splits_depend_on_shapes_only():
    cfg = kernels.config(64, torch.bfloat16)
    assert kernels.dq_splits(1, 1, 1, cfg) == 1
    assert kernels.dq_splits(1000, 1, 1, cfg) == cfg.dq_programs
    assert kernels.dq_splits(1000, 4096, 32, cfg) == 1


# --------------------------------------------------------------------------------------------
# Arguments, registration, and what a machine without Triton gets
# --------------------------------------------------------------------------------------------
@needs_kernels
def test_backward_arguments_are_checked():
    q, k, v, G, mask = on(*Case(1, 8, 8, 1, 64, torch.float32, False).inputs())
    out, lse = torch.zeros_like(q), torch.zeros(1, 1, 8, device=DEVICE)
    bad = {
        "dout": (q[:, :4], out, lse, r"dout must have shape \[1, 8, 1, 64\], got \[1, 4, 1, 64\]"),
        "out": (q, out.half(), lse, "out must have dtype Float, got Half"),
        "lse": (q, out, lse.double(), "lse must have dtype Float, got Double"),
    }
    for dout, o, lse_arg, message in bad.values():
        with pytest.raises(RuntimeError, match=message):
            kernels.g_attention_backward(dout, q, k, v, G, o, lse_arg, mask, False, None)
    with pytest.raises(RuntimeError, match="q.shape\\[-1\\] \\(head dim d\\) must be 64 or 128"):
        kernels.g_attention_forward(q[..., :32], k[..., :32], v[..., :32])


@needs_kernels
def test_refuses_tensors_of_the_other_mode():
    q = torch.zeros(1, 8, 1, 64, device="meta")
    expected = "TRITON_INTERPRET=1" if kernels.INTERPRETED else "run on CUDA tensors"
    with pytest.raises(RuntimeError, match=expected):
        kernels.g_attention_forward(q, q, q)


@pytest.mark.skipif(ops._LOAD_ERROR is not None, reason="pldr_kernels._C is not built")
def test_registered_on_the_cuda_key():
    """The backward always; the forward only in a build without CUDA kernels (where the CUDA
    kernels exist they stay the default)."""
    assert tk.REGISTERED == tk.ops_to_register(ops.built_with_cuda(), True)
    assert ("g_attention" in tk.REGISTERED) == (not ops.built_with_cuda())
    assert torch._C._dispatch_has_kernel_for_dispatch_key("pldr::g_attention_backward", "CUDA")
    assert tk.ops_to_register(True, True) == ("g_attention_backward",)
    assert tk.ops_to_register(False, True) == ("g_attention", "g_attention_backward")


def test_without_triton_the_cuda_kernels_say_what_to_install(monkeypatch):
    monkeypatch.setattr(tk, "triton_available", lambda: False)
    q = torch.zeros(1, 8, 1, 64)
    with pytest.raises(RuntimeError, match=r"Triton is not installed: `pip install triton`.*"
                       r"or rebuild pldr_kernels with its CUDA kernels"):
        tk.g_attention_cuda(q, q, q)
    with pytest.raises(RuntimeError, match=r"pldr::g_attention_backward on CUDA tensors runs "
                       r"Triton kernels here, and Triton is not installed"):
        tk.g_attention_backward_cuda(q, q, q, q, None, q, q[:, 0], None, False, None)


@needs_kernels
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(ops._LOAD_ERROR is not None, reason="pldr_kernels._C is not built")
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "fp16"])
def test_dispatcher_runs_the_triton_kernels_on_cuda(dtype):
    """torch.ops.pldr.* on CUDA tensors reach the Triton kernels: the backward always (bitwise
    the launcher's result), the forward in a build without CUDA kernels (else the CUDA kernel's
    (out, lse), which the Triton backward also takes)."""
    case = Case(2, 70, 70, 2, 64, dtype, True, "shared", "ragged")
    q, k, v, G, mask = case.inputs()
    args = on(q, k, v, G, mask)
    out, lse = torch.ops.pldr.g_attention(*args, True, None)
    testing.check_g_attention(out.cpu(), lse.cpu(), q, k, v, G, mask, True).assert_ok()
    if not ops.built_with_cuda():
        triton_out = kernels.g_attention_forward(*args, True)
        assert same_bits(out, triton_out[0]) and same_bits(lse, triton_out[1])
    dout = output_gradient(case).cuda()
    grads = torch.ops.pldr.g_attention_backward(dout, *args[:4], out, lse, args[4], True, None)
    direct = kernels.g_attention_backward(dout, *args[:4], out, lse, args[4], True, None)
    assert all(same_bits(a, b) for a, b in zip(grads, direct))
    check_grads(grads, output_gradient(case), q, k, v, G, mask, True).assert_ok()
