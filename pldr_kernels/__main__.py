"""`python -m pldr_kernels`: how this build was made and what it can run; exits 1 when the
extension is not loaded (the last line says why and what to do)."""
from __future__ import annotations

import os
import platform
import sys

import torch


def cpu_features() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch
        return "unknown"


def extension_function(name: str, restype):
    """A plain C function the extension exports for this report (read through ctypes, so that
    asking needs no op in the pldr library's schema), or None for a build without it."""
    import ctypes

    from . import ops  # noqa: F401  (loads _C onto the package)

    try:
        fn = getattr(ctypes.CDLL(sys.modules[__package__]._C.__file__), name)
    except (AttributeError, OSError):
        return None
    fn.restype = restype
    return fn


def cpu_kernels_isa() -> str:
    """The instruction set the CPU kernels run with, ``"<selected> (best <best>)"``, as the
    extension decides it (csrc/cpu/isa.h: the best this CPU runs, or PLDR_KERNELS_ISA), or the
    error an invalid PLDR_KERNELS_ISA gives; "unknown" for a build without the run-time choice."""
    import ctypes

    fn = extension_function("pldr_kernels_cpu_isa", ctypes.c_char_p)
    return fn().decode() if fn is not None else "unknown (a build without csrc/cpu/isa.cpp)"


def row_prefetch() -> str:
    """How far ahead the decode step's bf16/int8 weight rows are prefetched (pldr::linear_small,
    docs/design.md §3.9): "4096 bytes ahead", "off", or the error an invalid
    PLDR_KERNELS_ROW_PREFETCH gives; "unknown" for a build without it."""
    import ctypes

    fn = extension_function("pldr_kernels_row_prefetch_bytes", ctypes.c_int64)
    if fn is None:
        return "unknown (a build without it)"
    value = fn()
    if value < 0:
        return ("error: PLDR_KERNELS_ROW_PREFETCH must be a number of bytes from 0 to 1048576, "
                "got " + repr(os.environ.get("PLDR_KERNELS_ROW_PREFETCH")))
    return f"{value} bytes ahead" if value else "off"


def op_backends(op: str) -> str:
    """The backends this build has for ``pldr::<op>``, whether or not a GPU is visible; a CUDA
    kernel that is the Triton path says so (and whether triton is installed)."""
    from . import triton_kernels
    from .testing import available_backends

    backends = list(available_backends(op, need_device=False))
    if op in triton_kernels.REGISTERED and "cuda" not in backends:
        backends.append("cuda")  # the Triton forward of a build without CUDA kernels
    names = []
    for backend in backends:
        name = backend.upper()
        if backend == "cuda" and op in triton_kernels.REGISTERED:
            installed = triton_kernels.triton_available()
            name += " (Triton" + ("" if installed else ", NOT INSTALLED: pip install triton") + ")"
        names.append(name)
    return ", ".join(names) or "none"


def triton_line() -> str:
    """Whether the Triton path (CUDA tensors without nvcc, docs/design.md §3.7) can run."""
    from . import triton_kernels

    ops = ", ".join(triton_kernels.REGISTERED) or "no op"
    if not triton_kernels.triton_available():
        return f"not installed (CUDA tensors of {ops} raise an error that says so)"
    import triton
    return f"{triton.__version__}, the CUDA kernels of {ops}"


def report() -> str:
    from . import __version__, ops

    cuda_device = torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible"
    lines = [
        f"pldr-kernels {__version__} ({ops.PACKAGE_DIR})",
        f"python        {sys.version.split()[0]} ({platform.machine()})",
        f"torch         {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"threads       {torch.get_num_threads()}",
        f"cpu           {cpu_features()}",
        f"cuda device   {cuda_device}",
    ]
    if ops._LOAD_ERROR is not None:
        lines.append(f"extension     NOT LOADED: {ops._LOAD_ERROR}")
        return "\n".join(lines)
    info = ops.build_info()
    with_cuda = bool(info.get("with_cuda"))
    cuda_kernels = (f"yes, archs {info.get('cuda_archs', '?')}" if with_cuda else
                    "no (CUDA tensors raise an error that says how to rebuild)")
    lines += [
        f"built with    torch {info.get('built_with_torch', '?')}, "
        f"CUDA {info.get('built_with_cuda') or 'none'}",
        f"cuda kernels  {cuda_kernels}",
        f"cpu flags     {info.get('cpu_flags', '?')}",
        f"cpu isa       {cpu_kernels_isa()} (PLDR_KERNELS_ISA=avx512|avx2|portable forces one)",
        f"row prefetch  {row_prefetch()} (bf16/int8 decode rows; PLDR_KERNELS_ROW_PREFETCH=bytes)",
    ]
    mismatch = ops._torch_mismatch()
    if mismatch:
        lines.append(f"WARNING       {ops._mismatch_message(*mismatch)}")
    from .testing import BACKWARD_OPS, CPU_OPS, OPS

    lines.append(f"triton        {triton_line()}")
    # The backward ops run inside loss.backward() (§3.4); the CPU ops inside the model (§3.9-10).
    for op in OPS + BACKWARD_OPS + CPU_OPS:
        lines.append(f"pldr::{op:<23} {op_backends(op)}")
    return "\n".join(lines)


def main() -> int:
    from . import ops

    print(report())
    return 0 if ops._LOAD_ERROR is None else 1


if __name__ == "__main__":
    sys.exit(main())
