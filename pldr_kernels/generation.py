"""Generation for PLDRForCausalLM as plain functions (the shape of gpt-fast's generate.py):
:func:`generate_stream` yields each step's tokens, :func:`generate` runs it to the end.

Cache modes (docs/spec.md §3.1; :data:`~pldr_kernels.sampling.CACHE_MODES`): 'none' re-runs the
whole sequence each step and recomputes G; 'g' re-runs it with G frozen from the prompt; 'kv'
caches k/v and A and recomputes G from A; 'kvg' caches k/v, A and G (the fast path). The prompt
computes A, A_LM and G per layer with pad rows left out by default (``include_pad_in_g=True``
keeps them, like the HF port). In every mode the metric tensors in use live in the attention
layers' caches (``mha1.kv_cache``), which is where ``return_deductive`` reads them.
"""
from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import ops
from .nn import KVCache
from .sampling import GenerationOptions, TokenPicker

if TYPE_CHECKING:
    from .model import PLDRForCausalLM

Tensor = torch.Tensor
KV_MODES = ("kv", "kvg")


@dataclass
class GenerateOutput:
    sequences: Tensor  # [B, S + new] token ids
    deductive: list[tuple[Tensor, Tensor, Tensor]]  # per layer (A, A_LM, G) in use at the end


@dataclass
class DecodeState:
    """Where a batch stands in its KV-caches. The tensors are advanced in place, so a CUDA graph
    captured on them stays valid; ``length`` is their host-side copy (no device read per step)."""
    positions: Tensor  # int64 [B, 1]: RoPE position of each row's next token (its real tokens)
    cache_seqlens: Tensor  # int32 [B]: rows written, pads included (where the next k/v go)
    cache_start: Tensor | None  # int32 [B]: each row's first real row; None without padding
    length: int
    max_length: int

    @classmethod
    def after_prompt(cls, attention_mask: Tensor | None, batch_size: int, prompt_length: int,
                     max_length: int, device: torch.device) -> DecodeState:
        S = prompt_length
        seqlens = torch.full((batch_size,), S, dtype=torch.int32, device=device)
        if attention_mask is None:
            return cls(torch.full((batch_size, 1), S, dtype=torch.int64, device=device), seqlens,
                       None, S, max_length)
        n_pad = (attention_mask == 0).sum(dim=1)
        return cls((S - n_pad)[:, None], seqlens, n_pad.to(torch.int32), S, max_length)

    def check_room(self, n: int) -> None:
        if self.length + n > self.max_length:
            raise RuntimeError(
                f"KV-cache full: {self.length} rows used + {n} new > max_length "
                f"{self.max_length}. Allocate a longer cache (max_length=...) or generate fewer "
                f"tokens; nothing was written.")

    def advance(self) -> None:
        self.length += 1
        self.cache_seqlens.add_(1)
        self.positions.add_(1)


def _eager_decode(model: PLDRForCausalLM, state: DecodeState, recompute_G: bool
                  ) -> Callable[[Tensor], Tensor]:
    def step(tokens: Tensor) -> Tensor:
        state.check_room(1)
        logits = model.decode_step(tokens, state.positions, state.cache_seqlens,
                                   state.cache_start, recompute_G)
        state.advance()
        return logits
    return step


class GraphedDecode:
    """The decode step captured in a CUDA graph: static token input, the static caches and decode
    state (advanced in place between replays), a static logits output.

    Nothing in the step reads the device from the host (docs/design.md §3.3), and the RoPE tables
    were sized to the cache by ``setup_caches``, so the captured step replays as it ran."""

    def __init__(self, model: PLDRForCausalLM, state: DecodeState, recompute_G: bool):
        self.state = state
        B = state.cache_seqlens.shape[0]
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=state.cache_seqlens.device)

        def step() -> Tensor:
            return model.decode_step(self.tokens, state.positions, state.cache_seqlens,
                                     state.cache_start, recompute_G)

        # Warm up on a side stream first: lazy initialisation (cuBLAS handles, allocator pools)
        # must not happen inside a capture. The warm-up appends the k/v of a dummy token at row
        # cache_seqlens; it does not advance, so the first replay overwrites that row.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step()

    def __call__(self, tokens: Tensor) -> Tensor:
        self.state.check_room(1)
        self.tokens.copy_(tokens)
        self.graph.replay()
        self.state.advance()
        return self.logits


def _check_caches(model: PLDRForCausalLM, caches: list[KVCache]) -> None:
    if model.first_cache() is not caches[0]:
        raise RuntimeError("another generation on this model replaced its caches (the caches "
                           "belong to the attention layers): run one generation at a time per "
                           "model, or use a copy of the model")


def generate_stream(model: PLDRForCausalLM, input_ids: Tensor, options: GenerationOptions,
                    attention_mask: Tensor | None = None
                    ) -> Generator[Tensor, None, GenerateOutput]:
    """Yield the next token ids ``[B]`` step by step; the generator's return value (PEP 380) is
    the :class:`GenerateOutput`, which :func:`generate` collects."""
    ops.require_built()
    options.check(input_ids, attention_mask, model.config.vocab_size,
                  model.config.max_position_embeddings)
    if options.cuda_graph and model.device.type != "cuda":
        raise ValueError("cuda_graph=True needs the model on a CUDA device")
    return _stream(model, input_ids, options, attention_mask)


def _stream(model: PLDRForCausalLM, input_ids: Tensor, options: GenerationOptions,
            attention_mask: Tensor | None) -> Generator[Tensor, None, GenerateOutput]:
    B, S = input_ids.shape
    ids = input_ids.long()
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.long()
    padded = bool((mask == 0).any())
    prompt_mask = mask if padded else None
    picker = TokenPicker(options, model.config, B, ids.device)
    mode, n_new = options.cache, options.max_new_tokens
    kv = mode in KV_MODES
    max_length = (options.max_length or S + n_new) if kv else None
    with torch.inference_mode():
        caches = model.setup_caches(B, max_length, share_first_G=kv and model.config.cache_first_G)
    try:
        with torch.inference_mode():
            logits = model.prefill(ids, prompt_mask, options.include_pad_in_g)
            if kv:
                state = DecodeState.after_prompt(prompt_mask, B, S, max_length, ids.device)
                decode = (GraphedDecode if options.cuda_graph else _eager_decode)(
                    model, state, mode == "kv")
        for step in range(n_new):
            with torch.inference_mode():
                nxt = picker(logits)
                ids = torch.cat([ids, nxt[:, None]], dim=1)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            yield nxt
            if step == n_new - 1 or picker.all_finished():
                break
            _check_caches(model, caches)
            with torch.inference_mode():
                if kv:
                    logits = decode(nxt[:, None])
                else:  # 'none' recomputes G (and records it), 'g' attends with the prompt's
                    logits = model.prefill(ids, mask if padded else None,
                                           options.include_pad_in_g, G_from_cache=mode == "g")
    finally:
        if model.caches()[0] is caches[0]:
            model.clear_caches()
    return GenerateOutput(ids, [(c.A, c.A_LM, c.G) for c in caches])


def generate(model: PLDRForCausalLM, input_ids: Tensor, options: GenerationOptions,
             attention_mask: Tensor | None = None) -> GenerateOutput:
    """Run :func:`generate_stream` to its end."""
    stream = generate_stream(model, input_ids, options, attention_mask)
    while True:
        try:
            next(stream)
        except StopIteration as done:
            return done.value
