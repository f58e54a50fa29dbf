"""pldr::g_attention (DESIGN.md §3.2) against reference.g_attention run in fp64."""
from __future__ import annotations

import math

import pytest
import torch
from testing import DTYPES, assert_close_to_reference, random_g

from pldr_kernels import reference

g_attention = torch.ops.pldr.g_attention


def make_qkv(B, Sq, Sk, H, d, dtype):
    q = torch.randn(B, Sq, H, d).to(dtype)
    k = torch.randn(B, Sk, H, d).to(dtype)
    v = torch.randn(B, Sk, H, d).to(dtype)
    return q, k, v


def make_g(mode, B, H, d):
    return {"none": None, "per_batch": random_g(B, H, d), "shared": random_g(1, H, d)}[mode]


def reference64(q, k, v, G=None, key_mask=None, causal=False, scale=None):
    return reference.g_attention(q.double(), k.double(), v.double(),
                                 None if G is None else G.double(), key_mask, causal, scale)


def eager_same_dtype(q, k, v, G=None, key_mask=None, causal=False, scale=None):
    """The same math done by PyTorch in q's dtype (the low-precision peer of DESIGN §4)."""
    dt = q.dtype
    B, Sq, H, d = q.shape
    Sk = k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qt = q if G is None else torch.einsum("bshi,bhij->bshj", q, G.to(dt))
    scores = torch.matmul(qt.permute(0, 2, 1, 3), k.permute(0, 2, 3, 1)) * scale
    visible = torch.ones(B, 1, Sq, Sk, dtype=torch.bool)
    if causal:
        visible = visible & (torch.arange(Sk)[None, :] <= torch.arange(Sq)[:, None] + Sk - Sq)
    if key_mask is not None:
        visible = visible & key_mask[:, None, None, :]
    p = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.matmul(p, v.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)


def check_against_reference(q, k, v, G=None, key_mask=None, causal=False, scale=None):
    out, lse = g_attention(q, k, v, G, key_mask, causal, scale)
    ref_out, ref_lse = reference64(q, k, v, G, key_mask, causal, scale)
    assert out.dtype == q.dtype and out.shape == q.shape and out.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    peer = None if q.dtype == torch.float32 else eager_same_dtype(q, k, v, G, key_mask, causal, scale)
    assert_close_to_reference(out, ref_out, peer, name="out")
    # lse depends on the inputs only through fp32 arithmetic, whatever the input dtype
    assert_close_to_reference(lse, ref_lse, name="lse")
    return out, lse


SHAPES = [(1, 1, 1), (2, 7, 7), (1, 97, 97), (2, 7, 97), (2, 97, 7), (1, 1, 97), (1, 130, 65)]


@pytest.mark.parametrize("B,Sq,Sk", SHAPES)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("g_mode", ["none", "per_batch", "shared"])
@pytest.mark.parametrize("causal", [False, True])
def test_fp32_matches_reference(B, Sq, Sk, d, g_mode, causal):
    H = 2
    q, k, v = make_qkv(B, Sq, Sk, H, d, torch.float32)
    check_against_reference(q, k, v, make_g(g_mode, B, H, d), causal=causal)


LOW_PRECISION_CASES = [(d, g_mode) for d in (64, 128) for g_mode in ("none", "per_batch", "shared")
                       if d == 64 or g_mode == "per_batch"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,Sq,Sk", [(2, 7, 7), (2, 97, 97), (1, 7, 97), (2, 97, 7)])
@pytest.mark.parametrize("d,g_mode", LOW_PRECISION_CASES)
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision_matches_reference(dtype, B, Sq, Sk, d, g_mode, causal):
    H = 2
    q, k, v = make_qkv(B, Sq, Sk, H, d, dtype)
    check_against_reference(q, k, v, make_g(g_mode, B, H, d), causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_long_sequence_1025(dtype, causal):
    q, k, v = make_qkv(1, 1025, 1025, 2, 64, dtype)
    check_against_reference(q, k, v, random_g(1, 2, 64), causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
def test_explicit_scale(dtype):
    q, k, v = make_qkv(2, 33, 70, 2, 64, dtype)
    check_against_reference(q, k, v, random_g(2, 2, 64), causal=True, scale=0.3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_ragged_key_mask_and_batch_invariance(dtype, causal):
    """Right-padded batch with ragged lengths: each row equals that row run alone, unpadded."""
    B, S, H, d = 3, 97, 2, 64
    lengths = [97, 40, 1]
    q, k, v = make_qkv(B, S, S, H, d, dtype)
    key_mask = torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]
    G = random_g(B, H, d)
    out, lse = check_against_reference(q, k, v, G, key_mask, causal)
    for b, n in enumerate(lengths):
        sl = slice(b, b + 1)
        alone_out, alone_lse = g_attention(q[sl, :n], k[sl, :n], v[sl, :n], G[sl], None, causal)
        torch.testing.assert_close(out[sl, :n], alone_out, rtol=0, atol=0)
        torch.testing.assert_close(lse[sl, :, :n], alone_lse, rtol=0, atol=0)


def test_key_mask_with_holes():
    """An arbitrary (non-prefix) mask, including a fully padded key tile and left padding."""
    B, Sq, Sk, H, d = 2, 50, 200, 2, 64
    q, k, v = make_qkv(B, Sq, Sk, H, d, torch.float32)
    key_mask = torch.rand(B, Sk) > 0.5
    key_mask[0, :150] = False  # left padding spanning whole key tiles
    for causal in (False, True):
        check_against_reference(q, k, v, random_g(1, H, d), key_mask, causal)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fully_masked_rows_give_zero(dtype):
    B, Sq, Sk, H, d = 2, 7, 70, 2, 64
    q, k, v = make_qkv(B, Sq, Sk, H, d, dtype)
    key_mask = torch.ones(B, Sk, dtype=torch.bool)
    key_mask[1] = False
    out, lse = check_against_reference(q, k, v, None, key_mask)
    assert torch.count_nonzero(out[1]) == 0
    assert torch.isneginf(lse[1]).all() and torch.isfinite(lse[0]).all()
    # causal with Sq > Sk: the first Sq - Sk queries see no key at all
    q2, k2, v2 = make_qkv(1, 20, 5, H, d, dtype)
    out2, lse2 = check_against_reference(q2, k2, v2, None, None, True)
    assert torch.count_nonzero(out2[:, :15]) == 0 and torch.isneginf(lse2[..., :15]).all()
    assert torch.isfinite(lse2[..., 15:]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(dtype):
    """q, k, v sliced out of a fused qkv tensor, and a [B,H,S,d] tensor viewed as [B,S,H,d]."""
    B, S, H, d = 2, 97, 3, 64
    qkv = torch.randn(B, S, 3, H, d).to(dtype)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    assert not q.is_contiguous()
    G = random_g(B, H, d)
    out, lse = check_against_reference(q, k, v, G, causal=True)
    out_c, lse_c = g_attention(q.contiguous(), k.contiguous(), v.contiguous(), G, None, True)
    torch.testing.assert_close(out, out_c, rtol=0, atol=0)
    torch.testing.assert_close(lse, lse_c, rtol=0, atol=0)
    heads_first = torch.randn(B, H, S, d).to(dtype).transpose(1, 2)  # stride(1) = d
    check_against_reference(heads_first, k, v, G, causal=False)
    # G itself may be a strided view too (only its last dim must be contiguous)
    G_wide = torch.randn(B, H, d, 2 * d)[..., :d]
    G_view = G_wide.copy_(G)
    check_against_reference(q, k, v, G_view, causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_broadcast_views(dtype):
    """Stride-0 (expanded) dims: the same token repeated, heads sharing one G row pattern."""
    B, S, H, d = 2, 70, 2, 64
    q = torch.randn(B, 1, H, d).to(dtype).expand(B, S, H, d)
    k = torch.randn(B, S, 1, d).to(dtype).expand(B, S, H, d)
    v = torch.randn(1, S, H, d).to(dtype).expand(B, S, H, d)
    G = (0.1 * torch.randn(1, 1, 1, d)).expand(B, H, d, d)  # every row of G the same: stride(2) = 0
    assert q.stride(1) == 0 and G.stride(2) == 0
    check_against_reference(q, k, v, G, causal=True)
    check_against_reference(q[:, :1], k[:, :1], v[:, :1], G, causal=False)


def test_deterministic_bitwise():
    q, k, v = make_qkv(2, 300, 300, 3, 64, torch.float32)
    G = random_g(2, 3, 64)
    key_mask = torch.rand(2, 300) > 0.2
    first = g_attention(q, k, v, G, key_mask, True)
    second = g_attention(q, k, v, G, key_mask, True)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    # each query tile is computed the same way whichever thread runs it
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = g_attention(q, k, v, G, key_mask, True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first[0], single[0]) and torch.equal(first[1], single[1])


def test_identity_g_equals_no_g():
    q, k, v = make_qkv(1, 65, 65, 2, 64, torch.float32)
    eye = torch.eye(64).expand(1, 2, 64, 64).contiguous()
    a = g_attention(q, k, v, eye, None, True)
    b = g_attention(q, k, v, None, None, True)
    torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=1e-6)


def test_matches_sdpa_without_g():
    q, k, v = make_qkv(2, 97, 97, 2, 64, torch.float32)
    out, _ = g_attention(q, k, v, None, None, True)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    torch.testing.assert_close(out, sdpa.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_empty_batch():
    q, k, v = make_qkv(0, 7, 7, 2, 64, torch.float32)
    out, lse = g_attention(q, k, v, None, None, False)
    assert out.shape == q.shape and lse.shape == (0, 2, 7)


# ------------------------------------------------------------------------------------------------
# Bad inputs: every class raises an error that names the argument.
# ------------------------------------------------------------------------------------------------
def good_args():
    q, k, v = make_qkv(2, 5, 6, 2, 64, torch.float32)
    return dict(q=q, k=k, v=v, G=random_g(2, 2, 64), key_mask=torch.ones(2, 6, dtype=torch.bool),
                causal=False, scale=None)


def call(args):
    return g_attention(args["q"], args["k"], args["v"], args["G"], args["key_mask"], args["causal"],
                       args["scale"])


BAD_INPUTS = {
    "q_dtype_double": (lambda a: a.update(q=a["q"].double()), "q must be float32"),
    "q_int": (lambda a: a.update(q=a["q"].int()), "q must be float32"),
    "k_dtype_mismatch": (lambda a: a.update(k=a["k"].half()), "q, k and v must have the same dtype"),
    "v_dtype_mismatch": (lambda a: a.update(v=a["v"].bfloat16()), "q, k and v must have the same dtype"),
    "q_rank": (lambda a: a.update(q=a["q"][0]), "q must be a 4-D tensor"),
    "k_rank": (lambda a: a.update(k=a["k"].flatten(2)), "k must be a 4-D tensor"),
    "v_rank": (lambda a: a.update(v=a["v"][None]), "v must be a 4-D tensor"),
    "head_dim_96": (lambda a: a.update(q=a["q"][..., :48].repeat(1, 1, 1, 2)[..., :96]
                                       .contiguous(), k=torch.randn(2, 6, 2, 96),
                                       v=torch.randn(2, 6, 2, 96), G=None),
                    r"q.shape\[-1\] \(head dim d\) must be 64 or 128, got 96"),
    "k_batch": (lambda a: a.update(k=a["k"][:1], v=a["v"][:1]), r"k.shape\[0\] \(batch\)"),
    "k_heads": (lambda a: a.update(k=torch.randn(2, 6, 3, 64)), r"k.shape\[2\] \(heads\)"),
    "k_head_dim": (lambda a: a.update(k=torch.randn(2, 6, 2, 128)), r"k.shape\[3\] \(head dim\)"),
    "v_shape": (lambda a: a.update(v=a["v"][:, :5]), "v must have shape"),
    "q_last_dim_strided": (lambda a: a.update(q=torch.randn(2, 5, 2, 128)[..., ::2]),
                           "q must be contiguous in its last dimension"),
    "k_last_dim_strided": (lambda a: a.update(k=torch.randn(2, 6, 2, 128)[..., ::2]),
                           "k must be contiguous in its last dimension"),
    "v_last_dim_strided": (lambda a: a.update(v=torch.randn(2, 6, 2, 128)[..., ::2]),
                           "v must be contiguous in its last dimension"),
    "G_dtype": (lambda a: a.update(G=a["G"].bfloat16()), "G must have dtype Float"),
    "G_rank": (lambda a: a.update(G=a["G"][0]), "G must be a 4-D tensor"),
    "G_batch": (lambda a: a.update(G=random_g(3, 2, 64)), r"G.shape\[0\] \(batch\) must be 2 or 1"),
    "G_heads": (lambda a: a.update(G=random_g(2, 3, 64)), r"G.shape\[1\] \(heads\)"),
    "G_square": (lambda a: a.update(G=torch.randn(2, 2, 64, 32)), r"G.shape\[3\] \(head dim\)"),
    "G_last_dim_strided": (lambda a: a.update(G=torch.randn(2, 2, 64, 128)[..., ::2]),
                           "G must be contiguous in its last dimension"),
    "key_mask_dtype": (lambda a: a.update(key_mask=a["key_mask"].float()),
                       "key_mask must have dtype Bool"),
    "key_mask_shape": (lambda a: a.update(key_mask=a["key_mask"][:, :5]),
                       r"key_mask.shape\[1\] \(keys\)"),
    "key_mask_rank": (lambda a: a.update(key_mask=a["key_mask"][0]), "key_mask must be a 2-D"),
    "scale_nan": (lambda a: a.update(scale=float("nan")), "scale must be a finite float"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_naming_the_argument(case):
    mutate, message = BAD_INPUTS[case]
    args = good_args()
    call(args)  # the unmutated call is fine
    mutate(args)
    with pytest.raises(RuntimeError, match=message):
        call(args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a mixed-device call")
def test_wrong_device_raises():
    args = good_args()
    args["k"] = args["k"].cuda()
    with pytest.raises(RuntimeError, match="k must be on the same device as q"):
        call(args)
