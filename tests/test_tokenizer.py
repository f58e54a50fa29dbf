"""The PLDR tokenizer (pldr_kernels/tokenizer.py): the authors' special ids and conventions
(docs/spec.md §1), loading from every place a checkpoint keeps it, deterministic training,
streaming decode."""
from __future__ import annotations

import io
import os
import sys
import tarfile

import pytest
from text_testing import TINY_VOCAB, TRAINING_TEXT, tiny_tokenizer

from pldr_kernels.tokenizer import IncrementalDecoder, PLDRTokenizer

spm = pytest.importorskip("sentencepiece")

SAMPLE = "The metric tensor G is cached after the prompt, so decoding is cheaper."


def test_special_ids_and_pieces_are_the_authors():
    tok = tiny_tokenizer()
    assert tok.vocab_size == TINY_VOCAB
    assert [tok.id_to_piece(i) for i in range(4)] == ["[PAD]", "<unk>", "[START]", "[END]"]
    assert (tok.PAD_ID, tok.UNK_ID, tok.START_ID, tok.END_ID) == (0, 1, 2, 3)


def test_a_model_trained_by_sentencepiece_with_the_authors_options_loads_and_encodes_alike(
        tmp_path):
    prefix = str(tmp_path / "direct")
    spm.SentencePieceTrainer.train(
        input=TRAINING_TEXT, model_prefix=prefix, vocab_size=TINY_VOCAB, pad_id=0, unk_id=1,
        bos_id=2, eos_id=3, bos_piece="[START]", eos_piece="[END]", pad_piece="[PAD]",
        character_coverage=1.0, num_threads=1, minloglevel=2)
    tok = PLDRTokenizer.from_file(prefix + ".model")
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    assert tok.encode(SAMPLE) == sp.encode(SAMPLE)  # no BOS/EOS, as the HF tokenizer_config
    assert tok.encode(SAMPLE, add_end=True) == sp.encode(SAMPLE, add_eos=True)


def test_prompts_get_no_start_or_end_and_documents_end_with_end():
    tok = tiny_tokenizer()
    ids = tok.encode(SAMPLE)
    assert ids and tok.START_ID not in ids and tok.END_ID not in ids
    assert tok.encode(SAMPLE, add_end=True) == [*ids, tok.END_ID]
    assert tok.encode_batch([SAMPLE, "G"], add_end=True) == [
        tok.encode(SAMPLE, add_end=True), tok.encode("G", add_end=True)]


def test_decode_round_trips_and_skips_pad_start_end():
    tok = tiny_tokenizer()
    ids = tok.encode(SAMPLE)
    assert tok.decode(ids) == SAMPLE
    assert tok.decode([tok.PAD_ID, tok.START_ID, *ids, tok.END_ID, tok.PAD_ID]) == SAMPLE
    with pytest.raises(ValueError, match=r"ids must lie in \[0, vocab_size=256\), got 256"):
        tok.decode([5, 256])


def test_training_is_deterministic_and_the_seed_matters_only_when_sampling(tmp_path):
    a = PLDRTokenizer.train([TRAINING_TEXT], TINY_VOCAB)
    assert a.model_proto == tiny_tokenizer().model_proto
    sampled = [PLDRTokenizer.train([TRAINING_TEXT], TINY_VOCAB, input_sentence_size=200, seed=s)
               for s in (0, 0, 1)]
    assert sampled[0].model_proto == sampled[1].model_proto
    assert sampled[0].model_proto != sampled[2].model_proto


def test_training_errors_name_the_problem(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="hold no text"):
        PLDRTokenizer.train([empty], 100)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        PLDRTokenizer.train([latin1], 100)
    with pytest.raises(FileNotFoundError, match="missing.txt not found"):
        PLDRTokenizer.train([tmp_path / "missing.txt"], 100)
    with pytest.raises(ValueError, match="vocab_size must be an int > 4"):
        PLDRTokenizer.train([TRAINING_TEXT], 4)
    with pytest.raises(ValueError, match="failed"):  # more pieces than the text has
        PLDRTokenizer.train([TRAINING_TEXT], 100_000)


def test_save_pretrained_and_from_pretrained(tmp_path):
    tok = tiny_tokenizer()
    tok.save_pretrained(tmp_path / "ckpt")
    assert os.listdir(tmp_path / "ckpt") == ["tokenizer.model"]  # no temporary file left
    loaded = PLDRTokenizer.from_pretrained(tmp_path / "ckpt")
    assert loaded.model_proto == tok.model_proto and loaded.encode(SAMPLE) == tok.encode(SAMPLE)
    with pytest.raises(FileNotFoundError, match="tokenizer.model not found"):
        PLDRTokenizer.from_pretrained(tmp_path)


def _tarball(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_from_pth_finds_the_tokenizer_beside_the_checkpoint(tmp_path):
    tok = tiny_tokenizer()
    pth = tmp_path / "PLDRv51-110M.pth"
    pth.write_bytes(b"")  # only its directory is looked at
    with pytest.raises(FileNotFoundError, match="no tokenizer found for .*PLDRv51-110M.pth"):
        PLDRTokenizer.from_pth(pth)
    # The authors' release: a tarball holding the .model (and other files).
    _tarball(tmp_path / "tokenizer.tar.gz", {"refinedweb_tokenizer/README": b"readme",
                                             "refinedweb_tokenizer/sp.model": tok.model_proto})
    assert PLDRTokenizer.from_pth(pth).model_proto == tok.model_proto
    # A lone .model beside the .pth wins over the tarball; tokenizer.model over any .model.
    other = PLDRTokenizer.train([TRAINING_TEXT], 200)
    (tmp_path / "sp200.model").write_bytes(other.model_proto)
    assert PLDRTokenizer.from_pth(pth).vocab_size == 200
    tok.save_pretrained(tmp_path)
    assert PLDRTokenizer.from_pth(pth).vocab_size == TINY_VOCAB
    # An explicit path: a .model file, a tarball or a directory.
    assert PLDRTokenizer.from_pth(pth, tmp_path / "sp200.model").vocab_size == 200
    assert PLDRTokenizer.from_pth(pth, tmp_path / "tokenizer.tar.gz").vocab_size == TINY_VOCAB


def test_a_tarball_is_read_by_member_and_never_extracted(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    archive = tmp_path / "a" / "release.tgz"
    archive.parent.mkdir()
    _tarball(archive, {"../../escaped.model": tok.model_proto})
    monkeypatch.chdir(archive.parent)
    assert PLDRTokenizer.from_tarball(archive).model_proto == tok.model_proto
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "release.tgz"]
    _tarball(archive, {"x.model": tok.model_proto, "y.model": tok.model_proto})
    with pytest.raises(ValueError, match=r"expected one SentencePiece \.model.*x\.model"):
        PLDRTokenizer.from_tarball(archive)
    archive.write_bytes(b"not a tar")
    with pytest.raises(ValueError, match="not a readable tar archive"):
        PLDRTokenizer.from_tarball(archive)


def test_a_model_with_other_special_ids_is_refused(tmp_path):
    prefix = str(tmp_path / "default_ids")  # sentencepiece's defaults: unk 0, bos 1, eos 2
    spm.SentencePieceTrainer.train(input=TRAINING_TEXT, model_prefix=prefix, vocab_size=200,
                                   num_threads=1, minloglevel=2)
    with pytest.raises(ValueError, match=r"pad=0, unk=1.*this model has \{'pad': -1, 'unk': 0"):
        PLDRTokenizer.from_file(prefix + ".model")
    (tmp_path / "junk.model").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        PLDRTokenizer.from_file(tmp_path / "junk.model")


def test_check_fits_compares_vocabulary_and_special_ids():
    from pldr_kernels import PLDRConfig
    tok = tiny_tokenizer()
    tok.check_fits(PLDRConfig(vocab_size=TINY_VOCAB))
    with pytest.raises(ValueError, match=r"the config has \{'vocab_size': 32000\}"):
        tok.check_fits(PLDRConfig())
    with pytest.raises(ValueError, match=r"'eos_token_id': 7"):
        tok.check_fits(PLDRConfig(vocab_size=TINY_VOCAB, eos_token_id=7))


def test_incremental_decoding_streams_the_full_decode():
    tok = tiny_tokenizer()
    prompt, continuation = tok.encode("The metric"), tok.encode("tensor is cached, the KV too.")
    decoder = IncrementalDecoder(tok, prompt)
    pieces = [decoder.push(i) for i in continuation]
    assert "".join(pieces) + decoder.flush() == tok.decode(prompt + continuation)[
        len(tok.decode(prompt)):]
    assert pieces[0] == " tensor"  # the word-start marker becomes a space after the prompt


def test_missing_sentencepiece_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    with pytest.raises(ImportError, match=r"pip install pldr-kernels\[text\]"):
        PLDRTokenizer(b"")
