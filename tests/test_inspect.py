"""pldr-inspect (pldr_kernels/inspection.py, cli/inspect.py): the reported determinants, norms,
G-RMSEs and perplexities against a direct fp64 computation with the reference model; equal
perplexity in every cache mode when G does not depend on the input; one-line errors."""
from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from model_testing import needs_cpu_kernels, tiny_model
from text_testing import tiny_tokenizer

from pldr_kernels import inspection
from pldr_kernels.cli import inspect as cli
from pldr_kernels.reference_model import ReferencePLDR

pytestmark = needs_cpu_kernels
PROMPTS = ["The metric tensor is cached.", "A power law graph attention layer",
           "KV-cache and G-cache"]
TEXT = "The deep metric learner turns queries into G."  # 17 tokens: 'none' is O(n^2)
INSPECT = dict(text=TEXT, new_tokens=4, context=3)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=5)


@pytest.fixture(scope="module")
def result(model):
    return inspection.inspect_model(model, tiny_tokenizer(), PROMPTS, **INSPECT)


@pytest.fixture(scope="module")
def reference(model):
    return ReferencePLDR.from_model(model, torch.float64)


def _reference_deductive(ref, model, ids, new_tokens=0, cache="kvg"):
    """fp64 (A, A_LM, A_P, G) per layer from the authors'-style reference model."""
    _, per_layer = ref.generate(torch.tensor([ids]), new_tokens, cache=cache, eos_token_id=None,
                                return_deductive=True)
    out = []
    for layer, (A, A_LM, G) in zip(model.decoder.dec_layers, per_layer, strict=True):
        pw = layer.mha1.plgatt_layer.pwlst.detach().double()
        out.append({"A": A[0], "A_LM": A_LM[0], "A_P": torch.pow(A_LM[0], pw), "G_LM": G[0]})
    return out


def test_determinants_and_norms_match_the_fp64_reference(model, reference, result):
    tok = tiny_tokenizer()
    refs = [_reference_deductive(reference, model, tok.encode(p)) for p in PROMPTS]
    for layer in result["layers"]:
        for head in layer["heads"]:
            for name in inspection.DEDUCTIVE:
                X = torch.stack([r[layer["layer"]][name][head["head"]] for r in refs])
                sign, logabsdet = torch.linalg.slogdet(X)
                assert head[name]["sign"] == sign.tolist()
                # log|det| sums 64 log singular values: fp32 inputs give ~1e-3 absolute error
                got = {k: torch.tensor(head[name][k], dtype=torch.float64)
                       for k in ("logabsdet", "fro")}
                torch.testing.assert_close(got["logabsdet"], logabsdet, atol=5e-2, rtol=1e-3)
                torch.testing.assert_close(got["fro"], torch.linalg.matrix_norm(X), rtol=1e-4,
                                           atol=0)


def test_g_rmse_across_prompts_and_between_cache_modes_match_a_direct_computation(
        model, reference, result):
    tok = tiny_tokenizer()
    ids = [tok.encode(p) for p in PROMPTS]
    Gs = [torch.stack([r["G_LM"] for r in _reference_deductive(reference, model, i)])
          for i in ids]
    G_none = [torch.stack([r["G_LM"] for r in _reference_deductive(reference, model, i, 4,
                                                                   "none")]) for i in ids]
    pairs = list(itertools.combinations(range(len(PROMPTS)), 2))
    across = torch.stack([(Gs[i] - Gs[j]).pow(2).mean((-2, -1)).sqrt() for i, j in pairs]
                         ).mean(0)  # [L, H]
    none_vs_kvg = torch.stack([(n - g).pow(2).mean((-2, -1)).sqrt()
                               for n, g in zip(G_none, Gs, strict=True)])  # [P, L, H]
    got_across = torch.tensor([[h["G_rmse_across_prompts"] for h in layer["heads"]]
                               for layer in result["layers"]], dtype=torch.float64)
    got_none = torch.tensor([[h["G_rmse_none_vs_kvg"] for h in layer["heads"]]
                             for layer in result["layers"]], dtype=torch.float64)  # [L, H, P]
    assert bool((across > 0).all()) and bool((none_vs_kvg > 0).all())
    torch.testing.assert_close(got_across, across, rtol=2e-3, atol=1e-6)
    torch.testing.assert_close(got_none, none_vs_kvg.permute(1, 2, 0), rtol=2e-3, atol=1e-6)


@torch.no_grad()
def test_perplexity_per_cache_mode_matches_the_reference_scoring(reference, result):
    ids = tiny_tokenizer().encode(TEXT)
    ref = reference
    seq = torch.tensor([ids])
    # 'none': every token from a full forward over the tokens before it (G of that prefix).
    nll = [-torch.log_softmax(ref(seq[:, :j]).logits[0, -1], -1)[ids[j]]
           for j in range(3, len(ids))]
    expected_none = math.exp(float(torch.stack(nll).mean()))
    # 'kv'/'kvg': the cached G of the first 3 tokens: the reference's mode 'g' forward.
    _, ded, _ = ref.step(seq[:, :3], torch.arange(3)[None], ref.prefill_mask(None, 3, "cpu"))
    logits = ref.step(seq, torch.arange(len(ids))[None], ref.prefill_mask(None, len(ids), "cpu"),
                      Gcachelst=[[d[1], d[2]] for d in ded])[0]
    frozen = -torch.log_softmax(logits[0, 2:-1], -1).gather(1, seq[0, 3:, None]).mean()
    ppl = result["perplexity"]
    assert result["text_tokens"] == len(ids) and result["perplexity_context"] == 3
    assert ppl["none"] == pytest.approx(expected_none, rel=1e-4)
    assert ppl["kv"] == pytest.approx(math.exp(float(frozen)), rel=1e-4)
    assert ppl["kvg"] == pytest.approx(ppl["kv"], rel=1e-5)  # the same G: the A's, cached
    assert ppl["none"] != pytest.approx(ppl["kvg"], rel=1e-4)  # this G depends on the input


def test_perplexity_is_the_same_in_every_cache_mode_when_g_is_frozen():
    model = tiny_model(seed=6, custom_G_type="random")  # G fixed: no metric learner
    ids = tiny_tokenizer().encode(TEXT)
    ppl = {m: inspection.perplexity(model, ids, m, context=2) for m in ("none", "kv", "kvg")}
    assert ppl["kv"] == pytest.approx(ppl["none"], rel=1e-5)
    assert ppl["kvg"] == pytest.approx(ppl["none"], rel=1e-5)
    result = inspection.inspect_model(model, tiny_tokenizer(), PROMPTS[:2], new_tokens=2)
    head = result["layers"][0]["heads"][0]
    assert "A_P" not in head and head["G_rmse_across_prompts"] == 0.0
    assert head["G_rmse_none_vs_kvg"] == [0.0, 0.0]


def test_cli_writes_the_table_json_and_plot(model, result, tmp_path, capsys):
    """The CLI's JSON holds what inspect_model computes (checked above against the reference)."""
    model.save_pretrained(tmp_path / "ckpt")
    tiny_tokenizer().save_pretrained(tmp_path / "ckpt")
    (tmp_path / "prompts.txt").write_text("\n\n".join(PROMPTS) + "\n")
    (tmp_path / "text.txt").write_text(TEXT)
    status = cli.main(["--model", str(tmp_path / "ckpt"), "--prompts", str(tmp_path /
                       "prompts.txt"), "--text", str(tmp_path / "text.txt"), "--new-tokens",
                       "4", "--context", "3", "--json", str(tmp_path / "r.json"), "--plot",
                       str(tmp_path / "r.png"), "--layer", "1", "--head", "1"])
    out = capsys.readouterr().out
    assert status == 0
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["layers"] == json.loads(json.dumps(result["layers"]))
    assert saved["perplexity"] == result["perplexity"] and saved["prompts"] == PROMPTS
    assert "logdet G_LM" in out and f"kvg {result['perplexity']['kvg']:.4f}" in out
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("extra, message", [
    (["--prompts", "{missing}"], "--prompts: expected a file"),
    (["--prompts", "{blank}"], "holds no prompt"),
    (["--prompts", "{prompts}", "--layer", "2"], "the model has 2 layers and 2 heads"),
    (["--prompts", "{prompts}", "--text", "{short}", "--context", "5"],
     "perplexity needs more than the context of 5"),
    (["--prompts", "{prompts}", "--new-tokens", "-1"], "argument --new-tokens"),
])
def test_cli_user_mistakes_are_one_line_and_exit_2(model, tmp_path, capsys, extra, message):
    model.save_pretrained(tmp_path / "ckpt")
    tiny_tokenizer().save_pretrained(tmp_path / "ckpt")
    (tmp_path / "prompts.txt").write_text(PROMPTS[0])
    (tmp_path / "blank.txt").write_text("\n\n")
    (tmp_path / "short.txt").write_text("The metric")
    paths = dict(missing=str(tmp_path / "nope.txt"), blank=str(tmp_path / "blank.txt"),
                 prompts=str(tmp_path / "prompts.txt"), short=str(tmp_path / "short.txt"))
    status = cli.main(["--model", str(tmp_path / "ckpt"), *[a.format(**paths) for a in extra]])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("pldr-inspect: error: ") and err.count("\n") == 1
    assert message in err
