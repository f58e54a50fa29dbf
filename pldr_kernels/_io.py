"""Atomic file writes: the one place where pldr_kernels (checkpoints, pldr-bench outputs) and the
tools write files.

A file is written under a temporary name in its own directory, flushed to disk (``fsync``), then
moved over the target with ``os.replace``, which is atomic on POSIX and Windows: a reader, or a
process killed mid-write, sees the old file or the new one, never a part of either.
:func:`atomic_write_all` commits several files only after all of them are written, in the order
given (a checkpoint: weights before the config that describes them). This module uses the standard
library only, so tools that must not import torch can load it by path.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Sequence

PathLike = str | os.PathLike
Writer = Callable[[str], object]  # writes the whole file at the path it is given
TEMP_MARK = ".tmp-"  # in every temporary name: ".<name>.tmp-<random><suffix>"


def temporary_path(path: PathLike) -> str:
    """Create an empty, new file next to ``path`` and return its name: hidden, with ``path``'s
    suffix (writers such as matplotlib's ``savefig`` choose the format from it), and the mode a
    plain ``open(path, "w")`` would give (0o666 less the umask, not mkstemp's 0o600)."""
    directory, name = os.path.split(os.path.abspath(path))
    suffix = os.path.splitext(name)[1]
    while True:
        candidate = os.path.join(directory, f".{name}{TEMP_MARK}{secrets.token_hex(6)}{suffix}")
        try:
            os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return candidate


def _fsync(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not directory:  # some file systems cannot fsync a directory; the data is synced
            raise
    finally:
        os.close(fd)


def atomic_write_all(files: Sequence[tuple[PathLike, Writer]]) -> None:
    """Write every ``(path, writer)`` to a temporary file (``writer(temporary_path)``) and fsync
    it; only when all are written, move each over its path in the given order, then fsync the
    directories. If a writer raises, every temporary file is removed and no target is touched."""
    staged: list[tuple[str, str]] = []
    try:
        for path, writer in files:
            temp = temporary_path(path)
            staged.append((temp, os.fspath(path)))
            writer(temp)
            _fsync(temp)
        for temp, path in staged:
            os.replace(temp, path)
    except BaseException:
        for temp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                os.remove(temp)
        raise
    if os.name == "posix":  # the renames themselves reach the disk with the directory
        for directory in dict.fromkeys(os.path.dirname(os.path.abspath(p)) for _, p in staged):
            _fsync(directory, directory=True)


def atomic_write(path: PathLike, writer: Writer) -> None:
    """``writer(temporary_path)`` writes the file; it then replaces ``path`` atomically."""
    atomic_write_all([(path, writer)])


def bytes_writer(data: bytes) -> Writer:
    def write(temp: str) -> None:
        with open(temp, "wb") as f:
            f.write(data)
    return write


def text_writer(text: str) -> Writer:
    def write(temp: str) -> None:
        with open(temp, "w", encoding="utf-8") as f:
            f.write(text)
    return write


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    atomic_write(path, bytes_writer(data))


def atomic_write_text(path: PathLike, text: str) -> None:
    """UTF-8 text, written atomically."""
    atomic_write(path, text_writer(text))
