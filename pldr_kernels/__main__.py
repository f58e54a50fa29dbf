"""`python -m pldr_kernels`: how this build was made and what it can run."""
from __future__ import annotations

import platform
import sys

import torch

OPS = ("metric_tensors", "g_attention", "g_attention_decode")


def cpu_features() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch
        return "unknown"


def op_backends(op: str, with_cuda: bool) -> str:
    keys = []
    for key in ("CPU", "CUDA") if with_cuda else ("CPU",):  # else CUDA holds the rebuild hint
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"pldr::{op}", key):
            keys.append(key)
    return ", ".join(keys) or "none"


def report() -> str:
    from . import ops

    lines = [
        f"pldr-kernels {__import__('pldr_kernels').__version__}",
        f"python        {sys.version.split()[0]} ({platform.machine()})",
        f"torch         {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"threads       {torch.get_num_threads()}",
        f"cpu           {cpu_features()}",
        f"cuda device   {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none visible'}",
    ]
    if ops._LOAD_ERROR is not None:
        lines.append(f"extension     NOT LOADED: {ops._LOAD_ERROR}")
        return "\n".join(lines)
    try:
        from ._build_info import BUILD_INFO
    except ImportError:
        BUILD_INFO = {}
    lines += [
        f"built with    torch {BUILD_INFO.get('built_with_torch', '?')}, "
        f"CUDA {BUILD_INFO.get('built_with_cuda') or 'none'}",
        f"cuda kernels  {'yes, archs ' + BUILD_INFO.get('cuda_archs', '?') if BUILD_INFO.get('with_cuda') else 'no (CUDA tensors raise an error that says how to rebuild)'}",
        f"cpu flags     {BUILD_INFO.get('cpu_flags', '?')}",
    ]
    for op in OPS:
        lines.append(f"pldr::{op:<19} {op_backends(op, bool(BUILD_INFO.get('with_cuda')))}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
