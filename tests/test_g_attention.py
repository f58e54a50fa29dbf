"""pldr::g_attention (docs/design.md §3.2) on every backend (tests/backends.py) against the fp64
reference, by the rule of pldr_kernels.testing (docs/design.md §4).

One body per property, the backend a parameter; the cases are defined once, below, each sized for
the backends that run it."""
from __future__ import annotations

import itertools

import pytest
import torch
from backends import CUDA, backend_cases, backend_dtypes, backends, needs_cuda_kernels
from cases import LOW_PRECISION
from cases import AttentionCase as Case

from pldr_kernels import reference
from pldr_kernels.testing import (
    DTYPES,
    check_g_attention,
    compare,
    random_attention_inputs,
    random_g,
)

OP = "g_attention"


def check(backend, out, lse, q, k, v, G=None, key_mask=None, causal=False, scale=None):
    """The rule for ``(out, lse)`` of inputs ``q..`` (CPU tensors), plus what ``backend``
    guarantees beyond it (tests/backends.py: EXTRA_GUARANTEES)."""
    B, Sq, H, d = q.shape
    assert out.dtype == q.dtype and out.shape == q.shape and out.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == (B, H, Sq)
    out, lse = out.cpu(), lse.cpu()
    oracle = reference.g_attention(q.double(), k.double(), v.double(),
                                   None if G is None else G.double(), key_mask, causal, scale)
    check_g_attention(out, lse, q, k, v, G, key_mask, causal, scale, oracle=oracle).assert_ok()
    if backend.guarantees("g_attention lse at the fp32 rule"):
        compare(lse, oracle[1], name="lse (fp32 rule, CPU extra)").assert_ok()
    return out, lse


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


def _unique(cases):
    return list({c.id: c for c in cases}.values())


CASES = _unique([
    # Awkward shapes in fp32 (S = 1, 7, 97; Sq != Sk both ways; partial tiles), every G mode.
    *(Case(B, Sq, Sk, 2, d, torch.float32, causal, G)
      for (B, Sq, Sk), d, G, causal in itertools.product(
          [(1, 1, 1), (2, 7, 7), (1, 97, 97), (2, 7, 97), (2, 97, 7), (1, 1, 97), (1, 130, 65)],
          (64, 128), ("none", "batch", "shared"), (False, True))),
    # The same in bf16/fp16 (d = 128 with a per-batch G only).
    *(Case(B, Sq, Sk, 2, d, dtype, causal, G)
      for dtype, (B, Sq, Sk), (d, G), causal in itertools.product(
          LOW_PRECISION, [(2, 7, 7), (2, 97, 97), (1, 7, 97), (2, 97, 7)],
          [(64, "none"), (64, "batch"), (64, "shared"), (128, "batch")], (False, True))),
    # S = 1025, an explicit scale, a mask with holes that spans whole key tiles.
    *(Case(1, 1025, 1025, 2, 64, dtype, causal, "shared")
      for dtype, causal in itertools.product(DTYPES, (False, True))),
    *(Case(2, 33, 70, 2, 64, dtype, True, scale=0.3) for dtype in DTYPES),
    *(Case(2, 50, 200, 2, 64, torch.float32, causal, "shared", "holes")
      for causal in (False, True)),
    # Tiny enough for the emulator: partial tiles, Sq > Sk (early rows see no key), one query
    # row, G in two chunks with four key tiles at d = 128, a negative scale (the softmax max is
    # taken after scaling, so any finite scale works).
    Case(2, 70, 70, 1, 64, torch.bfloat16, True, "batch", size="tiny"),
    Case(1, 7, 33, 2, 64, torch.bfloat16, False, "none", "ragged", size="tiny"),
    Case(2, 33, 70, 1, 64, torch.float16, True, "shared", "ragged", size="tiny"),
    Case(1, 70, 7, 1, 64, torch.float16, True, "batch", size="tiny"),
    Case(1, 1, 70, 4, 64, torch.bfloat16, True, "shared", size="tiny"),
    Case(1, 70, 33, 1, 128, torch.bfloat16, False, "batch", "ragged", size="tiny"),
    Case(2, 33, 70, 1, 128, torch.float16, True, "none", size="tiny"),
    Case(1, 7, 7, 1, 128, torch.bfloat16, True, "shared", size="tiny"),
    Case(2, 33, 100, 1, 128, torch.float16, True, "batch", "ragged", size="tiny"),
    Case(2, 33, 70, 1, 64, torch.float32, True, "batch", "ragged", size="tiny"),
    Case(1, 70, 7, 2, 64, torch.float32, True, "none", size="tiny"),
    Case(1, 7, 33, 1, 128, torch.float32, False, "shared", "ragged", size="tiny"),
    Case(1, 33, 7, 1, 128, torch.float32, True, "batch", size="tiny"),
    *(Case(1, 33, 70, 2, 64, dtype, True, "shared", scale=-0.2, size="tiny")
      for dtype in (torch.float16, torch.float32)),
    # GPU-sized: long prompts with ragged masks, a decode-like row over 1025 keys, many heads.
    *(Case(B, Sq, Sk, H, d, dtype, causal, G, mask, size="large")
      for dtype, d, (B, Sq, Sk, H, causal, G, mask) in itertools.product(DTYPES, (64, 128), [
          (2, 97, 97, 3, True, "batch", "none"),
          (1, 1, 1025, 4, True, "shared", "none"),
          (2, 1025, 1025, 2, True, "batch", "ragged"),
          (3, 7, 97, 2, False, "none", "ragged"),
          (1, 97, 7, 2, True, "batch", "none"),
          (2, 256, 300, 1, False, "shared", "ragged"),
      ])),
])


@pytest.mark.parametrize("backend,case", backend_cases(OP, CASES))
def test_matches_reference(backend, case):
    q, k, v, G, mask = case.inputs()
    out, lse = backend.g_attention(*backend.to(q, k, v, G, mask), case.causal, case.scale)
    check(backend, out, lse, q, k, v, G, mask, case.causal, case.scale)


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("backend,dtype", backend_dtypes(OP, DTYPES))
def test_padded_batch_rows_equal_each_row_alone(backend, dtype, causal):
    """A right-padded batch with ragged lengths: each row equals that row run alone, unpadded,
    bitwise (docs/design.md §4 batch invariance)."""
    S = backend.sized(40, 97)
    lengths = [S, S * 2 // 5, 1]
    B, H, d = len(lengths), 2, 64
    q, k, v = random_attention_inputs(B, S, S, H, d, dtype)
    G = random_g(B, H, d)
    key_mask = torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]
    out, lse = backend.g_attention(*backend.to(q, k, v, G, key_mask), causal)
    out, lse = check(backend, out, lse, q, k, v, G, key_mask, causal)
    for b, n in enumerate(lengths):
        one = slice(b, b + 1)
        alone_out, alone_lse = backend.g_attention(
            *backend.to(q[one, :n], k[one, :n], v[one, :n], G[one]), None, causal)
        assert torch.equal(out[one, :n], alone_out.cpu()), f"row {b}: out differs"
        assert torch.equal(lse[one, :, :n], alone_lse.cpu()), f"row {b}: lse differs"


@pytest.mark.parametrize("backend,dtype", backend_dtypes(OP, DTYPES))
def test_rows_without_a_visible_key_are_zero(backend, dtype):
    """A fully masked batch row, and causal with Sq > Sk (the first Sq − Sk queries see no key):
    out exactly 0 and lse −inf there, the other rows finite."""
    B, Sq, Sk, H, d = 2, 7, 70, 2, 64
    q, k, v = random_attention_inputs(B, Sq, Sk, H, d, dtype)
    key_mask = torch.ones(B, Sk, dtype=torch.bool)
    key_mask[1] = False
    out, lse = check(backend, *backend.g_attention(*backend.to(q, k, v, None, key_mask)),
                     q, k, v, None, key_mask)
    assert torch.count_nonzero(out[1]) == 0 and torch.isneginf(lse[1]).all()
    assert torch.isfinite(lse[0]).all() and torch.isfinite(out[0].float()).all()
    q, k, v = random_attention_inputs(1, 20, 5, H, d, dtype)
    out, lse = check(backend, *backend.g_attention(*backend.to(q, k, v), None, None, True),
                     q, k, v, None, None, True)
    assert torch.count_nonzero(out[:, :15]) == 0 and torch.isneginf(lse[..., :15]).all()
    assert torch.isfinite(lse[..., 15:]).all()


@pytest.mark.parametrize("backend", backends(OP, "empty inputs"))
def test_empty_inputs(backend):
    """No batch rows, no queries, or no keys at all (every row sees nothing: 0 and −inf)."""
    q, k, v = backend.to(*random_attention_inputs(2, 7, 9, 2, 64, torch.bfloat16))
    out, lse = backend.g_attention(q[:0], k[:0], v[:0])
    assert out.shape == (0, 7, 2, 64) and lse.shape == (0, 2, 7)
    out, lse = backend.g_attention(q[:, :0], k, v)
    assert out.shape == (2, 0, 2, 64) and lse.shape == (2, 2, 0)
    out, lse = backend.g_attention(q, k[:, :0], v[:, :0])
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


@pytest.mark.parametrize("backend,dtype", backend_dtypes(OP, DTYPES))
def test_strided_views(backend, dtype):
    """Only the last dim must be contiguous. The contiguous inputs give the reference result, and
    each layout of the same values gives their very bits: q, k, v sliced from a fused qkv tensor,
    G and key_mask with strided rows, and q also as a [B,H,S,d] tensor viewed as [B,S,H,d] and
    with rows that are not 16-byte aligned (storage offset 1; the CUDA API copies that one once).
    """
    B, S, H, d = 2, backend.sized(33, 97), 3, 64
    qkv = torch.randn(B, S, 3, H, d).to(dtype)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    assert not q.is_contiguous()
    G = random_g(B, H, 2 * d)[:, :, ::2, :d]            # rows 4d apart
    key_mask = (torch.rand(B, 2 * S) > 0.2)[:, ::2]
    heads_first = torch.empty(B, H, S, d, dtype=dtype).transpose(1, 2).copy_(q)
    misaligned = torch.empty(B * S * H * d + 1, dtype=dtype)[1:].view(B, S, H, d).copy_(q)
    dense = (t.contiguous() for t in (q, k, v, G, key_mask))
    want = check(backend, *backend.g_attention(*backend.to(*dense), True, 0.2), q, k, v, G,
                 key_mask, True, 0.2)
    for q_view in (q, heads_first, misaligned):
        out, lse = backend.g_attention(*backend.to(q_view, k, v, G, key_mask), True, 0.2)
        assert torch.equal(out.cpu(), want[0]) and torch.equal(lse.cpu(), want[1])


@pytest.mark.parametrize("backend,dtype", backend_dtypes(OP, DTYPES))
def test_broadcast_views(backend, dtype):
    """Stride-0 (expanded) dims: one token repeated, keys shared by the heads, values by the
    batch; G with every row the same (stride(2) = 0) or shared by the heads (stride(1) = 0)."""
    B, S, H, d = 2, 33, 2, 64
    q = torch.randn(B, 1, H, d).to(dtype).expand(B, S, H, d)
    k = torch.randn(B, S, 1, d).to(dtype).expand(B, S, H, d)
    v = torch.randn(1, S, H, d).to(dtype).expand(B, S, H, d)
    same_rows = (0.1 * torch.randn(1, 1, 1, d)).expand(B, H, d, d)
    same_heads = random_g(B, 1, d).expand(B, H, d, d)
    assert q.stride(1) == 0 and same_rows.stride(2) == 0 and same_heads.stride(1) == 0
    for G in (same_rows, same_heads):
        out, lse = check(backend, *backend.g_attention(*backend.to(q, k, v, G), None, True),
                         q, k, v, G, None, True)
        dense = backend.g_attention(*backend.to(*(t.contiguous() for t in (q, k, v, G))), None,
                                    True)
        assert torch.equal(out, dense[0].cpu()) and torch.equal(lse, dense[1].cpu())
    one = (q[:, :1], k[:, :1], v[:, :1], same_rows)
    check(backend, *backend.g_attention(*backend.to(*one)), *one)


@pytest.mark.parametrize("backend,dtype", backend_dtypes(OP, DTYPES, emu_dtypes=(torch.bfloat16,)))
def test_deterministic_bitwise(backend, dtype):
    """Run after run, and on the CPU at any thread count (each query tile is computed the same
    way whichever thread runs it)."""
    S = backend.sized(40, 300)
    q, k, v, G = backend.to(*random_attention_inputs(2, S, S, 3, 64, dtype), random_g(2, 3, 64))
    key_mask = backend.to(torch.rand(2, S) > 0.2)
    first = backend.g_attention(q, k, v, G, key_mask, True)
    second = backend.g_attention(q, k, v, G, key_mask, True)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    if backend.runs("thread count"):
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            single = backend.g_attention(q, k, v, G, key_mask, True)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(first[0], single[0]) and torch.equal(first[1], single[1])


@pytest.mark.parametrize("backend", backends(OP))
def test_identity_g_equals_no_g(backend):
    S = backend.sized(33, 65)
    q, k, v = backend.to(*random_attention_inputs(1, S, S, 2, 64))
    eye = backend.to(torch.eye(64).expand(1, 2, 64, 64).contiguous())
    with_eye = backend.g_attention(q, k, v, eye, None, True)[0]
    without = backend.g_attention(q, k, v, None, None, True)[0]
    torch.testing.assert_close(with_eye, without, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", backends(OP))
def test_matches_sdpa_without_g(backend):
    S = backend.sized(33, 97)
    q, k, v = backend.to(*random_attention_inputs(2, S, S, 2, 64))
    out, _ = backend.g_attention(q, k, v, None, None, True)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(1, 2).cpu() for t in (q, k, v)), is_causal=True)
    torch.testing.assert_close(out.cpu(), sdpa.transpose(1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", backends(OP, only=("cuda",)))
def test_runs_on_the_current_stream(backend):
    q, k, v = backend.to(*random_attention_inputs(2, 300, 300, 2, 64, torch.bfloat16))
    G, key_mask = backend.to(random_g(2, 2, 64), torch.rand(2, 300) > 0.2)
    want, _ = backend.g_attention(q, k, v, G, key_mask, True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got, _ = backend.g_attention(q, k, v, G, key_mask, True)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got, want)


# --------------------------------------------------------------------------------------------
# Bad inputs: every class raises an error that names the argument.
# --------------------------------------------------------------------------------------------
def good_args(device):
    q, k, v = random_attention_inputs(2, 5, 6, 2, 64, device=device)
    return dict(q=q, k=k, v=v, G=random_g(2, 2, 64, device=device),
                key_mask=torch.ones(2, 6, dtype=torch.bool, device=device), causal=False,
                scale=None)


def call(backend, a):
    return backend.g_attention(a["q"], a["k"], a["v"], a["G"], a["key_mask"], a["causal"],
                               a["scale"])


def _randn(a, *shape):
    return torch.randn(*shape, device=a["q"].device)


BAD_INPUTS = {
    "q_dtype_double": (lambda a: a.update(q=a["q"].double()), "q must be float32"),
    "q_int": (lambda a: a.update(q=a["q"].int()), "q must be float32"),
    "k_dtype_mismatch": (lambda a: a.update(k=a["k"].half()),
                         "q, k and v must have the same dtype"),
    "v_dtype_mismatch": (lambda a: a.update(v=a["v"].bfloat16()),
                         "q, k and v must have the same dtype"),
    "q_rank": (lambda a: a.update(q=a["q"][0]), "q must be a 4-D tensor"),
    "k_rank": (lambda a: a.update(k=a["k"].flatten(2)), "k must be a 4-D tensor"),
    "v_rank": (lambda a: a.update(v=a["v"][None]), "v must be a 4-D tensor"),
    "head_dim_32": (lambda a: a.update(q=a["q"][..., :32], k=a["k"][..., :32],
                                       v=a["v"][..., :32], G=None),
                    r"q.shape\[-1\] \(head dim d\) must be 64 or 128, got 32"),
    "head_dim_96": (lambda a: a.update(q=_randn(a, 2, 5, 2, 96), k=_randn(a, 2, 6, 2, 96),
                                       v=_randn(a, 2, 6, 2, 96), G=None),
                    r"q.shape\[-1\] \(head dim d\) must be 64 or 128, got 96"),
    "k_batch": (lambda a: a.update(k=a["k"][:1], v=a["v"][:1]), r"k.shape\[0\] \(batch\)"),
    "k_heads": (lambda a: a.update(k=_randn(a, 2, 6, 3, 64)),
                r"k.shape\[2\] \(key/value heads H_kv\) must divide the query heads H = 2"),
    "k_head_dim": (lambda a: a.update(k=_randn(a, 2, 6, 2, 128)), r"k.shape\[3\] \(head dim\)"),
    "v_shape": (lambda a: a.update(v=a["v"][:, :5]), "v must have shape"),
    "q_last_dim_strided": (lambda a: a.update(q=_randn(a, 2, 5, 2, 128)[..., ::2]),
                           "q must be contiguous in its last dimension"),
    "k_last_dim_strided": (lambda a: a.update(k=_randn(a, 2, 6, 2, 128)[..., ::2]),
                           "k must be contiguous in its last dimension"),
    "v_last_dim_strided": (lambda a: a.update(v=_randn(a, 2, 6, 2, 128)[..., ::2]),
                           "v must be contiguous in its last dimension"),
    "G_dtype": (lambda a: a.update(G=a["G"].bfloat16()), "G must have dtype Float"),
    "G_rank": (lambda a: a.update(G=a["G"][0]), "G must be a 4-D tensor"),
    "G_batch": (lambda a: a.update(G=_randn(a, 3, 2, 64, 64)),
                r"G.shape\[0\] \(batch\) must be 2 or 1"),
    "G_heads": (lambda a: a.update(G=_randn(a, 2, 3, 64, 64)), r"G.shape\[1\] \(heads\)"),
    "G_square": (lambda a: a.update(G=_randn(a, 2, 2, 64, 32)), r"G.shape\[3\] \(head dim\)"),
    "G_last_dim_strided": (lambda a: a.update(G=_randn(a, 2, 2, 64, 128)[..., ::2]),
                           "G must be contiguous in its last dimension"),
    "key_mask_dtype": (lambda a: a.update(key_mask=a["key_mask"].float()),
                       "key_mask must have dtype Bool"),
    "key_mask_shape": (lambda a: a.update(key_mask=a["key_mask"][:, :5]),
                       r"key_mask.shape\[1\] \(keys\)"),
    "key_mask_rank": (lambda a: a.update(key_mask=a["key_mask"][0]), "key_mask must be a 2-D"),
    "scale_nan": (lambda a: a.update(scale=float("nan")), "scale must be a finite float"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("backend", backends(OP, "input validation"))
def test_bad_input_raises_naming_the_argument(backend, case):
    mutate, message = BAD_INPUTS[case]
    args = good_args(backend.device)
    call(backend, args)  # the unmutated call is fine
    mutate(args)
    with pytest.raises(RuntimeError, match=message):
        call(backend, args)


@needs_cuda_kernels(OP, "a mixed-device call")
@pytest.mark.parametrize("anchor", ["cpu", "cuda"])
@pytest.mark.parametrize("name", ["k", "v", "G", "key_mask"])
def test_mixed_devices_are_refused(anchor, name):
    """Every argument must be on q's device, whichever device q is on."""
    args = good_args(anchor)
    args[name] = args[name].to("cuda" if anchor == "cpu" else "cpu")
    with pytest.raises(RuntimeError, match=f"{name} must be on the same device as q"):
        call(CUDA, args)


# --------------------------------------------------------------------------------------------
# Dispatcher contract (docs/design.md §3.5): opcheck and torch.compile(fullgraph=True)
# --------------------------------------------------------------------------------------------
def sample_inputs(device):
    q, k, v = random_attention_inputs(2, 7, 9, 2, 64, device=device)
    mask = (torch.rand(2, 9) > 0.3).to(device)
    fused = torch.randn(1, 5, 3, 2, 128, device=device)
    return {
        "plain": ((q, k, v), {}),
        "G-mask-causal-scale": ((q, k, v, random_g(2, 2, 64, device=device), mask, True, 0.2), {}),
        "bf16-Gshared": ((q.bfloat16(), k.bfloat16(), v.bfloat16()),
                         dict(G=random_g(1, 2, 64, device=device), causal=True)),
        "strided-d128": ((fused[:, :, 0], fused[:, :, 1], fused[:, :, 2]), dict(causal=False)),
        "bf16-G-mask-causal": ((q.bfloat16(), k.bfloat16(), v.bfloat16(),
                                random_g(2, 2, 64, device=device), mask, True, None), {}),
    }


@pytest.mark.parametrize("sample", list(sample_inputs("cpu")))
@pytest.mark.parametrize("backend", backends(OP, "dispatcher"))
def test_opcheck(backend, sample):
    args, kwargs = sample_inputs(backend.device)[sample]
    torch.library.opcheck(torch.ops.pldr.g_attention.default, args, kwargs)


@pytest.mark.parametrize("backend", backends(OP, "dispatcher"))
def test_torch_compile_fullgraph_matches_eager(backend):
    import pldr_kernels

    def prefill(q, k, v, G):
        out, lse = pldr_kernels.g_attention(q, k, v, G, causal=True)
        return out * 2.0, lse

    torch._dynamo.reset()
    q, k, v, G = backend.to(*random_attention_inputs(2, 11, 11, 2, 64), random_g(2, 2, 64))
    eager = prefill(q, k, v, G)
    compiled = torch.compile(prefill, fullgraph=True, backend="inductor")(q, k, v, G)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
