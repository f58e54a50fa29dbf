"""What both models' generation shares: the options of a generate call, their checks, and token
selection (greedy, temperature/top-k/top-p sampling, early stop at EOS).

This module is neutral ground: the generation loop of PLDRForCausalLM (``generation.py``) and the
authors'-style loop of ReferencePLDR both take a :class:`GenerationOptions`, so they are driven by
the same arguments with the same defaults.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Literal

import torch

Tensor = torch.Tensor

CACHE_MODES = ("none", "g", "kv", "kvg")
CACHE_MODE_HELP = ("cache='none' (full recompute, G from the whole sequence each step), 'g' (full "
                   "recompute, G frozen from the prompt), 'kv' (KV-cache, A cached, G recomputed "
                   "from A each step) or 'kvg' (KV-cache and G-cache)")
FROM_CONFIG = "config"


@dataclass(frozen=True)
class GenerationOptions:
    """How to generate. ``model.generate(ids, max_new_tokens, **fields)`` builds one of these.

    - ``cache``: one of :data:`CACHE_MODES` (docs/spec.md §3.1 mode matrix), see CACHE_MODE_HELP.
    - ``do_sample`` with ``temperature``, ``top_k`` (0 = off), ``top_p`` (1 = off); else greedy.
      ``seed`` seeds a private generator (None: the global RNG).
    - ``eos_token_id``: ``'config'`` (the default) stops a row at the model config's
      ``eos_token_id``; an int stops at that id; ``None`` never stops early. A stopped row is
      filled with the config's ``pad_token_id`` (0 if None) until every row has stopped.
    - ``include_pad_in_g``: pad rows of a left-padded prompt enter QᵀQ (the HF port's behaviour).
    - ``max_length``: rows of PLDRForCausalLM's static KV-cache (default prompt + new tokens).
    - ``cuda_graph``: replay the decode step as a CUDA graph (PLDRForCausalLM on CUDA, 'kv'/'kvg').

    A generation that passes the config's ``max_position_embeddings`` warns instead of refusing
    (:func:`warn_beyond_context`, docs/spec.md §3.4).
    """
    max_new_tokens: int
    cache: str = "kvg"
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_id: int | None | Literal["config"] = FROM_CONFIG
    seed: int | None = None
    include_pad_in_g: bool = False
    max_length: int | None = None
    cuda_graph: bool = False

    @classmethod
    def of(cls, options: GenerationOptions | None, max_new_tokens: int | None,
           **fields) -> GenerationOptions:
        """``options`` with ``max_new_tokens`` and ``fields`` replaced, or new options from them;
        unknown field names are refused with the list of valid ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - names)
        if unknown:
            raise TypeError(f"unknown generation option(s) {unknown}; valid: {sorted(names)}")
        if max_new_tokens is not None:
            fields["max_new_tokens"] = max_new_tokens
        if options is not None:
            return dataclasses.replace(options, **fields)
        if "max_new_tokens" not in fields:
            raise TypeError("generate needs max_new_tokens (or options=GenerationOptions(...))")
        return cls(**fields)

    def eos(self, config) -> int | None:
        """The EOS id in effect for a model with ``config``."""
        return config.eos_token_id if self.eos_token_id == FROM_CONFIG else self.eos_token_id

    def check(self, input_ids: Tensor, attention_mask: Tensor | None, vocab_size: int,
              max_positions: int | None = None) -> None:
        """Raise ValueError naming the first bad argument, what was expected and what was given.

        With ``max_positions`` (the config's ``max_position_embeddings``), warn when a row would
        reach a RoPE position beyond it (:func:`warn_beyond_context`)."""
        if self.cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES}: {CACHE_MODE_HELP}; "
                             f"got {self.cache!r}")
        if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be [B, S] with B >= 1 rows and S >= 1 tokens, got "
                             f"shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be int64 or int32 token ids, got {input_ids.dtype}")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= vocab_size):
            raise ValueError(f"input_ids must lie in [0, vocab_size={vocab_size}), got values in "
                             f"[{input_ids.min().item()}, {input_ids.max().item()}]")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {self.max_new_tokens!r}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when do_sample=True, got "
                             f"{self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        eos = self.eos_token_id
        if eos not in (None, FROM_CONFIG) and (not isinstance(eos, int) or isinstance(eos, bool)):
            raise ValueError(f"eos_token_id must be an int, None (no early stop) or "
                             f"{FROM_CONFIG!r} (the model config's), got {eos!r}")
        if self.max_length is not None and (not isinstance(self.max_length, int)
                                            or self.max_length < 1):
            raise ValueError(f"max_length must be None or an int >= 1, got {self.max_length!r}")
        if attention_mask is not None:
            check_left_padded(attention_mask, input_ids)
        if max_positions is not None:
            warn_beyond_context(input_ids, attention_mask, self.max_new_tokens, max_positions)


def warn_beyond_context(input_ids: Tensor, attention_mask: Tensor | None, max_new_tokens: int,
                        max_positions: int) -> None:
    """Warn (not refuse) when the longest row, its real tokens plus ``max_new_tokens``, passes
    ``max_positions``: the RoPE tables grow and the kernels have no length limit, so the result is
    well defined, but the model was trained on at most ``max_positions`` positions and what it does
    beyond them is untested; extending the context on purpose stays possible (HF's generate warns
    alike)."""
    longest = input_ids.shape[1] if attention_mask is None else int(
        (attention_mask != 0).sum(dim=1).max())
    if longest + max_new_tokens > max_positions:
        warnings.warn(f"generation reaches {longest + max_new_tokens} positions (the longest "
                      f"prompt row's {longest} tokens + max_new_tokens={max_new_tokens}), beyond "
                      f"the model's max_position_embeddings={max_positions}: positions past the "
                      f"trained context are computed but the model never saw them, so the output "
                      f"may degrade", UserWarning, stacklevel=4)


def check_left_padded(attention_mask: Tensor, input_ids: Tensor) -> None:
    """attention_mask [B,S] of 0/1 with padding on the left only and at least one real token."""
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids "
                         f"{tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}")
    # The values as given: a cast to int first would turn 0.5 into a pad.
    if ((attention_mask != 0) & (attention_mask != 1)).any():
        raise ValueError("attention_mask must contain only 0 (pad) and 1 (token)")
    m = attention_mask.to(torch.int64)
    if (m.sum(dim=1) == 0).any():
        raise ValueError("every row of attention_mask needs at least one real token (a 1)")
    if (m[:, 1:] < m[:, :-1]).any():
        raise ValueError("attention_mask must be left-padded (zeros only before the first 1 of a "
                         "row); right padding is not supported by the generation loop")


def sample_next_token(logits: Tensor, do_sample: bool, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """``logits [B, V]`` → token ids ``[B]`` (int64): argmax, or temperature/top-k/top-p
    sampling."""
    if not do_sample:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    if top_k > 0 and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1 - top_p)
        drop_sorted[:, -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


class TokenPicker:
    """Chooses each step's tokens for a batch and tracks which rows have reached EOS."""

    def __init__(self, options: GenerationOptions, config, batch_size: int, device: torch.device):
        self.options = options
        self.eos = options.eos(config)
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else 0
        self.generator = make_generator(options.seed, device)
        self.finished = torch.zeros(batch_size, dtype=torch.bool, device=device)

    def __call__(self, logits: Tensor) -> Tensor:
        """``logits [B, V]`` → next ids ``[B]``; rows already finished get the pad id."""
        o = self.options
        nxt = sample_next_token(logits, o.do_sample, o.temperature, o.top_k, o.top_p,
                                self.generator)
        if self.eos is not None:
            nxt = torch.where(self.finished, torch.full_like(nxt, self.pad_id), nxt)
            self.finished |= nxt == self.eos
        return nxt

    def all_finished(self) -> bool:
        """Whether every row has stopped (reads one bool from the device; False without EOS)."""
        return self.eos is not None and bool(self.finished.all())
