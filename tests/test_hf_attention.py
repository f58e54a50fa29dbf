"""``attn_implementation="pldr"`` (pldr_kernels/hf/attention.py, docs/design.md §3.8) on tiny
random LlamaForCausalLMs built here, with and without grouped-query attention: logits, greedy
generations (DynamicCache and StaticCache, left-padded batches) and a training step's loss and
gradients against the same model with "sdpa", by the rule of docs/design.md §4 (fp32: errors
within 2x those of "eager", PyTorch's other fp32 formulation, against an fp64 copy of the model
run with "sdpa", plus a floor)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")
hf_attention = pytest.importorskip("pldr_kernels.hf.attention")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

H = 4
VOCAB = 97
FLOOR = 1e-5


def tiny_llama(kv_heads: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=H, num_key_value_heads=kv_heads,
                         head_dim=64, max_position_embeddings=128, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def left_padded_batch(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 19), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # left padding
    mask[2, :1] = 0
    ids[mask == 0] = 0
    return ids, mask


def logits_with(model, impl, ids, mask):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


class OpCalls(TorchDispatchMode):
    """Which pldr ops ran."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "pldr":
            self.names.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def assert_within_rule(got, sdpa, eager, fp64, what):
    """|got − fp64| <= 2·|eager − fp64| + floor, entrywise max (the §4 peer rule); sdpa is
    held to the same bound so that the comparison is fair."""
    bound = 2 * (eager - fp64).abs().max().item() + FLOOR
    err = (got - fp64).abs().max().item()
    assert err <= bound, f"{what}: pldr error {err:.3g} > bound {bound:.3g}"
    assert (sdpa - fp64).abs().max().item() <= bound


@pytest.mark.parametrize("kv_heads", (1, 2, H))
def test_logits_match_sdpa_with_left_padding(kv_heads):
    """Prefill logits of the real (unpadded) positions by the rule against an fp64 copy, the
    mask reaching pldr::g_attention as a key mask."""
    model = tiny_llama(kv_heads)
    ids, mask = left_padded_batch()
    fp64 = logits_with(copy.deepcopy(model).double(), "sdpa", ids, mask)
    sdpa = logits_with(model, "sdpa", ids, mask)
    eager = logits_with(model, "eager", ids, mask)
    with OpCalls() as calls:
        got = logits_with(model, "pldr", ids, mask)
    assert set(calls.names) == {"g_attention"}
    real = mask.bool()
    assert_within_rule(got[real], sdpa[real], eager[real], fp64[real].float(), "logits")
    assert torch.isfinite(got).all()


def test_mask_function_is_registered_and_reaches_the_attention(monkeypatch):
    """transformers 5.24 builds no mask for an attention key without a mask function (the
    padding would silently be dropped): with the registered one the left-padding mask arrives;
    without it, it does not (which is why register_pldr_attention registers both)."""
    model = tiny_llama(2)
    ids, mask = left_padded_batch()
    seen = []

    def spy(module, query, key, value, attention_mask, **kw):
        seen.append(attention_mask)
        return hf_attention.pldr_attention_forward(module, query, key, value, attention_mask,
                                                   **kw)

    monkeypatch.setitem(transformers.AttentionInterface._global_mapping, "pldr", spy)
    logits_with(model, "pldr", ids, mask)
    assert seen and all(m is not None and m.dtype == torch.bool for m in seen)
    seen.clear()
    monkeypatch.delitem(AttentionMaskInterface._global_mapping, "pldr")
    logits_with(model, "pldr", ids, mask)
    assert seen and all(m is None for m in seen)


@pytest.mark.parametrize("kv_heads,cache,padded", [(1, "dynamic", True), (2, "dynamic", True),
                                                   (H, "dynamic", True), (2, "static", True),
                                                   (2, "dynamic", False)])
def test_greedy_generation_equals_sdpa(kv_heads, cache, padded):
    """Greedy generate on a left-padded batch (or an unpadded one, whose steps get no mask) gives
    sdpa's tokens; the one-token steps run pldr::g_attention_decode on the model's own cache
    tensors (DynamicCache or StaticCache)."""
    model = tiny_llama(kv_heads, seed=3)
    ids, mask = left_padded_batch(seed=4)
    if not padded:
        ids, mask = ids[1:2], mask[1:2]
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
              pad_token_id=0)
    if cache == "static":
        kw["cache_implementation"] = "static"
    model.set_attn_implementation("sdpa")
    want = model.generate(**kw)
    model.set_attn_implementation("pldr")
    with OpCalls() as calls:
        got = model.generate(**kw)
    assert torch.equal(got, want)
    assert "g_attention" in calls.names and "g_attention_decode" in calls.names


@pytest.mark.parametrize("kv_heads", (1, 2))
def test_training_step_matches_sdpa(kv_heads):
    """Loss and every parameter gradient of a training step (padded batch, labels) through
    pldr::g_attention's backward, by the rule against an fp64 copy with eager as the peer."""
    ids, mask = left_padded_batch(seed=5)
    labels = ids.masked_fill(mask == 0, -100)

    def step(model, impl):
        model.train()
        model.set_attn_implementation(impl)
        model.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    model = tiny_llama(kv_heads, seed=6)
    fp64_loss, fp64_grads = step(copy.deepcopy(model).double(), "sdpa")
    results = {impl: step(model, impl) for impl in ("sdpa", "eager", "pldr")}
    assert_within_rule(results["pldr"][0], results["sdpa"][0], results["eager"][0],
                       fp64_loss.float(), "loss")
    for name, g64 in fp64_grads.items():
        assert_within_rule(results["pldr"][1][name], results["sdpa"][1][name],
                           results["eager"][1][name], g64.float(), name)


# --------------------------------------------------------------------------------------------
# The mask conversion
# --------------------------------------------------------------------------------------------
def test_mask_conversion_is_exact_or_refused():
    """Key padding, bottom-right causal with a StaticCache's unfilled tail cut off, and a
    one-token row's contiguous range are recognised; a sliding window, a per-head mask and an
    additive bias are refused with an error saying what cannot be expressed."""
    B, Sq, Sk = 2, 4, 10
    pad = torch.ones(B, Sk, dtype=torch.bool)
    pad[0, :3] = False
    i, j = torch.arange(Sq)[:, None], torch.arange(Sk)[None, :]
    causal_static = (j <= i + 3) & pad[:, None, :]  # 4 cached + 4 new of Smax = 10, row 0 padded
    conv = hf_attention.mask_to_key_mask(causal_static[:, None], B, Sq, Sk)
    assert conv.key_end == 7 and conv.causal and torch.equal(conv.key_mask, pad[:, :7])
    step = pad[:, None, None, :].clone()  # one token, keys [3, 8) and [0, 8) of Smax = 10
    step[..., 8:] = False
    conv = hf_attention.mask_to_key_mask(step, B, 1, Sk)
    assert [t.tolist() for t in conv.rows] == [[3, 0], [8, 8]]
    window = causal_static & (j >= i + 1)
    with pytest.raises(ValueError, match="not a key padding mask"):
        hf_attention.mask_to_key_mask(window[:, None], B, Sq, Sk)
    per_head = torch.stack([causal_static, causal_static.logical_not()], dim=1)
    with pytest.raises(ValueError, match="differs between heads"):
        hf_attention.mask_to_key_mask(per_head, B, Sq, Sk)
    bias = torch.zeros(B, 1, Sq, Sk)
    bias[..., 0] = -1.5
    with pytest.raises(ValueError, match="values other than 0"):
        hf_attention.mask_to_key_mask(bias, B, Sq, Sk)
    additive = torch.zeros(B, 1, Sq, Sk).masked_fill(~causal_static[:, None], float("-inf"))
    assert hf_attention.mask_to_key_mask(additive, B, Sq, Sk).causal


def test_unsupported_arguments_are_refused():
    q = torch.zeros(1, H, 3, 64)
    with pytest.raises(ValueError, match="no attention dropout"):
        hf_attention.pldr_attention_forward(torch.nn.Module(), q, q, q, None, dropout=0.1)
    with pytest.raises(ValueError, match="soft-capping"):
        hf_attention.pldr_attention_forward(torch.nn.Module(), q, q, q, None, softcap=30.0)


def test_llama_bench_suite_runs():
    """`pldr-bench llama` on a tiny run: every (part, attn) row is there and checked."""
    from pldr_kernels.bench.llama_suite import LlamaConfig, run_llama

    rows, skips = run_llama(LlamaConfig(llama_seqlens=(16,), llama_kv_heads=(2,), llama_layers=1,
                                        repeats=1), torch.device("cpu"), show_progress=False)
    assert not skips
    assert {(r["part"], r["impl"]) for r in rows} == {
        (part, impl) for part in ("attention", "prefill", "decode")
        for impl in ("pldr", "sdpa", "eager")}
    assert all(r["valid"] and r["time_ms_p50"] > 0 for r in rows)
