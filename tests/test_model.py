"""PLDRForCausalLM (kernel path) against the authors'-style ReferencePLDR run in fp64."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from model_testing import left_pad, needs_cpu_kernels, ops_replaced_by_peers, prompt, tiny_model

from pldr_kernels import reference
from pldr_kernels.generation import DecodeState
from pldr_kernels.reference_model import ReferencePLDR
from pldr_kernels.sampling import GenerationOptions
from pldr_kernels.testing import assert_close

CACHE_MODES = ("none", "g", "kv", "kvg")


@needs_cpu_kernels
@pytest.mark.parametrize("reference_rope", [True, False])
def test_prefill_logits_match_reference(reference_rope):
    model = tiny_model(reference_rope=reference_rope)
    ref = ReferencePLDR.from_model(model, torch.float64).eval()
    ids = prompt(23, seed=1)
    with torch.no_grad():
        assert_close(model(ids).logits, ref(ids).logits, name="logits")


@needs_cpu_kernels
@pytest.mark.parametrize("include_pad_in_g", [False, True])
def test_padded_prefill_logits_match_reference(include_pad_in_g):
    model = tiny_model()
    ref = ReferencePLDR.from_model(model, torch.float64).eval()
    ids, mask = left_pad([prompt(17, seed=2), prompt(9, seed=3)])
    with torch.no_grad():
        out = model(ids, mask, include_pad_in_g=include_pad_in_g).logits
        want = ref(ids, mask, include_pad_in_g=include_pad_in_g).logits
    real = mask.bool()  # pad positions have no visible key: their logits are not compared
    assert_close(out[real], want[real], name="logits")


@needs_cpu_kernels
@pytest.mark.parametrize("cache", CACHE_MODES)
def test_greedy_generation_matches_reference(cache):
    model = tiny_model()
    ref = ReferencePLDR.from_model(model, torch.float64).eval()
    peer = ReferencePLDR.from_model(model, torch.float32).eval()
    ids = prompt(11, seed=4)
    no_eos = dict(cache=cache, return_deductive=True, eos_token_id=None)
    got, ded = model.generate(ids, 32, **no_eos)
    want, ref_ded = ref.generate(ids, 32, **no_eos)
    _, peer_ded = peer.generate(ids, 32, **no_eos)
    assert got.shape == (1, 11 + 32)
    assert torch.equal(got, want), \
        f"cache={cache}: {got[0, 11:].tolist()} vs {want[0, 11:].tolist()}"
    # G of layer ≥ 1 sits behind a whole layer and the power stage, which amplify fp32 rounding
    # (docs/spec.md §5.1): judged against the same model in fp32 PyTorch (docs/design.md §4.1
    # peer rule).
    names = ("A", "A_LM", "G") if cache != "g" else ("A_LM", "G")  # 'g': A is recomputed (authors)
    for layer, (d, r, p) in enumerate(zip(ded, ref_ded, peer_ded)):
        for i, name in enumerate(("A", "A_LM", "G")):
            if name in names:
                assert_close(d[i], r[i], peer=p[i], name=f"{name}[{layer}]")


@needs_cpu_kernels
def test_kvg_equals_recompute_with_frozen_g():
    """docs/spec.md §3.1 mode matrix: with G frozen from the prompt, caching k/v changes nothing."""
    model = tiny_model(seed=5)
    ids = prompt(13, seed=6)
    kvg = model.generate(ids, 24, cache="kvg")
    frozen = model.generate(ids, 24, cache="g")
    kv = model.generate(ids, 24, cache="kv")
    assert torch.equal(kvg, frozen)
    assert torch.equal(kvg, kv)


@needs_cpu_kernels
@pytest.mark.parametrize("cache", CACHE_MODES)
def test_left_padded_batch_equals_each_prompt_alone(cache):
    model = tiny_model(seed=7)
    prompts = [prompt(14, seed=8), prompt(5, seed=9), prompt(10, seed=10)]
    ids, mask = left_pad(prompts)
    batch = model.generate(ids, 16, cache=cache, attention_mask=mask, eos_token_id=None)
    for i, p in enumerate(prompts):
        alone = model.generate(p, 16, cache=cache, eos_token_id=None)
        assert torch.equal(batch[i, ids.shape[1] - p.shape[1]:], alone[0]), f"row {i}"
    with torch.no_grad():
        batch_logits = model(ids, mask).logits
        for i, p in enumerate(prompts):
            alone_logits = model(p).logits[0]
            row = batch_logits[i, ids.shape[1] - p.shape[1]:]
            assert (row - alone_logits).abs().max() <= 1e-5 * alone_logits.abs().max()


@needs_cpu_kernels
def test_include_pad_in_g_reproduces_hf_port():
    """HF port semantics: pad rows enter QᵀQ, so a padded row's G differs from its G alone."""
    model = tiny_model(seed=11)
    ref = ReferencePLDR.from_model(model, torch.float64).eval()
    ids, mask = left_pad([prompt(12, seed=12), prompt(6, seed=13)])
    got, ded = model.generate(ids, 8, attention_mask=mask, include_pad_in_g=True,
                              return_deductive=True)
    want, ref_ded = ref.generate(ids, 8, attention_mask=mask, include_pad_in_g=True,
                                 return_deductive=True)
    assert torch.equal(got, want)
    assert_close(ded[0][2], ref_ded[0][2], name="G")  # layer 0: no chain in front
    _, alone = model.generate(ids[1:, 6:], 1, return_deductive=True)
    assert (ded[0][2][1] - alone[0][2][0]).abs().max() > 1e-3


@needs_cpu_kernels
def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = tiny_model(seed=14)
    ids = prompt(7, seed=15)
    a = model.generate(ids, 12, do_sample=True, temperature=0.8, top_p=0.9, seed=3)
    b = model.generate(ids, 12, do_sample=True, temperature=0.8, top_p=0.9, seed=3)
    assert torch.equal(a, b)
    greedy = model.generate(ids, 12)
    assert torch.equal(model.generate(ids, 12, do_sample=True, top_k=1, seed=5), greedy)


@needs_cpu_kernels
def test_stream_and_eos():
    model = tiny_model(seed=16)
    ids = prompt(9, seed=17)
    full = model.generate(ids, 10, eos_token_id=None)
    streamed = torch.stack(list(model.generate_stream(ids, 10, eos_token_id=None)), dim=1)
    assert torch.equal(streamed, full[:, 9:])
    eos = int(full[0, 12])  # the 4th generated token
    stopped = model.generate(ids, 10, eos_token_id=eos)
    first = int((full[0, 9:] == eos).nonzero()[0])
    assert torch.equal(stopped, full[:, :9 + first + 1])


@needs_cpu_kernels
def test_cache_never_written_past_its_end():
    model = tiny_model(seed=18)
    ids = prompt(6, seed=19)
    with pytest.raises(RuntimeError, match="KV-cache full"):
        model.generate(ids, 5, max_length=8, eos_token_id=None)
    with pytest.raises(RuntimeError, match="KV-cache full"):
        model.generate(ids, 1, max_length=5)  # the prompt alone does not fit
    assert model.caches() == [None, None]  # a failed generation leaves no caches behind
    with torch.no_grad():
        model.setup_caches(1, 8)
        model.prefill(ids)
        state = DecodeState.after_prompt(None, 1, 6, 8, ids.device)
        for _ in range(2):
            model.decode_step(torch.tensor([[5]]), state.positions, state.cache_seqlens)
            state.advance()
        snapshot = [c.k.clone() for c in model.caches()]
        with pytest.raises((RuntimeError, ValueError), match="exceeds the cache length"):
            # the op refuses the append
            model.decode_step(torch.tensor([[5]]), state.positions, state.cache_seqlens)
    assert all(torch.equal(a, c.k) for a, c in zip(snapshot, model.caches()))


def _sdpa_forward(model, ids):
    """Independent PLDR forward with G = identity: plain causal SDPA (no pldr op)."""
    cfg = model.config
    B, S = ids.shape
    H, d = cfg.num_attention_heads, cfg.head_dim
    pos = torch.arange(S)
    x = model.decoder.layernorm1(model.decoder.embedding(ids) * math.sqrt(cfg.hidden_size))
    for block in model.decoder.dec_layers:
        att = block.mha1
        q = reference.apply_rope(att.wq(x).view(B, S, H, d), pos, cfg.reference_rope)
        k = reference.apply_rope(att.wk(x).view(B, S, H, d), pos, cfg.reference_rope)
        v = att.wv(x).view(B, S, H, d)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)
        attn = att.dense(o.transpose(1, 2).reshape(B, S, H * d))
        out1 = block.layernorm1(attn + x)
        ffn = block.ffn.gluw3(F.silu(block.ffn.gluw1(out1)) * block.ffn.gluw2(out1))
        x = block.layernorm2(ffn + out1)
    return model.final_layer(x)


@needs_cpu_kernels
def test_identity_g_model_equals_sdpa():
    model = tiny_model(seed=20, custom_G_type="identity")
    ids = prompt(19, seed=21)
    with torch.no_grad():
        want = _sdpa_forward(model.double(), ids)
        model.float()
        assert_close(model(ids).logits, want, name="logits")
    assert "decoder.past_G_values" in model.state_dict()
    assert not any("plgatt_layer" in k or "reslayerAs" in k for k in model.state_dict())


@needs_cpu_kernels
@pytest.mark.parametrize("cache", ["none", "kvg"])
def test_external_g_matches_reference(cache):
    model = tiny_model(seed=22, custom_G_type="external")
    with torch.no_grad():
        G = torch.eye(64) + 0.2 * torch.randn(2, 1, 2, 64, 64) / 8
        model.decoder.past_G_values[:, 2] = G
    ref = ReferencePLDR.from_model(model, torch.float64).eval()
    ids = prompt(10, seed=23)
    with torch.no_grad():
        assert_close(model(ids).logits, ref(ids).logits, name="logits")
    assert torch.equal(model.generate(ids, 16, cache=cache), ref.generate(ids, 16, cache=cache))


@needs_cpu_kernels
def test_bf16_weights_keep_the_g_path_fp32():
    model = tiny_model(seed=24)
    ref = ReferencePLDR.from_model(model, torch.float64).eval()
    ids = prompt(15, seed=25)
    with torch.no_grad():
        want = ref(ids).logits
        model.to(torch.bfloat16)
        att = model.decoder.dec_layers[0].mha1
        assert att.wq.weight.dtype == torch.bfloat16
        assert model.final_layer.weight.dtype == torch.bfloat16
        assert att.plgatt_layer.pwlst.dtype == torch.float32
        assert att.reslayerAs[0].denseAs[0].gluw1.weight.dtype == torch.float32
        assert all(w.dtype == torch.float32 for w in att.packed_metric_weights())
        out = model(ids).logits
        # Peer (docs/design.md §4.1): the same model and dtypes with the ops' math in plain
        # PyTorch.
        with ops_replaced_by_peers():
            peer = model(ids).logits
    assert out.dtype == torch.bfloat16 and peer.dtype == torch.bfloat16
    assert_close(out, want, peer=peer, name="bf16 logits")
    assert model.generate(ids, 4, eos_token_id=None).shape == (1, 19)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph decode needs a CUDA device")
@needs_cpu_kernels
def test_cuda_graph_decode_matches_eager():
    model = tiny_model(seed=28).cuda()
    ids = prompt(9, seed=29).cuda()
    assert torch.equal(model.generate(ids, 16, cuda_graph=True), model.generate(ids, 16))


def test_cuda_graph_refused_on_cpu():
    model = tiny_model()
    with pytest.raises(ValueError, match="CUDA"):
        next(model.generate_stream(prompt(4, seed=0), 2, cuda_graph=True))


@pytest.mark.parametrize("kwargs, match", [
    (dict(cache="fast"), "cache must be one of"),
    (dict(top_p=0.0), "top_p"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(attention_mask=torch.tensor([[1, 1, 0, 0]])), "left-padded"),
])
def test_bad_generate_arguments(kwargs, match):
    model = tiny_model()
    with pytest.raises(ValueError, match=match):
        model.generate(prompt(4, seed=0), 2, **kwargs)


@needs_cpu_kernels
def test_cache_first_g_shares_row_0_g_in_decode():
    """HF port's cache_first_G: every row decodes with row 0's G (prefill uses each row's own)."""
    model = tiny_model(seed=30, cache_first_G=True)
    a, b = prompt(8, seed=31), prompt(8, seed=32)
    out, ded = model.generate(torch.cat([a, b]), 6, return_deductive=True, eos_token_id=None)
    assert ded[0][2].shape[0] == 1
    with torch.no_grad():
        G_a = model.decoder.dec_layers[0].mha1(model.decoder.embed(a), return_metric=True)[1][2]
    assert (ded[0][2] - G_a).abs().max() <= 1e-6 * G_a.abs().max()  # row 0's G, not row 1's
    assert torch.equal(out[0], model.generate(a, 6, eos_token_id=None)[0])
    assert torch.equal(model.generate(a, 0), a)


@needs_cpu_kernels
def test_labels_give_the_shifted_next_token_loss():
    """HF convention: position t is scored against labels[t + 1]; -100 labels are left out."""
    model = tiny_model(seed=33)
    ref = ReferencePLDR.from_model(model, torch.float64).eval()
    ids = prompt(12, seed=34)
    labels = ids.clone()
    labels[0, :4] = -100  # e.g. a prompt that is not trained on
    with torch.no_grad():
        out = model(ids, labels=labels)
        want = ref(ids, labels=labels)
    logits = out.logits[0].double()
    targets = ids[0, 1:]
    picked = torch.arange(3, 11)  # positions whose next label is not -100 (labels 4 … 11)
    nll = torch.logsumexp(logits[picked], -1) - logits[picked, targets[picked]]
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    assert_close(out.loss, nll.mean(), name="loss")
    assert_close(out.loss, want.loss, name="loss vs reference")
    assert model(ids).loss is None
    with pytest.raises(ValueError, match="labels must have the shape"):
        model(ids, labels=labels[:, 1:])
    V = model.config.vocab_size
    for bad, grad in ((V, False), (-1, True)):  # at inference and in a training step alike
        wrong = labels.clone()
        wrong[0, 7] = bad
        with torch.set_grad_enabled(grad), pytest.raises(
                ValueError, match=rf"labels\[0, 7\] = {bad} is not a token id: expected 0 <= "
                                  rf"label < {V} \(vocab_size\), or -100"):
            model(ids, labels=wrong)


@needs_cpu_kernels
@pytest.mark.parametrize("cache", ["none", "kvg"])
def test_eos_defaults_to_the_config_and_none_disables_it(cache):
    ids = prompt(9, seed=36)
    free = tiny_model(seed=35).generate(ids, 10, cache=cache, eos_token_id=None)
    eos = int(free[0, 12])  # the 4th generated token
    first = int((free[0, 9:] == eos).nonzero()[0])
    model = tiny_model(seed=35, eos_token_id=eos)
    ref = ReferencePLDR.from_model(model, torch.float64).eval()
    stopped = model.generate(ids, 10, cache=cache)
    assert torch.equal(stopped, free[:, :9 + first + 1])
    assert torch.equal(ref.generate(ids, 10, cache=cache), stopped)
    assert torch.equal(model.generate(ids, 10, cache=cache, eos_token_id=None), free)
    assert torch.equal(ref.generate(ids, 10, cache=cache, eos_token_id=None), free)


@needs_cpu_kernels
def test_options_object_equals_keywords_and_unknown_keywords_are_refused():
    model = tiny_model(seed=37)
    ids = prompt(7, seed=38)
    options = GenerationOptions(max_new_tokens=6, cache="kv", do_sample=True, top_k=5, seed=2)
    by_keywords = model.generate(ids, 6, cache="kv", do_sample=True, top_k=5, seed=2)
    assert torch.equal(model.generate(ids, options=options), by_keywords)
    assert torch.equal(model.generate(ids, 3, options=options), by_keywords[:, :10])
    with pytest.raises(TypeError, match="unknown generation option.*'tempreature'"):
        model.generate(ids, 2, tempreature=0.5)
    with pytest.raises(ValueError, match="eos_token_id must be"):
        model.generate(ids, 2, eos_token_id="3")
    with pytest.raises(ValueError, match="ReferencePLDR has no CUDA-graph"):
        ReferencePLDR.from_model(model).generate(ids, 2, cuda_graph=True)


@needs_cpu_kernels
def test_caches_belong_to_one_generation_at_a_time():
    model = tiny_model(seed=39)
    ids = prompt(5, seed=40)
    first = model.generate_stream(ids, 4, eos_token_id=None)
    next(first)
    assert all(c is not None for c in model.caches())
    second = model.generate_stream(ids, 4, eos_token_id=None)
    assert len(list(second)) == 4
    assert model.caches() == [None, None]  # cleared at the end of a generation
    with pytest.raises(RuntimeError, match="another generation on this model replaced"):
        next(first)


@needs_cpu_kernels
def test_torch_compile_fullgraph_forward_prefill_and_decode_step():
    """The whole model traces without graph breaks. Inductor fuses the LayerNorms and pointwise ops
    differently from eager, so compiled outputs are judged against the fp64 reference by the fp32
    rule, like the eager ones; the pldr ops run unchanged inside the graph."""
    torch._dynamo.reset()
    model = tiny_model(seed=41, num_hidden_layers=1, num_reslayerA=1, num_denseA=1, vocab_size=64)
    ref = ReferencePLDR.from_model(model, torch.float64).eval()
    ids, mask = left_pad([prompt(9, seed=42, vocab=64), prompt(5, seed=43, vocab=64)])
    labels = ids.masked_fill(mask == 0, -100)
    compile_kw = dict(fullgraph=True, dynamic=False, backend="inductor")
    with torch.no_grad():
        out = torch.compile(model, **compile_kw)(ids, mask, labels=labels)
        want = ref(ids, mask, labels=labels)
        real = mask.bool()
        assert_close(out.logits[real], want.logits[real], name="compiled logits")
        assert_close(out.loss, want.loss, name="compiled loss")

    def prefill_and_decode(prefill, decode_step):
        """Greedy prompt + 3 decode steps ('kvg'): the logits of each step and the tokens."""
        model.setup_caches(2, 16)
        state = DecodeState.after_prompt(mask, 2, ids.shape[1], 16, ids.device)
        steps = [prefill(ids, mask)]
        tokens = [steps[-1].argmax(-1)[:, None]]
        for _ in range(3):
            steps.append(decode_step(tokens[-1], state.positions, state.cache_seqlens,
                                     state.cache_start))
            state.advance()
            tokens.append(steps[-1].argmax(-1)[:, None])
        k_cache = model.caches()[0].k.clone()
        model.clear_caches()
        return steps, torch.cat([ids, *tokens], dim=1), k_cache

    with torch.no_grad():
        eager, eager_tokens, eager_k = prefill_and_decode(model.prefill, model.decode_step)
        compiled, tokens, k_cache = prefill_and_decode(
            torch.compile(model.prefill, **compile_kw),
            torch.compile(model.decode_step, **compile_kw))
    # The eager steps are judged against the fp64 reference by the other tests; the compiled
    # ones against the eager ones, by the fp32 rule.
    for i, (c, e) in enumerate(zip(compiled, eager)):
        assert_close(c, e.double(), name=f"compiled step {i} logits")
    assert_close(k_cache, eager_k.double(), name="k cache written under compile")
    assert torch.equal(tokens, eager_tokens)
    assert torch.equal(tokens, ref.generate(ids, 4, attention_mask=mask, eos_token_id=None))
