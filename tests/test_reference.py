"""The oracle itself, checked against independent formulations (so kernel tests rest on solid
ground)."""
import math

import pytest
import torch
import torch.nn.functional as F

from pldr_kernels import reference as ref
from pldr_kernels.testing import make_metric_weights, metric_args


def test_rope_interleaved_is_complex_rotation_of_adjacent_pairs():
    B, S, H, d = 2, 5, 3, 64
    x = torch.randn(B, S, H, d, dtype=torch.float64)
    pos = torch.arange(S)
    out = ref.apply_rope(x, pos, interleaved=True)
    theta = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    z = torch.complex(x[..., 0::2], x[..., 1::2]) * torch.polar(
        torch.ones(S, d // 2, dtype=torch.float64), pos[:, None].double() * theta)[None, :, None]
    want = torch.stack((z.real, z.imag), dim=-1).flatten(-2)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)  # angles are fp32 (as the authors')


def test_rope_rotate_half_pairs_i_with_i_plus_half():
    B, S, H, d = 1, 4, 2, 64
    x = torch.randn(B, S, H, d, dtype=torch.float64)
    pos = torch.tensor([[3, 9, 10, 200]])
    out = ref.apply_rope(x, pos, interleaved=False)
    # the angle table is fp32, as in the authors' code (docs/spec.md §2 step 4)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = (pos[0, :, None].float() * inv_freq).double()
    z = torch.complex(x[..., : d // 2], x[..., d // 2:]) * torch.polar(
        torch.ones(S, d // 2, dtype=torch.float64), ang)[None, :, None]
    torch.testing.assert_close(out, torch.cat((z.real, z.imag), dim=-1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_flavours_differ_and_preserve_norm(interleaved):
    x = torch.randn(1, 6, 2, 64, dtype=torch.float64)
    out = ref.apply_rope(x, torch.arange(6), interleaved=interleaved)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(out[:, 0], x[:, 0])  # position 0 is the identity
    other = ref.apply_rope(x, torch.arange(6), interleaved=not interleaved)
    assert (out[:, 1:] - other[:, 1:]).abs().max() > 1e-3


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Sq,Sk", [(7, 7), (3, 10), (1, 5)])
def test_g_attention_is_sdpa_on_premultiplied_query(causal, Sq, Sk):
    B, H, d = 2, 3, 64
    q, k, v = (torch.randn(B, s, H, d, dtype=torch.float64) for s in (Sq, Sk, Sk))
    G = torch.randn(B, H, d, d, dtype=torch.float64) / math.sqrt(d)
    out, lse = ref.g_attention(q, k, v, G, causal=causal)
    qt = torch.einsum("bshi,bhij->bhsj", q, G)
    mask = None
    if causal:  # bottom-right aligned
        mask = torch.ones(Sq, Sk, dtype=torch.bool).tril(diagonal=Sk - Sq)
    want = F.scaled_dot_product_attention(qt, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    torch.testing.assert_close(out, want.transpose(1, 2))
    scores = qt @ k.transpose(1, 2).transpose(-1, -2) / math.sqrt(d)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), rtol=1e-6, atol=1e-6)


def test_g_attention_fully_masked_rows_give_zero_and_minus_inf_lse():
    B, S, H, d = 2, 4, 1, 64
    q, k, v = (torch.randn(B, S, H, d, dtype=torch.float64) for _ in range(3))
    key_mask = torch.tensor([[False] * 4, [True, True, False, False]])
    out, lse = ref.g_attention(q, k, v, key_mask=key_mask)
    assert torch.all(out[0] == 0) and torch.all(torch.isneginf(lse[0]))
    assert torch.isfinite(out[1]).all() and torch.isfinite(lse[1]).all()


def _naive_metric_tensors(q, w, eps_ln=1e-6, eps_adj=1e-9):
    """Row-by-row loops with explicit formulas, independent of reference.metric_tensors."""
    B, S, H, d = q.shape
    R, Gd = w["w1"].shape[:2]

    def ln(x, g, b):
        mu = x.mean()
        var = ((x - mu) ** 2).mean()
        return (x - mu) / torch.sqrt(var + eps_ln) * g + b

    A_all, ALM_all, G_all = (torch.empty(B, H, d, d, dtype=torch.float64) for _ in range(3))
    for bi in range(B):
        for h in range(H):
            Q = q[bi, :, h, :]
            A0 = Q.T @ Q
            A = torch.stack([ln(A0[i], w["ln0_w"], w["ln0_b"]) for i in range(d)])
            for r in range(R):
                A_in = A.clone()
                for g in range(Gd):
                    rows = []
                    for i in range(d):
                        x = A[i]
                        h1 = w["w1"][r, g] @ x + w["b1"][r, g]
                        h2 = w["w2"][r, g] @ x + w["b2"][r, g]
                        glu = h1 / (1 + torch.exp(-h1)) * h2
                        rows.append(w["w3"][r, g] @ glu + w["b3"][r, g])
                    A = torch.stack(rows)
                A = torch.stack([ln(A[i] + A_in[i], w["lnA_w"][r], w["lnA_b"][r])
                                 for i in range(d)])
            Z = w["W"][h] @ A + w["b"][h]
            A_LM = Z * Z / (1 + torch.exp(-Z)) + eps_adj
            G = w["a"][h] @ A_LM ** w["pw"][h] + w["ba"][h]
            A_all[bi, h], ALM_all[bi, h], G_all[bi, h] = A, A_LM, G
    return A_all, ALM_all, G_all


def test_metric_tensors_matches_naive_row_loops():
    w = {k: v.double() for k, v in make_metric_weights(d=64, H=2, R=2, Gd=2, F=24).items()}
    q = torch.randn(1, 5, 2, 64, dtype=torch.float64)
    got = ref.metric_tensors(q, None, *metric_args(w))
    want = _naive_metric_tensors(q, w)
    for g, wnt, name in zip(got, want, ("A", "A_LM", "G")):
        torch.testing.assert_close(g, wnt, rtol=1e-9, atol=1e-9, msg=name)
    assert got[1].min() >= 1e-9  # iSwiGLU >= 0, eps added after


def test_metric_tensors_q_mask_drops_rows():
    w = {k: v.double() for k, v in make_metric_weights(d=64, H=1, R=1, Gd=1, F=16).items()}
    q = torch.randn(1, 6, 1, 64, dtype=torch.float64)
    mask = torch.tensor([[False, False, True, True, True, True]])
    masked = ref.metric_tensors(q, mask, *metric_args(w))
    alone = ref.metric_tensors(q[:, 2:], None, *metric_args(w))
    for m, a in zip(masked, alone):
        torch.testing.assert_close(m, a)


def test_g_from_metric_equals_tail_of_metric_tensors():
    w = {k: v.double() for k, v in make_metric_weights(d=64, H=2, R=1, Gd=2, F=16).items()}
    q = torch.randn(2, 3, 2, 64, dtype=torch.float64)
    A, A_LM, G = ref.metric_tensors(q, None, *metric_args(w))
    A_LM2, G2 = ref.g_from_metric(A, w["W"], w["b"], w["pw"], w["a"], w["ba"])
    torch.testing.assert_close(A_LM2, A_LM)
    torch.testing.assert_close(G2, G)


def test_decode_reference_equals_full_causal_attention():
    B, S, H, d, Smax = 2, 9, 2, 64, 16
    q, k, v = (torch.randn(B, S, H, d, dtype=torch.float64) for _ in range(3))
    G = torch.randn(1, H, d, d, dtype=torch.float64) / 8
    full, _ = ref.g_attention(q, k, v, G, causal=True)
    kc = torch.zeros(B, Smax, H, d, dtype=torch.float64)
    vc = torch.zeros_like(kc)
    lens = torch.zeros(B, dtype=torch.int32)
    outs = []
    for t0, t1 in ((0, 5), (5, 6), (6, 9)):  # a prefill chunk, then single steps / a block
        outs.append(ref.g_attention_decode(q[:, t0:t1], kc, vc, lens, k[:, t0:t1], v[:, t0:t1],
                                           G=G))
        lens += t1 - t0
    torch.testing.assert_close(torch.cat(outs, dim=1), full)
    torch.testing.assert_close(kc[:, :S], k)


def test_decode_reference_refuses_to_pass_the_cache_end():
    kc = torch.zeros(1, 4, 1, 64)
    vc = torch.zeros_like(kc)
    q = torch.randn(1, 2, 1, 64)
    with pytest.raises(ValueError, match="exceeds the cache length"):
        ref.g_attention_decode(q, kc, vc, torch.tensor([3], dtype=torch.int32), q, q)
    assert torch.all(kc == 0)
