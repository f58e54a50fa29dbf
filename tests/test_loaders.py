"""Checkpoint formats: the authors' .pth (+ hyperparameter sidecar), HF directories, bad inputs."""
from __future__ import annotations

import json
import os

import pytest
import torch
from model_testing import tiny_config, tiny_model

from pldr_kernels import PLDRConfig, PLDRForCausalLM
from pldr_kernels.loaders import CheckpointError, read_hyperparameters
from pldr_kernels.reference_model import ReferencePLDR

SIDECAR = '''
import numpy as np
import torch.nn.functional as F
hpdict={"num_layers": 2,
        "d_model": int(2*64),
        "num_heads": 2,
        "dff": int(np.floor(2*64*4*2/3)),
        "num_reslayerA": 2,
        "num_denseA": 2,
        "A_dff": 170,
        "input_vocab_size": 256,
        "max_seq_len": 128,
        "activation": F.silu,
        "learning_rate": 1e-3,
        "side_effect": __import__("os").system("touch {marker}"),
        }
'''


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


def test_state_dict_keys_are_the_authors():
    keys = set(tiny_model().state_dict())
    for k in ("decoder.embedding.weight", "decoder.layernorm1.weight", "final_layer.bias",
              "decoder.dec_layers.1.mha1.wq.weight", "decoder.dec_layers.1.mha1.dense.bias",
              "decoder.dec_layers.1.mha1.plgatt_layer.pwlst",
              "decoder.dec_layers.1.mha1.layernorm1.bias",
              "decoder.dec_layers.1.mha1.reslayerAs.1.denseAs.1.gluw3.weight",
              "decoder.dec_layers.1.mha1.reslayerAs.1.layernormA.weight",
              "decoder.dec_layers.1.ffn.gluw2.bias", "decoder.dec_layers.1.layernorm2.weight"):
        assert k in keys, k
    assert keys == set(ReferencePLDR(tiny_config()).state_dict())
    assert not any("rope" in k or "cos" in k for k in keys)


def test_pth_roundtrip_in_the_authors_format(tmp_path):
    model = tiny_model(seed=1)
    path = tmp_path / "PLDRv51_tiny.pth"
    model.save_pth(path)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"model_state_dict"}
    assert all(v.dtype == torch.float32 for v in raw["model_state_dict"].values())
    loaded = PLDRForCausalLM.from_pth(path, config=model.config)
    assert _same_state(model, loaded)
    # An authors'-style dict with extra entries (loss, accuracy) loads too.
    torch.save({"model_state_dict": raw["model_state_dict"], "loss": 1.5, "accuracy": 0.3}, path)
    assert _same_state(model, PLDRForCausalLM.from_pth(path, config=model.config))


def test_pth_with_hyperparameter_sidecar_is_parsed_not_executed(tmp_path):
    model = tiny_model(seed=2)
    model.save_pth(tmp_path / "PLDRv51_tiny.pth")
    marker = tmp_path / "executed"
    sidecar = SIDECAR.replace("{marker}", str(marker))
    (tmp_path / "PLDRv51_tiny_hyperparameters.py").write_text(sidecar)
    hp = read_hyperparameters(tmp_path / "PLDRv51_tiny_hyperparameters.py")
    assert hp["dff"] == 341 and hp["d_model"] == 128 and hp["activation"] == "silu"
    assert "side_effect" not in hp
    loaded = PLDRForCausalLM.from_pth(tmp_path / "PLDRv51_tiny.pth")  # finds the sidecar
    assert not marker.exists()
    assert loaded.config.intermediate_size == 341 and loaded.config.num_hidden_layers == 2
    assert loaded.config.max_position_embeddings == 128
    assert _same_state(model, loaded)


def test_hf_directory_roundtrip(tmp_path):
    model = tiny_model(seed=3, reference_rope=False)
    model.save_pretrained(tmp_path / "hf")
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "pldrllm" and cfg["reference_rope"] is False
    loaded = PLDRForCausalLM.from_pretrained(tmp_path / "hf")
    assert loaded.config == model.config
    assert _same_state(model, loaded)


def test_predefined_g_buffers_are_saved_and_loaded(tmp_path):
    model = tiny_model(seed=4, custom_G_type="external")
    with torch.no_grad():
        model.decoder.past_G_values[:, 2] = torch.randn(2, 1, 2, 64, 64)
    assert model.decoder.past_G_values.shape == (2, 3, 1, 2, 64, 64)
    model.save_pretrained(tmp_path / "hf")
    loaded = PLDRForCausalLM.from_pretrained(tmp_path / "hf")
    assert torch.equal(loaded.decoder.past_G_values, model.decoder.past_G_values)
    loaded.to(torch.bfloat16)
    assert loaded.decoder.past_G_values.dtype == torch.float32


def test_bad_checkpoint_lists_every_bad_key(tmp_path):
    model = tiny_model()
    sd = dict(model.state_dict())
    del sd["decoder.dec_layers.0.mha1.plgatt_layer.pwlst"]
    del sd["final_layer.bias"]
    sd["decoder.dec_layers.0.mha1.rotary.theta"] = torch.zeros(3)
    sd["decoder.dec_layers.1.ffn.gluw1.weight"] = torch.zeros(340, 128)
    torch.save({"model_state_dict": sd}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as info:
        PLDRForCausalLM.from_pth(tmp_path / "bad.pth", config=model.config)
    msg = str(info.value)
    for text in ("2 missing", "plgatt_layer.pwlst", "final_layer.bias", "1 unexpected",
                 "rotary.theta", "1 mis-shaped",
                 "gluw1.weight: checkpoint (340, 128) vs model (341, 128)"):
        assert text in msg, (text, msg)


def test_wrong_config_for_checkpoint_is_reported(tmp_path):
    tiny_model().save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["custom_G_type"] = "identity"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unexpected key.*plgatt_layer"):
        PLDRForCausalLM.from_pretrained(tmp_path / "hf")


def test_pth_without_config_or_sidecar_says_what_to_pass(tmp_path):
    tiny_model().save_pth(tmp_path / "m.pth")
    with pytest.raises(ValueError, match="config=PLDRConfig"):
        PLDRForCausalLM.from_pth(tmp_path / "m.pth")


@pytest.mark.parametrize("fields, match", [
    (dict(hidden_size=130), "hidden_size \\(130\\) must equal num_attention_heads"),
    (dict(head_dim=96, hidden_size=192), "head_dim must be one of"),
    (dict(custom_G_type="learned"), "custom_G_type must be one of"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(num_hidden_layers=0), "num_hidden_layers must be a positive int"),
    (dict(eos_token_id=999), "eos_token_id"),
    (dict(rope_scaling={"type": "linear"}), "rope_scaling"),
])
def test_bad_configs_are_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**fields)


def test_config_defaults_and_dict_roundtrip():
    c = PLDRConfig()
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers,
            c.num_attention_heads, c.head_dim, c.A_dff, c.num_reslayerA, c.num_denseA) == (
        32000, 896, 2389, 5, 14, 64, 170, 8, 2)
    d = c.to_dict()
    d["transformers_version"] = "4.56.1"  # HF bookkeeping is ignored
    assert PLDRConfig.from_dict(d) == c
    hp = PLDRConfig.from_hyperparameters({"num_layers": 5, "d_model": 896, "num_heads": 14,
                                          "dff": 2389, "A_dff": 170, "num_reslayerA": 8,
                                          "num_denseA": 2, "input_vocab_size": 32000,
                                          "max_seq_len": 1024})
    assert hp == c


@pytest.mark.parametrize("fields, match", [
    (dict(layer_norm_eps=float("inf")), "layer_norm_eps must be a finite number > 0"),
    (dict(rope_theta=float("inf")), "rope_theta must be a finite number > 0"),
    (dict(rope_theta=True), "rope_theta must be a finite number > 0"),
    (dict(attention_bias="no"), "attention_bias must be True or False, got 'no'"),
    (dict(max_position_embeddings=2**21), "max_position_embeddings must be at most 1048576"),
], ids=["inf-eps", "inf-theta", "bool-theta", "string-bool", "positions"])
def test_unbounded_config_values_are_refused(fields, match):
    """Values that passed before and built a model that generates garbage (an infinite eps or
    theta), a wrong model (the string 'no' is truthy) or unbounded RoPE tables."""
    with pytest.raises(ValueError, match=match):
        tiny_config(**fields)


# ---- malformed files: one CheckpointError each, naming the file and the key -----------------
def _sidecar(tmp_path, **replace) -> str:
    """The tiny model's .pth with a sidecar whose hpdict lines are replaced (key → source)."""
    tiny_model().save_pth(tmp_path / "PLDRv51_tiny.pth")
    lines = {"num_layers": "2", "d_model": "int(2*64)", "num_heads": "2",
             "dff": "int(np.floor(2*64*4*2/3))", "num_reslayerA": "2", "num_denseA": "2",
             "A_dff": "170", "input_vocab_size": "256", "max_seq_len": "128",
             "activation": "F.silu"}
    body = [f'        "{k}": {replace.pop(k, v)},' for k, v in lines.items()]
    body += [f'        "{k}": {v},' for k, v in replace.items()]  # keys given a second time
    text = "import numpy as np\nimport torch.nn.functional as F\nhpdict={\n" + "\n".join(
        body) + "\n        }\n"
    path = tmp_path / "PLDRv51_tiny_hyperparameters.py"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("replace, match", [
    (dict(dff="int(1e400)"), r"hpdict\['dff'\] = int\(1e400\) cannot be evaluated.*"
                             r"OverflowError"),
    (dict(num_layers="1e400"), "hyperparameter 'num_layers' must be an integer, got inf"),
    (dict(num_heads="2.5"), "hyperparameter 'num_heads' must be an integer, got 2.5"),
    (dict(num_layers="n_layers"), r"line 4: hpdict\['num_layers'\] = n_layers cannot be "
                                  r"evaluated"),
    (dict(A_dff="170", max_seq_len="128", num_reslayerA="2", activation="F.gelu"),
     r"hpdict\['activation'\] = F.gelu cannot be evaluated"),
], ids=["overflow", "inf", "non-integral", "variable", "other-activation"])
def test_bad_hyperparameter_entries_are_refused(tmp_path, replace, match):
    _sidecar(tmp_path, **replace)
    with pytest.raises(CheckpointError, match=match) as info:
        PLDRForCausalLM.from_pth(tmp_path / "PLDRv51_tiny.pth")
    assert "PLDRv51_tiny_hyperparameters.py" in str(info.value)


def test_duplicate_hyperparameter_with_a_later_non_literal_is_refused(tmp_path):
    """Python keeps the later of two equal keys; reading the earlier literal instead would build
    the model the file does not describe."""
    path = _sidecar(tmp_path)
    text = open(path).read().replace("        }", '        "num_layers": NUM_LAYERS,\n        }')
    open(path, "w").write(text)
    with pytest.raises(CheckpointError, match=r"hpdict\['num_layers'\] = NUM_LAYERS cannot be "
                                              r"evaluated.*given twice \(lines 4 and 14\)"):
        PLDRForCausalLM.from_pth(tmp_path / "PLDRv51_tiny.pth")
    # Equal keys with literal values: the later one counts, as when Python runs the file.
    open(path, "w").write(text.replace("NUM_LAYERS", "3"))
    assert read_hyperparameters(path)["num_layers"] == 3


@pytest.mark.parametrize("content, match", [
    ({"model_state_dict": [1, 2]}, "model_state_dict must be a dict of tensors, got a list"),
    ({"model_state_dict": {"decoder.embedding.weight": 3}},
     r"model_state_dict\['decoder.embedding.weight'\] is of type int, expected a tensor"),
    ({"model_state_dict": {7: torch.zeros(1)}}, "has a key 7 of type int"),
], ids=["list", "non-tensor", "int-key"])
def test_malformed_pth_is_refused(tmp_path, content, match):
    torch.save(content, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=match) as info:
        PLDRForCausalLM.from_pth(tmp_path / "bad.pth", config=tiny_config())
    assert "bad.pth" in str(info.value)


def test_unreadable_pth_is_refused(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a torch.save file")
    with pytest.raises(CheckpointError, match="junk.pth: cannot read it as a torch.save file"):
        PLDRForCausalLM.from_pth(tmp_path / "junk.pth", config=tiny_config())


@pytest.mark.parametrize("text, match", [
    ("[1, 2, 3]", "expected a JSON object of config fields, got a JSON array"),
    ('{"num_hidden_layers": 2,', "not a readable JSON file"),
    ('{"num_hidden_layers": 1' + "0" * 5000 + "}", "not a readable JSON file"),
    ('{"layer_norm_eps": 1e999}', "layer_norm_eps must be a finite number > 0, got inf"),
], ids=["list", "truncated", "5000-digit-int", "overflowing-float"])
def test_malformed_config_json_is_refused(tmp_path, text, match):
    tiny_model().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=match) as info:
        PLDRForCausalLM.from_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(info.value)


def test_malformed_safetensors_is_refused(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors"):
        PLDRForCausalLM.from_pretrained(tmp_path)
