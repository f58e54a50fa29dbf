"""pldr::g_attention on real CUDA tensors (csrc/cuda/g_attention_api.cu) against the fp64
reference, DESIGN §4 tolerances. Skips cleanly without a GPU or without the CUDA kernels."""
import pytest
import torch
from g_attention_cases import check_against_reference, random_inputs
from testing import HAS_CUDA_KERNELS, random_g

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not HAS_CUDA_KERNELS,
                       reason="needs a CUDA device and pldr_kernels built with CUDA kernels "
                              "(PLDR_KERNELS_FORCE_CUDA=1 pip install --no-build-isolation -e .)"),
]
DEV = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def g_attention(*args, **kwargs):
    return torch.ops.pldr.g_attention(*args, **kwargs)


def make_case(B, Sq, Sk, H, d, dtype, g_mode, masked, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = random_inputs(B, Sq, Sk, H, d, dtype, gen, DEV)
    G = None if g_mode is None else random_g(B if g_mode == "batch" else 1, H, d, DEV)
    key_mask = None
    if masked:
        key_mask = torch.rand(B, Sk, generator=gen) > 0.3
        key_mask[0, : Sk // 2] = False  # left padding
        key_mask = key_mask.to(DEV)
    return q, k, v, G, key_mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("B,Sq,Sk,H,causal,g_mode,masked", [
    (2, 97, 97, 3, True, "batch", False),
    (1, 1, 1025, 4, True, "shared", False),
    (2, 1025, 1025, 2, True, "batch", True),
    (3, 7, 97, 2, False, None, True),
    (1, 97, 7, 2, True, "batch", False),  # Sq > Sk: the first rows see no key
    (2, 256, 300, 1, False, "shared", True),
])
def test_matches_reference(dtype, d, B, Sq, Sk, H, causal, g_mode, masked):
    q, k, v, G, key_mask = make_case(B, Sq, Sk, H, d, dtype, g_mode, masked)
    out, lse = g_attention(q, k, v, G, key_mask, causal)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (B, H, Sq)
    assert lse.dtype == torch.float32
    check_against_reference(out.cpu(), lse.cpu(), q.cpu(), k.cpu(), v.cpu(),
                            None if G is None else G.cpu(),
                            None if key_mask is None else key_mask.cpu(), causal)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_and_misaligned_views(dtype):
    B, S, H, d = 2, 130, 3, 64
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(B, S, 3, H, d, generator=gen).to(DEV, dtype)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    G = torch.randn(B, H, d, 2 * d, device=DEV)[..., :d] * 0.1 + torch.eye(d, device=DEV)
    key_mask = (torch.rand(B, 2 * S, generator=gen) > 0.2).to(DEV)[:, ::2]
    out, lse = g_attention(q, k, v, G, key_mask, True, 0.2)
    check_against_reference(out.cpu(), lse.cpu(), q.cpu(), k.cpu(), v.cpu(), G.cpu(),
                            key_mask.cpu(), True, 0.2)
    # A view whose rows are not 16-byte aligned (storage offset of one element).
    flat = torch.randn(B * S * H * d + 1, generator=gen).to(DEV, dtype)
    q_odd = flat[1:].view(B, S, H, d)
    out2, lse2 = g_attention(q_odd, k, v, G, key_mask, True, 0.2)
    check_against_reference(out2.cpu(), lse2.cpu(), q_odd.cpu(), k.cpu(), v.cpu(), G.cpu(),
                            key_mask.cpu(), True, 0.2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_and_batch_invariant(dtype):
    q, k, v, G, key_mask = make_case(3, 200, 200, 2, 64, dtype, "batch", True, seed=3)
    out1, lse1 = g_attention(q, k, v, G, key_mask, True)
    out2, lse2 = g_attention(q, k, v, G, key_mask, True)
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)
    for b in range(3):
        ob, lb = g_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], G[b:b + 1], key_mask[b:b + 1],
                             True)
        assert torch.equal(ob[0], out1[b]) and torch.equal(lb[0], lse1[b])


def test_fully_masked_rows_and_empty_inputs():
    q, k, v, G, _ = make_case(2, 65, 65, 2, 64, torch.bfloat16, "shared", False)
    key_mask = torch.ones(2, 65, dtype=torch.bool, device=DEV)
    key_mask[1] = False
    out, lse = g_attention(q, k, v, G, key_mask, False)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))
    assert torch.isfinite(out[0].float()).all()
    out, lse = g_attention(q[:, :0], k, v, G, key_mask, False)
    assert out.shape == (2, 0, 2, 64) and lse.shape == (2, 2, 0)
    out, lse = g_attention(q, k[:, :0], v[:, :0], G, None, False)  # no keys at all
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


def test_runs_on_the_current_stream():
    q, k, v, G, key_mask = make_case(2, 300, 300, 2, 64, torch.bfloat16, "batch", True)
    want, _ = g_attention(q, k, v, G, key_mask, True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got, _ = g_attention(q, k, v, G, key_mask, True)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got, want)


def test_bad_inputs_name_the_argument():
    q, k, v, G, _ = make_case(1, 8, 8, 2, 64, torch.bfloat16, "batch", False)
    with pytest.raises(RuntimeError, match="head dim"):
        g_attention(q[..., :32], k[..., :32], v[..., :32])
    with pytest.raises(RuntimeError, match="same dtype"):
        g_attention(q, k.float(), v)
    with pytest.raises(RuntimeError, match="G must have dtype"):
        g_attention(q, k, v, G.bfloat16())
    with pytest.raises(RuntimeError, match="same device"):
        g_attention(q, k.cpu(), v)


def test_opcheck():
    q, k, v, G, key_mask = make_case(2, 33, 40, 2, 64, torch.bfloat16, "batch", True)
    torch.library.opcheck(torch.ops.pldr.g_attention, (q, k, v, G, key_mask, True, None))
