"""Token selection and argument checks shared by the generation loops of both models."""
from __future__ import annotations

import torch

Tensor = torch.Tensor

CACHE_MODES = ("none", "g", "kv", "kvg")
CACHE_MODE_HELP = ("cache='none' (full recompute, G from the whole sequence each step), 'g' (full "
                   "recompute, G frozen from the prompt), 'kv' (KV-cache, A cached, G recomputed "
                   "from A each step) or 'kvg' (KV-cache and G-cache)")


def check_generate_args(input_ids: Tensor, max_new_tokens: int, cache: str, do_sample: bool,
                        temperature: float, top_k: int, top_p: float,
                        attention_mask: Tensor | None, vocab_size: int) -> None:
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}: {CACHE_MODE_HELP}; got {cache!r}")
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be [B, S] with S >= 1, got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be int64 or int32 token ids, got {input_ids.dtype}")
    if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= vocab_size):
        raise ValueError(f"input_ids must lie in [0, vocab_size={vocab_size}), got values in "
                         f"[{input_ids.min().item()}, {input_ids.max().item()}]")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when do_sample=True, got {temperature!r}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
    if attention_mask is not None:
        check_left_padded(attention_mask, input_ids)


def check_left_padded(attention_mask: Tensor, input_ids: Tensor) -> None:
    """attention_mask [B,S] of 0/1 with padding on the left only and at least one real token."""
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids "
                         f"{tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}")
    m = attention_mask.to(torch.int64)
    if ((m != 0) & (m != 1)).any():
        raise ValueError("attention_mask must contain only 0 (pad) and 1 (token)")
    if (m.sum(dim=1) == 0).any():
        raise ValueError("every row of attention_mask needs at least one real token (a 1)")
    if (m[:, 1:] < m[:, :-1]).any():
        raise ValueError("attention_mask must be left-padded (zeros only before the first 1 of a "
                         "row); right padding is not supported by the generation loop")


def positions_from_mask(attention_mask: Tensor | None, B: int, S: int,
                        device: torch.device) -> Tensor:
    """RoPE positions ``[B, S]``: counted from each row's first real token, so a left-padded row
    sees the positions it would see alone; pad slots get position 1 (HF generate's rule)."""
    if attention_mask is None:
        return torch.arange(S, device=device)[None, :].expand(B, S)
    m = attention_mask.to(torch.int64)
    return (m.cumsum(dim=1) - 1).masked_fill(m == 0, 1)


def sample_next_token(logits: Tensor, do_sample: bool, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """``logits [B, V]`` → token ids ``[B]`` (int64): argmax, or temperature/top-k/top-p sampling."""
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
