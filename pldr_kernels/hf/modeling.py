"""PldrllmForCausalLM: PLDR-LLM as a ``transformers`` PreTrainedModel + GenerationMixin, running on
the pldr ops through PLDRForCausalLM's own modules and layer loop (docs/design.md §2.1).

The module tree is PLDRForCausalLM's, so the state-dict keys are the authors' (``decoder.*``,
``final_layer.*``, docs/spec.md §4). The layer loop, the cache setup, the prefill and the decode
step are PLDRForCausalLM's methods, shared by assignment below (they need only ``decoder``,
``final_layer``, ``config.has_metric_learner`` and the model's dtype and device): one forward
path for both classes. What this class adds is the HF surface: ``forward`` with HF's arguments
and outputs, a :class:`~pldr_kernels.hf.cache.PldrCache` for ``generate``, and bounded loading of
HF-format directories that never runs a directory's code.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .. import loaders, ops
from ..generation import DecodeState
from ..layers import attach_lm_head, causal_lm_loss
from ..model import PLDRDecoder, PLDRForCausalLM, _forget_decode_plan
from ..nn import SmallRowsLinear
from .cache import PldrCache
from .configuration import HF_CACHE_MODES, PldrllmConfig
from .tokenizer import check_tokenizer_matches_config, has_tokenizer

Tensor = torch.Tensor
# from_pretrained: where to download from (a hub name), and what HF's loader takes that has no
# meaning here (no code of the directory is ever run, whatever trust_remote_code says).
HUB_KEYS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "proxies",
            "subfolder", "code_revision")
IGNORED_LOAD_KEYS = ("trust_remote_code", "adapter_kwargs", "low_cpu_mem_usage",
                     "use_safetensors", "attn_implementation", "state_dict",
                     "output_loading_info", "gguf_file", "quantization_config", "max_memory",
                     "offload_folder", "offload_buffers", "offload_state_dict")


@dataclass
class CausalPLDRLLMOutputWithPast(CausalLMOutputWithPast):
    """HF's causal-LM output plus the port's ``pldr_attentions``: per layer the tuple
    ``(A, A_LM, pw, a, ba, G_LM, E)`` (docs/spec.md §4). E, the attention weights, is None: the
    kernels never materialise them. pw, a, ba (the power-law parameters) are None for a
    predefined-G model, which has none."""

    pldr_attentions: tuple | None = None


class PldrllmPreTrainedModel(PreTrainedModel):
    config_class = PldrllmConfig
    config: PldrllmConfig
    base_model_prefix = "decoder"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PLDRDecoderLayer"]
    _supports_sdpa = False
    _supports_flash_attn = False
    _supports_flex_attn = False

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing: the modules initialise themselves as the authors' do (xavier, layers.py), so
        a PldrllmForCausalLM built under a seed has the weights of a PLDRForCausalLM built under
        it; a load replaces every weight."""


class PldrllmForCausalLM(PldrllmPreTrainedModel, GenerationMixin):
    """PLDR-LLM v510 for transformers, on the fused pldr ops.

    ``forward(input_ids, attention_mask=None, cache=None, labels=None, logits_to_keep=0, ...)``:
    without a cache, the full uncached forward (G from this input, as PLDRForCausalLM's
    ``forward``); with a :class:`PldrCache`, its first call is the prompt (the caches filled) and
    each later call one token per row through ``pldr::g_attention_decode``. ``generate`` makes
    the cache itself, in the cache mode of ``pldr_cache_mode`` (a generate keyword, else the
    config's; :data:`~pldr_kernels.hf.configuration.HF_CACHE_MODES`)."""

    def __init__(self, config: PldrllmConfig):
        super().__init__(config)
        config.check()
        pldr_config = config.to_pldr_config()
        self.decoder = PLDRDecoder(pldr_config)
        attach_lm_head(self, pldr_config, linear=SmallRowsLinear)  # as PLDRForCausalLM's
        self._decode_plan: list | None = None  # the fused decode step's weights, as there
        self.register_load_state_dict_post_hook(_forget_decode_plan)
        self.post_init()

    # ---- PLDRForCausalLM's layer loop and caches (model.py), shared --------------------------
    gradient_checkpointing: bool = False
    _attention_layers = PLDRForCausalLM._attention_layers
    _run = PLDRForCausalLM._run
    _head = PLDRForCausalLM._head
    _sequence_inputs = PLDRForCausalLM._sequence_inputs
    setup_caches = PLDRForCausalLM.setup_caches
    caches = PLDRForCausalLM.caches
    first_cache = PLDRForCausalLM.first_cache
    clear_caches = PLDRForCausalLM.clear_caches
    prefill = PLDRForCausalLM.prefill
    decode_step = PLDRForCausalLM.decode_step
    fused_decode = PLDRForCausalLM.fused_decode
    _fused_decode_applies = PLDRForCausalLM._fused_decode_applies
    _plan_decode = PLDRForCausalLM._plan_decode
    _decode_plan_current = PLDRForCausalLM._decode_plan_current
    _fused_decode_step = PLDRForCausalLM._fused_decode_step

    def _apply(self, fn, recurse=True):
        self._decode_plan = None  # .to() / .half() / ... may give the weights new storage
        return super()._apply(fn, recurse)

    @property
    def pldr_config(self):
        return self.decoder.config

    def get_input_embeddings(self) -> nn.Embedding:
        return self.decoder.embedding

    def get_output_embeddings(self) -> nn.Linear:
        return self.final_layer

    def to_pldr(self) -> PLDRForCausalLM:
        """A PLDRForCausalLM with this model's config and weights (a copy)."""
        model = PLDRForCausalLM(self.pldr_config)
        model.load_state_dict(self.state_dict())
        return model.to(self.dtype).eval()

    @classmethod
    def from_pldr(cls, model: PLDRForCausalLM) -> PldrllmForCausalLM:
        """This class with the config and weights of a PLDRForCausalLM (a copy)."""
        hf = cls(PldrllmConfig.from_pldr_config(model.config))
        hf.load_state_dict(model.state_dict())
        return hf.to(model.dtype).eval()

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache: PldrCache | None = None,
                inputs_embeds: Tensor | None = None, labels: Tensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0,
                output_pldr_attentions: bool | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, pldr_cache_mode: str | None = None,
                include_pad_in_g: bool = False, **kwargs) -> CausalPLDRLLMOutputWithPast:
        """``position_ids`` are not read: RoPE positions come from ``attention_mask`` (counted
        from each row's first real token), as in PLDRForCausalLM. ``include_pad_in_g=True``
        lets the pad rows of a left-padded prompt into QᵀQ, as the HF port does."""
        ops.require_built()
        if cache is None:  # the name before transformers 5.2x renamed it
            cache = kwargs.pop("past_key_values", None)
        if inputs_embeds is not None:
            raise ValueError("PldrllmForCausalLM takes input_ids, not inputs_embeds (the "
                             "embedding is scaled by sqrt(hidden_size) and normalised first)")
        if input_ids is None:
            raise ValueError("PldrllmForCausalLM.forward needs input_ids")
        if output_hidden_states:
            raise ValueError("output_hidden_states is not supported by PldrllmForCausalLM (the "
                             "fused layer loop keeps no per-layer hidden states)")
        if pldr_cache_mode is not None and pldr_cache_mode not in HF_CACHE_MODES:
            raise ValueError(f"pldr_cache_mode must be one of {HF_CACHE_MODES}, got "
                             f"{pldr_cache_mode!r}")
        want_pldr = (self.config.output_pldr_attentions if output_pldr_attentions is None
                     else output_pldr_attentions)
        input_ids = input_ids.long()
        if cache is not None and not isinstance(cache, PldrCache):
            raise TypeError(f"PldrllmForCausalLM keeps its KV- and G-caches in a PldrCache, got "
                            f"a {type(cache).__name__}; let generate make it, or pass "
                            f"cache=PldrCache(num_layers, max_length, mode)")
        if cache is None or cache.get_seq_length() == 0:
            mask = attention_mask
            if mask is not None and not bool((mask == 0).any()):
                mask = None  # an all-ones mask: the unpadded path, as PLDRForCausalLM.generate
        if cache is None:
            logits, metric = self._uncached_forward(input_ids, mask, include_pad_in_g,
                                                    logits_to_keep, want_pldr)
        elif cache.get_seq_length() == 0:
            logits, metric = self._prompt_into_cache(cache, input_ids, mask, include_pad_in_g,
                                                     logits_to_keep)
        else:  # the decode state holds the padding (cache_start): the mask is not read
            logits, metric = self._decode_with_cache(cache, input_ids)
        loss = None
        if labels is not None:
            if logits.shape[1] != input_ids.shape[1]:
                raise ValueError("labels need the logits of every position (logits_to_keep=0)")
            loss = causal_lm_loss(logits, labels, lean=True)
        return CausalPLDRLLMOutputWithPast(
            loss=loss, logits=logits, cache=cache,
            pldr_attentions=self._pldr_attentions(metric) if want_pldr else None)

    def _uncached_forward(self, ids, mask, include_pad_in_g, logits_to_keep, want_metric):
        """PLDRForCausalLM's uncached forward; with ``want_metric`` the metric tensors are kept
        (in metric-only caches, the cache mode 'none' of PLDRForCausalLM.generate)."""
        if not want_metric:
            inputs = self._sequence_inputs(ids, mask, include_pad_in_g, "off")
            return self._run(ids, inputs, logits_to_keep), None
        caches = self.setup_caches(ids.shape[0], None)
        try:
            inputs = self._sequence_inputs(ids, mask, include_pad_in_g, "write")
            return self._run(ids, inputs, logits_to_keep), caches
        finally:
            self.clear_caches()

    def _prompt_into_cache(self, cache: PldrCache, ids, mask, include_pad_in_g, logits_to_keep):
        B, S = ids.shape
        if S > cache.max_length:
            raise RuntimeError(f"KV-cache full: {S} prompt rows > max_length {cache.max_length}")
        kv = self.setup_caches(B, cache.max_length,
                               share_first_G=self.pldr_config.cache_first_G)
        try:
            inputs = self._sequence_inputs(ids, mask, include_pad_in_g, "write")
            logits = self._run(ids, inputs, logits_to_keep)
        finally:
            self.clear_caches()
        cache.store(kv, DecodeState.after_prompt(mask, B, S, cache.max_length, ids.device))
        return logits, kv

    def _decode_with_cache(self, cache: PldrCache, ids):
        if ids.shape[1] != 1:
            raise ValueError(f"after the prompt a PldrCache takes one token per row, got "
                             f"{ids.shape[1]} (chunked prefill and assisted decoding are not "
                             f"supported)")
        state = cache.state
        if ids.shape[0] != state.cache_seqlens.shape[0]:
            raise ValueError(f"batch of {ids.shape[0]} rows, but the cache holds "
                             f"{state.cache_seqlens.shape[0]}")
        state.check_room(1)
        for attention, kv in zip(self._attention_layers(), cache.kv_caches, strict=True):
            attention.kv_cache = kv
        try:
            logits = self.decode_step(ids, state.positions, state.cache_seqlens,
                                      state.cache_start, recompute_G=cache.mode == "kv")
        finally:
            self.clear_caches()
        state.advance()
        return logits[:, None], cache.kv_caches

    def _pldr_attentions(self, caches) -> tuple:
        """Per layer ``(A, A_LM, pw, a, ba, G_LM, E)``; E None (never materialised)."""
        out = []
        for layer, kv in zip(self.decoder.dec_layers, caches):
            plga = getattr(layer.mha1, "plgatt_layer", None)
            params = ((None,) * 3 if plga is None else (plga.pwlst, plga.alst, plga.balst))
            out.append((kv.A, kv.A_LM, *params, kv.G, None))
        return tuple(out)

    # ---- generate ------------------------------------------------------------------------------
    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode,
                                      batch_size, max_cache_length):
        """A PldrCache for the cache mode in effect (none for 'none' or use_cache=False), sized
        like PLDRForCausalLM.generate's: prompt + max_new_tokens rows."""
        user_cache = model_kwargs.get("cache")
        if user_cache is not None:
            if not isinstance(user_cache, PldrCache):
                raise TypeError(f"PldrllmForCausalLM generates with a PldrCache, got a "
                                f"{type(user_cache).__name__}")
            return
        mode = model_kwargs.get("pldr_cache_mode") or self.config.pldr_cache_mode
        if mode not in HF_CACHE_MODES:
            raise ValueError(f"pldr_cache_mode must be one of {HF_CACHE_MODES}, got {mode!r}")
        if generation_config.use_cache is False or mode == "none":
            # generate's own copy: each step then re-runs the whole sequence (no slicing)
            generation_config.use_cache = False
            return
        model_kwargs["cache"] = PldrCache(self.config.num_hidden_layers, max_cache_length + 1,
                                          mode)

    # ---- loading and saving --------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args,
                        config: PldrllmConfig | None = None, **kwargs) -> PldrllmForCausalLM:
        """Load an HF-format PLDR-LLM directory (``config.json`` + ``model.safetensors``; the
        authors' with its ``auto_map`` and remote code, or one written by either class's
        ``save_pretrained``) by the bounded load of loaders.py (docs/spec.md §4): no code of the
        directory is run, whatever ``trust_remote_code`` says. A directory whose config is not a
        PLDR-LLM, weights that do not fit the config, a predefined-G model without its G buffers,
        or tokenizer files whose special ids disagree with the config raise
        :class:`~pldr_kernels.loaders.CheckpointError`.

        Keywords: ``dtype`` / ``torch_dtype`` (a torch dtype, or "auto" for the config's),
        ``device_map`` (a single device), config fields (e.g. ``pldr_cache_mode="kv"``); the
        hub's download keywords when the name is not a local directory."""
        directory = _resolve_directory(pretrained_model_name_or_path, kwargs)
        config_path = os.path.join(directory, loaders.CONFIG_NAME)
        weights_path = os.path.join(directory, loaders.WEIGHTS_NAME)
        _check_is_pldrllm(config_path)
        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
        device = kwargs.pop("device_map", None)
        for key in [k for k, v in kwargs.items()
                    if k in IGNORED_LOAD_KEYS or k.startswith("_") or v is None]:
            del kwargs[key]
        if config is None:
            try:
                config, kwargs = PldrllmConfig.from_pretrained(directory,
                                                               return_unused_kwargs=True,
                                                               **kwargs)
            except ValueError as e:
                raise loaders.CheckpointError(f"{config_path}: {e}") from None
        else:
            for key in [k for k in kwargs if hasattr(config, k)]:
                setattr(config, key, kwargs.pop(key))
            config.check()
        if model_args or kwargs:
            raise TypeError(f"unexpected arguments for PldrllmForCausalLM.from_pretrained: "
                            f"{list(model_args) + sorted(kwargs)}")
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(f"{weights_path} not found: an HF-format PLDR-LLM "
                                    f"directory holds {loaders.CONFIG_NAME} and "
                                    f"{loaders.WEIGHTS_NAME}")
        model = _load_safetensors(cls, config, weights_path, config_path)
        if has_tokenizer(directory):
            check_tokenizer_matches_config(directory, config)
        generation_path = os.path.join(directory, "generation_config.json")
        if os.path.isfile(generation_path):
            model.generation_config = GenerationConfig.from_pretrained(directory)
        if dtype == "auto":
            dtype = config.dtype
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if dtype is not None:
            model = model.to(dtype)
        if isinstance(device, dict) and set(device) == {""}:  # accelerate's whole-model map
            device = device[""]
        if isinstance(device, (str, int, torch.device)) and str(device) != "auto":
            model = model.to(device)
        model.name_or_path = config._name_or_path = str(pretrained_model_name_or_path)
        return model.eval()

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """HF's save with the weights as independent tensors (the packed weights of nn.py are
        views of one storage, which safetensors refuses): ``model.safetensors``,
        ``config.json`` (the PldrllmConfig fields), ``generation_config.json``."""
        kwargs.setdefault("state_dict", loaders._plain_state_dict(self))
        super().save_pretrained(save_directory, *args, **kwargs)


def _resolve_directory(name, kwargs) -> str:
    """A local directory as is; a hub name through transformers' file cache (config.json,
    model.safetensors and the tokenizer files, all in one snapshot directory)."""
    hub = {k: kwargs.pop(k) for k in HUB_KEYS if k in kwargs}
    if os.path.isdir(name):
        return os.fspath(name)
    from transformers.utils import cached_file
    config = cached_file(str(name), loaders.CONFIG_NAME, **hub)
    cached_file(str(name), loaders.WEIGHTS_NAME, **hub)
    for optional in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                     "generation_config.json"):
        cached_file(str(name), optional, _raise_exceptions_for_missing_entries=False, **hub)
    return os.path.dirname(config)


def _check_is_pldrllm(config_path: str) -> None:
    """A clear error for a directory whose config.json is not a PLDR-LLM's."""
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} not found: an HF-format PLDR-LLM directory holds "
                                f"{loaders.CONFIG_NAME} and {loaders.WEIGHTS_NAME}")
    try:
        with open(config_path, encoding="utf-8") as f:
            fields = json.load(f)
    except (ValueError, RecursionError) as e:
        raise loaders.CheckpointError(f"{config_path}: not a readable JSON file ({e})") from None
    model_type = fields.get("model_type") if isinstance(fields, dict) else None
    if model_type != PldrllmConfig.model_type:
        raise loaders.CheckpointError(
            f"{config_path}: not a PLDR-LLM config: model_type is {model_type!r}, expected "
            f"{PldrllmConfig.model_type!r}")


def _load_safetensors(cls, config: PldrllmConfig, weights_path: str, config_path: str):
    """loaders.load_pretrained's bounded load, building this class from its HF config."""
    from safetensors import SafetensorError, safe_open
    with contextlib.ExitStack() as stack:
        try:
            weights = stack.enter_context(safe_open(weights_path, framework="pt", device="cpu"))
            shapes = {k: tuple(weights.get_slice(k).get_shape()) for k in weights.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise loaders.CheckpointError(f"{weights_path}: not a readable safetensors file "
                                          f"({e})") from None
        held = {k: math.prod(shape) for k, shape in shapes.items()}
        return loaders._load_checked(lambda _: cls(config), config.to_pldr_config(), shapes, held,
                                     weights.get_tensor, weights_path, config_path)
