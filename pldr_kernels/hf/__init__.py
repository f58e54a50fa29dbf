"""pldr-kernels in the Hugging Face ecosystem (``pip install pldr-kernels[hf]``; docs/design.md
§2.1): :class:`PldrllmConfig`, :class:`PldrllmForCausalLM` (PreTrainedModel + GenerationMixin on
the pldr ops), :class:`PldrCache` (the KV- and G-caches of HF ``generate``) and
:class:`PldrllmTokenizerFast`; ``attn_implementation="pldr"`` for any transformers model
(:mod:`pldr_kernels.hf.attention`). Importing this module registers them with transformers'
AutoConfig, AutoModel, AutoModelForCausalLM and AutoTokenizer under model_type "pldrllm", so
``AutoModelForCausalLM.from_pretrained(dir)`` and ``pipeline("text-generation", model=dir)``
load a PLDR-LLM directory without running any code it contains.

Outside pldr-bench's hf and llama suites, the only part of pldr_kernels that imports transformers.
"""
from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .cache import PldrCache
from .configuration import HF_CACHE_MODES, PldrllmConfig
from .modeling import CausalPLDRLLMOutputWithPast, PldrllmForCausalLM, PldrllmPreTrainedModel
from .tokenizer import PldrllmTokenizerFast

AutoConfig.register(PldrllmConfig.model_type, PldrllmConfig, exist_ok=True)
AutoModel.register(PldrllmConfig, PldrllmForCausalLM, exist_ok=True)
AutoModelForCausalLM.register(PldrllmConfig, PldrllmForCausalLM, exist_ok=True)
AutoTokenizer.register(PldrllmConfig, fast_tokenizer_class=PldrllmTokenizerFast, exist_ok=True)

# attn_implementation="pldr" for any HF model (docs/design.md §3.8) registers on import
from . import attention  # noqa: E402, F401

__all__ = ["HF_CACHE_MODES", "CausalPLDRLLMOutputWithPast", "PldrCache", "PldrllmConfig",
           "PldrllmForCausalLM", "PldrllmPreTrainedModel", "PldrllmTokenizerFast"]
