"""Weight-only int8 (PLDRForCausalLM.quantize_weights, pldr_kernels/quantize.py; docs/design.md
§3.9): what is quantised and what never is, the int8 model against its dequantised fp64 twin by
the peer rule (prefill and decode), save/load bit for bit with clear errors, the accuracy of a
trained model (perplexity within 1% of fp32, greedy continuations compared), and the bytes the
generate suite counts for a decode step."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from pldr_kernels import PLDRConfig, PLDRForCausalLM, ops
from pldr_kernels.bench import generate_suite
from pldr_kernels.loaders import CheckpointError
from pldr_kernels.quantize import Int8Linear, quantize_rows
from pldr_kernels.reference_model import ReferencePLDR
from pldr_kernels.testing import compare

pytestmark = pytest.mark.skipif(ops._LOAD_ERROR is not None, reason=f"{ops._LOAD_ERROR}")

TINY = dict(vocab_size=61, hidden_size=64, intermediate_size=90, num_hidden_layers=2,
            num_attention_heads=1, head_dim=64, A_dff=12, num_reslayerA=1, num_denseA=1,
            max_position_embeddings=96)


def tiny_model(seed: int = 0, **changes) -> PLDRForCausalLM:
    torch.manual_seed(seed)
    return PLDRForCausalLM(PLDRConfig(**(TINY | changes))).eval()


def dequantized_twin(quantized: PLDRForCausalLM, source: PLDRForCausalLM) -> PLDRForCausalLM:
    """``source`` with every int8 weight of ``quantized`` put back as its dequantised value."""
    twin = copy.deepcopy(source)
    with torch.no_grad():
        for name, m in quantized.named_modules():
            if isinstance(m, Int8Linear):
                twin.get_submodule(name).weight.copy_(m.dequantized())
    return twin


def logits(model, ids):
    out = model(ids)
    return getattr(out, "logits", out)


def test_quantize_rows_round_trip_within_half_a_step():
    w = torch.randn(7, 33)
    w[3] = 0  # an all-zero row keeps scale 1
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale[3] == 1
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()
    assert (q.abs().amax(dim=1)[[0, 1, 2, 4, 5, 6]] == 127).all()


def test_quantize_weights_in_place_keeps_the_g_path_norms_and_embedding():
    model = tiny_model()
    kept = {k: v.clone() for k, v in model.state_dict().items()
            if any(p in k for p in ("reslayerAs", "plgatt_layer", "layernorm", "embedding"))}
    assert model.quantize_weights("int8") is model
    assert model.quantization == "int8" and model.dtype == torch.float32
    attention, ffn = model.decoder.dec_layers[0].mha1, model.decoder.dec_layers[0].ffn
    for m in (attention.wq, attention.wk, attention.wv, attention.dense, ffn.gluw1, ffn.gluw2,
              ffn.gluw3, model.final_layer):
        assert isinstance(m, Int8Linear) and m.weight.dtype == torch.int8
    assert attention.packs["qkv_weight"].get().dtype == torch.int8
    state = model.state_dict()
    for k, v in kept.items():
        assert torch.equal(state[k], v) and state[k].dtype == v.dtype, k
    assert model.quantize_weights("int8") is model  # a second call changes nothing
    with pytest.raises(ValueError, match="kind must be one of"):
        model.quantize_weights("int4")


def test_tied_head_stays_unquantised():
    model = tiny_model(tie_word_embeddings=True).quantize_weights("int8")
    assert not isinstance(model.final_layer, Int8Linear)
    assert model.final_layer.weight is model.decoder.embedding.weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_logits_match_the_dequantised_model_prefill_and_decode(dtype, monkeypatch):
    mp = monkeypatch
    source = tiny_model(1)
    model = copy.deepcopy(source).to(dtype).quantize_weights("int8")
    assert model.dtype == dtype
    twin = dequantized_twin(model, source)
    ids = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(2))
    oracle_model = ReferencePLDR.from_model(twin, torch.float64).eval()
    peer_model = ReferencePLDR.from_model(twin, dtype).eval()
    with torch.no_grad():
        for rows in (ids, ids[:, :1]):  # 24 rows: dequantised F.linear; 2 × 1: linear_small
            compare(model(rows).logits, logits(oracle_model, rows), logits(peer_model, rows),
                    name=f"int8 logits, {rows.numel()} rows").assert_ok()
    # decode (cached G, so no uncached forward to compare with): the int8 step against the
    # dequantised twin's step on torch's F.linear — fp32 twin the oracle, a twin in the
    # activation dtype the peer
    out = model.generate(ids, 3, eos_token_id=None)
    steps = {}
    for name, m in (("int8", model), ("fp32", twin), ("peer", copy.deepcopy(twin).to(dtype))):
        steps[name] = decode_step_logits(m, out, small_rows=name == "int8", monkeypatch=mp)
    peer = None if dtype == torch.float32 else steps["peer"]
    compare(steps["int8"], steps["fp32"], peer, name="int8 decode-step logits").assert_ok()


def decode_step_logits(model, out, small_rows: bool, monkeypatch) -> torch.Tensor:
    """Prefill ``out[:, :-1]``, then the logits of one decode step of its last token."""
    from pldr_kernels import nn as pnn
    with monkeypatch.context() as m, torch.inference_mode():
        if not small_rows:
            m.setattr(pnn, "takes_small_rows", lambda x, w: False)
        B, n = out.shape
        model.setup_caches(B, n)
        model.prefill(out[:, :-1])
        seqlens = torch.full((B,), n - 1, dtype=torch.int32)
        return model.decode_step(out[:, -1:], seqlens[:, None].long(), seqlens).float()


def test_save_and_load_int8_bitwise_and_clear_errors(tmp_path):
    model = tiny_model(3).quantize_weights("int8")
    model.save_pretrained(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"] == "int8" and config["torch_dtype"] == "float32"
    loaded = PLDRForCausalLM.from_pretrained(tmp_path / "q")
    assert loaded.quantization == "int8"
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    ids = torch.randint(0, TINY["vocab_size"], (1, 6))
    assert torch.equal(model.generate(ids, 4, eos_token_id=None),
                       loaded.generate(ids, 4, eos_token_id=None))
    # the marker removed: the int8 tensors and scales do not fit an fp32 model
    del config["quantization"]
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unexpected key"):
        PLDRForCausalLM.from_pretrained(tmp_path / "q")
    config["quantization"] = "int4"
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match='"quantization" must be one of'):
        PLDRForCausalLM.from_pretrained(tmp_path / "q")
    # an fp32 checkpoint said to be int8
    tiny_model(3).save_pretrained(tmp_path / "f")
    config = json.loads((tmp_path / "f" / "config.json").read_text())
    config["quantization"] = "int8"
    (tmp_path / "f" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing key"):
        PLDRForCausalLM.from_pretrained(tmp_path / "f")
    with pytest.raises(ValueError, match="save_pth writes the authors' fp32 format"):
        model.save_pth(tmp_path / "m.pth")


def test_int8_dtype_mismatch_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    model = tiny_model(4).quantize_weights("int8")
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    key = "final_layer.weight"
    state[key] = state[key].float()  # same shape, not int8
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="int8 on one side only.*final_layer.weight"):
        PLDRForCausalLM.from_pretrained(tmp_path)


# ---- accuracy of a trained model ----------------------------------------------------------------
def markov_text(n: int, seed: int, vocab: int) -> torch.Tensor:
    """Tokens of a fixed sparse Markov chain (each token has 3 likely successors): a text with
    structure a small model learns in a few hundred steps; ``seed`` draws the sample only."""
    table = torch.Generator().manual_seed(1234)
    successors = torch.randint(0, vocab, (vocab, 3), generator=table)
    probs = torch.tensor([0.6, 0.3, 0.1])
    g = torch.Generator().manual_seed(seed)
    out, token = [], 0
    picks = torch.multinomial(probs, n, replacement=True, generator=g)
    for i in range(n):
        token = int(successors[token, picks[i]])
        out.append(token)
    return torch.tensor(out)


def perplexity(model, text: torch.Tensor, S: int) -> float:
    windows = text[: len(text) // S * S].view(-1, S)
    with torch.no_grad():
        return math.exp(float(model(windows, labels=windows).loss))


def test_int8_trained_model_perplexity_within_1_percent_and_greedy_agreement(record_property):
    V, S = TINY["vocab_size"], 32
    model = tiny_model(5).train()
    train, held_out = markov_text(8192, seed=1, vocab=V), markov_text(2048, seed=2, vocab=V)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(6)
    for _ in range(80):
        starts = torch.randint(0, len(train) - S, (8,), generator=g)
        batch = torch.stack([train[s:s + S] for s in starts.tolist()])
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    ppl32 = perplexity(model, held_out, S)
    assert ppl32 < 0.5 * V  # it learned the chain (a uniform guess is V)
    quantized = copy.deepcopy(model).quantize_weights("int8")
    ppl8 = perplexity(quantized, held_out, S)
    prompts = held_out[:8 * 16].view(8, 16)
    a = model.generate(prompts, 16, eos_token_id=None)[:, 16:]
    b = quantized.generate(prompts, 16, eos_token_id=None)[:, 16:]
    agree = int((a == b).sum())
    prefix = int(sum(int((row_a != row_b).nonzero()[0]) if (row_a != row_b).any() else 16
                     for row_a, row_b in zip(a, b)))
    record_property("int8_accuracy", f"held-out perplexity fp32 {ppl32:.4f} int8 {ppl8:.4f} "
                    f"({ppl8 / ppl32 - 1:+.3%}); greedy: {agree}/{a.numel()} tokens agree, "
                    f"{prefix}/{a.numel()} before the first difference")
    print(f"\nint8 accuracy: perplexity fp32 {ppl32:.4f} int8 {ppl8:.4f} "
          f"({ppl8 / ppl32 - 1:+.3%}); greedy {agree}/{a.numel()} tokens agree, "
          f"{prefix}/{a.numel()} before the first difference")
    assert abs(ppl8 / ppl32 - 1) < 0.01
    assert agree >= a.numel() // 2


def test_decode_step_bytes_count_weights_in_their_dtype():
    model = tiny_model(7)
    c = model.config
    fp32 = generate_suite.decode_step_bytes(model, "kvg", cache_len=10, batch=1)
    int8 = generate_suite.decode_step_bytes(copy.deepcopy(model).quantize_weights("int8"), "kvg",
                                            cache_len=10, batch=1)
    D, F, V = c.hidden_size, c.intermediate_size, c.vocab_size
    linear_weights = c.num_hidden_layers * (4 * D * D + 2 * F * D + D * F) + V * D
    linear_rows = c.num_hidden_layers * (4 * D + 2 * F + D) + V  # one scale per row
    assert fp32 - int8 == 4 * linear_weights - (linear_weights + 4 * linear_rows)
    kv_per_row = 2 * c.num_hidden_layers * c.hidden_size * 4
    assert generate_suite.decode_step_bytes(model, "kvg", 11, 1) - fp32 == kv_per_row
    assert generate_suite.decode_step_bytes(model, "none", 10, 1) is None
