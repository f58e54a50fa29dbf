"""pldr::decode_layer (docs/design.md §3.12): one decoder layer of a CPU decode step in one call.

The model's fused decode step gives the bits of its Python layer loop — logits and tokens, in
fp32, bf16 and int8, interleaved and rotate_half RoPE, with and without biases, a padded batch,
the kv and kvg cache modes, a predefined-G model — and falls back to the loop where the op does not
apply (autograd, a hook, a module of the user's). The op itself: clear errors naming the argument
with nothing written, the caches' version counters bumped, no backward, opcheck. (The fake
kernel's words are those of the C++ checks: tests/test_fake_kernels.py.)"""
from __future__ import annotations

import copy

import pytest
import torch
from model_testing import left_pad, needs_cpu_kernels, prompt, tiny_model

from pldr_kernels import ops
from pldr_kernels.nn import SMALL_ROWS

pytestmark = [pytest.mark.skipif(ops._LOAD_ERROR is not None, reason=f"{ops._LOAD_ERROR}"),
              needs_cpu_kernels]

NEW_TOKENS = 6


def decode_logits(model, ids, mask, fused: bool, recompute_G: bool = False):
    """Greedy decoding after a prefill, step by step: the logits of every step and the tokens,
    with the fused decode step on or off (and whether it ran)."""
    model.fused_decode = fused
    B, S = ids.shape
    with torch.inference_mode():
        model.setup_caches(B, S + NEW_TOKENS)
        logits = [model.prefill(ids, mask)]
        positions = (mask.sum(1, keepdim=True) - 1 if mask is not None
                     else torch.full((B, 1), S - 1))
        seqlens = torch.full((B,), S, dtype=torch.int32)
        start = None if mask is None else (S - mask.sum(1)).int()
        tokens = []
        for _ in range(NEW_TOKENS):
            token = logits[-1].argmax(-1, keepdim=True)
            tokens.append(token)
            positions = positions + 1
            logits.append(model.decode_step(token, positions, seqlens, start, recompute_G))
            seqlens += 1
    ran_fused = bool(model._decode_plan)
    model.fused_decode = True
    return torch.stack(logits), torch.cat(tokens, 1), ran_fused


def assert_fused_gives_the_loops_bits(model, ids, mask=None, recompute_G=False):
    fused, fused_tokens, ran = decode_logits(model, ids, mask, True, recompute_G)
    loop, loop_tokens, ran_loop = decode_logits(model, ids, mask, False, recompute_G)
    assert ran and not ran_loop
    assert torch.equal(fused_tokens, loop_tokens)
    torch.testing.assert_close(fused, loop, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "int8"])
@pytest.mark.parametrize("reference_rope", [True, False], ids=["interleaved", "rotate_half"])
def test_fused_decode_step_gives_the_layer_loops_bits(dtype, reference_rope):
    model = tiny_model(seed=1, reference_rope=reference_rope)
    if dtype == "int8":
        model.quantize_weights("int8")
    else:
        model.to(dtype)
    assert_fused_gives_the_loops_bits(model, prompt(9, seed=2))


@pytest.mark.parametrize("batch", [2, 3])
def test_fused_decode_step_on_a_left_padded_batch(batch):
    model = tiny_model(seed=3)
    ids, mask = left_pad([prompt(n, seed=n) for n in (5, 11, 8)[:batch]])
    assert_fused_gives_the_loops_bits(model, ids, mask)


def test_fused_decode_step_recomputing_G_from_the_cached_A():  # cache mode 'kv'
    assert_fused_gives_the_loops_bits(tiny_model(seed=4), prompt(7, seed=5), recompute_G=True)


def test_fused_decode_step_without_biases():
    model = tiny_model(seed=6, attention_bias=False, glu_bias=False)
    assert model.decoder.dec_layers[0].mha1.dense.bias is None
    assert_fused_gives_the_loops_bits(model, prompt(8, seed=7))


def test_fused_decode_step_of_a_predefined_G_model():
    model = tiny_model(seed=8, custom_G_type="random")
    assert not model.config.has_metric_learner
    assert_fused_gives_the_loops_bits(model, prompt(6, seed=9))


def test_generate_takes_the_fused_step_and_gives_the_loops_tokens(monkeypatch):
    model = tiny_model(seed=10)
    ids = prompt(10, seed=11)
    steps = []
    fused_step = model._fused_decode_step
    monkeypatch.setattr(model, "_fused_decode_step",
                        lambda *args: steps.append(1) or fused_step(*args))
    fused = model.generate(ids, 8, cache="kvg", eos_token_id=None)
    assert len(steps) == 7  # the first new token comes from the prefill
    model.fused_decode = False
    loop = model.generate(ids, 8, cache="kvg", eos_token_id=None)
    assert torch.equal(fused, loop) and len(steps) == 7


def test_the_layer_loop_runs_where_the_op_does_not_apply():
    model = tiny_model(seed=12)
    ids = prompt(5, seed=13)
    model.setup_caches(1, 8)
    with torch.no_grad():
        model.prefill(ids)
    token, seqlens = ids[:, -1:], torch.tensor([5], dtype=torch.int32)
    with torch.enable_grad():  # parameters require grad: the loop's linears take the GEMMs
        model.decode_step(token, torch.tensor([[5]]), seqlens)
    assert model._decode_plan is None
    with torch.no_grad():
        big = tiny_model(seed=12)
        big.setup_caches(SMALL_ROWS + 1, 8)
        big.prefill(ids.expand(SMALL_ROWS + 1, -1))
        big.decode_step(token.expand(SMALL_ROWS + 1, -1), torch.full((SMALL_ROWS + 1, 1), 5),
                        seqlens.expand(SMALL_ROWS + 1).contiguous())
    assert big._decode_plan is None


def test_a_hook_on_a_layer_keeps_the_layer_loop():
    model = tiny_model(seed=14)
    seen = []
    model.decoder.dec_layers[1].ffn.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    logits, _, ran = decode_logits(model, prompt(6, seed=15), None, fused=True)
    assert not ran and model._decode_plan == [] and len(seen) == 1 + NEW_TOKENS


def test_the_plan_follows_the_weights():
    """A cast, a load with assign=True and quantisation each drop the kept weights."""
    model = tiny_model(seed=16)
    ids = prompt(6, seed=17)
    decode_logits(model, ids, None, fused=True)
    assert model._decode_plan
    model.to(torch.bfloat16)
    assert model._decode_plan is None
    assert_fused_gives_the_loops_bits(model, ids)
    other = tiny_model(seed=18).to(torch.bfloat16)
    model.load_state_dict(other.state_dict(), assign=True)
    assert model._decode_plan is None
    assert_fused_gives_the_loops_bits(model, ids)
    model.quantize_weights("int8")
    assert model._decode_plan is None
    assert_fused_gives_the_loops_bits(model, ids)


def _first_packed_parameter(model):
    """A parameter that is a view into layer 0's qkv pack."""
    obj = model.decoder.dec_layers[0].mha1
    for name in obj.packs["qkv_weight"].paths[0]:
        obj = getattr(obj, name)
    return obj


# Changes a user may make between two decode steps, after the plan was kept.
CHANGES = {
    "a linear's weight re-assigned": lambda m: setattr(
        m.decoder.dec_layers[0].mha1.dense, "weight",
        torch.nn.Parameter(m.decoder.dec_layers[0].mha1.dense.weight.detach().flip(0).clone())),
    "a packed parameter's .data re-pointed": lambda m: setattr(
        _first_packed_parameter(m), "data", _first_packed_parameter(m).detach().flip(0).clone()),
    "a projection module replaced": lambda m: setattr(
        m.decoder.dec_layers[1].ffn, "gluw2", copy.deepcopy(m.decoder.dec_layers[1].ffn.gluw1)),
    "a layer norm's eps": lambda m: setattr(m.decoder.dec_layers[1].layernorm2, "eps", 0.5),
    "a layer replaced": lambda m: m.decoder.dec_layers.__setitem__(
        0, copy.deepcopy(m.decoder.dec_layers[1])),
    "a hook on the shared RoPE": lambda m: m.decoder.rope.register_forward_hook(
        lambda module, args, out: out.flip(-1)),
    "a forward hook": lambda m: m.decoder.dec_layers[0].ffn.register_forward_hook(
        lambda module, args, out: out * 2),
    "a global forward hook": lambda m: torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: out * 1.5 if type(module) is torch.nn.LayerNorm else None),
}


@pytest.mark.parametrize("change", CHANGES)
def test_a_change_between_steps_is_seen_by_the_kept_plan(change):
    """The kept weights are checked at every step: after each change the fused step gives the
    layer loop's bits, never the old weights' result."""
    base = tiny_model(seed=19)
    ids = prompt(7, seed=20)

    def steps(fused: bool) -> torch.Tensor:
        model = copy.deepcopy(base)
        model.fused_decode = fused
        handles = []
        with torch.inference_mode():
            model.setup_caches(1, 7 + 4)
            logits = [model.prefill(ids)]
            seqlens = torch.tensor([7], dtype=torch.int32)
            for step in range(4):
                if step == 2:
                    handles.append(CHANGES[change](model))
                token = logits[-1].argmax(-1, keepdim=True)
                logits.append(model.decode_step(token, torch.tensor([[7 + step]]), seqlens))
                seqlens += 1
        for handle in handles:
            if hasattr(handle, "remove"):
                handle.remove()
        return torch.stack(logits)

    fused, loop = steps(True), steps(False)
    torch.testing.assert_close(fused, loop, rtol=0, atol=0)


# ---- the op ------------------------------------------------------------------------------------
def layer_call(model, B=1, cache_len=4):
    """decode_layer's arguments for the model's first layer, with fresh caches of ``cache_len``
    rows written."""
    layer = model.decoder.dec_layers[0]
    layer_plan = layer.decode_layer_arguments()
    weights, eps = layer_plan.weights, layer_plan.eps
    c = model.config
    H, d = c.num_attention_heads, c.head_dim
    k_cache = torch.randn(B, 8, H, d).to(model.dtype)
    v_cache = torch.randn(B, 8, H, d).to(model.dtype)
    cos, sin = model.decoder.rope.tables(torch.full((B, 1), cache_len))
    names = ("qkv_weight", "qkv_bias", "qkv_scale", "dense_weight", "dense_bias", "dense_scale",
             "ln1_weight", "ln1_bias", "ffn_w12", "ffn_b12", "ffn_s12", "ffn_w3", "ffn_b3",
             "ffn_s3", "ln2_weight", "ln2_bias")
    return dict(x=torch.randn(B, 1, c.hidden_size).to(model.dtype), **dict(zip(names, weights)),
                k_cache=k_cache, v_cache=v_cache,
                cache_seqlens=torch.full((B,), cache_len, dtype=torch.int32), cache_start=None,
                G=layer.mha1.kv_cache.G if layer.mha1.kv_cache is not None else None,
                rope_cos=cos, rope_sin=sin, interleaved_rope=c.reference_rope, eps=eps)


@pytest.mark.parametrize("argument, spoil, message", [
    ("ffn_w3", lambda t: torch.empty(t.shape[::-1]).t().copy_(t), "ffn_w3 must be contiguous"),
    ("dense_bias", lambda t: t[:-1], "dense_bias must have shape [128], got [127]"),
    ("qkv_weight", lambda t: t.to(torch.int8), "qkv_scale is required with an int8 qkv_weight"),
    ("rope_sin", lambda t: torch.cat((t, t), -1),
     "rope_sin must have shape [1, 1, 1, 32] (one angle per pair"),
    ("cache_seqlens", lambda t: torch.full_like(t, 8),
     "appending would write past the end of k_cache/v_cache"),
], ids=["strided weight", "short bias", "int8 without scale", "rope table", "cache full"])
def test_a_bad_call_names_the_argument_and_writes_nothing(argument, spoil, message):
    kw = layer_call(tiny_model(seed=19))
    kw[argument] = spoil(kw[argument].detach())
    before = kw["k_cache"].clone(), kw["v_cache"].clone()
    with pytest.raises(RuntimeError) as info:
        ops.decode_layer(**kw)
    assert message in str(info.value)
    assert torch.equal(kw["k_cache"], before[0]) and torch.equal(kw["v_cache"], before[1])


def test_the_append_bumps_the_caches_version_counters():
    kw = layer_call(tiny_model(seed=20))
    versions = kw["k_cache"]._version, kw["v_cache"]._version
    with torch.no_grad():
        ops.decode_layer(**kw)
    assert (kw["k_cache"]._version, kw["v_cache"]._version) == (versions[0] + 1, versions[1] + 1)


def test_a_gradient_asked_of_decode_layer_says_why_there_is_none():
    kw = layer_call(tiny_model(seed=21))
    kw["x"].requires_grad_()
    out = ops.decode_layer(**kw)  # the forward runs under grad mode
    assert out.requires_grad
    with pytest.raises(RuntimeError, match=r"pldr::decode_layer has no backward"):
        out.sum().backward()


def test_opcheck():
    model = tiny_model(seed=22)
    model.setup_caches(1, 8)
    with torch.no_grad():
        model.prefill(prompt(4, seed=23))
        kw = layer_call(model)
    kw = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    torch.library.opcheck(torch.ops.pldr.decode_layer.default, (), kw,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration", "test_aot_dispatch_dynamic"))
