"""pldr-kernels: fused CPU and CUDA kernels for PLDR-LLM power law graph attention.

``import pldr_kernels`` loads the compiled ops into ``torch.ops.pldr`` (and registers their fake
implementations for torch.compile); without a loadable build it still imports, and
``pldr_kernels.ops.require_built()`` (which every op wrapper calls) says why and what to do.
Entry points: :mod:`pldr_kernels.ops` (the ops), :mod:`pldr_kernels.reference` (the pure-PyTorch
oracle), :class:`PLDRConfig`, :class:`PLDRForCausalLM`, :mod:`pldr_kernels.reference_model` (the
authors'-style model, an oracle); ``python -m pldr_kernels`` reports the build. Text in, text
out: :class:`pldr_kernels.tokenizer.PLDRTokenizer` and :func:`generate_text` (loaded on first use;
they need the ``sentencepiece`` package, ``pip install pldr-kernels[text]``).
"""
from . import (
    ops,  # noqa: F401  (loads _C and registers the fake kernels)
    triton_kernels,  # noqa: F401  (the Triton kernels on the CUDA key, docs/design.md §3.7)
)

if ops._LOAD_ERROR is None:
    from . import autograd  # noqa: F401  (registers the ops' backward formulas)
from ._version import __version__  # noqa: F401
from .config import PLDRConfig  # noqa: F401
from .layers import CausalLMOutput  # noqa: F401
from .model import PLDRForCausalLM  # noqa: F401
from .ops import g_attention, g_attention_decode, metric_tensors  # noqa: F401
from .sampling import GenerationOptions  # noqa: F401

_LAZY = {"generate_text": "textgen", "stream_text": "textgen", "PLDRTokenizer": "tokenizer"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
