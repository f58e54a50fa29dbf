"""PLDRConfig: the hyperparameters of a PLDR-LLM, with the field names of the HF ``PldrllmConfig``.

Field names and defaults follow docs/spec.md §4 (the 110M model). ``from_hyperparameters`` maps the
authors' ``hpdict`` (their ``*_hyperparameters.py`` sidecar) onto these fields.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

CUSTOM_G_TYPES = (None, "identity", "random", "external")
SUPPORTED_HEAD_DIMS = (64, 128)

# Keys of the authors' hpdict → PLDRConfig fields (several spellings across their repos).
HPDICT_KEYS = {
    "num_layers": "num_hidden_layers",
    "d_model": "hidden_size",
    "num_heads": "num_attention_heads",
    "dff": "intermediate_size",
    "A_dff": "A_dff",
    "num_reslayerA": "num_reslayerA",
    "num_denseA": "num_denseA",
    "input_vocab_size": "vocab_size",
    "target_vocab_size": "vocab_size",
    "vocab_size": "vocab_size",
    "vocab": "vocab_size",
    "max_seq_len": "max_position_embeddings",
}


@dataclass
class PLDRConfig:
    vocab_size: int = 32000
    hidden_size: int = 896
    intermediate_size: int = 2389
    num_hidden_layers: int = 5
    num_attention_heads: int = 14
    head_dim: int = 64
    hidden_act: str = "silu"
    max_position_embeddings: int = 1024
    initializer_range: float = 0.02  # unused (xavier init, as the authors), kept for HF parity
    layer_norm_eps: float = 1e-6
    use_cache: bool = True
    output_pldr_attentions: bool = False
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_id: int | None = 3  # where generate() stops a row unless told otherwise
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = True
    glu_bias: bool = True
    final_bias: bool = True
    reference_rope: bool = True
    attention_dropout: float = 0.0
    num_reslayerA: int = 8
    num_denseA: int = 2
    A_dff: int = 170
    custom_G_type: str | None = None
    cache_first_G: bool = False

    def __post_init__(self):
        self.validate()

    # ----------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming every invalid field (all problems at once)."""
        problems = []
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "head_dim", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} must be a positive int, got {value!r}")
        if self.custom_G_type is None:
            for name in ("num_reslayerA", "num_denseA", "A_dff"):
                value = getattr(self, name)
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    problems.append(f"{name} must be a positive int (the metric learner needs it), "
                                    f"got {value!r}")
        if not problems and self.hidden_size != self.num_attention_heads * self.head_dim:
            problems.append(f"hidden_size ({self.hidden_size}) must equal num_attention_heads "
                            f"({self.num_attention_heads}) x head_dim ({self.head_dim}) = "
                            f"{self.num_attention_heads * self.head_dim}")
        if self.head_dim not in SUPPORTED_HEAD_DIMS:
            problems.append(f"head_dim must be one of {SUPPORTED_HEAD_DIMS} (the kernels are built "
                            f"for these), got {self.head_dim!r}")
        if self.custom_G_type not in CUSTOM_G_TYPES:
            problems.append(f"custom_G_type must be one of {CUSTOM_G_TYPES}, got "
                            f"{self.custom_G_type!r}")
        if self.hidden_act != "silu":
            problems.append(f"hidden_act must be 'silu' (the only activation of PLDR-LLM), got "
                            f"{self.hidden_act!r}")
        if self.rope_scaling is not None:
            problems.append(f"rope_scaling is not supported (must be None), got "
                            f"{self.rope_scaling!r}")
        if not (isinstance(self.layer_norm_eps, (int, float)) and self.layer_norm_eps > 0):
            problems.append(f"layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            problems.append(f"rope_theta must be > 0, got {self.rope_theta!r}")
        if not (isinstance(self.attention_dropout, (int, float)) and
                0.0 <= self.attention_dropout < 1.0):
            problems.append(f"attention_dropout must be in [0, 1), got {self.attention_dropout!r}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and isinstance(self.vocab_size, int) and not (
                    isinstance(value, int) and 0 <= value < self.vocab_size):
                problems.append(f"{name} must be None or in [0, vocab_size={self.vocab_size}), "
                                f"got {value!r}")
        if problems:
            raise ValueError("invalid PLDRConfig: " + "; ".join(problems) + ".")

    # ----------------------------------------------------------------------------------------
    @property
    def has_metric_learner(self) -> bool:
        """False for the predefined-G models (v51G ablations): no metric learner, G in a buffer."""
        return self.custom_G_type is None

    def to_dict(self) -> dict:
        """Plain dict of every field, plus the HF bookkeeping keys of a ``config.json``."""
        d = dataclasses.asdict(self)
        d["model_type"] = "pldrllm"
        d["architectures"] = ["PldrllmForCausalLM"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PLDRConfig:
        """Build from a dict such as an HF ``config.json``; keys that are not fields are ignored
        (HF configs carry bookkeeping such as ``auto_map`` or ``transformers_version``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_hyperparameters(cls, hpdict: dict, **overrides: Any) -> PLDRConfig:
        """Map the authors' ``hpdict`` (num_layers, d_model, num_heads, dff, …) onto a config."""
        fields: dict = {}
        for key, field in HPDICT_KEYS.items():
            if key in hpdict and hpdict[key] is not None:
                fields[field] = int(hpdict[key])
        missing = [k for k in ("num_layers", "d_model", "num_heads", "dff") if k not in hpdict]
        if missing:
            raise ValueError(f"hyperparameters are missing the key(s) {missing} (found keys "
                             f"{sorted(hpdict)})")
        if "hidden_size" in fields and "num_attention_heads" in fields:
            heads = fields["num_attention_heads"]
            if fields["hidden_size"] % heads:
                raise ValueError(f"d_model ({fields['hidden_size']}) is not divisible by "
                                 f"num_heads ({heads})")
            fields["head_dim"] = fields["hidden_size"] // heads
        activation = hpdict.get("activation")
        if isinstance(activation, str):
            fields["hidden_act"] = activation
        fields.update(overrides)
        return cls(**fields)

    @property
    def embedding_scale(self) -> float:
        return math.sqrt(self.hidden_size)
