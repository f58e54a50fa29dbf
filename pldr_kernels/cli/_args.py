"""What every pldr command line shares: argument types that check their value, and one way to
report a user's mistake — a single line ``prog: error: <message>`` on stderr and exit status 2,
no traceback (as argparse reports a bad option). Bugs still raise with their traceback.

Use::

    parser = _args.ArgumentParser(prog="pldr-x", description=...)
    parser.add_argument("--steps", type=_args.positive)

    def main(argv=None) -> int:
        return _args.run(parser.prog, _main, argv)   # _main(argv) -> int

    def _main(argv):
        args = parser.parse_args(argv)
        _args.require_file(args.data, "--data")       # UsageError when it is not a file
        with _args.user_errors("--model"):            # FileNotFoundError, ValueError (incl.
            model = load(args.model)                  #  CheckpointError), ImportError → exit 2
        ...
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence

EXIT_USAGE = 2  # argparse's status for a bad command line
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A mistake of the user (a missing file, a bad option value): reported as one line, exit 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line (``prog: error: ...; see prog
    --help``) instead of the whole usage text."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def run(prog: str, main: Callable[[Sequence[str] | None], int | None],
        argv: Sequence[str] | None = None) -> int:
    """``main(argv)``, with a :class:`UsageError` printed as ``prog: error: message`` and exit
    status 2, Ctrl-C as exit 130. Returns the exit status (0 when ``main`` returns None)."""
    try:
        status = main(argv)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return 0 if status is None else status


@contextlib.contextmanager
def user_errors(what: str) -> Iterator[None]:
    """Turn the errors a bad input raises (a missing or unreadable file, a value a checker
    refused, a missing optional package) into a :class:`UsageError` prefixed with ``what``."""
    try:
        yield
    except (OSError, ValueError, ImportError) as e:
        raise UsageError(f"{what}: {e}") from None


def require_file(path: str, option: str) -> str:
    if not os.path.isfile(path):
        kind = "a directory" if os.path.isdir(path) else "not found"
        raise UsageError(f"{option}: expected a file, got {path!r} ({kind})")
    return path


def require_path(path: str, option: str) -> str:
    if not os.path.exists(path):
        raise UsageError(f"{option}: {path!r} not found")
    return path


def read_text(path: str, option: str) -> str:
    """A UTF-8 text file's contents, or a UsageError saying why not."""
    require_file(path, option)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UsageError(f"{option}: {path} is not UTF-8 text ({e})") from None
    except OSError as e:
        raise UsageError(f"{option}: cannot read {path} ({e})") from None


# ---- argparse types: each raises ArgumentTypeError naming what it expected and what it got ----
def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def probability(text: str) -> float:
    """A number in (0, 1] (top-p)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def device_name(text: str) -> str:
    if not DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


DTYPES = ("float32", "bfloat16", "float16")


def dtype_name(text: str) -> str:
    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(DTYPES)}, got {text!r}")
    return text


def check_device(device: str) -> None:
    """A UsageError when ``device`` names a CUDA device this machine does not have."""
    if device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available on this machine")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
