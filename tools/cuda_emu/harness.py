"""Build and run CUDA device code on the CPU through the emulation shim (docs/design.md §5).

A *driver* is a small C++ program (no torch headers, so it compiles in seconds) that includes a
kernel header from csrc/cuda, reads its inputs from ``<dir>/<name>.bin`` raw files and integer
parameters from ``<dir>/params.txt`` (``name value`` lines), calls the op's launch function of
that header (or ``cuda_emu::launch``) and writes each output to ``<dir>/<name>.bin``. Tests call
:func:`run_driver`.

Executables are cached by a hash of the driver, every header it can include and the flags, under
``$PLDR_EMU_CACHE`` (default ``build/cuda_emu``). ``PLDR_EMU_SANITIZE=thread|address`` builds the
drivers with ThreadSanitizer or AddressSanitizer (``make emu-tsan``).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SHIM_DIR = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("PLDR_EMU_CACHE", ROOT / "build" / "cuda_emu"))
CXX = os.environ.get("CXX", "g++")


def have_compiler() -> bool:
    return shutil.which(CXX) is not None


def _header_digest() -> str:
    h = hashlib.sha256()
    for d in (ROOT / "csrc", SHIM_DIR):
        for p in sorted(d.rglob("*")):
            if p.suffix in (".h", ".cuh", ".hpp"):
                h.update(p.name.encode())
                h.update(p.read_bytes())
    return h.hexdigest()


def compile_driver(driver: Path, sanitize: str | None = None,
                   extra_flags: Iterable[str] = ()) -> Path:
    """Compile ``driver`` against the shim; returns the executable (cached)."""
    sanitize = sanitize if sanitize is not None else os.environ.get("PLDR_EMU_SANITIZE") or None
    flags = ["-std=c++20", "-O1" if sanitize else "-O2", "-g", "-pthread",
             "-include", str(SHIM_DIR / "cuda_cpu_shim.h"),
             f"-I{ROOT / 'csrc'}", f"-I{SHIM_DIR}", *extra_flags]
    if sanitize:
        flags.append(f"-fsanitize={sanitize}")
    key = hashlib.sha256((Path(driver).read_text() + _header_digest() + " ".join(flags)).encode())
    exe = CACHE / f"{Path(driver).stem}-{key.hexdigest()[:16]}"
    if exe.exists():
        return exe
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = exe.with_suffix(".tmp")
    proc = subprocess.run([CXX, *flags, str(driver), "-o", str(tmp)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"emulation build of {driver} failed:\n{proc.stderr[-6000:]}")
    tmp.rename(exe)
    return exe


def run_driver(driver: Path, inputs: Mapping[str, np.ndarray], params: Mapping[str, int],
               outputs: Mapping[str, tuple[tuple[int, ...], np.dtype]],
               sanitize: str | None = None, timeout: float = 600.0) -> dict[str, np.ndarray]:
    """Compile (cached) and run ``driver``; returns the arrays it wrote, shaped as ``outputs``.

    Arrays in ``inputs`` that the driver also writes (e.g. a mutated cache) can be named in
    ``outputs`` too: they are read back after the run.
    """
    exe = compile_driver(driver, sanitize)
    with tempfile.TemporaryDirectory(prefix="pldr_emu_") as d:
        for name, arr in inputs.items():
            np.ascontiguousarray(arr).tofile(os.path.join(d, f"{name}.bin"))
        with open(os.path.join(d, "params.txt"), "w") as f:
            for name, value in params.items():
                f.write(f"{name} {int(value)}\n")
        proc = subprocess.run([str(exe), d], capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"emulated {Path(driver).name} exited with {proc.returncode}:\n"
                               f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        result = {}
        for name, (shape, dtype) in outputs.items():
            result[name] = np.fromfile(os.path.join(d, f"{name}.bin"), dtype=dtype).reshape(shape)
        return result
