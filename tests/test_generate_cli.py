"""Text generation: ``pldr_kernels.generate_text`` / ``stream_text`` (textgen.py) against the
model's own generate on the same ids, and the ``pldr-generate`` command line (cli/generate.py):
streaming output, HF directories and the authors' .pth, one-line errors with exit status 2."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile

import pytest
from model_testing import needs_cpu_kernels, tiny_model
from text_testing import tiny_tokenizer

import pldr_kernels
from pldr_kernels.cli import generate as cli
from pldr_kernels.textgen import encode_prompts, stream_text

pytestmark = needs_cpu_kernels
PROMPTS = ["The metric tensor", "A power law graph attention layer learns"]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_text_model")
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return str(directory)


def _continuations(model, prompts, **options):
    """What model.generate gives on the same left-padded ids, decoded after the prompt (so a
    word start is a space, as the text reads): the direct computation."""
    tok = tiny_tokenizer()
    ids, mask, prompt_ids = encode_prompts(tok, prompts, model.config.max_position_embeddings)
    out = model.generate(ids, 12, attention_mask=mask, **options)[:, ids.shape[1]:]
    rows, texts = [], []
    for prompt, row in zip(prompt_ids, out.tolist(), strict=True):
        if tok.END_ID in row:  # a stopped row is [END] then pads
            row = row[:row.index(tok.END_ID) + 1]
        rows.append(row)
        texts.append(tok.decode(prompt + row)[len(tok.decode(prompt)):])
    return rows, texts


@pytest.mark.parametrize("cache", ["none", "kvg"])
def test_generate_text_is_the_models_generation_decoded(model, cache):
    tok = tiny_tokenizer()
    ids, texts = _continuations(model, PROMPTS, cache=cache)
    assert pldr_kernels.generate_text(model, tok, PROMPTS, max_new_tokens=12,
                                      cache=cache) == texts
    stream = stream_text(model, tok, PROMPTS, max_new_tokens=12, cache=cache)
    pieces = [[], []]
    while True:
        try:
            for row, text in enumerate(next(stream)):
                pieces[row].append(text)
        except StopIteration as done:
            result = done.value
            break
    assert result.token_ids == ids and result.texts == texts
    assert ["".join(p) for p in pieces] == texts  # the stream adds up to the text
    assert result.prompt_tokens == sum(len(tok.encode(p)) for p in PROMPTS)
    assert result.new_tokens == sum(len(r) for r in ids)


def test_generate_text_samples_reproducibly_with_a_seed_and_streams_to_a_callback(model):
    tok = tiny_tokenizer()
    seen = []
    kwargs = dict(max_new_tokens=12, do_sample=True, temperature=1.5, top_k=50, seed=7)
    text = pldr_kernels.generate_text(model, tok, PROMPTS[0],
                                      on_text=lambda row, t: seen.append((row, t)), **kwargs)
    assert isinstance(text, str) and text == "".join(t for _, t in seen)
    assert {row for row, _ in seen} == {0}
    assert text == _continuations(model, PROMPTS[:1], do_sample=True, temperature=1.5, top_k=50,
                                  seed=7)[1][0]


def test_generate_text_refuses_bad_prompts_and_unfitting_tokenizers(model):
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="prompt 1 .* encodes to no tokens"):
        pldr_kernels.generate_text(model, tok, ["x", ""])
    with pytest.raises(ValueError, match="more than the model's context of "
                                         "max_position_embeddings=128"):
        pldr_kernels.generate_text(model, tok, "the metric " * 100)
    with pytest.raises(ValueError, match="does not fit the model config"):
        pldr_kernels.generate_text(tiny_model(vocab_size=300), tok, "x")


def _run(argv, capsys):
    status = cli.main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_streams_the_continuation_and_reports_speed(checkpoint, model, capsys):
    status, out, err = _run(["--model", checkpoint, "--prompt", PROMPTS[0],
                             "--max-new-tokens", "12", "--cache", "kv"], capsys)
    assert status == 0
    assert out == PROMPTS[0] + _continuations(model, PROMPTS[:1], cache="kv")[1][0] + "\n"
    assert "tokens/s after the first" in err and "first token" in err and "load" in err


def test_cli_batch_from_a_prompts_file(checkpoint, model, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS[0] + "\n\n" + PROMPTS[1] + "\n")
    status, out, _ = _run(["--model", checkpoint, "--prompts-file", str(prompts),
                           "--max-new-tokens", "12", "--no-stats"], capsys)
    texts = _continuations(model, PROMPTS)[1]
    assert status == 0
    assert out == f"[0] {PROMPTS[0]}{texts[0]}\n[1] {PROMPTS[1]}{texts[1]}\n"


def test_cli_runs_an_authors_pth_with_sidecar_and_tokenizer_tarball(model, tmp_path, capsys):
    model.save_pth(tmp_path / "PLDRv51_tiny.pth")
    c = model.config
    (tmp_path / "PLDRv51_tiny_hyperparameters.py").write_text(
        f"hpdict = {{'num_layers': {c.num_hidden_layers}, 'd_model': {c.hidden_size}, "
        f"'num_heads': {c.num_attention_heads}, 'dff': {c.intermediate_size}, 'A_dff': "
        f"{c.A_dff}, 'num_reslayerA': {c.num_reslayerA}, 'num_denseA': {c.num_denseA}, "
        f"'input_vocab_size': {c.vocab_size}, 'max_seq_len': {c.max_position_embeddings}}}\n")
    proto = tiny_tokenizer().model_proto
    with tarfile.open(tmp_path / "tokenizer.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("tok/refinedweb.model")
        info.size = len(proto)
        tar.addfile(info, io.BytesIO(proto))
    status, out, _ = _run(["--model", str(tmp_path / "PLDRv51_tiny.pth"), "--prompt", PROMPTS[0],
                           "--max-new-tokens", "12", "--no-stats"], capsys)
    assert status == 0
    assert out == PROMPTS[0] + _continuations(model, PROMPTS[:1])[1][0] + "\n"


@pytest.mark.parametrize("args, message", [
    (["--model", "{missing}", "--prompt", "x"], "--model: '{missing}' not found"),
    (["--model", "{empty}", "--prompt", "x"], "tokenizer.model not found"),
    (["--model", "{ckpt}", "--prompt", "x", "--top-p", "2"],
     "argument --top-p: expected a number in (0, 1], got '2'"),
    (["--model", "{ckpt}", "--prompt", "x", "--cache", "full"], "argument --cache: invalid choice"),
    (["--model", "{ckpt}", "--prompt", "x", "--top-k", "5"], "give --temperature > 0"),
    (["--model", "{ckpt}", "--prompt", "x", "--temperature", "-1"],
     "argument --temperature: expected a finite number >= 0, got '-1'"),
    (["--model", "{ckpt}", "--prompt", "the metric " * 100], "max_position_embeddings=128"),
    (["--model", "{ckpt}", "--prompt", "  "], "--prompt: expected some text"),
    (["--model", "{ckpt}", "--prompts-file", "{latin1}"], "is not UTF-8 text"),
    (["--model", "{ckpt}", "--prompts-file", "{blank}"], "holds no prompt"),
    (["--model", "{ckpt}", "--prompt", "x", "--tokenizer", "{other_tok}"],
     "does not fit the model config"),
    (["--model", "{ckpt}"], "one of the arguments --prompt --prompts-file is required"),
])
def test_cli_user_mistakes_are_one_line_and_exit_2(checkpoint, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "blank.txt").write_text("\n \n")
    tiny_tokenizer(200).save_pretrained(tmp_path / "other")
    paths = dict(missing=str(tmp_path / "nope"), empty=str(tmp_path / "empty"), ckpt=checkpoint,
                 latin1=str(tmp_path / "latin1.txt"), blank=str(tmp_path / "blank.txt"),
                 other_tok=str(tmp_path / "other" / "tokenizer.model"))
    status, out, err = _run([a.format(**paths) for a in args], capsys)
    assert status == 2
    assert err.startswith("pldr-generate: error: ") and err.count("\n") == 1
    assert message.format(**paths) in err


def test_the_module_runs_as_a_program(checkpoint):
    """The installed entry point's code path in a fresh interpreter: exit 2 and no traceback for
    a mistake; the text on stdout for a run."""
    root = os.path.dirname(os.path.dirname(pldr_kernels.__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "pldr_kernels.cli.generate", "--model", checkpoint]
    bad = subprocess.run([*cmd, "--prompt", "x", "--max-new-tokens", "0"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "--max-new-tokens: expected a positive integer, got '0'" in bad.stderr
    good = subprocess.run([*cmd, "--prompt", PROMPTS[0], "--max-new-tokens", "4", "--threads",
                           "1"], capture_output=True, text=True, env=env, timeout=120)
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith(PROMPTS[0]) and "start-up" in good.stderr


def test_loading_a_checkpoint_does_not_import_dynamo(checkpoint):
    """Start-up: building the model on the meta device used to import torch._dynamo (~2 s, the
    meta init fillers and torch.stack); the load must not pay for it."""
    root = os.path.dirname(os.path.dirname(pldr_kernels.__file__))
    code = ("import sys; from pldr_kernels import PLDRForCausalLM; "
            f"PLDRForCausalLM.from_pretrained({checkpoint!r}); "
            "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=root), timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
