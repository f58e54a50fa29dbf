"""lm-eval's ``hf`` model on a PLDR-LLM directory (pldr_kernels.hf registered), offline, on a local
multiple-choice task and a local generation task the test writes: scores identical with the cache
modes none, kv and kvg, and the numbers lm-eval reports are PLDRForCausalLM's."""
from __future__ import annotations

import json
import os
import random

import pytest
import torch

pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")
lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("accelerate", reason="lm-eval's hf model needs accelerate (lm-eval[hf])")

from model_testing import needs_cpu_kernels, tiny_model  # noqa: E402

import pldr_kernels.hf.evaluate  # noqa: E402,F401  (registers the Auto classes, lm-eval's "pldr")
from pldr_kernels.hf import PldrllmTokenizerFast  # noqa: E402

pytestmark = needs_cpu_kernels
WORDS = ("the river ran past an old mill where seven children played with a small dog while "
         "their mother sang about winter bread and distant ships under grey morning skies").split()
QUESTIONS = [("the river ran past", ["an old mill", "a dog"], 0),
             ("seven children played with", ["a small dog", "grey ships"], 0),
             ("their mother sang about", ["the mill", "winter bread"], 1)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("lmeval")
    rng = random.Random(1)
    (d / "text.txt").write_text("\n".join(
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))) for _ in range(300)))
    spm.SentencePieceTrainer.train(
        input=str(d / "text.txt"), model_prefix=str(d / "tokenizer"), vocab_size=48,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, bos_piece="[START]", eos_piece="[END]",
        hard_vocab_limit=False, minloglevel=2)
    tok = PldrllmTokenizerFast.from_sentencepiece(str(d / "tokenizer.model"))
    model = tiny_model(seed=30, vocab_size=len(tok), intermediate_size=64, A_dff=32,
                       num_reslayerA=1, num_denseA=1)
    model_dir = d / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    with open(d / "mc.jsonl", "w") as f:
        for q, choices, answer in QUESTIONS:
            f.write(json.dumps({"question": q, "choices": choices, "answer": answer}) + "\n")
    common = {"dataset_path": "json", "test_split": "test"}
    tasks = {
        "pldr_tiny_mc": {**common, "output_type": "multiple_choice",
                         "dataset_kwargs": {"data_files": {"test": str(d / "mc.jsonl")}},
                         "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
                         "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}]},
        "pldr_tiny_gen": {**common, "output_type": "generate_until",
                          "dataset_kwargs": {"data_files": {"test": str(d / "mc.jsonl")}},
                          "doc_to_text": "{{question}}", "doc_to_target": "{{choices[0]}}",
                          "generation_kwargs": {"until": ["[END]"], "max_gen_toks": 4,
                                                "do_sample": False},
                          "metric_list": [{"metric": "exact_match"}]}}
    task_dir = d / "tasks"
    task_dir.mkdir()
    for name, spec in tasks.items():
        (task_dir / f"{name}.yaml").write_text(json.dumps({"task": name, **spec}))
    return model, tok, model_dir, task_dir


_TASK_MANAGERS: dict = {}


def _evaluate(model_dir, task_dir, mode, model="hf", batch_size=1):
    from lm_eval.tasks import TaskManager
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    if task_dir not in _TASK_MANAGERS:  # only the local tasks: indexing lm-eval's own is slow
        _TASK_MANAGERS[task_dir] = TaskManager(include_path=str(task_dir),
                                               include_defaults=False)
    return lm_eval.simple_evaluate(
        model=model, model_args=f"pretrained={model_dir},pldr_cache_mode={mode}",
        tasks=["pldr_tiny_mc", "pldr_tiny_gen"], task_manager=_TASK_MANAGERS[task_dir],
        batch_size=batch_size, device="cpu", log_samples=True)


def _loglikelihoods(out) -> list[float]:
    return [resp[0][0] for s in out["samples"]["pldr_tiny_mc"] for resp in s["resps"]]


@pytest.fixture(scope="module")
def runs(setup):
    _, _, model_dir, task_dir = setup
    return {mode: _evaluate(model_dir, task_dir, mode) for mode in ("none", "kv", "kvg")}


def test_lm_eval_scores_identical_in_every_cache_mode(setup, runs):
    model, tok, model_dir, task_dir = setup
    for mode, out in runs.items():
        assert out["results"]["pldr_tiny_mc"]["acc,none"] == \
            runs["kvg"]["results"]["pldr_tiny_mc"]["acc,none"], mode
        # the log-likelihoods lm-eval scored are PLDRForCausalLM's
        for sample in out["samples"]["pldr_tiny_mc"]:
            doc = sample["doc"]
            context = tok(doc["question"]).input_ids
            for choice, resp in zip(doc["choices"], sample["resps"]):
                whole = tok(doc["question"] + " " + choice).input_ids
                with torch.no_grad():
                    logits = model(torch.tensor([whole[:-1]])).logits[0].log_softmax(-1)
                ours = sum(float(logits[t - 1, whole[t]]) for t in range(len(context),
                                                                         len(whole)))
                assert resp[0][0] == pytest.approx(ours, abs=1e-4), (mode, choice)
        # generation: each mode's text is PLDRForCausalLM.generate's in that mode
        for sample in out["samples"]["pldr_tiny_gen"]:
            ids = torch.tensor([tok(sample["doc"]["question"]).input_ids])
            new = model.generate(ids, 4, cache=mode)[0, ids.shape[1]:].tolist()
            new = new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
            assert sample["resps"][0][0] == tok.decode(new, skip_special_tokens=True), mode
    texts = {m: [s["resps"][0][0] for s in r["samples"]["pldr_tiny_gen"]] for m, r in runs.items()}
    assert texts["kv"] == texts["kvg"]


def test_lm_eval_pldr_model_keeps_batch_padding_out_of_g(setup, runs):
    """lm-eval's "hf" right-pads a batch without a mask, and G sees the pad rows (docs/spec.md
    §5.7); "pldr" masks them, so a batch of 2 scores what batch size 1 scores."""
    _, _, model_dir, task_dir = setup
    alone = _loglikelihoods(runs["kvg"])
    batched = _loglikelihoods(_evaluate(model_dir, task_dir, "kvg", "pldr", batch_size=2))
    assert batched == pytest.approx(alone, abs=1e-4)
    unmasked = _loglikelihoods(_evaluate(model_dir, task_dir, "kvg", "hf", batch_size=2))
    assert unmasked != pytest.approx(alone, abs=1e-4)
