"""pldr_kernels.hf: PldrllmForCausalLM and the transformers surface (docs/design.md §2.1) against
PLDRForCausalLM and the fp64 ReferencePLDR."""
from __future__ import annotations

import json
import os
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

from model_testing import left_pad, needs_cpu_kernels, prompt  # noqa: E402
from model_testing import tiny_model as _tiny_model  # noqa: E402

from pldr_kernels import PLDRForCausalLM  # noqa: E402
from pldr_kernels.hf import (  # noqa: E402
    PldrCache,
    PldrllmConfig,
    PldrllmForCausalLM,
    PldrllmTokenizerFast,
)
from pldr_kernels.loaders import CheckpointError  # noqa: E402
from pldr_kernels.reference_model import ReferencePLDR  # noqa: E402
from pldr_kernels.testing import assert_close  # noqa: E402

pytestmark = needs_cpu_kernels
HF_MODES = ("none", "kv", "kvg")
WORDS = ("the river ran past an old mill where seven children played with a small dog while "
         "their mother sang about winter bread and distant ships under grey morning skies").split()


def tiny_model(seed: int = 0, **overrides) -> PLDRForCausalLM:
    """model_testing's tiny model with a smaller FFN and metric learner (these tests are about
    the HF layer, not the kernels)."""
    return _tiny_model(seed, **{"intermediate_size": 96, "A_dff": 48, **overrides})


def hf_twin(model: PLDRForCausalLM) -> PldrllmForCausalLM:
    return PldrllmForCausalLM.from_pldr(model)


def hf_generate(hf, ids, mask=None, **kw):
    kw.setdefault("do_sample", False)
    return hf.generate(ids, attention_mask=mask, eos_token_id=None, pad_token_id=0, **kw)


# --------------------------------------------------------------------------------------------
# A tiny sentencepiece model with the authors' special ids, trained on text the test writes
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> str:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))) + "."
             for _ in range(400)]
    d = tmp_path_factory.mktemp("spm")
    text = d / "text.txt"
    text.write_text("\n".join(lines), encoding="utf-8")
    prefix = str(d / "tokenizer")
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=prefix, vocab_size=48, model_type="unigram",
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece="<pad>", unk_piece="<unk>",
        bos_piece="[START]", eos_piece="[END]", hard_vocab_limit=False, minloglevel=2)
    return prefix + ".model"


def write_model_dir(directory, model: PLDRForCausalLM, spm_model: str | None = None) -> None:
    model.save_pretrained(directory)
    if spm_model is not None:
        PldrllmTokenizerFast.from_sentencepiece(spm_model).save_pretrained(directory)


# --------------------------------------------------------------------------------------------
# 1. Loading, saving, the Auto classes
# --------------------------------------------------------------------------------------------
def test_config_maps_pldr_config_fields_both_ways():
    model = tiny_model(custom_G_type=None, cache_first_G=True)
    config = PldrllmConfig.from_pldr_config(model.config)
    assert config.model_type == "pldrllm"
    assert config.to_pldr_config() == model.config
    with pytest.raises(ValueError, match="head_dim must be one of"):
        PldrllmConfig(hidden_size=96, num_attention_heads=3, head_dim=32)
    with pytest.raises(ValueError, match="pldr_cache_mode must be one of"):
        PldrllmConfig(pldr_cache_mode="g")


def _authors_directory(tmp_path, model, spm_model):
    """An HF-format directory as the authors publish it: config.json with auto_map to remote code
    that, if ever imported, leaves a marker file and raises."""
    d = tmp_path / "authors"
    write_model_dir(d, model, spm_model)
    marker = tmp_path / "remote_code_ran"
    for name in ("modeling_pldrllm.py", "configuration_pldrllm.py"):
        (d / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                              f"raise RuntimeError('remote code was executed')\n")
    config = json.loads((d / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_pldrllm.PldrllmConfig",
                          "AutoModelForCausalLM": "modeling_pldrllm.PldrllmForCausalLM"}
    config["transformers_version"] = "4.56.1"
    (d / "config.json").write_text(json.dumps(config))
    return d, marker


@pytest.mark.parametrize("trust_remote_code", [None, True])
def test_auto_model_loads_authors_directory_without_running_its_code(tmp_path, spm_model,
                                                                     trust_remote_code):
    vocab = spm.SentencePieceProcessor(model_file=spm_model).get_piece_size()
    model = tiny_model(seed=1, vocab_size=vocab)
    d, marker = _authors_directory(tmp_path, model, spm_model)
    extra = {} if trust_remote_code is None else {"trust_remote_code": True}
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, **extra)
    tok = transformers.AutoTokenizer.from_pretrained(d, **extra)
    assert not marker.exists()
    assert type(hf) is PldrllmForCausalLM and isinstance(tok, PldrllmTokenizerFast)
    assert hf.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(hf.state_dict()[key], value), key
    ids = prompt(9, seed=2, vocab=vocab)
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, model(ids).logits)


def test_save_pretrained_round_trips_weights_and_config(tmp_path):
    model = tiny_model(seed=3, cache_first_G=True)
    hf = hf_twin(model)
    hf.config.pldr_cache_mode = "kv"
    hf.save_pretrained(tmp_path / "hf")
    again = PldrllmForCausalLM.from_pretrained(tmp_path / "hf")
    for key, value in hf.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    for name in (*PldrllmConfig.__dataclass_fields__,):
        if name not in ("_name_or_path", "transformers_version", "architectures", "dtype"):
            assert getattr(again.config, name) == getattr(hf.config, name), name
    # PLDRForCausalLM reads the HF save, and the HF class reads PLDRForCausalLM's
    ours = PLDRForCausalLM.from_pretrained(tmp_path / "hf")
    assert ours.config == model.config
    model.save_pretrained(tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())


def test_predefined_g_model_round_trips_its_g_buffers(tmp_path):
    model = tiny_model(seed=4, custom_G_type="random")
    hf_twin(model).save_pretrained(tmp_path)
    again = PldrllmForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(again.decoder.past_G_values, model.decoder.past_G_values)
    ids = prompt(8, seed=5)
    assert torch.equal(hf_generate(again, ids, max_new_tokens=5),
                       model.generate(ids, 5, eos_token_id=None))


# --------------------------------------------------------------------------------------------
# 6. Bad input: one clear error each
# --------------------------------------------------------------------------------------------
def test_directory_whose_config_is_not_pldrllm(tmp_path):
    tiny_model(seed=6).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not a PLDR-LLM config: model_type is 'llama'"):
        PldrllmForCausalLM.from_pretrained(tmp_path)


def test_weights_that_do_not_fit_the_config(tmp_path):
    tiny_model(seed=7).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 340
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"mis-shaped key\(s\): decoder.dec_layers.0.ffn"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_custom_g_type_without_its_g_buffers(tmp_path):
    tiny_model(seed=8, custom_G_type="identity").save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file
    weights = load_file(tmp_path / "model.safetensors")
    del weights["decoder.past_G_values"], weights["decoder.past_G_values_status"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"custom_G_type='identity'.*\n2 missing key\(s\): "
                                              r"decoder.past_G_values"):
        PldrllmForCausalLM.from_pretrained(tmp_path)


def test_tokenizer_whose_special_ids_disagree_with_the_config(tmp_path, spm_model):
    vocab = spm.SentencePieceProcessor(model_file=spm_model).get_piece_size()
    write_model_dir(tmp_path, tiny_model(seed=9, vocab_size=vocab, eos_token_id=5), spm_model)
    with pytest.raises(CheckpointError, match=r"eos_token '\[END\]' has id 3, .*eos_token_id=5"):
        PldrllmForCausalLM.from_pretrained(tmp_path)


def test_sentencepiece_model_without_the_authors_ids(tmp_path, spm_model):
    text = tmp_path / "t.txt"
    text.write_text("\n".join(" ".join(WORDS[i:i + 8]) for i in range(20)), encoding="utf-8")
    # sentencepiece's default ids: unk 0, bos 1, eos 2, no pad
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "m"),
                                   vocab_size=40, hard_vocab_limit=False, minloglevel=2)
    with pytest.raises(CheckpointError, match="special ids disagree with the authors' ids"):
        PldrllmTokenizerFast.from_sentencepiece(tmp_path / "m.model")


# --------------------------------------------------------------------------------------------
# 2. HF generation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", HF_MODES)
def test_greedy_generate_equals_pldr_generate(mode):
    model = tiny_model(seed=10)
    hf = hf_twin(model)
    ids, mask = left_pad([prompt(11, seed=11), prompt(6, seed=12)])
    want = model.generate(ids, 8, attention_mask=mask, cache=mode, eos_token_id=None)
    got = hf_generate(hf, ids, mask, max_new_tokens=8, pldr_cache_mode=mode)
    assert torch.equal(got, want), f"{got[:, 11:].tolist()} vs {want[:, 11:].tolist()}"
    hf.config.pldr_cache_mode = mode  # the config's mode when generate is not told one
    assert torch.equal(hf_generate(hf, ids, mask, max_new_tokens=8), want)


def test_hf_generate_takes_the_fused_decode_step_and_gives_the_loops_tokens(monkeypatch):
    hf = hf_twin(tiny_model(seed=13))
    ids, mask = left_pad([prompt(9, seed=14), prompt(5, seed=15)])
    steps = []
    fused_step = hf._fused_decode_step
    monkeypatch.setattr(hf, "_fused_decode_step",
                        lambda plan, *a: steps.append(plan) or fused_step(plan, *a))
    fused = hf_generate(hf, ids, mask, max_new_tokens=6, pldr_cache_mode="kvg")
    assert len(steps) == 5  # the first new token comes from the prefill
    hf.fused_decode = False
    assert torch.equal(hf_generate(hf, ids, mask, max_new_tokens=6, pldr_cache_mode="kvg"), fused)
    assert len(steps) == 5
    hf.fused_decode = True
    hf.to(torch.bfloat16)  # the plan is made again for the moved weights
    assert hf._decode_plan is None
    hf_generate(hf, ids, mask, max_new_tokens=3, pldr_cache_mode="kvg")
    assert len(steps) == 7
    weights = steps[-1][0][2].weights  # the last step's plan, layer 0
    assert weights[3] is hf.decoder.dec_layers[0].mha1.dense.weight  # bf16 now
    assert weights[3].dtype == torch.bfloat16


def test_use_cache_false_is_mode_none():
    model = tiny_model(seed=13)
    hf = hf_twin(model)
    ids = prompt(9, seed=14)
    assert torch.equal(hf_generate(hf, ids, max_new_tokens=8, use_cache=False),
                       model.generate(ids, 8, cache="none", eos_token_id=None))


def test_logits_of_prompt_and_cached_steps_match_reference():
    """HF forward (uncached) and the cached steps of a PldrCache against the fp64 reference, by
    the docs/design.md §4 rule; the reference of a cached step is the full sequence run with G
    frozen from the prompt (what the KV- and G-caches compute, docs/spec.md §3.1)."""
    model = tiny_model(seed=15)
    hf = hf_twin(model)
    ref = ReferencePLDR.from_model(model, torch.float64).eval()
    ids = prompt(13, seed=16)
    P = 10
    with torch.no_grad():
        assert_close(hf(ids).logits, ref(ids).logits, name="logits")
        for mode in ("kvg", "kv"):
            cache = PldrCache(hf.config.num_hidden_layers, 16, mode)
            out = hf(ids[:, :P], cache=cache)
            assert out.cache is cache and cache.get_seq_length() == P
            got = [out.logits[:, -1]] + [hf(ids[:, t:t + 1], cache=cache).logits[:, -1]
                                         for t in range(P, 13)]
            positions = torch.arange(13)[None]
            _, deductive, _ = ref.step(ids[:, :P], positions[:, :P],
                                       ref.prefill_mask(None, P, "cpu"))
            frozen = [[d[1], d[2]] for d in deductive]
            for t, logits in zip(range(P, 14), got):
                want = ref.step(ids[:, :t], positions[:, :t], ref.prefill_mask(None, t, "cpu"),
                                None, frozen)[0][:, -1]
                assert_close(logits, want, name=f"{mode} logits at position {t - 1}")


def test_beam_search_on_left_padded_batch_gives_each_row_what_it_gets_alone():
    """Beam search expands the batch to B·beams and reorders the cache every step: the G rows
    must move with the KV rows, or a padded batch's rows would decode with each other's G."""
    model = tiny_model(seed=17)
    hf = hf_twin(model)
    rows = [prompt(10, seed=18), prompt(5, seed=19)]
    ids, mask = left_pad(rows)
    beams = dict(num_beams=3, max_new_tokens=6, length_penalty=1.0, early_stopping=True)
    batch = hf_generate(hf, ids, mask, **beams)
    for i, row in enumerate(rows):
        alone = hf_generate(hf, row, **beams)
        assert torch.equal(batch[i, -6:], alone[0, -6:]), f"row {i}"
    # and the beams are not greedy's: the reorders were exercised
    greedy = hf_generate(hf, ids, mask, max_new_tokens=6)
    assert not torch.equal(batch, greedy)


def test_reorder_cache_moves_g_rows_with_kv_rows():
    hf = hf_twin(tiny_model(seed=20))
    ids, mask = left_pad([prompt(6, seed=21), prompt(4, seed=22), prompt(5, seed=23)])
    cache = PldrCache(hf.config.num_hidden_layers, 8, "kvg")
    with torch.no_grad():
        hf(ids, attention_mask=mask, cache=cache)
    before = [(kv.k.clone(), kv.G.clone(), kv.A.clone()) for kv in cache.kv_caches]
    start = cache.state.cache_start.clone()
    addresses = [kv.G.data_ptr() for kv in cache.kv_caches]
    order = torch.tensor([2, 0, 0])
    cache.reorder_cache(order)
    for kv, (k, G, A), address in zip(cache.kv_caches, before, addresses):
        assert torch.equal(kv.k, k[order]) and torch.equal(kv.G, G[order])
        assert torch.equal(kv.A, A[order]) and kv.G.data_ptr() == address
    assert torch.equal(cache.state.cache_start, start[order])
    cache.batch_repeat_interleave(2)
    assert cache.batch_size == 6 and torch.equal(cache.kv_caches[0].G[4], before[0][1][0])
    cache.batch_select_indices(torch.tensor([5]))
    assert cache.batch_size == 1 and torch.equal(cache.kv_caches[1].G[0], before[1][1][0])


def test_sampling_logits_processors_stopping_criteria_and_streamer(spm_model):
    vocab = spm.SentencePieceProcessor(model_file=spm_model).get_piece_size()
    model = tiny_model(seed=24, vocab_size=vocab)
    hf = hf_twin(model)
    tok = PldrllmTokenizerFast.from_sentencepiece(spm_model)
    ids = tok(["the old mill"], return_tensors="pt").input_ids
    config = transformers.GenerationConfig(do_sample=True, top_k=8, temperature=0.9,
                                           max_new_tokens=10, pad_token_id=0, eos_token_id=None)
    torch.manual_seed(5)
    a = hf.generate(ids, generation_config=config)
    torch.manual_seed(5)
    b = hf.generate(ids, generation_config=config)
    assert torch.equal(a, b) and a.shape == (1, ids.shape[1] + 10)
    greedy = hf_generate(hf, ids, max_new_tokens=10)
    banned = int(greedy[0, ids.shape[1]])

    class Ban(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, banned] = -float("inf")
            return scores

    class StopAfter(transformers.StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= ids.shape[1] + 4)

    out = hf_generate(hf, ids, max_new_tokens=10,
                      logits_processor=transformers.LogitsProcessorList([Ban()]),
                      stopping_criteria=transformers.StoppingCriteriaList([StopAfter()]))
    assert out.shape[1] == ids.shape[1] + 4 and banned not in out[0, ids.shape[1]:].tolist()
    printed = []

    class Collect(transformers.TextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            printed.append(text)

    hf_generate(hf, ids, max_new_tokens=10, streamer=Collect(tok, skip_prompt=True))
    assert "".join(printed).strip() == tok.decode(greedy[0, ids.shape[1]:]).strip()


def test_pipeline_text_in_text_out(tmp_path, spm_model):
    """pipeline("text-generation", model=dir) from a directory holding the model and the
    tokenizer: the text it returns is the decoded greedy continuation of PLDRForCausalLM."""
    vocab = spm.SentencePieceProcessor(model_file=spm_model).get_piece_size()
    model = tiny_model(seed=25, vocab_size=vocab)
    write_model_dir(tmp_path, model, spm_model)
    generator = transformers.pipeline("text-generation", model=str(tmp_path), device="cpu")
    texts = ["the river ran", "seven children played with a small"]
    out = generator(texts, max_new_tokens=6, do_sample=False, return_full_text=False,
                    batch_size=2)
    sp = spm.SentencePieceProcessor(model_file=spm_model)
    for text, result in zip(texts, out):
        ids = torch.tensor([sp.encode(text)])
        want = model.generate(ids, 6)
        assert result[0]["generated_text"] == generator.tokenizer.decode(
            want[0, ids.shape[1]:], skip_special_tokens=True)


def test_fast_tokenizer_encodes_as_sentencepiece(spm_model, tmp_path):
    sp = spm.SentencePieceProcessor(model_file=spm_model)
    tok = PldrllmTokenizerFast.from_sentencepiece(spm_model)
    texts = ["the river ran past an old mill.", "  seven  children, played! xyz dog",
             "grey skies\nand ships"]
    for text in texts:
        assert tok(text).input_ids == sp.encode(text), text
        assert tok.decode(tok(text).input_ids) == sp.decode(sp.encode(text)).replace(" ⁇ ",
                                                                                      "<unk>")
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    batch = tok(["the dog", "the old grey mill sang"], padding=True)
    assert batch.attention_mask[0][0] == 0 and batch.attention_mask[0][-1] == 1  # left padding
    tok.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["tokenizer.json", "tokenizer.model",
                                            "tokenizer_config.json"]
    again = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert again(texts[0]).input_ids == sp.encode(texts[0]) and again.padding_side == "left"


def test_output_pldr_attentions_are_the_ports_deductive_outputs():
    model = tiny_model(seed=26)
    hf = hf_twin(model)
    ids, mask = left_pad([prompt(9, seed=27), prompt(6, seed=28)])
    with torch.no_grad():
        out = hf(ids, attention_mask=mask, output_pldr_attentions=True)
        _, deductive = model.generate(ids, 1, attention_mask=mask, cache="none",
                                      return_deductive=True)
    assert len(out.pldr_attentions) == model.config.num_hidden_layers
    for layer, got, (A, A_LM, G) in zip(hf.decoder.dec_layers, out.pldr_attentions, deductive):
        plga = layer.mha1.plgatt_layer
        assert len(got) == 7 and got[6] is None  # E: never materialised by the kernels
        assert torch.equal(got[0], A) and torch.equal(got[1], A_LM) and torch.equal(got[5], G)
        assert got[2] is plga.pwlst and got[3] is plga.alst and got[4] is plga.balst
    assert hf(ids).pldr_attentions is None


def test_hf_bench_suite_runs(tmp_path):
    """`pldr-bench hf` on a tiny model: the HF row and PLDRForCausalLM's are checked, timed and
    carry the decode step's bytes and GB/s like the generate suite's rows."""
    import json

    from pldr_kernels.bench import __main__ as cli

    path = tmp_path / "hf.json"
    assert cli.main(["hf", "--model-config", "num_hidden_layers=1", "hidden_size=128",
                     "num_attention_heads=2", "intermediate_size=64", "vocab_size=64", "A_dff=16",
                     "num_reslayerA=1", "num_denseA=1", "max_position_embeddings=64",
                     "--prompt-lens", "8", "--new-tokens", "4", "--repeats", "1",
                     "--no-progress", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["results"]
    assert {r["impl"] for r in rows} == {"pldr_kernels", "pldr_kernels_hf"}
    for r in rows:
        assert r["valid"] and r["per_token_ms_p50"] > 0 and r["step_gbps"] > 0
