"""pldr-kernels: fused CPU and CUDA kernels for PLDR-LLM power law graph attention.

``import pldr_kernels`` loads the compiled ops into ``torch.ops.pldr`` (and registers their fake
implementations for torch.compile). Entry points: :mod:`pldr_kernels.ops` (the ops),
:mod:`pldr_kernels.reference` (the pure-PyTorch oracle),
:class:`PLDRConfig`, :mod:`pldr_kernels.reference_model` (the authors'-style model, an oracle).
"""
from . import ops  # noqa: F401  (loads _C and registers the fake kernels)
from .config import PLDRConfig  # noqa: F401
from .model import PLDRForCausalLM  # noqa: F401
from .ops import g_attention, g_attention_decode, metric_tensors  # noqa: F401

__version__ = "0.1.0"
