"""PldrllmConfig: the HF port's ``PldrllmConfig`` (model_type "pldrllm", docs/spec.md §4) as a
``transformers.PreTrainedConfig`` whose PLDR-LLM fields are exactly those of
:class:`~pldr_kernels.config.PLDRConfig`.

One concept in one place: the fields, their defaults and their validation are PLDRConfig's; this
class maps them (:meth:`PldrllmConfig.to_pldr_config`, :meth:`PldrllmConfig.from_pldr_config`) and
validates by building the PLDRConfig. It adds one field of its own, ``pldr_cache_mode`` (the
cache mode HF ``generate`` uses, docs/design.md §2.1).
"""
from __future__ import annotations

import dataclasses

from transformers import PreTrainedConfig

from ..config import PLDRConfig

# The cache modes of HF generate on PldrllmForCausalLM (docs/spec.md §3.1): 'kvg' (KV-cache and
# G-cache), 'kv' (KV-cache, G recomputed from the cached A each step), 'none' (the whole sequence
# re-run each step, G recomputed from it; also what use_cache=False gives).
HF_CACHE_MODES = ("none", "kv", "kvg")
PLDR_FIELDS = tuple(f.name for f in dataclasses.fields(PLDRConfig))
_DEFAULTS = PLDRConfig()


class PldrllmConfig(PreTrainedConfig):
    """The config of a PLDR-LLM for transformers (``config.json`` with ``"model_type":
    "pldrllm"``). Fields and defaults: docs/spec.md §4 (those of PLDRConfig), plus
    ``pldr_cache_mode`` (one of :data:`HF_CACHE_MODES`, default 'kvg')."""

    model_type = "pldrllm"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = _DEFAULTS.vocab_size
    hidden_size: int = _DEFAULTS.hidden_size
    intermediate_size: int = _DEFAULTS.intermediate_size
    num_hidden_layers: int = _DEFAULTS.num_hidden_layers
    num_attention_heads: int = _DEFAULTS.num_attention_heads
    head_dim: int = _DEFAULTS.head_dim
    hidden_act: str = _DEFAULTS.hidden_act
    max_position_embeddings: int = _DEFAULTS.max_position_embeddings
    initializer_range: float = _DEFAULTS.initializer_range
    layer_norm_eps: float = _DEFAULTS.layer_norm_eps
    use_cache: bool = _DEFAULTS.use_cache
    output_pldr_attentions: bool = _DEFAULTS.output_pldr_attentions
    pad_token_id: int | None = _DEFAULTS.pad_token_id
    bos_token_id: int | None = _DEFAULTS.bos_token_id
    eos_token_id: int | None = _DEFAULTS.eos_token_id
    tie_word_embeddings: bool = _DEFAULTS.tie_word_embeddings
    rope_theta: float = _DEFAULTS.rope_theta
    rope_scaling: dict | None = None
    attention_bias: bool = _DEFAULTS.attention_bias
    glu_bias: bool = _DEFAULTS.glu_bias
    final_bias: bool = _DEFAULTS.final_bias
    reference_rope: bool = _DEFAULTS.reference_rope
    attention_dropout: float = _DEFAULTS.attention_dropout
    num_reslayerA: int = _DEFAULTS.num_reslayerA
    num_denseA: int = _DEFAULTS.num_denseA
    A_dff: int = _DEFAULTS.A_dff
    custom_G_type: str | None = _DEFAULTS.custom_G_type
    cache_first_G: bool = _DEFAULTS.cache_first_G
    pldr_cache_mode: str = "kvg"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.check()

    def check(self) -> None:
        """Raise ValueError naming every invalid field: PLDRConfig's rules, and the cache mode
        (None is taken as 'none': lm-eval's ``--model_args`` parse the word none as None)."""
        if self.pldr_cache_mode is None:
            self.pldr_cache_mode = "none"
        if self.pldr_cache_mode not in HF_CACHE_MODES:
            raise ValueError(f"invalid PldrllmConfig: pldr_cache_mode must be one of "
                             f"{HF_CACHE_MODES}, got {self.pldr_cache_mode!r}")
        self.to_pldr_config()

    # The rule lives in PLDRConfig; the same property serves both configs.
    has_metric_learner = PLDRConfig.has_metric_learner

    def to_pldr_config(self) -> PLDRConfig:
        """The PLDRConfig of these fields (validated there)."""
        return PLDRConfig(**{name: getattr(self, name) for name in PLDR_FIELDS})

    @classmethod
    def from_pldr_config(cls, config: PLDRConfig, **kwargs) -> PldrllmConfig:
        """A PldrllmConfig with the fields of ``config`` (``kwargs``: further HF fields)."""
        return cls(**{name: getattr(config, name) for name in PLDR_FIELDS}, **kwargs)
