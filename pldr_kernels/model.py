"""PLDR-LLM on the pldr ops: PLDRForCausalLM, whose attention layers own a static KV-cache and a
G-cache.

Model math: docs/spec.md §2 (embedding ×√D + LayerNorm, post-LN decoder layers with power law graph
attention and a SwiGLU FFN, biased LM head). Module tree and parameter names are the authors', so
the state-dict keys are those of docs/spec.md §4 and checkpoints load without renaming (loaders.py).

One forward path, as in gpt-fast: :meth:`PLDRForCausalLM.forward` (uncached), :meth:`~.prefill`
(the prompt, filling the caches) and :meth:`~.decode_step` (one token per row, appending to them)
all run the same layer loop, each layer calling its attention once with the step's shared
:class:`~pldr_kernels.nn.StepInputs`. The caches hang off the attention layers
(``mha1.kv_cache``, attached by :meth:`~.setup_caches`); the generation loop is in
``generation.py``. Every one of these steps traces under ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import generation, ops
from .config import PLDRConfig
from .layers import (
    CausalLMOutput,
    apply_linear,
    attach_lm_head,
    causal_lm_loss,
    lm_head_applies_fused,
    lm_head_causal_lm_loss,
    positions_from_mask,
    predefined_g_values,
)
from .nn import (
    SMALL_ROW_DTYPES,
    SMALL_ROWS,
    GCachedAttention,
    KVCache,
    PackedModule,
    PowerLawGraphAttention,
    RotaryEmbedding,
    SmallRowsLinear,
    StepInputs,
    SwiGLU,
)
from .quantize import Int8Linear
from .sampling import GenerationOptions

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------------
# Modules (authors' names: decoder.{embedding, layernorm1, dec_layers}, final_layer)
# --------------------------------------------------------------------------------------------
class PLDRDecoderLayer(nn.Module):
    def __init__(self, config: PLDRConfig, rope: RotaryEmbedding):
        super().__init__()
        common = dict(hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
                      head_dim=config.head_dim, bias=config.attention_bias,
                      interleaved_rope=config.reference_rope, rope_theta=config.rope_theta,
                      max_positions=config.max_position_embeddings, rope=rope)
        if config.has_metric_learner:
            self.mha1 = PowerLawGraphAttention(
                A_dff=config.A_dff, num_reslayerA=config.num_reslayerA,
                num_denseA=config.num_denseA, eps=config.layer_norm_eps,
                glu_bias=config.glu_bias, **common)
        else:
            self.mha1 = GCachedAttention(**common)
        self.ffn = SwiGLU(config.hidden_size, config.intermediate_size, config.hidden_size,
                          config.glu_bias)
        self.layernorm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layernorm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor, inputs: StepInputs,
                metric: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
        """Step 16 around the attention: ``LN2(FFN(out1) + out1)``, ``out1 = LN1(attn(x) + x)``;
        ``metric`` is the predefined (A, A_LM, G) of a model without metric learner."""
        out1 = self.layernorm1(self.mha1.forward_step(x, inputs, metric) + x)
        return self.layernorm2(self.ffn(out1) + out1)

    def decode_layer_arguments(self) -> DecodeLayerPlan | None:
        """The weights of this layer as ``pldr::decode_layer`` takes them (the qkv pack, dense,
        LN1, the FFN's packs and gluw3, LN2, each linear with its int8 scale or None), the
        LayerNorms' eps, and how to tell they are still this layer's; None when a module here is
        not the model's own (a user's swapped in, a hook on one) or a pack is not kept (then
        :meth:`forward` runs, whose bits the op gives)."""
        attention, ffn, ln1, ln2 = self.mha1, self.ffn, self.layernorm1, self.layernorm2
        # The modules the layer loop calls (whose hooks it would run); RoPE's among them.
        modules = (self, attention, attention.rope, ffn, ffn.gluw3, attention.dense, ln1, ln2)
        linear_types = (SmallRowsLinear, Int8Linear)
        if (type(attention) not in (GCachedAttention, PowerLawGraphAttention)
                or type(attention.rope) is not RotaryEmbedding or type(ffn) is not SwiGLU
                or type(ffn.gluw3) not in linear_types
                or type(attention.dense) not in linear_types
                or any(type(n) is not nn.LayerNorm or n.weight is None or n.bias is None
                       or n.normalized_shape != (n.weight.shape[0],) for n in (ln1, ln2))
                or ln1.eps != ln2.eps or _global_module_hooks()
                or any(m._forward_hooks or m._forward_pre_hooks for m in modules)):
            return None
        packs = []

        def pack(module: PackedModule, name: str) -> Tensor | None:
            if name not in module.packs:
                return None
            kept = module.packs[name]
            kept.get()  # repacks a stale pack, as the layer loop's call would
            packs.append((kept, kept.packed))  # the pack itself: the op has no autograd
            return kept.packed

        def linear(module: nn.Module) -> tuple[Tensor, Tensor | None, Tensor | None]:
            return module.weight, module.bias, getattr(module, "weight_scale", None)

        weights = (pack(attention, "qkv_weight"), pack(attention, "qkv_bias"),
                   pack(attention, "qkv_scale"), *linear(attention.dense), ln1.weight, ln1.bias,
                   pack(ffn, "w12"), pack(ffn, "b12"), pack(ffn, "s12"), *linear(ffn.gluw3),
                   ln2.weight, ln2.bias)
        if not all(packed is not None and p._valid() for p, packed in packs):
            return None  # a pack not kept (stacked per call): nothing to keep either
        # What a kept plan must find unchanged at every step: each module in its place, its
        # tensors the same objects, the packs the same and their parameters the same objects at
        # the same addresses (still views of the pack), no hook, the same eps.
        places = [(self._modules, name, m) for name, m in
                  (("mha1", attention), ("ffn", ffn), ("layernorm1", ln1), ("layernorm2", ln2))]
        places += [(attention._modules, "dense", attention.dense),
                   (attention._modules, "rope", attention.rope),
                   (ffn._modules, "gluw3", ffn.gluw3)]
        for module in (attention.dense, ffn.gluw3, ln1, ln2):
            for registry in (module._parameters, module._buffers):
                places += [(registry, name, t) for name, t in registry.items()]
        addresses = []
        for kept, _ in packs:
            for path in kept.paths:
                obj = kept.owner
                for name in path:
                    registry = next(r for r in (obj._parameters, obj._buffers, obj._modules)
                                    if name in r)
                    places.append((registry, name, registry[name]))
                    obj = registry[name]
                addresses.append((obj, obj.data_ptr()))
        return DecodeLayerPlan(weights, ln1.eps, packs, places, addresses, modules, (ln1, ln2))


def _global_module_hooks() -> bool:
    """Whether a hook is registered for every module (``nn.modules.module.
    register_module_forward_hook`` and the pre-hook): the layer loop would run it."""
    from torch.nn.modules import module as torch_module
    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


class DecodeLayerPlan:
    """One layer's ``pldr::decode_layer`` arguments kept between decode steps
    (:meth:`PLDRDecoderLayer.decode_layer_arguments`), with the check that they are still the
    layer's: :meth:`current`, run at every step (tens of µs for the 110M model), so that a
    replaced module or parameter, a re-pointed ``.data``, a hook or a new eps is never missed."""

    def __init__(self, weights: tuple, eps: float, packs: list, places: list, addresses: list,
                 modules: tuple, norms: tuple):
        self.weights, self.eps = weights, eps
        self._packs, self._places, self._addresses = packs, places, addresses
        self._modules, self._norms = modules, norms

    def current(self) -> bool:
        return (all(registry.get(name) is t for registry, name, t in self._places)
                and all(p.packed is packed for p, packed in self._packs)
                and all(t.data_ptr() == address for t, address in self._addresses)
                and not any(m._forward_hooks or m._forward_pre_hooks for m in self._modules)
                and all(n.eps == self.eps for n in self._norms))


class PLDRDecoder(PackedModule):
    fp32_own = True  # past_G_values stays fp32 under bf16/fp16 casts

    def __init__(self, config: PLDRConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        rope = RotaryEmbedding(config.head_dim, config.rope_theta, config.reference_rope,
                               config.max_position_embeddings)
        self.dec_layers = nn.ModuleList([PLDRDecoderLayer(config, rope)
                                         for _ in range(config.num_hidden_layers)])
        self.layernorm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if not config.has_metric_learner:
            # Predefined G (v51G ablations, HF custom_G_type): persistent, saved with the model.
            self.register_buffer("past_G_values", predefined_g_values(config))
            self.register_buffer("past_G_values_status",
                                 torch.ones(config.num_hidden_layers, dtype=torch.bool))

    @property
    def rope(self) -> RotaryEmbedding:
        return self.dec_layers[0].mha1.rope

    def embed(self, ids: Tensor) -> Tensor:
        """Steps 1–2: ``LN(Emb[ids] · √D)``."""
        return self.layernorm1(self.embedding(ids) * self.config.embedding_scale)

    def predefined_metric(self, layer: int) -> tuple[Tensor, Tensor, Tensor] | None:
        """(A, A_LM, G) ``[1, H, d, d]`` of a predefined-G model's layer; None with a metric
        learner."""
        if self.config.has_metric_learner:
            return None
        g = self.past_G_values[layer]
        return g[0], g[1], g[2]


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
def _forget_decode_plan(model: PLDRForCausalLM, incompatible_keys) -> None:
    model._decode_plan = None  # load_state_dict(assign=True) may have replaced the weights


class PLDRForCausalLM(nn.Module):
    """PLDR-LLM v510 on the fused pldr ops (``torch.ops.pldr.*``).

    ``model(input_ids, attention_mask=None, labels=None)`` → :class:`CausalLMOutput` (``.logits``
    ``[B, S, V]`` of a full uncached forward, ``.loss`` when labels are given);
    ``model.generate(...)`` / ``model.generate_stream(...)`` decode with KV/G caches.
    ``model.to(torch.bfloat16)`` runs the projections, FFN and head in bf16; the G path stays fp32.
    """

    def __init__(self, config: PLDRConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.decoder = PLDRDecoder(config)
        attach_lm_head(self, config, linear=SmallRowsLinear)
        self._decode_plan: list | None = None  # the fused decode step's weights (decode_step)
        self.register_load_state_dict_post_hook(_forget_decode_plan)

    # ---- loaders (loaders.py) ----------------------------------------------------------------
    # A load checks the config and the checkpoint's shapes first, builds this class on the meta
    # device and materialises it from the checkpoint (no random init); a bad file raises
    # loaders.CheckpointError. Saves are atomic (_io.py). docs/spec.md §4.
    @classmethod
    def from_pth(cls, path, config: PLDRConfig | None = None, hyperparameters=None,
                 map_location="cpu") -> PLDRForCausalLM:
        """The authors' ``.pth``; the config from ``config``, ``hyperparameters`` (a dict or the
        ``*_hyperparameters.py`` sidecar, parsed, never run) or the one sidecar next to it."""
        from .loaders import load_pth
        return load_pth(cls, path, config, hyperparameters, map_location)

    @classmethod
    def from_pretrained(cls, directory, map_location="cpu") -> PLDRForCausalLM:
        """An HF-format directory (``config.json`` + ``model.safetensors``)."""
        from .loaders import load_pretrained
        return load_pretrained(cls, directory, map_location)

    def save_pretrained(self, directory) -> None:
        """Write ``model.safetensors`` then ``config.json``, each replaced only when both are
        written, so a kill mid-save leaves the old checkpoint loadable."""
        from .loaders import save_pretrained
        save_pretrained(self, directory)

    def save_pth(self, path) -> None:
        """Write the authors' format (fp32 ``{'model_state_dict': ...}``), atomically."""
        from .loaders import save_pth
        save_pth(self, path)

    def load_checkpoint_state_dict(self, state_dict) -> None:
        """``load_state_dict`` that reports every missing, unexpected and mis-shaped key at once."""
        from .loaders import load_checked_state_dict
        load_checked_state_dict(self, state_dict)

    # ---- weight-only quantisation (quantize.py) ----------------------------------------------
    def quantize_weights(self, kind: str = "int8") -> PLDRForCausalLM:
        """Quantise the projections, SwiGLU FFN and (untied) LM head to int8 weights with one fp32
        scale per output channel, in place; returns the model. The G path (metric learner),
        LayerNorms and embedding keep their dtype, activations too (fp32 or bf16). A few rows
        (decode) run on ``pldr::linear_small``; more (prefill) on the weights dequantised.
        ``save_pretrained`` / ``from_pretrained`` keep the int8 weights bit for bit."""
        from .quantize import QUANTIZATIONS, quantize_int8
        if kind not in QUANTIZATIONS:
            raise ValueError(f"quantize_weights: kind must be one of {QUANTIZATIONS}, got "
                             f"{kind!r}")
        self._decode_plan = None
        return quantize_int8(self)

    @property
    def quantization(self) -> str | None:
        """'int8' after :meth:`quantize_weights`, else None."""
        from .quantize import quantization_of
        return quantization_of(self)

    # ---- helpers -----------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (the embedding's: int8 weights leave it as it was)."""
        return self.decoder.embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.final_layer.weight.device

    def _apply(self, fn, recurse=True):
        self._decode_plan = None  # .to() / .half() / ... may give the weights new storage
        return super()._apply(fn, recurse)

    def _attention_layers(self) -> list[GCachedAttention]:
        return [layer.mha1 for layer in self.decoder.dec_layers]

    # ---- training ----------------------------------------------------------------------------
    gradient_checkpointing: bool = False  # set by gradient_checkpointing_enable / _disable

    def gradient_checkpointing_enable(self) -> None:
        """Activation checkpointing of every decoder layer in the uncached forward with autograd
        on: a layer keeps only its input, and its forward is run again in the backward
        (``torch.utils.checkpoint``, ``use_reentrant=False``). Same gradients, less memory."""
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    # ---- the one forward path ----------------------------------------------------------------
    def _run(self, ids: Tensor, inputs: StepInputs, logits_to_keep: int = 0,
             head: bool = True) -> Tensor:
        """Embedding, the decoder layers, the LM head (called once) on the last
        ``logits_to_keep`` positions (0 = all); ``head=False``: the final hidden states."""
        x = self.decoder.embed(ids)
        # Only the uncached forward: a cache-writing step must not write twice.
        checkpointed = (self.gradient_checkpointing and inputs.cache_use == "off"
                        and torch.is_grad_enabled())
        predefined = not self.decoder.config.has_metric_learner
        for i, layer in enumerate(self.decoder.dec_layers):
            metric = self.decoder.predefined_metric(i) if predefined else None
            if checkpointed:
                x = checkpoint(layer, x, inputs, metric, use_reentrant=False)
            else:
                x = layer(x, inputs, metric)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self._head(x) if head else x

    def _head(self, x: Tensor) -> Tensor:
        return apply_linear(self.final_layer, x)

    def _sequence_inputs(self, input_ids: Tensor, attention_mask: Tensor | None,
                         include_pad_in_g: bool, cache_use: str) -> StepInputs:
        """Step inputs of a full-sequence pass. An all-ones mask gives the bits of no mask (the ops
        skip nothing and the positions are 0 … S-1), so the mask is used as given: no device
        read."""
        B, S = input_ids.shape
        positions = positions_from_mask(attention_mask, B, S, input_ids.device)
        key_mask = None if attention_mask is None else attention_mask.bool()
        return StepInputs(rotation=self.decoder.rope.rotation(positions, max_position=S - 1),
                          key_mask=key_mask, q_mask=None if include_pad_in_g else key_mask,
                          cache_use=cache_use)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                include_pad_in_g: bool = False, labels: Tensor | None = None) -> CausalLMOutput:
        """Full uncached forward: ``.logits [B, S, V]`` (G recomputed from this input) and, with
        ``labels [B, S]``, ``.loss``: the mean next-token cross entropy, -100 labels left out.

        The fused ops run with autograd on or off; their registered autograd formulas give the
        gradients (docs/design.md §3.4.2), so ``loss.backward()`` trains the model on the kernels.
        Under ``torch.autocast`` the projections, FFN, head and attention run in the autocast
        dtype, the G path in fp32; :meth:`gradient_checkpointing_enable` recomputes each decoder
        layer in the backward instead of keeping its activations."""
        ops.require_built()
        inputs = self._sequence_inputs(input_ids, attention_mask, include_pad_in_g, "off")
        hidden = self._run(input_ids, inputs, head=False)
        if labels is not None and lm_head_applies_fused(self.final_layer, hidden):
            # The head and the loss in one autograd function (docs/design.md §3.4.2).
            logits, loss = lm_head_causal_lm_loss(hidden, self.final_layer, labels)
            return CausalLMOutput(logits=logits, loss=loss)
        logits = self._head(hidden)
        loss = None if labels is None else causal_lm_loss(logits, labels, lean=True)
        return CausalLMOutput(logits=logits, loss=loss)

    # ---- caches ------------------------------------------------------------------------------
    def setup_caches(self, batch_size: int, max_length: int | None,
                     share_first_G: bool = False) -> list[KVCache]:
        """Attach a fresh :class:`KVCache` to every attention layer; returns them in layer order.

        ``max_length``: rows of the static KV-cache (prompt + new tokens); None = metric tensors
        only (the cache modes without KV-cache). ``share_first_G``: one G serves the whole batch
        (the config's ``cache_first_G``); a predefined-G model always has one G."""
        c = self.config
        rows = 1 if share_first_G or not c.has_metric_learner else batch_size
        if max_length is not None:
            self.decoder.rope.reserve(max_length)  # a compiled/captured step must not grow it
        caches = [KVCache.allocate(batch_size, max_length, c.num_attention_heads, c.head_dim,
                                   rows, self.dtype, self.device)
                  for _ in range(c.num_hidden_layers)]
        for attention, cache in zip(self._attention_layers(), caches):
            attention.kv_cache = cache
        self._decode_plan = None
        return caches

    def caches(self) -> list[KVCache | None]:
        return [attention.kv_cache for attention in self._attention_layers()]

    def first_cache(self) -> KVCache | None:
        """``caches()[0]`` without building the list (asked once per decode step)."""
        return self.decoder.dec_layers[0].mha1.kv_cache

    def clear_caches(self) -> None:
        for attention in self._attention_layers():
            attention.kv_cache = None
        self._decode_plan = None

    def prefill(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                include_pad_in_g: bool = False, G_from_cache: bool = False) -> Tensor:
        """Run a whole sequence against the caches: store its k/v (rows 0 … S-1, when the caches
        have a KV part) and its (A, A_LM, G); logits of the last position ``[B, V]``.

        ``G_from_cache``: attend with the cached G instead and write nothing (cache mode 'g')."""
        caches = self.caches()
        if caches[0] is None:
            raise RuntimeError("prefill needs caches: call setup_caches(batch_size, max_length) "
                               "first")
        S = input_ids.shape[1]
        if caches[0].k is not None and S > caches[0].max_length:
            raise RuntimeError(
                f"KV-cache full: {S} prompt rows > max_length {caches[0].max_length}. Allocate a "
                f"longer cache (max_length=...); nothing was written.")
        cache_use = "read_G" if G_from_cache else "write"
        inputs = self._sequence_inputs(input_ids, attention_mask, include_pad_in_g, cache_use)
        return self._run(input_ids, inputs, logits_to_keep=1)[:, -1]

    def decode_step(self, tokens: Tensor, positions: Tensor, cache_seqlens: Tensor,
                    cache_start: Tensor | None = None, recompute_G: bool = False) -> Tensor:
        """One token per row (``tokens [B, 1]`` at RoPE ``positions [B, 1]``): every layer appends
        its k/v at row ``cache_seqlens`` (int32 ``[B]``) and attends to rows ``cache_start …`` with
        the cached G (or G recomputed from the cached A when ``recompute_G``, mode 'kv');
        logits ``[B, V]``.

        Reads nothing back from the device and advances nothing (the caller does, in place), so
        the step can be captured in a CUDA graph or compiled. A few CPU rows at inference take
        one ``pldr::decode_layer`` call per layer (:attr:`fused_decode`)."""
        cache = self.first_cache()
        if cache is None or cache.k is None:
            raise RuntimeError("decode_step needs KV-caches: call setup_caches(batch_size, "
                               "max_length) and prefill first")
        max_length = cache.max_length
        if self._fused_decode_applies(tokens):
            plan = self._decode_plan
            if plan is None or not self._decode_plan_current():
                plan = self._plan_decode()
            if plan:
                return self._fused_decode_step(plan, tokens, positions, cache_seqlens,
                                               cache_start, recompute_G, max_length)
        inputs = StepInputs(rotation=self.decoder.rope.rotation(positions, max_length - 1),
                            cache_use="decode_G_from_A" if recompute_G else "decode",
                            cache_seqlens=cache_seqlens, cache_start=cache_start)
        return self._run(tokens, inputs, logits_to_keep=1)[:, -1]

    # ---- the fused CPU decode step (docs/design.md §3.12) ---------------------------------------
    fused_decode: bool = True  # False: decode steps run the Python layer loop (the same bits)

    def _fused_decode_applies(self, tokens: Tensor) -> bool:
        """Where the layer loop's projections take pldr::linear_small (nn.takes_small_rows): a few
        CPU rows, fp32/bf16, no autograd, no autocast; and eager (a compiled step keeps the
        layer loop, which the compiler sees into)."""
        return (self.fused_decode and tokens.device.type == "cpu" and ops._LOAD_ERROR is None
                and tokens.shape[0] <= SMALL_ROWS and not torch.is_grad_enabled()
                and self.dtype in SMALL_ROW_DTYPES and not torch.is_autocast_enabled("cpu")
                and not torch.compiler.is_compiling())

    def _decode_plan_current(self) -> bool:
        """Whether the kept plan still holds the layers' own weights (an empty plan, kept for a
        layer with a hook, stays until the next reset: the loop runs, which is never wrong)."""
        plan = self._decode_plan
        if not plan:
            return True
        layers = tuple(self.decoder.dec_layers._modules.values())
        return (len(layers) == len(plan) and not _global_module_hooks()
                and self.decoder.rope is plan[0][1].rope  # each layer's, by the plan's places
                and all(layer is kept and layer_plan.current()
                        for layer, (kept, _, layer_plan) in zip(layers, plan)))

    def _plan_decode(self) -> list:
        """Per layer: its attention (cache and G) and :meth:`PLDRDecoderLayer.
        decode_layer_arguments`; empty when a layer has none. Checked at every step
        (:meth:`DecodeLayerPlan.current`) and dropped where the weights may have moved
        (setup_caches, clear_caches, .to(), load_state_dict, quantize_weights)."""
        plan = []
        for layer in self.decoder.dec_layers:
            arguments = layer.decode_layer_arguments()
            if arguments is None or layer.mha1.rope is not self.decoder.rope:  # the step's tables
                plan = []
                break
            plan.append((layer, layer.mha1, arguments))
        self._decode_plan = plan
        return plan

    def _fused_decode_step(self, plan: list, tokens: Tensor, positions: Tensor,
                           cache_seqlens: Tensor, cache_start: Tensor | None, recompute_G: bool,
                           max_length: int) -> Tensor:
        """:meth:`decode_step` with one pldr::decode_layer call per layer; embedding and LM head
        as in :meth:`_run`."""
        rope = self.decoder.rope
        cos, sin = rope.tables(positions, max_length - 1)
        cache_use = "decode_G_from_A" if recompute_G else "decode"
        decode_layer = torch.ops.pldr.decode_layer.default
        x = self.decoder.embed(tokens)
        for _, attention, layer_plan in plan:
            cache = attention.kv_cache
            if cache is None or cache.k is None:
                raise RuntimeError("decode_step needs every layer's KV-cache: call "
                                   "setup_caches(batch_size, max_length) and prefill first")
            G = attention._decode_G(cache, cache_use)
            x = decode_layer(x, *layer_plan.weights, cache.k, cache.v, cache_seqlens, cache_start,
                             G, cos, sin, rope.interleaved, layer_plan.eps)
        return self._head(x[:, -1:])[:, -1]

    # ---- generate (generation.py) ------------------------------------------------------------
    def generate_stream(self, input_ids: Tensor, max_new_tokens: int | None = None, *,
                        attention_mask: Tensor | None = None,
                        options: GenerationOptions | None = None, **fields) -> Iterator[Tensor]:
        """Yield the next token ids ``[B]`` step by step; arguments as :meth:`generate`."""
        options = GenerationOptions.of(options, max_new_tokens, **fields)
        return generation.generate_stream(self, input_ids, options, attention_mask)

    def generate(self, input_ids: Tensor, max_new_tokens: int | None = None, *,
                 attention_mask: Tensor | None = None, return_deductive: bool = False,
                 options: GenerationOptions | None = None, **fields):
        """Generate up to ``max_new_tokens`` per row → ids ``[B, S + new]`` (left-padded prompts
        via ``attention_mask``, 0 = pad). With ``return_deductive`` also the per-layer
        ``(A, A_LM, G)`` in use at the end (the prompt's in the cached modes).

        Keywords (``fields``) are those of :class:`~pldr_kernels.sampling.GenerationOptions`:
        ``cache, do_sample, temperature, top_k, top_p, eos_token_id, seed, include_pad_in_g,
        max_length, cuda_graph``; ``options`` passes them as one object. ``eos_token_id``
        defaults to the config's; ``eos_token_id=None`` never stops early."""
        options = GenerationOptions.of(options, max_new_tokens, **fields)
        out = generation.generate(self, input_ids, options, attention_mask)
        return (out.sequences, out.deductive) if return_deductive else out.sequences
