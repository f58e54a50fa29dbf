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
# The RoPE tables are built for max_position_embeddings positions when the model is (fp32
# [positions, head_dim/2] cos and sin, 0.5 GiB at this bound with head_dim 128); they grow on
# demand, so the bound limits the config value, not the length of a generation.
MAX_POSITION_EMBEDDINGS = 2**20
BOOL_FIELDS = ("use_cache", "output_pldr_attentions", "tie_word_embeddings", "attention_bias",
               "glu_bias", "final_bias", "reference_rope", "cache_first_G")

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
HPDICT_ACTIVATION_KEY = "activation"
# Every hpdict key that from_hyperparameters reads (the sidecar reader refuses these unevaluated).
HPDICT_READ_KEYS = frozenset(HPDICT_KEYS) | {HPDICT_ACTIVATION_KEY}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_positive(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


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
        """Raise ValueError naming every invalid field (all problems at once): what was expected
        and what was given."""
        problems = []
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "head_dim", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                problems.append(f"{name} must be a positive int, got {value!r}")
        if self.custom_G_type is None:
            for name in ("num_reslayerA", "num_denseA", "A_dff"):
                value = getattr(self, name)
                if not _is_int(value) or value < 1:
                    problems.append(f"{name} must be a positive int (the metric learner needs it), "
                                    f"got {value!r}")
        if not problems and self.hidden_size != self.num_attention_heads * self.head_dim:
            problems.append(f"hidden_size ({self.hidden_size}) must equal num_attention_heads "
                            f"({self.num_attention_heads}) x head_dim ({self.head_dim}) = "
                            f"{self.num_attention_heads * self.head_dim}")
        if self.head_dim not in SUPPORTED_HEAD_DIMS:
            problems.append(f"head_dim must be one of {SUPPORTED_HEAD_DIMS} (the kernels are built "
                            f"for these), got {self.head_dim!r}")
        if _is_int(self.max_position_embeddings) and (
                self.max_position_embeddings > MAX_POSITION_EMBEDDINGS):
            problems.append(f"max_position_embeddings must be at most {MAX_POSITION_EMBEDDINGS} "
                            f"(the RoPE tables are built for that many positions), got "
                            f"{self.max_position_embeddings!r}")
        if self.custom_G_type not in CUSTOM_G_TYPES:
            problems.append(f"custom_G_type must be one of {CUSTOM_G_TYPES}, got "
                            f"{self.custom_G_type!r}")
        if self.hidden_act != "silu":
            problems.append(f"hidden_act must be 'silu' (the only activation of PLDR-LLM), got "
                            f"{self.hidden_act!r}")
        if self.rope_scaling is not None:
            problems.append(f"rope_scaling is not supported (must be None), got "
                            f"{self.rope_scaling!r}")
        for name in ("layer_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not _is_finite_positive(value):
                problems.append(f"{name} must be a finite number > 0, got {value!r}")
        if not (isinstance(self.attention_dropout, (int, float)) and
                0.0 <= self.attention_dropout < 1.0):
            problems.append(f"attention_dropout must be in [0, 1), got {self.attention_dropout!r}")
        for name in BOOL_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                problems.append(f"{name} must be True or False, got {value!r}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and isinstance(self.vocab_size, int) and not (
                    _is_int(value) and 0 <= value < self.vocab_size):
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
        if not isinstance(d, dict):
            raise ValueError(f"a PLDRConfig is built from a dict of its fields, got a "
                             f"{type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_hyperparameters(cls, hpdict: dict, **overrides: Any) -> PLDRConfig:
        """Map the authors' ``hpdict`` (num_layers, d_model, num_heads, dff, …) onto a config.

        The sizes must be integers (an integral float such as 896.0 is taken as 896); anything
        else is refused with the key and the value, never truncated."""
        fields: dict = {}
        for key, field in HPDICT_KEYS.items():
            if key in hpdict and hpdict[key] is not None:
                fields[field] = _integral(key, hpdict[key])
        missing = [k for k in ("num_layers", "d_model", "num_heads", "dff") if k not in hpdict]
        if missing:
            raise ValueError(f"hyperparameters are missing the key(s) {missing} (found keys "
                             f"{sorted(hpdict)})")
        if "hidden_size" in fields and "num_attention_heads" in fields:
            heads = fields["num_attention_heads"]
            if heads < 1 or fields["hidden_size"] % heads:
                raise ValueError(f"d_model ({fields['hidden_size']}) is not divisible by "
                                 f"num_heads ({heads})")
            fields["head_dim"] = fields["hidden_size"] // heads
        activation = hpdict.get(HPDICT_ACTIVATION_KEY)
        if isinstance(activation, str):
            fields["hidden_act"] = activation
        fields.update(overrides)
        return cls(**fields)

    def state_dict_numel(self) -> int:
        """Elements in the state dict of a model with this config (the keys of docs/spec.md §4;
        a tied LM head counts twice, as ``state_dict()`` lists it twice). Computed from the
        fields alone, so a loader can compare a config with its checkpoint before building
        anything (tests/test_model_io.py checks it against the models)."""
        V, D, F, L = (self.vocab_size, self.hidden_size, self.intermediate_size,
                      self.num_hidden_layers)
        H, d = self.num_attention_heads, self.head_dim

        def linear(n_in: int, n_out: int, bias: bool) -> int:
            return n_out * n_in + (n_out if bias else 0)
        layer = (4 * linear(D, D, self.attention_bias)
                 + 2 * linear(D, F, self.glu_bias) + linear(F, D, self.glu_bias) + 4 * D)
        if self.has_metric_learner:
            A, R, Gd = self.A_dff, self.num_reslayerA, self.num_denseA
            glu = 2 * linear(d, A, self.glu_bias) + linear(A, d, self.glu_bias)
            layer += 5 * H * d * d + 2 * d + R * (Gd * glu + 2 * d)
        predefined_g = 0 if self.has_metric_learner else L * (3 * H * d * d + 1)
        return V * D + 2 * D + L * layer + predefined_g + linear(D, V, self.final_bias)

    @property
    def embedding_scale(self) -> float:
        return math.sqrt(self.hidden_size)


def _integral(key: str, value) -> int:
    """An hpdict size as an int: ints, and floats with an integral finite value."""
    if _is_int(value):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    raise ValueError(f"hyperparameter {key!r} must be an integer, got {value!r}")
