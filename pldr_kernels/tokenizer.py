"""The PLDR-LLM tokenizer: SentencePiece with the authors' conventions (docs/spec.md §1).

Ids: [PAD] = 0, unk = 1, [START] = 2, [END] = 3. Prompts are encoded with neither [START] nor [END]
(the original pipeline drops the trailing [END] of a prompt; the HF tokenizer_config has
add_bos=False, add_eos=False); a training document ends with [END] (``encode(..., add_end=True)``).

It loads the ``tokenizer.model`` of an HF-format directory, the ``.model`` beside an authors'
``.pth`` or inside their tokenizer tarball (read by member name, nothing extracted), and trains a
new one from text files. Only the ``sentencepiece`` package is needed
(``pip install pldr-kernels[text]``); it is imported when a tokenizer is made, not with this module.
"""
from __future__ import annotations

import glob
import os
import random
import tarfile
from collections.abc import Iterable, Iterator, Sequence

from . import _io

PathLike = str | os.PathLike
TOKENIZER_NAME = "tokenizer.model"  # beside the weights of an HF-format directory
TARBALL_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
MAX_MODEL_BYTES = 64 << 20  # a 32000-piece model is ~0.8 MB; refuse to read a huge tar member


def _sentencepiece():
    try:
        import sentencepiece
    except ImportError:
        raise ImportError("the PLDR tokenizer needs the sentencepiece package: "
                          "pip install pldr-kernels[text] (or pip install sentencepiece)") from None
    return sentencepiece


class PLDRTokenizer:
    """A SentencePiece model whose special ids are the authors' (checked when it is loaded)."""
    PAD_ID = 0
    UNK_ID = 1
    START_ID = 2
    END_ID = 3
    PAD_PIECE = "[PAD]"
    START_PIECE = "[START]"
    END_PIECE = "[END]"
    SKIPPED_IN_DECODE = frozenset((PAD_ID, START_ID, END_ID))

    def __init__(self, model_proto: bytes, source: str = "tokenizer"):
        spm = _sentencepiece()
        self.source = source
        self._proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(self._proto)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{source}: not a SentencePiece model ({e})") from None
        special = {"pad": (self.sp.pad_id(), self.PAD_ID), "unk": (self.sp.unk_id(), self.UNK_ID),
                   "bos/[START]": (self.sp.bos_id(), self.START_ID),
                   "eos/[END]": (self.sp.eos_id(), self.END_ID)}
        wrong = {name: held for name, (held, want) in special.items() if held != want}
        if wrong:
            raise ValueError(
                f"{source}: a PLDR-LLM tokenizer has pad=0, unk=1, bos/[START]=2, eos/[END]=3 "
                f"(docs/spec.md §1); this model has {wrong} (-1 = absent). Train one with "
                f"PLDRTokenizer.train")
        self.vocab_size: int = self.sp.get_piece_size()

    # ---------------------------------------------------------------------------------- loading
    @classmethod
    def from_file(cls, path: PathLike) -> PLDRTokenizer:
        """A SentencePiece ``.model`` file."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer model {path} not found")
        with open(path, "rb") as f:
            return cls(f.read(), source=path)

    @classmethod
    def from_pretrained(cls, directory: PathLike) -> PLDRTokenizer:
        """``directory/tokenizer.model`` (an HF-format PLDR-LLM directory)."""
        path = os.path.join(os.fspath(directory), TOKENIZER_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: an HF-format directory keeps its "
                                    f"tokenizer as {TOKENIZER_NAME} beside the weights")
        return cls.from_file(path)

    @classmethod
    def from_tarball(cls, path: PathLike) -> PLDRTokenizer:
        """The ``.model`` inside a tar archive (the authors' tokenizer release). Members are
        looked up by name and read into memory; nothing is extracted and no path of the archive
        touches the file system. With several ``.model`` members, the one named
        ``tokenizer.model`` wins, else it is an error."""
        path = os.fspath(path)
        try:
            with tarfile.open(path, mode="r:*") as tar:
                models = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".model")]
                if len(models) > 1:
                    named = [m for m in models if os.path.basename(m.name) == TOKENIZER_NAME]
                    models = named if len(named) == 1 else models
                if len(models) != 1:
                    raise ValueError(f"{path}: expected one SentencePiece .model file in the "
                                     f"archive, found {[m.name for m in models]}")
                member = models[0]
                if member.size > MAX_MODEL_BYTES:
                    raise ValueError(f"{path}: member {member.name} is {member.size} bytes, "
                                     f"more than a tokenizer model ({MAX_MODEL_BYTES})")
                data = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ValueError(f"{path}: not a readable tar archive ({e})") from None
        return cls(data, source=f"{path}:{member.name}")

    @classmethod
    def from_path(cls, path: PathLike) -> PLDRTokenizer:
        """A ``.model`` file, a tokenizer tarball, or an HF-format directory."""
        path = os.fspath(path)
        if os.path.isdir(path):
            return cls.from_pretrained(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer {path} not found")
        if path.endswith(TARBALL_SUFFIXES) or tarfile.is_tarfile(path):
            return cls.from_tarball(path)
        return cls.from_file(path)

    @classmethod
    def from_pth(cls, pth_path: PathLike, tokenizer: PathLike | None = None) -> PLDRTokenizer:
        """The tokenizer of an authors' ``.pth``: ``tokenizer`` if given (a .model file, a
        tarball or a directory), else, beside the .pth, ``tokenizer.model``, else the one
        ``*.model`` file, else the one tar archive holding a ``.model``."""
        if tokenizer is not None:
            return cls.from_path(tokenizer)
        directory = os.path.dirname(os.path.abspath(pth_path))
        beside = os.path.join(directory, TOKENIZER_NAME)
        if os.path.isfile(beside):
            return cls.from_file(beside)
        models = sorted(glob.glob(os.path.join(glob.escape(directory), "*.model")))
        if len(models) == 1:
            return cls.from_file(models[0])
        tarballs = sorted(p for p in glob.glob(os.path.join(glob.escape(directory), "*"))
                          if p.endswith(TARBALL_SUFFIXES) and os.path.isfile(p))
        if len(models) == 0 and len(tarballs) == 1:
            return cls.from_tarball(tarballs[0])
        raise FileNotFoundError(
            f"no tokenizer found for {pth_path}: expected {TOKENIZER_NAME}, one *.model file or "
            f"one tokenizer tarball ({', '.join(TARBALL_SUFFIXES)}) beside it, found "
            f"{len(models)} .model file(s) and {len(tarballs)} tarball(s); pass the tokenizer's "
            f"path")

    def save_pretrained(self, directory: PathLike) -> None:
        """Write ``directory/tokenizer.model`` atomically (beside the weights)."""
        os.makedirs(directory, exist_ok=True)
        _io.atomic_write_bytes(os.path.join(os.fspath(directory), TOKENIZER_NAME), self._proto)

    @property
    def model_proto(self) -> bytes:
        """The serialized SentencePiece model (what ``tokenizer.model`` holds)."""
        return self._proto

    # --------------------------------------------------------------------------------- training
    @classmethod
    def train(cls, files: Sequence[PathLike], vocab_size: int, *, model_type: str = "unigram",
              character_coverage: float = 1.0, input_sentence_size: int = 0,
              seed: int = 0) -> PLDRTokenizer:
        """Train a SentencePiece model on the lines of UTF-8 text ``files`` with the authors'
        special ids. Deterministic: one training thread, a seeded sampler, the files read in the
        given order. ``input_sentence_size`` > 0 trains on that many lines drawn with ``seed``
        (0: all lines). The draw is made here: sentencepiece's own sampler ignores its seed.
        ``vocab_size`` counts the 4 special pieces."""
        spm = _sentencepiece()
        files = [os.fspath(f) for f in ([files] if isinstance(files, str | os.PathLike)
                                        else files)]
        if not files:
            raise ValueError("files must name at least one text file, got none")
        if not isinstance(vocab_size, int) or vocab_size <= 4:
            raise ValueError(f"vocab_size must be an int > 4 (4 special pieces), got "
                             f"{vocab_size!r}")
        if model_type not in ("unigram", "bpe", "char", "word"):
            raise ValueError(f"model_type must be unigram, bpe, char or word, got "
                             f"{model_type!r}")
        lines = list(_read_lines(files))
        if not lines:
            raise ValueError(f"files {files} hold no text to train a tokenizer on")
        if not isinstance(input_sentence_size, int) or input_sentence_size < 0:
            raise ValueError(f"input_sentence_size must be an int >= 0 (0 = every line), got "
                             f"{input_sentence_size!r}")
        if 0 < input_sentence_size < len(lines):
            chosen = sorted(random.Random(seed).sample(range(len(lines)), input_sentence_size))
            lines = [lines[i] for i in chosen]
        spm.set_random_generator_seed(seed)
        model = _BytesSink()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
                model_type=model_type, character_coverage=character_coverage,
                num_threads=1,
                pad_id=cls.PAD_ID, unk_id=cls.UNK_ID, bos_id=cls.START_ID, eos_id=cls.END_ID,
                pad_piece=cls.PAD_PIECE, bos_piece=cls.START_PIECE, eos_piece=cls.END_PIECE,
                minloglevel=2)
        except RuntimeError as e:
            raise ValueError(f"training a {vocab_size}-piece {model_type} tokenizer on {files} "
                             f"failed: {e}") from None
        return cls(model.data, source=f"trained on {files}")

    # ------------------------------------------------------------------------ encoding, decoding
    def encode(self, text: str, *, add_end: bool = False) -> list[int]:
        """Token ids of ``text``; never [START]; [END] appended with ``add_end`` (a training
        document, docs/spec.md §1)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self.sp.encode(text, out_type=int)
        return [*ids, self.END_ID] if add_end else ids

    def encode_batch(self, texts: Iterable[str], *, add_end: bool = False) -> list[list[int]]:
        texts = list(texts)
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise TypeError(f"texts must be strs, got {bad[0]}")
        # sentencepiece's batch encode starts a thread pool (~5 ms): only worth it for many texts
        batch = (self.sp.encode(texts, out_type=int) if len(texts) > 64
                 else [self.sp.encode(t, out_type=int) for t in texts])
        return [[*ids, self.END_ID] for ids in batch] if add_end else batch

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``, [PAD], [START] and [END] left out."""
        ids = [int(i) for i in ids]
        outside = [i for i in ids if not 0 <= i < self.vocab_size]
        if outside:
            raise ValueError(f"ids must lie in [0, vocab_size={self.vocab_size}), got "
                             f"{outside[0]}")
        return self.sp.decode([i for i in ids if i not in self.SKIPPED_IN_DECODE])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def check_fits(self, config) -> None:
        """ValueError unless a model with ``config`` (a PLDRConfig) can use this tokenizer: the
        same vocabulary size and special ids."""
        wanted = {"vocab_size": self.vocab_size, "pad_token_id": self.PAD_ID,
                  "bos_token_id": self.START_ID, "eos_token_id": self.END_ID}
        wrong = {name: getattr(config, name) for name, want in wanted.items()
                 if getattr(config, name) != want}
        if wrong:
            raise ValueError(f"the tokenizer ({self.source}) does not fit the model config: the "
                             f"tokenizer needs {wanted}, the config has {wrong}")

    def __repr__(self) -> str:
        return f"PLDRTokenizer(vocab_size={self.vocab_size}, source={self.source!r})"


class IncrementalDecoder:
    """Text of a growing id sequence, piece by piece, for streaming: ``push(id)`` returns what the
    new id adds to the text. SentencePiece marks a word start with '▁', which decodes to a space
    only after other text, so the decoder keeps ``context`` ids (the prompt's last) before the new
    ones; a piece that ends in the middle of a UTF-8 character (byte fallback, shown as U+FFFD) is
    held until the character is complete."""

    def __init__(self, tokenizer: PLDRTokenizer, context: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self._ids = [int(i) for i in context][-1:]
        self._shown = len(tokenizer.decode(self._ids))

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        text = self.tokenizer.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        new, self._shown = text[self._shown:], len(text)
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self._ids)
        new, self._shown = text[self._shown:], len(text)
        return new


class _BytesSink:
    """The ``model_writer`` SentencePieceTrainer writes the trained model to."""

    def __init__(self):
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


def _read_lines(files: Sequence[str]) -> Iterator[str]:
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"training text {path} not found")
        try:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    line = line.strip()
                    if line:
                        yield line
        except UnicodeDecodeError as e:
            raise ValueError(f"training text {path} is not UTF-8 ({e})") from None
