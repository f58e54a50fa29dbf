"""The PLDR-LLM tokenizer through transformers: a fast tokenizer (``PreTrainedTokenizerFast``)
built from the authors' sentencepiece ``tokenizer.model``, with their special ids (pad 0, unk 1,
[START] 2, [END] 3), left padding, and no BOS/EOS added to the text (docs/spec.md §4).

The ``.model`` file is a ``sentencepiece.ModelProto``; it is read here with a small reader of
the protobuf wire format (only the fields the conversion needs), so neither protobuf nor running
anything from the directory is needed. The vocabulary, normalizer and pre-tokenizer are then
those transformers' own SentencePiece conversion builds (``SpmConverter``), so the fast tokenizer
encodes as ``SentencePieceProcessor.encode`` does (tests/test_hf.py checks it).
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from types import SimpleNamespace

from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import SpmConverter

from ..loaders import CheckpointError

SPM_MODEL_NAME = "tokenizer.model"
TOKENIZER_FILE_NAME = "tokenizer.json"
# The authors' special pieces; their ids come from the .model itself.
SPECIAL_PIECES = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "[START]",
                  "eos_token": "[END]"}
_CONFIG_ID_OF = {"pad_token": "pad_token_id", "bos_token": "bos_token_id",
                 "eos_token": "eos_token_id"}


# --------------------------------------------------------------------------------------------
# sentencepiece ModelProto, read from the wire format
# --------------------------------------------------------------------------------------------
def _varint(data: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(data):
            raise ValueError("truncated varint")
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _fields(data: bytes):
    """(field number, wire type, value) of one protobuf message: ints for varints, bytes for
    length-delimited fields, raw 4/8 bytes for fixed32/fixed64."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 2:
            n, i = _varint(data, i)
            value, i = data[i:i + n], i + n
        elif wire == 5:
            value, i = data[i:i + 4], i + 4
        elif wire == 1:
            value, i = data[i:i + 8], i + 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def read_spm_model(path: str) -> SimpleNamespace:
    """The fields of a sentencepiece ``.model`` that the conversion reads (proto2 defaults where
    the file leaves one out): ``pieces`` (piece, score, type), ``trainer_spec`` (model_type,
    byte_fallback, unk/bos/eos/pad ids, unk_piece), ``normalizer_spec`` (precompiled_charsmap,
    add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces)."""
    with open(path, "rb") as f:
        data = f.read()
    trainer = SimpleNamespace(model_type=1, byte_fallback=False, unk_id=0, bos_id=1, eos_id=2,
                              pad_id=-1, unk_piece="<unk>")
    normalizer = SimpleNamespace(precompiled_charsmap=b"", add_dummy_prefix=True,
                                 remove_extra_whitespaces=True, escape_whitespaces=True)
    pieces = []
    trainer_ints = {3: "model_type", 40: "unk_id", 41: "bos_id", 42: "eos_id", 43: "pad_id"}
    try:
        for number, _, value in _fields(data):
            if number == 1:
                piece = SimpleNamespace(piece="", score=0.0, type=1)
                for n, _, v in _fields(value):
                    if n == 1:
                        piece.piece = v.decode("utf-8")
                    elif n == 2:
                        piece.score = struct.unpack("<f", v)[0]
                    elif n == 3:
                        piece.type = v
                pieces.append(piece)
            elif number == 2:
                for n, _, v in _fields(value):
                    if n in trainer_ints:  # int32 fields: a negative id is a 64-bit varint
                        setattr(trainer, trainer_ints[n], v - (1 << 64) if v >= 1 << 63 else v)
                    elif n == 35:
                        trainer.byte_fallback = bool(v)
                    elif n == 45:
                        trainer.unk_piece = v.decode("utf-8")
            elif number == 3:
                for n, _, v in _fields(value):
                    if n == 2:
                        normalizer.precompiled_charsmap = v
                    elif n in (3, 4, 5):
                        setattr(normalizer, {3: "add_dummy_prefix", 4: "remove_extra_whitespaces",
                                             5: "escape_whitespaces"}[n], bool(v))
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise CheckpointError(f"{path}: not a readable sentencepiece model ({e})") from None
    if not pieces:
        raise CheckpointError(f"{path}: not a sentencepiece model (no pieces)")
    return SimpleNamespace(pieces=pieces, trainer_spec=trainer, normalizer_spec=normalizer)


def backend_from_spm(path: str):
    """A ``tokenizers.Tokenizer`` equivalent to the sentencepiece model at ``path``."""
    proto = read_spm_model(path)
    unigram = proto.trainer_spec.model_type == 1
    if unigram:
        vocab = [(p.piece, p.score) for p in proto.pieces]
    else:
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    tokenizer = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    if tokenizer is None:
        raise CheckpointError(f"{path}: unsupported sentencepiece model type "
                              f"{proto.trainer_spec.model_type}")
    return tokenizer, proto


class PldrllmTokenizerFast(PreTrainedTokenizerFast):
    """The PLDR-LLM tokenizer (``tokenizer.json``; :meth:`from_sentencepiece` converts the
    sentencepiece ``tokenizer.model``). Padding on the left; nothing added around the text
    (``add_special_tokens`` adds no BOS/EOS), as the authors' generation expects."""

    vocab_files_names = {"vocab_file": SPM_MODEL_NAME, "tokenizer_file": TOKENIZER_FILE_NAME}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"

    @classmethod
    def from_sentencepiece(cls, model_file: str, **kwargs) -> PldrllmTokenizerFast:
        """Build from a sentencepiece ``.model`` whose special ids must be the authors' (pad 0,
        unk 1, [START] 2, [END] 3 — checked against the file's own pieces)."""
        backend, _ = backend_from_spm(os.fspath(model_file))
        for name, piece in SPECIAL_PIECES.items():
            kwargs.setdefault(name, piece)
        kwargs.setdefault("padding_side", "left")
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        tokenizer = cls(tokenizer_object=backend, **kwargs)
        tokenizer.vocab_file = os.fspath(model_file)
        check_special_ids(tokenizer, {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3},
                          os.fspath(model_file), "the authors' ids")
        if tokenizer.unk_token_id != 1:
            raise CheckpointError(f"{model_file}: unk_token {tokenizer.unk_token!r} has id "
                                  f"{tokenizer.unk_token_id}, expected 1 (the authors' ids: pad 0,"
                                  f" unk 1, [START] 2, [END] 3)")
        return tokenizer

    def save_pretrained(self, save_directory, *args, **kwargs):
        """HF's save (tokenizer.json, tokenizer_config.json), plus the sentencepiece model this
        tokenizer was converted from, as the authors ship it."""
        files = super().save_pretrained(save_directory, *args, **kwargs)
        source = getattr(self, "vocab_file", None)
        out = os.path.join(save_directory, SPM_MODEL_NAME)
        if source and os.path.isfile(source) and os.path.abspath(source) != os.path.abspath(out):
            shutil.copyfile(source, out)
            files = (*files, out)
        return files


def check_special_ids(tokenizer, expected: dict, source: str, against: str) -> None:
    """Raise CheckpointError when a special token's id differs from ``expected``
    (``{'pad_token_id': 0, ...}``): every disagreement in one message."""
    problems = []
    for name, config_key in _CONFIG_ID_OF.items():
        want = expected.get(config_key)
        token = getattr(tokenizer, name, None)
        got = tokenizer.convert_tokens_to_ids(token) if token is not None else None
        if want is not None and got != want:
            problems.append(f"{name} {token!r} has id {got}, {against} say {config_key}={want}")
    if problems:
        raise CheckpointError(f"{source}: the tokenizer's special ids disagree with "
                              f"{against}: " + "; ".join(problems))


def has_tokenizer(directory: str) -> bool:
    return any(os.path.isfile(os.path.join(directory, name))
               for name in (TOKENIZER_FILE_NAME, SPM_MODEL_NAME))


def check_tokenizer_matches_config(directory: str, config) -> None:
    """The tokenizer files of a model directory against its config's pad/bos/eos ids."""
    tokenizer = load_tokenizer(directory)
    check_special_ids(tokenizer, {k: getattr(config, k) for k in _CONFIG_ID_OF.values()},
                      os.path.join(directory, "tokenizer files"),
                      f"{os.path.join(directory, 'config.json')}")


def load_tokenizer(directory: str) -> PldrllmTokenizerFast:
    """The tokenizer of a directory, as PldrllmTokenizerFast, whatever class its
    tokenizer_config.json names (the authors' may name their remote one; it is never run)."""
    kwargs = {"padding_side": "left", "clean_up_tokenization_spaces": False}
    config_path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            saved = json.load(f)
        for name in SPECIAL_PIECES:
            value = saved.get(name)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                kwargs[name] = value
    tokenizer_json = os.path.join(directory, TOKENIZER_FILE_NAME)
    if os.path.isfile(tokenizer_json):
        for name, piece in SPECIAL_PIECES.items():
            kwargs.setdefault(name, piece)
        return PldrllmTokenizerFast(tokenizer_file=tokenizer_json, **kwargs)
    return PldrllmTokenizerFast.from_sentencepiece(os.path.join(directory, SPM_MODEL_NAME),
                                                   **kwargs)
