"""The fake (meta) kernels refuse what the C++ kernels refuse, with the same words.

Every bad call below is made twice: on real CPU tensors (the C++ checks of csrc/common/checks.h
answer) and on FakeTensors of the same tensors (pldr_kernels/_checks.py answers, as under
torch.compile). Both must raise, with the same message. Then: a call mixing real and meta tensors
is refused (the dispatcher sends it to the fake kernel, which must not return made-up tensors), a
bad call fails when torch.compile traces it, and the checks hold with symbolic shapes.
"""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from pldr_kernels import ops
from pldr_kernels.testing import make_metric_weights, random_g

pytestmark = pytest.mark.skipif(ops._LOAD_ERROR is not None, reason=f"{ops._LOAD_ERROR}")

B, SQ, SK, H, D, SMAX = 2, 5, 7, 2, 64, 8


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def noncontiguous_last_dim(*shape):
    return torch.randn(*shape[:-1], 2 * shape[-1])[..., ::2]


def attention_call(**changes):
    kw = dict(q=randn(B, SQ, H, D), k=randn(B, SK, H, D), v=randn(B, SK, H, D),
              G=random_g(B, H, D), key_mask=torch.rand(B, SK) > 0.3, causal=False, scale=None)
    return kw | changes


def decode_call(**changes):
    kw = dict(q=randn(B, 1, H, D), k_cache=randn(B, SMAX, H, D), v_cache=randn(B, SMAX, H, D),
              cache_seqlens=torch.tensor([3, 5], dtype=torch.int32), k_new=randn(B, 1, H, D),
              v_new=randn(B, 1, H, D), cache_start=torch.tensor([0, 1], dtype=torch.int32),
              G=random_g(B, H, D), scale=None, num_splits=0)
    return kw | changes


def metric_call(**changes):
    kw = dict(q=randn(B, SQ, H, D), q_mask=torch.rand(B, SQ) > 0.3)
    kw |= make_metric_weights(d=D, H=H, R=2, Gd=1, F=8)
    return kw | changes


ATTENTION_BAD = {
    "q rank": dict(q=randn(SQ, H, D)),
    "k rank": dict(k=randn(1, B, SK, H, D)),
    "v rank": dict(v=randn(B, SK, H * D)),
    "q dtype": dict(q=randn(B, SQ, H, D, dtype=torch.float64)),
    "k dtype differs": dict(k=randn(B, SK, H, D, dtype=torch.float16)),
    "head dim 32": dict(q=randn(B, SQ, H, 32), k=randn(B, SK, H, 32), v=randn(B, SK, H, 32),
                        G=None),
    "k batch": dict(k=randn(1, SK, H, D)),
    "k heads": dict(k=randn(B, SK, H + 1, D)),
    "k head dim": dict(k=randn(B, SK, H, 128)),
    "v shape": dict(v=randn(B, SK - 1, H, D)),
    "q last dim strided": dict(q=noncontiguous_last_dim(B, SQ, H, D)),
    "v last dim strided": dict(v=noncontiguous_last_dim(B, SK, H, D)),
    "G dtype": dict(G=random_g(B, H, D).bfloat16()),
    "G rank": dict(G=random_g(B, H, D)[0]),
    "G batch": dict(G=random_g(B + 1, H, D)),
    "G heads": dict(G=random_g(B, H + 1, D)),
    "G head dim": dict(G=random_g(B, H, D)[..., :32]),
    "G transposed": dict(G=random_g(B, H, D).transpose(-1, -2)),
    "key_mask dtype": dict(key_mask=torch.ones(B, SK)),
    "key_mask rank": dict(key_mask=torch.ones(SK, dtype=torch.bool)),
    "key_mask batch": dict(key_mask=torch.ones(1, SK, dtype=torch.bool)),
    "key_mask keys": dict(key_mask=torch.ones(B, SK + 1, dtype=torch.bool)),
    "scale inf": dict(scale=float("inf")),
    "scale nan": dict(scale=float("nan")),
    "scale overflows fp32": dict(scale=1e39),
    "scale·log2(e) overflows fp32": dict(scale=-2.4e38),
}


def _aliased_decode_args():
    """Decode arguments that overlap a cache (docs/design.md §3.5), built once: a fake tensor
    keeps the aliasing of the real tensors it is made from (one FakeTensorMode, one memo)."""
    shared, big = randn(B, SMAX, H, D), randn(B, 64, H, D)
    rows = 6 * 16384 + 2
    buffer = randn(rows * D, dtype=torch.bfloat16)

    def irregular_view(row_stride, offset):
        return buffer.as_strided((1, 16384, 1, D), (rows * D, row_stride * D, D, 1), offset)

    def small(*shape):
        return randn(*shape, dtype=torch.bfloat16)

    return {
        "k_cache is v_cache": dict(k_cache=shared, v_cache=shared),
        "expanded cache": dict(k_cache=randn(1, SMAX, H, D).expand(B, SMAX, H, D)),
        "cache rows overlapping": dict(v_cache=randn(B * SMAX * H * D).as_strided(
            (B, SMAX, H, D), (SMAX * H * D, D, D, 1))),
        "v_cache a row after k_cache": (lambda t: dict(k_cache=t[:, :SMAX], v_cache=t[:, 1:]))(
            randn(B, SMAX + 1, H, D)),
        "q a view of the rows written": dict(k_cache=shared, q=shared[:, 3:4]),
        "v_new a view of v_cache": dict(v_cache=shared, v_new=shared[:, 5:6]),
        "G a view of v_cache": dict(k_cache=randn(B, 64, H, D), v_cache=big,
                                    G=big.view(-1)[:H * D * D].view(1, H, D, D)),
        "cache_seqlens a view of k_cache": dict(k_cache=shared,
                                                cache_seqlens=shared.view(-1).view(torch.int32)[:B]),
        "caches too irregular to check": dict(
            q=small(1, 1, 1, D), k_cache=irregular_view(2, 0), v_cache=irregular_view(6, D),
            cache_seqlens=torch.tensor([0], dtype=torch.int32), k_new=small(1, 1, 1, D),
            v_new=small(1, 1, 1, D), cache_start=None, G=None),
        "k_cache requires grad": dict(k_cache=randn(B, SMAX, H, D).requires_grad_()),
        "v_cache requires grad (non-leaf)": dict(
            v_cache=randn(B, SMAX, H, D).requires_grad_() * 1.0),
    }

DECODE_BAD = {
    "q rank": dict(q=randn(B, H, D)),
    "k_cache rank": dict(k_cache=randn(B, SMAX, H * D)),
    "q dtype": dict(q=randn(B, 1, H, D, dtype=torch.float64)),
    "k_cache dtype differs": dict(k_cache=randn(B, SMAX, H, D, dtype=torch.float16)),
    "head dim 32": dict(q=randn(B, 1, H, 32), k_cache=randn(B, SMAX, H, 32),
                        v_cache=randn(B, SMAX, H, 32), k_new=None, v_new=None, G=None),
    "no new tokens": dict(q=randn(B, 0, H, D), k_new=randn(B, 0, H, D), v_new=randn(B, 0, H, D)),
    "k_cache batch": dict(k_cache=randn(1, SMAX, H, D)),
    "k_cache heads": dict(k_cache=randn(B, SMAX, H + 1, D)),
    "v_cache shape": dict(v_cache=randn(B, SMAX + 1, H, D)),
    "q last dim strided": dict(q=noncontiguous_last_dim(B, 1, H, D)),
    "v_cache last dim strided": dict(v_cache=noncontiguous_last_dim(B, SMAX, H, D)),
    "cache_seqlens dtype": dict(cache_seqlens=torch.tensor([3, 5])),
    "cache_seqlens rank": dict(cache_seqlens=torch.tensor([[3, 5]], dtype=torch.int32)),
    "cache_seqlens batch": dict(cache_seqlens=torch.tensor([3, 5, 1], dtype=torch.int32)),
    "k_new alone": dict(v_new=None),
    "k_new dtype": dict(k_new=randn(B, 1, H, D, dtype=torch.float16)),
    "k_new shape": dict(k_new=randn(B, 2, H, D)),
    "v_new rank": dict(v_new=randn(B, H, D)),
    "more new tokens than the cache holds": dict(q=randn(B, SMAX + 1, H, D),
                                                 k_new=randn(B, SMAX + 1, H, D),
                                                 v_new=randn(B, SMAX + 1, H, D)),
    "cache_start dtype": dict(cache_start=torch.tensor([0, 1])),
    "cache_start batch": dict(cache_start=torch.tensor([0], dtype=torch.int32)),
    "G batch": dict(G=random_g(B + 1, H, D)),
    "G dtype": dict(G=random_g(B, H, D).half()),
    "scale nan": dict(scale=float("nan")),
    "scale overflows fp32": dict(scale=1e39),
    "num_splits negative": dict(num_splits=-1),
} | _aliased_decode_args()

METRIC_BAD = {
    "q rank": dict(q=randn(B, SQ, H * D)),
    "q dtype": dict(q=randn(B, SQ, H, D, dtype=torch.float64)),
    "q last dim strided": dict(q=noncontiguous_last_dim(B, SQ, H, D)),
    "head dim 32": dict(q=randn(B, SQ, H, 32)),
    "q_mask dtype": dict(q_mask=torch.ones(B, SQ, dtype=torch.int32)),
    "q_mask rank": dict(q_mask=torch.ones(B * SQ, dtype=torch.bool)),
    "q_mask batch": dict(q_mask=torch.ones(B + 1, SQ, dtype=torch.bool)),
    "q_mask sequence": dict(q_mask=torch.ones(B, SQ - 1, dtype=torch.bool)),
    "w1 rank": dict(w1=randn(2, 8, D)),
    "w1 empty": dict(w1=randn(0, 1, 8, D)),
    "ln0_w shape": dict(ln0_w=randn(D + 1)),
    "w3 transposed": dict(w3=randn(2, 1, 8, D)),
    "lnA_w shape": dict(lnA_w=randn(3, D)),
    "b dtype": dict(b=randn(H, D, D, dtype=torch.bfloat16)),
    "pw shape": dict(pw=randn(H, D, 32)),
    "ba heads": dict(ba=randn(H + 1, D, D)),
    "eps_ln nan": dict(eps_ln=float("nan")),
    "eps_ln zero": dict(eps_ln=0.0),
    "eps_ln overflows fp32": dict(eps_ln=1e39),
    "eps_adj negative": dict(eps_adj=-1e-9),
    "eps_adj rounds to 0 in fp32": dict(eps_adj=1e-50),
}


def cross_entropy_call(**changes):
    kw = dict(logits=randn(6, 50), targets=torch.tensor([0, 49, -100, 3, 4, 5]), ignore_index=-100)
    return kw | changes


def cross_entropy_backward_call(**changes):
    kw = dict(logits=randn(6, 50), lse=randn(6), targets=torch.tensor([0, 49, -100, 3, 4, 5]),
              grad_nll=randn(6), start=3, end=40, grad_logits=randn(6, 50), ignore_index=-100)
    return kw | changes


CROSS_ENTROPY_BAD = {  # the targets' values are the kernel's check (a fake tensor has none)
    "logits dtype": dict(logits=randn(6, 50, dtype=torch.float64)),
    "logits rank": dict(logits=randn(6, 50, 1)),
    "logits last dim strided": dict(logits=noncontiguous_last_dim(6, 50)),
    "targets dtype": dict(targets=torch.zeros(6, dtype=torch.int32)),
    "targets shape": dict(targets=torch.zeros(5, dtype=torch.int64)),
}
CROSS_ENTROPY_BACKWARD_BAD = CROSS_ENTROPY_BAD | {
    "lse shape": dict(lse=randn(5)),
    "grad_nll dtype": dict(grad_nll=randn(6, dtype=torch.bfloat16)),
    "start negative": dict(start=-1),
    "end before start": dict(start=10, end=9),
    "end past the vocabulary": dict(end=51),
    "grad_logits shape": dict(grad_logits=randn(6, 49)),
    "grad_logits last dim strided": dict(grad_logits=noncontiguous_last_dim(6, 50)),
}



def transpose_call(**changes):
    return dict(x=randn(6, 50)) | changes


TRANSPOSE_BAD = {
    "x dtype": dict(x=randn(6, 50, dtype=torch.float16)),
    "x rank": dict(x=randn(6, 50, 2)),
    "x last dim strided": dict(x=noncontiguous_last_dim(6, 50)),
}

LAYER_D, LAYER_I = H * D, 40  # decode_layer: hidden size and FFN width


def decode_layer_call(**changes):
    Dm, I = LAYER_D, LAYER_I
    kw = dict(x=randn(B, 1, Dm), qkv_weight=randn(3 * Dm, Dm), qkv_bias=randn(3 * Dm),
              qkv_scale=None, dense_weight=randn(Dm, Dm), dense_bias=randn(Dm), dense_scale=None,
              ln1_weight=randn(Dm), ln1_bias=randn(Dm), ffn_w12=randn(2 * I, Dm),
              ffn_b12=randn(2 * I), ffn_s12=None, ffn_w3=randn(Dm, I), ffn_b3=randn(Dm),
              ffn_s3=None, ln2_weight=randn(Dm), ln2_bias=randn(Dm),
              k_cache=randn(B, SMAX, H, D), v_cache=randn(B, SMAX, H, D),
              cache_seqlens=torch.tensor([3, 5], dtype=torch.int32),
              cache_start=torch.tensor([0, 1], dtype=torch.int32), G=random_g(B, H, D),
              rope_cos=randn(B, 1, 1, D // 2), rope_sin=randn(B, 1, 1, D // 2),
              interleaved_rope=True, eps=1e-6)
    return kw | changes


def int8(*shape):
    return torch.randint(-127, 128, shape, dtype=torch.int8)


DECODE_LAYER_BAD = {
    "x rank": dict(x=randn(B, LAYER_D)),
    "x two tokens": dict(x=randn(B, 2, LAYER_D)),
    "x dtype": dict(x=randn(B, 1, LAYER_D, dtype=torch.float16)),
    "x last dim strided": dict(x=noncontiguous_last_dim(B, 1, LAYER_D)),
    "x hidden size": dict(x=randn(B, 1, LAYER_D + 1)),
    "k_cache rank": dict(k_cache=randn(B, SMAX, LAYER_D)),
    "qkv_weight shape": dict(qkv_weight=randn(2 * LAYER_D, LAYER_D)),
    "qkv_weight dtype": dict(qkv_weight=randn(3 * LAYER_D, LAYER_D, dtype=torch.float16)),
    "qkv_bias shape": dict(qkv_bias=randn(LAYER_D)),
    "qkv_scale missing": dict(qkv_weight=int8(3 * LAYER_D, LAYER_D)),
    "qkv_scale without int8": dict(qkv_scale=randn(3 * LAYER_D)),
    "dense_weight transposed": dict(dense_weight=randn(LAYER_D, LAYER_D).t()),
    "dense_scale shape": dict(dense_weight=int8(LAYER_D, LAYER_D), dense_scale=randn(3)),
    "ffn_w12 odd rows": dict(ffn_w12=randn(2 * LAYER_I + 1, LAYER_D),
                             ffn_b12=randn(2 * LAYER_I + 1)),
    "ffn_s12 dtype": dict(ffn_w12=int8(2 * LAYER_I, LAYER_D),
                          ffn_s12=randn(2 * LAYER_I, dtype=torch.bfloat16)),
    "ffn_w3 width": dict(ffn_w3=randn(LAYER_D, LAYER_I + 1)),
    "ffn_b3 dtype": dict(ffn_b3=randn(LAYER_D, dtype=torch.float64)),
    "ln1_weight shape": dict(ln1_weight=randn(LAYER_D - 1)),
    "ln2_bias dtype": dict(ln2_bias=randn(LAYER_D, dtype=torch.float16)),
    "rope_cos shape": dict(rope_cos=randn(B, 1, 1, D)),
    "rope_sin dtype": dict(rope_sin=randn(B, 1, 1, D // 2, dtype=torch.bfloat16)),
    "rope_cos rotate_half shape": dict(interleaved_rope=False),
    "eps nan": dict(eps=float("nan")),
    "v_cache shape": dict(v_cache=randn(B, SMAX - 1, H, D)),
    "cache_seqlens dtype": dict(cache_seqlens=torch.tensor([3, 5])),
    "G heads": dict(G=random_g(B, H + 1, D)),
    "k_cache is v_cache": (lambda t: dict(k_cache=t, v_cache=t))(randn(B, SMAX, H, D)),
}

CASES = ([("g_attention", attention_call, name, bad) for name, bad in ATTENTION_BAD.items()]
         + [("g_attention_decode", decode_call, name, bad) for name, bad in DECODE_BAD.items()]
         + [("metric_tensors", metric_call, name, bad) for name, bad in METRIC_BAD.items()]
         + [("cross_entropy_forward", cross_entropy_call, name, bad)
            for name, bad in CROSS_ENTROPY_BAD.items()]
         + [("cross_entropy_backward", cross_entropy_backward_call, name, bad)
            for name, bad in CROSS_ENTROPY_BACKWARD_BAD.items()]
         + [("transpose_2d", transpose_call, name, bad) for name, bad in TRANSPOSE_BAD.items()]
         + [("decode_layer", decode_layer_call, name, bad)
            for name, bad in DECODE_LAYER_BAD.items()])


def error_of(op: str, kwargs: dict) -> str:
    with pytest.raises(RuntimeError) as info:
        getattr(torch.ops.pldr, op)(**kwargs)
    return str(info.value)


def as_fake(mode: FakeTensorMode, kwargs: dict) -> dict:
    return {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


@pytest.mark.parametrize("op, make, name, bad", CASES, ids=[f"{c[0]}: {c[2]}" for c in CASES])
def test_fake_kernel_refuses_a_bad_call_as_the_kernel_does(op, make, name, bad):
    kwargs = make(**bad)
    real_error = error_of(op, kwargs)
    mode = FakeTensorMode()
    fake_kwargs = as_fake(mode, kwargs)
    with mode:
        fake_error = error_of(op, fake_kwargs)
    assert fake_error == real_error


@pytest.mark.parametrize("op, make", [("g_attention", attention_call),
                                      ("g_attention_decode", decode_call),
                                      ("metric_tensors", metric_call),
                                      ("cross_entropy_forward", cross_entropy_call),
                                      ("cross_entropy_backward", cross_entropy_backward_call),
                                      ("transpose_2d", transpose_call),
                                      ("decode_layer", decode_layer_call)])
def test_fake_kernel_accepts_the_good_call_with_the_kernels_output_shapes(op, make):
    kwargs = make()
    real = getattr(torch.ops.pldr, op)(**kwargs)
    mode = FakeTensorMode()
    fake_kwargs = as_fake(mode, kwargs)
    with mode:
        fake = getattr(torch.ops.pldr, op)(**fake_kwargs)
    real, fake = (x if isinstance(x, tuple) else (x,) for x in (real, fake))
    assert [(t.shape, t.dtype, t.device) for t in fake] == [(t.shape, t.dtype, t.device)
                                                            for t in real]


# Every tensor argument of every op.
MIXED = ([("g_attention", attention_call, arg) for arg in ("k", "v", "G", "key_mask")]
         + [("g_attention_decode", decode_call, arg)
            for arg in ("k_cache", "v_cache", "cache_seqlens", "k_new", "v_new", "cache_start",
                        "G")]
         + [("metric_tensors", metric_call, arg)
            for arg in ("q_mask", *make_metric_weights(d=D, H=H, R=1, Gd=1, F=8))])


@pytest.mark.parametrize("op, make, arg", MIXED, ids=[f"{m[0]}: {m[2]} on meta" for m in MIXED])
def test_a_meta_tensor_beside_a_cpu_q_is_refused(op, make, arg):
    # Meta outranks CPU in dispatch, so this call reaches the fake kernel, not the CPU one.
    kwargs = make()
    kwargs[arg] = kwargs[arg].to("meta")
    assert error_of(op, kwargs) == (f"{arg} must be on the same device as q (cpu), got meta. "
                                    "Move it with .to(q.device).")


OPS = [("g_attention", attention_call, "k"), ("g_attention_decode", decode_call, "k_cache"),
       ("metric_tensors", metric_call, "q_mask")]  # the op, its call, the first device check


@pytest.mark.parametrize("op, make, first", OPS, ids=[o[0] for o in OPS])
def test_a_meta_q_with_cpu_tensors_is_refused(op, make, first):
    kwargs = make()
    kwargs["q"] = kwargs["q"].to("meta")
    assert error_of(op, kwargs).startswith(
        f"{first} must be on the same device as q (meta), got cpu.")


@pytest.mark.parametrize("op, make, first", OPS, ids=[o[0] for o in OPS])
def test_all_meta_call_gives_meta_outputs_of_the_kernels_shapes(op, make, first):
    kwargs = make()
    real = getattr(torch.ops.pldr, op)(**kwargs)
    meta = getattr(torch.ops.pldr, op)(**{k: v.to("meta") if isinstance(v, torch.Tensor) else v
                                          for k, v in kwargs.items()})
    real, meta = (x if isinstance(x, tuple) else (x,) for x in (real, meta))
    assert [(t.shape, t.dtype, t.device.type) for t in meta] == [(t.shape, t.dtype, "meta")
                                                                 for t in real]


def test_torch_compile_reports_a_bad_call_while_tracing():
    torch._dynamo.reset()

    def attend(q, k, v, G):
        return ops.g_attention(q, k, v, G, causal=True)[0] * 2

    kw = attention_call(G=random_g(B, H, D).double())
    compiled = torch.compile(attend, fullgraph=True, backend="eager")
    with pytest.raises(Exception, match=r"G must have dtype Float, got Double"):
        compiled(kw["q"], kw["k"], kw["v"], kw["G"])


def test_checks_hold_with_symbolic_shapes():
    torch._dynamo.reset()

    def attend(q, k, v, G, key_mask):
        return ops.g_attention(q, k, v, G, key_mask)[0] + 1

    compiled = torch.compile(attend, fullgraph=True, backend="eager", dynamic=True)
    for sq, sk in ((5, 7), (9, 12)):
        kw = attention_call(q=randn(B, sq, H, D), k=randn(B, sk, H, D), v=randn(B, sk, H, D),
                            key_mask=torch.rand(B, sk) > 0.3)
        args = (kw["q"], kw["k"], kw["v"], kw["G"], kw["key_mask"])
        torch.testing.assert_close(compiled(*args), attend(*args), rtol=0, atol=0)
    bad = attention_call(key_mask=torch.ones(B, SK + 3, dtype=torch.bool))
    with pytest.raises(Exception, match=r"key_mask\.shape\[1\] \(keys\) must be"):
        compiled(bad["q"], bad["k"], bad["v"], bad["G"], bad["key_mask"])


def test_decode_checks_hold_with_symbolic_shapes():
    """The overlap search of _checks.py runs on symbolic strides (guards, not errors): a compiled
    dynamic-shape step matches eager on plain and head-sliced caches and refuses aliased ones."""
    torch._dynamo.reset()

    def step(q, k_cache, v_cache, lens, k_new, v_new, G):
        return ops.g_attention_decode(q, k_cache, v_cache, lens, k_new, v_new, G=G) + 1

    compiled = torch.compile(step, fullgraph=True, backend="eager", dynamic=True)
    with torch.no_grad():
        for b, smax, pad in ((2, 16, 0), (3, 24, 0), (3, 20, 1)):
            kw = decode_call(q=randn(b, 1, H, D), k_cache=randn(b, smax, H + pad, D)[:, :, :H],
                             v_cache=randn(b, smax, H + pad, D)[:, :, :H],
                             cache_seqlens=torch.full((b,), 5, dtype=torch.int32),
                             k_new=randn(b, 1, H, D), v_new=randn(b, 1, H, D),
                             G=random_g(b, H, D))
            args = [kw[n] for n in ("q", "k_cache", "v_cache", "cache_seqlens", "k_new", "v_new",
                                    "G")]
            eager_caches = [args[1].clone(), args[2].clone()]
            want = step(args[0], *eager_caches, *args[3:])
            torch.testing.assert_close(compiled(*args), want, rtol=0, atol=0)
            assert torch.equal(args[1], eager_caches[0]) and torch.equal(args[2], eager_caches[1])
        args[2] = args[1]
        with pytest.raises(Exception, match="k_cache and v_cache must not overlap in memory"):
            compiled(*args)
