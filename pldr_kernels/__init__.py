"""pldr-kernels: fused CPU and CUDA kernels for PLDR-LLM power law graph attention.

``import pldr_kernels`` loads the compiled ops into ``torch.ops.pldr`` (and registers their fake
implementations for torch.compile); without a loadable build it still imports, and
``pldr_kernels.ops.require_built()`` (which every op wrapper calls) says why and what to do.
Entry points: :mod:`pldr_kernels.ops` (the ops), :mod:`pldr_kernels.reference` (the pure-PyTorch
oracle), :class:`PLDRConfig`, :class:`PLDRForCausalLM`, :mod:`pldr_kernels.reference_model` (the
authors'-style model, an oracle); ``python -m pldr_kernels`` reports the build.
"""
# ops loads _C and registers the fake kernels; autograd (which imports ops) the backward of the ops.
from . import autograd, ops  # noqa: F401
from ._version import __version__  # noqa: F401
from .config import PLDRConfig  # noqa: F401
from .layers import CausalLMOutput  # noqa: F401
from .model import PLDRForCausalLM  # noqa: F401
from .ops import g_attention, g_attention_decode, metric_tensors  # noqa: F401
from .sampling import GenerationOptions  # noqa: F401
