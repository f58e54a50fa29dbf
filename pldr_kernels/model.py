"""PLDR-LLM on the pldr ops: PLDRForCausalLM with a static KV-cache and a G-cache.

Model math: pldr-spec §2 (embedding ×√D + LayerNorm, post-LN decoder layers with power law graph
attention and a SwiGLU FFN, biased LM head). Module tree and parameter names are the authors', so
the state-dict keys are those of spec §4 and checkpoints load without renaming (loaders.py).

Generation (spec §3): prefill computes A, A_LM and G per layer from the prompt's queries — pad rows
left out by default (``include_pad_in_g=True`` keeps them, like the HF port) — and writes k/v into a
preallocated cache ``[B, Smax, H, d]``. Each decode step appends in place through
``pldr::g_attention_decode``. Cache modes: 'none' (full recompute, G from the whole sequence),
'g' (full recompute, G frozen from the prompt), 'kv' (A cached, G recomputed from A each step),
'kvg' (A and G cached; the fast path).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from . import ops
from .config import PLDRConfig
from .nn import GCachedAttention, PowerLawGraphAttention, RotaryEmbedding, SwiGLU, _keep_fp32
from .reference_model import _init_weights, predefined_g_values
from .sampling import check_generate_args, make_generator, positions_from_mask, sample_next_token

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

    def finish(self, x: Tensor, attn: Tensor) -> Tensor:
        """Step 16: residual + LN1, SwiGLU FFN, residual + LN2."""
        out1 = self.layernorm1(attn + x)
        return self.layernorm2(self.ffn(out1) + out1)


class PLDRDecoder(nn.Module):
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

    def _apply(self, fn, recurse=True):
        if recurse:
            for child in self.children():
                child._apply(fn)
        return super()._apply(_keep_fp32(fn), recurse=False)  # past_G_values stays fp32

    @property
    def rope(self) -> RotaryEmbedding:
        return self.dec_layers[0].mha1.rope

    def embed(self, ids: Tensor) -> Tensor:
        """Steps 1–2: ``LN(Emb[ids] · √D)``."""
        return self.layernorm1(self.embedding(ids) * self.config.embedding_scale)


# --------------------------------------------------------------------------------------------
# Caches
# --------------------------------------------------------------------------------------------
@dataclass
class PLDRCache:
    """Static per-layer KV-cache ``[B, Smax, H, d]`` (model dtype) and G-cache (fp32 ``[B|1,H,d,d]``).

    ``length`` (host) counts the rows written so far, pads included; ``cache_seqlens`` is the same
    count as the int32 ``[B]`` tensor the op reads; ``cache_start`` (int32 ``[B]``, None without
    padding) is each row's first real token; ``n_real`` (host) counts each row's real tokens, i.e.
    the RoPE position of its next token."""
    k: list[Tensor]
    v: list[Tensor]
    cache_seqlens: Tensor
    cache_start: Tensor | None
    length: int = 0
    n_real: list[int] = field(default_factory=list)
    A: list[Tensor | None] = field(default_factory=list)
    A_LM: list[Tensor | None] = field(default_factory=list)
    G: list[Tensor | None] = field(default_factory=list)

    @property
    def max_length(self) -> int:
        return self.k[0].shape[1]

    def check_room(self, n: int) -> None:
        if self.length + n > self.max_length:
            raise RuntimeError(
                f"KV-cache full: {self.length} rows used + {n} new > max_length "
                f"{self.max_length}. Allocate a longer cache (max_length=...) or generate fewer "
                f"tokens; nothing was written.")


@dataclass
class _StepState:
    """What the generation loop keeps between steps (also read by ``generate`` at the end)."""
    ids: Tensor
    mask: Tensor
    padded: bool
    cache: PLDRCache | None = None
    frozen_G: list[Tensor] | None = None
    deductive: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
class PLDRForCausalLM(nn.Module):
    """PLDR-LLM v510 on the fused pldr ops (``torch.ops.pldr.*``).

    ``model(input_ids, attention_mask=None)`` → logits ``[B, S, V]`` of a full uncached forward;
    ``model.generate(...)`` / ``model.generate_stream(...)`` for decoding with KV/G caches.
    ``model.to(torch.bfloat16)`` runs the projections, FFN and head in bf16; the G path stays fp32.
    """

    def __init__(self, config: PLDRConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.decoder = PLDRDecoder(config)
        self.final_layer = nn.Linear(config.hidden_size, config.vocab_size,
                                     bias=config.final_bias)
        self.apply(_init_weights)
        if config.tie_word_embeddings:
            self.final_layer.weight = self.decoder.embedding.weight
        self._graphs = {}

    # ---- loaders (loaders.py) ----------------------------------------------------------------
    @classmethod
    def from_pth(cls, path, config: PLDRConfig | None = None, hyperparameters=None,
                 map_location="cpu") -> PLDRForCausalLM:
        from .loaders import load_pth
        return load_pth(cls, path, config, hyperparameters, map_location)

    @classmethod
    def from_pretrained(cls, directory, map_location="cpu") -> PLDRForCausalLM:
        from .loaders import load_pretrained
        return load_pretrained(cls, directory, map_location)

    def save_pretrained(self, directory) -> None:
        from .loaders import save_pretrained
        save_pretrained(self, directory)

    def save_pth(self, path) -> None:
        from .loaders import save_pth
        save_pth(self, path)

    def load_checkpoint_state_dict(self, state_dict) -> None:
        """``load_state_dict`` that reports every missing, unexpected and mis-shaped key at once."""
        from .loaders import load_checked_state_dict
        load_checked_state_dict(self, state_dict)

    # ---- helpers -----------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.final_layer.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.final_layer.weight.device

    def _predefined_G(self, layer: int) -> Tensor:
        return self.decoder.past_G_values[layer, 2]

    def _g_for_layer(self, layer: int, mha1: nn.Module, q: Tensor, q_mask: Tensor | None,
                     frozen_G: list[Tensor] | None):
        """(A, A_LM, G) of one layer for a full-sequence pass."""
        if not self.config.has_metric_learner:
            g = self.decoder.past_G_values[layer]
            return g[0], g[1], g[2]
        if frozen_G is not None:
            return None, None, frozen_G[layer]
        return mha1.metric_tensors(q, q_mask)

    def _full_pass(self, ids: Tensor, attention_mask: Tensor | None, include_pad_in_g: bool,
                   frozen_G: list[Tensor] | None = None, cache: PLDRCache | None = None,
                   logits_to_keep: int = 0):
        """Uncached pass over ``ids [B,S]``; optionally writes k/v and A/A_LM/G into ``cache``.

        Returns (logits of the last ``logits_to_keep`` positions (0 = all), per-layer deductive)."""
        B, S = ids.shape
        padded = attention_mask is not None and not bool(attention_mask.all())
        mask = attention_mask if padded else None
        positions = positions_from_mask(mask, B, S, ids.device)
        rotation = self.decoder.rope.rotation(positions)
        key_mask = mask.bool() if padded else None
        q_mask = None if include_pad_in_g else key_mask
        x = self.decoder.embed(ids)
        deductive = []
        for layer, block in enumerate(self.decoder.dec_layers):
            q, k, v = block.mha1.project(x, rotation)
            A, A_LM, G = self._g_for_layer(layer, block.mha1, q, q_mask, frozen_G)
            deductive.append((A, A_LM, G))
            if cache is not None:
                cache.k[layer][:, :S] = k
                cache.v[layer][:, :S] = v
            attn = block.mha1.output(block.mha1.attend(q, k, v, G, key_mask, causal=True))
            x = block.finish(x, attn)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.final_layer(x), deductive

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                include_pad_in_g: bool = False) -> Tensor:
        """Full uncached forward: logits ``[B, S, V]`` (G recomputed from this input).

        Under ``torch.no_grad()``/``inference_mode()`` it runs the fused ops; with autograd on
        (parameters require grad by default) it runs the reference math, which has a backward
        and needs no compiled extension."""
        if not torch.is_grad_enabled():
            ops.require_built()
        return self._full_pass(input_ids, attention_mask, include_pad_in_g)[0]

    # ---- cached generation -------------------------------------------------------------------
    def allocate_cache(self, batch_size: int, max_length: int) -> PLDRCache:
        """Preallocate a KV-cache of ``max_length`` rows per layer (prompt + new tokens)."""
        c = self.config
        shape = (batch_size, max_length, c.num_attention_heads, c.head_dim)
        kw = dict(dtype=self.dtype, device=self.device)
        L = c.num_hidden_layers
        return PLDRCache(k=[torch.zeros(shape, **kw) for _ in range(L)],
                         v=[torch.zeros(shape, **kw) for _ in range(L)],
                         cache_seqlens=torch.zeros(batch_size, dtype=torch.int32,
                                                   device=self.device),
                         cache_start=None, A=[None] * L, A_LM=[None] * L, G=[None] * L)

    def prefill(self, input_ids: Tensor, cache: PLDRCache, attention_mask: Tensor | None = None,
                include_pad_in_g: bool = False) -> Tensor:
        """Run the prompt, fill ``cache`` (k, v, A, A_LM, G); logits of the last position ``[B,V]``."""
        B, S = input_ids.shape
        cache.check_room(S)
        logits, deductive = self._full_pass(input_ids, attention_mask, include_pad_in_g,
                                            cache=cache, logits_to_keep=1)
        first_G_only = self.config.cache_first_G
        for layer, (A, A_LM, G) in enumerate(deductive):
            cache.A[layer] = A[:1] if first_G_only and A is not None else A
            cache.A_LM[layer] = A_LM[:1] if first_G_only else A_LM
            cache.G[layer] = G[:1] if first_G_only else G
        cache.length = S
        cache.cache_seqlens.fill_(S)
        if attention_mask is not None and not bool(attention_mask.all()):
            n_pad = (attention_mask == 0).sum(dim=1)
            cache.cache_start = n_pad.to(torch.int32)
            cache.n_real = (S - n_pad).tolist()
        else:
            cache.cache_start = None
            cache.n_real = [S] * B
        return logits[:, -1]

    def decode_step(self, tokens: Tensor, cache: PLDRCache, recompute_G: bool = False,
                    positions: Tensor | None = None, max_position: int | None = None
                    ) -> Tensor:
        """One token per row (``tokens [B,1]``): append k/v at ``cache.length``, attend with the
        cached G (or G recomputed from the cached A when ``recompute_G``); logits ``[B, V]``.

        Does not advance the cache; :meth:`advance` does (kept apart for CUDA-graph replay)."""
        if positions is None:
            positions = torch.tensor(cache.n_real, device=tokens.device)[:, None]
            max_position = max(cache.n_real)
        rotation = self.decoder.rope.rotation(positions, max_position)
        x = self.decoder.embed(tokens)
        for layer, block in enumerate(self.decoder.dec_layers):
            G = cache.G[layer]
            if recompute_G and self.config.has_metric_learner:
                G = block.mha1.g_from_metric(cache.A[layer])[1]
            attn = block.mha1.decode(x, G, rotation, cache.k[layer], cache.v[layer],
                                     cache.cache_seqlens, cache.cache_start)
            x = block.finish(x, attn)
        return self.final_layer(x[:, -1])

    @staticmethod
    def advance(cache: PLDRCache) -> None:
        cache.length += 1
        cache.cache_seqlens.add_(1)
        cache.n_real = [n + 1 for n in cache.n_real]

    # ---- generate ------------------------------------------------------------------------------
    def generate_stream(self, input_ids: Tensor, max_new_tokens: int, cache: str = "kvg",
                        do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                        top_p: float = 1.0, eos_token_id: int | None = None,
                        attention_mask: Tensor | None = None, seed: int | None = None,
                        include_pad_in_g: bool = False, max_length: int | None = None,
                        cuda_graph: bool = False, _state: list | None = None
                        ) -> Iterator[Tensor]:
        """Yield the next token ids ``[B]`` step by step (same arguments as :meth:`generate`)."""
        ops.require_built()
        check_generate_args(input_ids, max_new_tokens, cache, do_sample, temperature, top_k,
                            top_p, attention_mask, self.config.vocab_size)
        if cuda_graph and self.device.type != "cuda":
            raise ValueError("cuda_graph=True needs the model on a CUDA device")
        B, S = input_ids.shape
        device = input_ids.device
        ids = input_ids.long()
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.long()
        padded = bool((mask == 0).any())
        state = _StepState(ids=ids, mask=mask, padded=padded)
        if _state is not None:
            _state.append(state)
        generator = make_generator(seed, device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        pad_id = self.config.pad_token_id if self.config.pad_token_id is not None else 0

        with torch.inference_mode():
            if cache in ("kv", "kvg"):
                state.cache = self.allocate_cache(B, max_length or S + max_new_tokens)
                logits = self.prefill(ids, state.cache, mask if padded else None,
                                      include_pad_in_g)
                c = state.cache
                state.deductive = list(zip(c.A, c.A_LM, c.G))
            else:
                logits, state.deductive = self._full_pass(ids, mask if padded else None,
                                                          include_pad_in_g, logits_to_keep=1)
                logits = logits[:, -1]
                if cache == "g":
                    state.frozen_G = [d[2] for d in state.deductive]
            step_fn = self._decode_fn(state.cache, cache == "kv", cuda_graph) \
                if state.cache is not None else None
            for step in range(max_new_tokens):
                nxt = sample_next_token(logits, do_sample, temperature, top_k, top_p, generator)
                if eos_token_id is not None:
                    nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
                    finished |= nxt == eos_token_id
                state.ids = torch.cat([state.ids, nxt[:, None]], dim=1)
                state.mask = torch.cat([state.mask, torch.ones_like(state.mask[:, :1])], dim=1)
                yield nxt
                last = step == max_new_tokens - 1
                if last or (eos_token_id is not None and bool(finished.all())):
                    break
                if state.cache is not None:
                    logits = step_fn(nxt[:, None])
                else:
                    full_mask = state.mask if padded else None
                    logits, ded = self._full_pass(state.ids, full_mask, include_pad_in_g,
                                                  state.frozen_G, logits_to_keep=1)
                    logits = logits[:, -1]
                    if cache == "none":
                        state.deductive = ded

    def _decode_fn(self, cache: PLDRCache, recompute_G: bool, cuda_graph: bool):
        """A callable ``tokens [B,1] → logits [B,V]`` that also advances the cache."""
        if not cuda_graph:
            def step(tokens):
                cache.check_room(1)
                logits = self.decode_step(tokens, cache, recompute_G)
                self.advance(cache)
                return logits
            return step
        return _GraphedDecode(self, cache, recompute_G)

    def generate(self, input_ids: Tensor, max_new_tokens: int, cache: str = "kvg",
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, eos_token_id: int | None = None,
                 attention_mask: Tensor | None = None, seed: int | None = None,
                 return_deductive: bool = False, include_pad_in_g: bool = False,
                 max_length: int | None = None, cuda_graph: bool = False):
        """Generate up to ``max_new_tokens`` per row → ids ``[B, S + new]`` (left-padded prompts
        via ``attention_mask``, 0 = pad). Greedy unless ``do_sample``. With ``return_deductive``
        also the per-layer ``(A, A_LM, G)`` in use at the end (the prompt's in cached modes).

        ``max_length`` sizes the KV-cache (default prompt + new tokens); ``cuda_graph`` captures the
        decode step in a CUDA graph (CUDA only, cache modes 'kv'/'kvg')."""
        states: list = []
        for _ in self.generate_stream(input_ids, max_new_tokens, cache, do_sample, temperature,
                                      top_k, top_p, eos_token_id, attention_mask, seed,
                                      include_pad_in_g, max_length, cuda_graph, _state=states):
            pass
        state = states[0]
        if return_deductive:
            return state.ids, state.deductive
        return state.ids


class _GraphedDecode:
    """The decode step captured in a CUDA graph: static token/position inputs, static caches and
    ``cache_seqlens`` (advanced in place between replays), static logits output. The decode op
    must not sync with the host on CUDA; RoPE tables are grown to the cache length before capture.
    """

    def __init__(self, model: PLDRForCausalLM, cache: PLDRCache, recompute_G: bool):
        self.model, self.cache = model, cache
        B = cache.k[0].shape[0]
        device = model.device
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.positions = torch.tensor(cache.n_real, device=device)[:, None]
        smax = cache.max_length
        model.decoder.rope.rotation(self.positions, max_position=smax)  # grow before capture
        # Graph capture needs the op not to append: warm up on a side stream with k/v writes that
        # land in a row we overwrite anyway (the next one), then capture.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            model.decode_step(self.tokens, cache, recompute_G, self.positions, smax)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model.decode_step(self.tokens, cache, recompute_G, self.positions, smax)

    def __call__(self, tokens: Tensor) -> Tensor:
        self.cache.check_room(1)
        self.tokens.copy_(tokens)
        self.graph.replay()
        self.model.advance(self.cache)
        self.positions.add_(1)
        return self.logits
