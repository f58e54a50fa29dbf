"""pldr_kernels.nn modules: kernel path against reference.py in fp64, weight packing, dtypes."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from model_testing import needs_cpu_kernels

from pldr_kernels import reference
from pldr_kernels.nn import GCachedAttention, MetricLearner, PowerLawGraphAttention
from pldr_kernels.testing import assert_close

D, H, d = 128, 2, 64


def _metric_learner(seed=0):
    torch.manual_seed(seed)
    ml = MetricLearner(d, H, A_dff=170, num_reslayerA=2, num_denseA=2)
    with torch.no_grad():
        for name, p in ml.named_parameters():
            if "bias" in name or name.endswith("blst") or name.endswith("balst"):
                p.add_(0.05 * torch.randn_like(p))
    return ml


def _packed64(ml):
    return [w.double() for w in ml.packed_metric_weights()]


@torch.no_grad()  # the inference path; with autograd on, the packs are stacked per call
def test_metric_weights_are_packed_as_views_in_op_layout():
    ml = _metric_learner()
    w = dict(zip(("ln0_w", "ln0_b", "w1", "b1", "w2", "b2", "w3", "b3", "lnA_w", "lnA_b"),
                 ml.packed_metric_weights()))
    assert w["w1"].shape == (2, 2, 170, d) and w["w3"].shape == (2, 2, d, 170)
    assert w["lnA_w"].shape == (2, d)
    glu = ml.reslayerAs[1].denseAs[0]
    assert torch.equal(w["w1"][1, 0], glu.gluw1.weight)
    assert glu.gluw1.weight.data_ptr() == w["w1"][1, 0].data_ptr()  # a view, no copy per call
    # load_state_dict copies in place: the pack sees the new values without repacking.
    sd = {k: v + 1 for k, v in ml.state_dict().items()}
    ml.load_state_dict(sd)
    assert torch.equal(ml.packed_metric_weights()[2][1, 0],
                       sd["reslayerAs.1.denseAs.0.gluw1.weight"])
    # Re-assigned parameters (assign=True) are re-packed on the next call.
    ml.load_state_dict({k: v * 2 for k, v in sd.items()}, assign=True)
    assert torch.equal(ml.packed_metric_weights()[4][0, 1],
                       2 * sd["reslayerAs.0.denseAs.1.gluw2.weight"])
    clone = copy.deepcopy(ml)
    with torch.no_grad():
        clone.reslayerAs[0].denseAs[0].gluw1.weight.zero_()
    assert clone.packed_metric_weights()[2][0, 0].abs().sum() == 0
    assert ml.packed_metric_weights()[2][0, 0].abs().sum() > 0


def test_low_precision_cast_keeps_metric_learner_fp32():
    att = PowerLawGraphAttention(D, H, d, num_reslayerA=2).to(torch.bfloat16)
    assert att.wq.weight.dtype == torch.bfloat16 and att.dense.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in att.reslayerAs.parameters())
    assert att.plgatt_layer.Wlst.dtype == torch.float32
    assert att.layernorm1.weight.dtype == torch.float32
    assert att.rope.cos.dtype == torch.float32
    assert all(w.dtype == torch.float32 for w in att.packed_metric_weights())


@needs_cpu_kernels
def test_metric_learner_matches_reference():
    ml = _metric_learner(seed=1)
    q = torch.randn(2, 37, H, d)
    q_mask = torch.ones(2, 37, dtype=torch.bool)
    q_mask[1, :9] = False
    with torch.no_grad():
        got = ml(q, q_mask)
    want = reference.metric_tensors(q.double(), q_mask, *_packed64(ml))
    for name, g, w in zip(("A", "A_LM", "G"), got, want):
        assert g.dtype == torch.float32
        assert_close(g, w, name=name)
    A_LM, G = ml.g_from_metric(got[0])
    assert_close(G, reference.g_from_metric(want[0], *_packed64(ml)[10:])[1], name="G")


@needs_cpu_kernels
@pytest.mark.parametrize("interleaved", [True, False])
def test_power_law_graph_attention_matches_reference(interleaved):
    torch.manual_seed(2)
    att = PowerLawGraphAttention(D, H, d, num_reslayerA=2, interleaved_rope=interleaved).eval()
    x = torch.randn(2, 21, D)
    mask = torch.ones(2, 21, dtype=torch.long)
    mask[0, :6] = 0
    pos = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        out, (A, A_LM, G) = att(x, pos, mask, return_metric=True)
    att64 = copy.deepcopy(att).double()
    x64 = x.double()
    B, S = 2, 21
    q = reference.apply_rope(att64.wq(x64).view(B, S, H, d), pos, interleaved)
    k = reference.apply_rope(att64.wk(x64).view(B, S, H, d), pos, interleaved)
    v = att64.wv(x64).view(B, S, H, d)
    w64 = [t.double() for t in att.packed_metric_weights()]
    rA, rA_LM, rG = reference.metric_tensors(q, mask.bool(), *w64)
    o, _ = reference.g_attention(q, k, v, rG, mask.bool(), causal=True)
    want = att64.dense(o.reshape(B, S, D))
    assert_close(G, rG, name="G")
    real = mask.bool()
    assert_close(out[real], want[real], name="out")


@needs_cpu_kernels
def test_g_cached_attention_without_g_is_sdpa():
    torch.manual_seed(3)
    att = GCachedAttention(D, H, d).eval()
    x = torch.randn(1, 19, D)
    with torch.no_grad():
        out = att(x, None)
        att64 = copy.deepcopy(att).double()
        x64 = x.double()
        pos = torch.arange(19)
        q = reference.apply_rope(att64.wq(x64).view(1, 19, H, d), pos)
        k = reference.apply_rope(att64.wk(x64).view(1, 19, H, d), pos)
        v = att64.wv(x64).view(1, 19, H, d)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)
        want = att64.dense(o.transpose(1, 2).reshape(1, 19, D))
    assert_close(out, want, name="out")


def test_rope_tables_match_reference_rope():
    att = GCachedAttention(D, H, d, interleaved_rope=True, max_positions=4)
    x = torch.randn(2, 5, 2 * H, d)
    pos = torch.tensor([[0, 1, 2, 3, 4], [1, 1, 0, 1, 2]])
    got = att.rope(x, att.rope.rotation(pos))  # grows the 4-row table on demand
    want = reference.apply_rope(x.double(), pos, True)
    assert_close(got, want, name="rope")
    att2 = GCachedAttention(D, H, d, interleaved_rope=False)
    assert_close(att2.rope(x, att2.rope.rotation(pos)),
                              reference.apply_rope(x.double(), pos, False),
                              name="rope_half")


@needs_cpu_kernels
def test_fused_weights_follow_optimizer_steps_and_loads():
    """The packed weights the kernels read are views of the parameters: an optimiser step (in
    place) is seen without repacking; .to() and load_state_dict(assign=True) repack eagerly, so a
    compiled forward (which cannot check the pack) never reads stale weights."""
    torch.manual_seed(5)
    att = PowerLawGraphAttention(D, H, d, num_reslayerA=2)
    x = torch.randn(1, 11, D)
    att(x).square().mean().backward()  # autograd on: the ops read parameters stacked per call
    torch.optim.AdamW(att.parameters(), lr=1e-2, foreach=True).step()
    packed = att.packs["w1"].packed
    assert packed.data_ptr() == att.reslayerAs[0].denseAs[0].gluw1.weight.data_ptr()
    assert torch.equal(packed[0, 0], att.reslayerAs[0].denseAs[0].gluw1.weight)
    with torch.no_grad():
        fused = att(x)
    assert att.packs["w1"].packed is packed  # no repack was needed
    assert torch.equal(fused, att(x).detach())  # stacked per call: the same values, the same bits
    att.load_state_dict({k: v.clone() for k, v in att.state_dict().items()}, assign=True)
    w1 = att.reslayerAs[1].denseAs[1].gluw1.weight
    assert att.packs["w1"].packed[1, 1].data_ptr() == w1.data_ptr()
    att.double()
    assert att.packs["qkv_weight"].packed.dtype == torch.float64
    assert att.packs["qkv_weight"].packed[:D].data_ptr() == att.wq.weight.data_ptr()


@needs_cpu_kernels
def test_torch_compile_fullgraph_modules():
    """The modules trace without graph breaks (positions given or not). aot_eager runs the traced,
    functionalised graph on the eager kernels, so the outputs are bitwise those of eager mode;
    inductor codegen of the same code is covered by the model's compile test (peer rule)."""
    torch._dynamo.reset()
    torch.manual_seed(6)
    plga = PowerLawGraphAttention(D, H, d, num_reslayerA=1, num_denseA=1).eval()
    gca = GCachedAttention(D, H, d).eval()
    ml = _metric_learner(seed=7)
    x = torch.randn(2, 13, D)
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, :4] = 0
    pos = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)
    G = torch.eye(d).expand(2, H, d, d) + 0.01
    q = torch.randn(2, 13, H, d)
    calls = [(plga, (x,), dict(attention_mask=mask, return_metric=True)),
             (plga, (x, pos, mask), {}),
             (gca, (x, G), {}),
             (ml, (q, mask.bool()), {})]
    with torch.no_grad():
        for module, args, kwargs in calls:
            want = module(*args, **kwargs)
            got = torch.compile(module, fullgraph=True, dynamic=False, backend="aot_eager")(
                *args, **kwargs)
            for g, w in zip(torch.utils._pytree.tree_leaves(got),
                            torch.utils._pytree.tree_leaves(want)):
                assert torch.equal(g, w), type(module).__name__
