"""Training data for ``pldr-train``: text files → token documents → fixed-length packed sequences
→ a deterministic, resumable order of global batches, split by rank (docs/design.md §3.4.3).

* A **document** is one file, read as strict UTF-8 (an empty or non-UTF-8 file is refused by
  name, :class:`DataError`). Its non-blank lines are encoded (no [START]/BOS, the authors'
  convention, docs/spec.md §1) and joined, and [END] is appended: the authors' pre-training
  documents each end with [END].
* **Packing**: the documents' tokens, concatenated in file order, are cut into sequences of
  ``seq_len`` tokens (the remainder is dropped), so no position is padding; a sequence may span a
  document boundary, which [END] marks (as the authors pack their web documents). The last
  ``eval_fraction`` of the sequences is the held-out split.
* **Order**: epoch ``e`` visits the training sequences in ``torch.randperm`` order of a generator
  seeded with ``(seed, e)``; optimizer step ``t`` takes the ``t``-th run of ``global_batch``
  sequences (a partial batch at an epoch's end is dropped). The order depends on the step alone —
  not on the number of processes or micro-batches — so a resumed run reads what the uninterrupted
  one would have read, and 1 process × 4 rows reads the rows of 2 processes × 2. Rank ``r`` of
  ``world`` takes rows ``[r·B/world, (r+1)·B/world)`` of the global batch, cut into
  ``grad_accum`` micro-batches.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

Tensor = torch.Tensor
PathLike = str | os.PathLike
EncodeBatch = Callable[[list[str]], list[list[int]]]


class DataError(ValueError):
    """A data file or a data setting that cannot be trained on; the message names it."""


# --------------------------------------------------------------------------------------------
# Files → documents
# --------------------------------------------------------------------------------------------
def corpus_files(paths: Iterable[PathLike]) -> list[str]:
    """The files named, with each directory replaced by the files under it (recursively, sorted,
    hidden names and the ``MANIFEST`` stamp of ``make data`` left out); duplicates once."""
    files: list[str] = []
    for path in map(os.fspath, paths):
        if os.path.isdir(path):
            found = []
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [os.path.join(root, n) for n in sorted(names)
                          if not n.startswith(".") and n != "MANIFEST"]
            if not found:
                raise DataError(f"--data {path}: the directory holds no files")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise DataError(f"--data {path}: no such file or directory")
    return list(dict.fromkeys(files))


def read_document(path: PathLike) -> str:
    """The text of a file, strict UTF-8; an empty (or whitespace-only) file is an error."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"--data {os.fspath(path)}: not UTF-8 text (byte 0x{raw[e.start]:02x} at "
                        f"offset {e.start}); convert it, e.g. `iconv -f latin1 -t utf-8`") from None
    if not text.strip():
        raise DataError(f"--data {os.fspath(path)}: the file is empty (no text to train on)")
    return text


def read_documents(paths: Iterable[PathLike]) -> list[str]:
    """Every file's text (:func:`corpus_files`, :func:`read_document`), all read and checked
    before anything is trained or written."""
    files = corpus_files(paths)
    if not files:
        raise DataError("--data: no files given")
    return [read_document(f) for f in files]


def encode_documents(documents: Sequence[str], encode_batch: EncodeBatch, end_id: int) -> Tensor:
    """The token stream (int64 ``[N]``): each document's non-blank lines encoded and joined, then
    ``end_id``."""
    parts = []
    for text in documents:
        lines = [line for line in text.splitlines() if line.strip()]
        ids = [i for piece in encode_batch(lines) for i in piece]
        ids.append(end_id)
        parts.append(torch.tensor(ids, dtype=torch.int64))
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)


# --------------------------------------------------------------------------------------------
# Packing and the held-out split
# --------------------------------------------------------------------------------------------
@dataclass
class PackedData:
    """``train [N, S]`` and ``eval [M, S]`` sequences of ``S = seq_len`` tokens."""
    train: Tensor
    eval: Tensor

    @property
    def seq_len(self) -> int:
        return self.train.shape[1]

    def fingerprint(self) -> str:
        """SHA-256 of the packed tokens (both splits): a resumed run must train on the same
        data."""
        h = hashlib.sha256()
        for t in (self.train, self.eval):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()


def pack(tokens: Tensor, seq_len: int, eval_fraction: float, min_train: int) -> PackedData:
    """Cut ``tokens`` into ``[N, seq_len]`` (remainder dropped); the last
    ``max(1, round(eval_fraction·N))`` sequences are held out (none when ``eval_fraction`` is 0).
    ``min_train``: the fewest training sequences wanted (one global batch)."""
    if seq_len < 2:
        raise DataError(f"--seq-len must be at least 2 (a next-token target), got {seq_len}")
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    n = tokens.numel() // seq_len
    held = 0 if eval_fraction == 0 else max(1, round(eval_fraction * n))
    if n - held < min_train:
        raise DataError(
            f"--data gives {tokens.numel():,} tokens = {n} sequences of --seq-len {seq_len}, "
            f"{held} of them held out for evaluation; a global batch needs {min_train} training "
            f"sequences. Give more text, or a smaller --seq-len / --batch-size / --eval-fraction")
    sequences = tokens[: n * seq_len].view(n, seq_len)
    return PackedData(train=sequences[: n - held].clone(), eval=sequences[n - held:].clone())


# --------------------------------------------------------------------------------------------
# The order of the batches
# --------------------------------------------------------------------------------------------
EPOCH_SEED_STRIDE = 1_000_003  # a prime: (seed, epoch) pairs map to distinct generator seeds


@dataclass(frozen=True)
class BatchOrder:
    """Which training sequences optimizer step ``t`` uses: see the module docstring."""
    num_sequences: int
    global_batch: int
    seed: int

    def __post_init__(self):
        if self.global_batch < 1 or self.global_batch > self.num_sequences:
            raise DataError(f"a global batch of {self.global_batch} sequences needs 1 … "
                            f"{self.num_sequences} (the training sequences)")

    @property
    def steps_per_epoch(self) -> int:
        return self.num_sequences // self.global_batch

    def position(self, step: int) -> dict:
        """Where step ``step`` (0-based) reads: epoch and batch within it."""
        epoch, batch = divmod(step, self.steps_per_epoch)
        return {"step": step, "epoch": epoch, "batch_in_epoch": batch,
                "steps_per_epoch": self.steps_per_epoch}

    def global_rows(self, step: int) -> Tensor:
        """Indices ``[global_batch]`` of the training sequences of step ``step``."""
        pos = self.position(step)
        gen = torch.Generator().manual_seed(self.seed * EPOCH_SEED_STRIDE + pos["epoch"])
        perm = torch.randperm(self.num_sequences, generator=gen)
        start = pos["batch_in_epoch"] * self.global_batch
        return perm[start: start + self.global_batch]

    def micro_batches(self, step: int, rank: int, world: int, grad_accum: int) -> list[Tensor]:
        """This rank's rows of step ``step``, as ``grad_accum`` micro-batches of indices."""
        micro, extra = divmod(self.global_batch, world * grad_accum)
        if extra:
            raise DataError(f"--batch-size {self.global_batch} must be divisible by the number of "
                            f"processes ({world}) × --grad-accum ({grad_accum})")
        rows = self.global_rows(step)
        per_rank = micro * grad_accum
        return list(rows[rank * per_rank: (rank + 1) * per_rank].split(micro))
