"""Triton kernels for CUDA tensors (docs/design.md §3.7): ``pldr::g_attention``'s forward and
``pldr::g_attention_backward``, JIT-compiled, so no nvcc is needed.

Importing this package (``import pldr_kernels`` does) registers, on the dispatcher's CUDA key:

* ``pldr::g_attention_backward`` → the Triton backward, always (no C++ CUDA backward exists);
* ``pldr::g_attention`` → the Triton forward, only when ``_C`` was built without CUDA kernels
  (``ops.built_with_cuda()`` False, e.g. a plain ``pip install`` on a machine without nvcc), in
  place of the stub that would raise; where the CUDA kernels are built they stay the default.

Triton itself is imported on the first call (``attention`` holds the kernels), so importing
pldr_kernels stays cheap; when it is not installed, that call raises an error that says so.
"""
from __future__ import annotations

import importlib.util
import warnings

import torch

from .. import ops

REGISTERED: tuple[str, ...] = ()
"""The ops whose CUDA kernel this package registered (``register`` fills it)."""


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _missing_triton_message(op: str) -> str:
    text = (f"pldr::{op} on CUDA tensors runs Triton kernels here, and Triton is not installed: "
            "`pip install triton` (or `pip install pldr-kernels[triton]`)")
    if op == "g_attention":
        text += (", or rebuild pldr_kernels with its CUDA kernels: a CUDA build of torch and nvcc "
                 "on PATH, `PLDR_KERNELS_FORCE_CUDA=1 pip install --no-build-isolation -e .`")
    return text + "."


def _kernels(op: str):
    if not triton_available():
        raise RuntimeError(_missing_triton_message(op))
    from . import attention
    return attention


def g_attention_cuda(q, k, v, G=None, key_mask=None, causal=False, scale=None):
    """The CUDA kernel of ``pldr::g_attention`` in a build without CUDA kernels."""
    return _kernels("g_attention").g_attention_forward(q, k, v, G, key_mask, causal, scale)


def g_attention_backward_cuda(dout, q, k, v, G, out, lse, key_mask, causal, scale):
    """The CUDA kernel of ``pldr::g_attention_backward``."""
    return _kernels("g_attention_backward").g_attention_backward(dout, q, k, v, G, out, lse,
                                                                 key_mask, causal, scale)


def ops_to_register(built_with_cuda: bool, has_backward_schema: bool) -> tuple[str, ...]:
    """Which ops get the Triton kernels on the CUDA key (see the module docstring)."""
    return (("g_attention",) if not built_with_cuda else ()) + (
        ("g_attention_backward",) if has_backward_schema else ())


def register() -> tuple[str, ...]:
    """Register the Triton kernels on the CUDA key (once; needs a loaded ``_C``, whose schemas
    they implement) and return the ops registered."""
    global REGISTERED
    if REGISTERED or ops._LOAD_ERROR is not None:
        return REGISTERED
    names = ops_to_register(ops.built_with_cuda(), _has_schema("pldr::g_attention_backward"))
    impls = {"g_attention": g_attention_cuda, "g_attention_backward": g_attention_backward_cuda}
    with warnings.catch_warnings():
        # The CPU-only build's CUDA stub (csrc/cpu/no_cuda_stubs.cpp) is replaced on purpose.
        warnings.filterwarnings("ignore", message="Warning only once for all operators")
        for name in names:
            torch.library.impl(f"pldr::{name}", "cuda", impls[name])
    REGISTERED = names
    return names


def _has_schema(qualname: str) -> bool:
    namespace, name = qualname.split("::")
    try:
        getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        return False
    return True


register()
