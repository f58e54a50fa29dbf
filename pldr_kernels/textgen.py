"""Text in, text out: prompts are encoded with the PLDR tokenizer (no [START]/[END],
docs/spec.md §1), left-padded into one batch, run through ``PLDRForCausalLM.generate_stream`` (the
one generation loop, generation.py; token selection in sampling.py) and decoded piece by piece.

:func:`generate_text` returns the continuations; :func:`stream_text` yields each step's new text
per row and returns a :class:`TextGeneration` with the timings that ``pldr-generate`` reports.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field

import torch

from .sampling import GenerationOptions
from .tokenizer import IncrementalDecoder, PLDRTokenizer


@dataclass
class TextGeneration:
    """What a :func:`stream_text` run produced and how long it took."""
    texts: list[str]  # the continuation of each prompt (without the prompt)
    prompt_tokens: int  # real (unpadded) prompt tokens over all rows
    new_tokens: int  # generated tokens over all rows, up to and including each row's [END]
    first_token_s: float  # prompt prefill + the first token of every row
    decode_s: float  # the steps after the first token
    token_ids: list[list[int]] = field(default_factory=list)  # each row's generated ids

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.first_token_s if self.first_token_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens of the steps after the first, over the time of those steps."""
        later = self.new_tokens - len(self.texts)
        return later / self.decode_s if self.decode_s > 0 and later > 0 else 0.0


def encode_prompts(tokenizer: PLDRTokenizer, prompts: Sequence[str], max_positions: int
                   ) -> tuple[torch.Tensor, torch.Tensor | None, list[list[int]]]:
    """Prompts → left-padded ids [B, S] with [PAD], an attention mask (None when no row is
    padded) and each row's ids. ValueError for an empty prompt or one longer than the context."""
    rows = tokenizer.encode_batch(prompts)
    for i, ids in enumerate(rows):
        if not ids:
            raise ValueError(f"prompt {i} ({prompts[i]!r}) encodes to no tokens; give some text")
        if len(ids) > max_positions:
            raise ValueError(f"prompt {i} has {len(ids)} tokens, more than the model's context "
                             f"of max_position_embeddings={max_positions}")
    S = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), S), tokenizer.PAD_ID, dtype=torch.long)
    mask = torch.zeros(len(rows), S, dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, S - len(ids):] = torch.tensor(ids)
        mask[i, S - len(ids):] = 1
    return input_ids, (None if bool(mask.all()) else mask), rows


def stream_text(model, tokenizer: PLDRTokenizer, prompts: str | Sequence[str], *,
                max_new_tokens: int = 64, options: GenerationOptions | None = None,
                **generation_options) -> Generator[list[str], None, TextGeneration]:
    """Yield, at every step, the text each row adds (``""`` for a row that has stopped or whose
    piece completes no character yet); return a :class:`TextGeneration`.

    ``generation_options`` are :class:`GenerationOptions` fields (cache, do_sample, temperature,
    top_k, top_p, seed, eos_token_id, ...). A row stops at [END] (the config's eos_token_id)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("prompts must hold at least one prompt, got none")
    tokenizer.check_fits(model.config)
    options = GenerationOptions.of(options, max_new_tokens, **generation_options)
    input_ids, mask, rows = encode_prompts(tokenizer, prompts, model.config.max_position_embeddings)
    input_ids = input_ids.to(model.device)
    mask = None if mask is None else mask.to(model.device)
    eos = options.eos(model.config)
    decoders = [IncrementalDecoder(tokenizer, ids) for ids in rows]
    texts = [""] * len(rows)
    generated: list[list[int]] = [[] for _ in rows]
    finished = [False] * len(rows)
    start = time.perf_counter()
    first_token_s = 0.0
    stream = model.generate_stream(input_ids, attention_mask=mask, options=options)
    while True:
        try:
            step = next(stream)
        except StopIteration:
            break
        if not first_token_s:
            first_token_s = time.perf_counter() - start
        new = [""] * len(rows)
        for i, token in enumerate(step.tolist()):
            if finished[i]:
                continue
            generated[i].append(token)
            finished[i] = token == eos
            new[i] = decoders[i].flush() if finished[i] else decoders[i].push(token)
            texts[i] += new[i]
        yield new
    rest = [d.flush() for d in decoders]
    if any(rest):
        texts = [t + r for t, r in zip(texts, rest, strict=True)]
        yield rest
    total = time.perf_counter() - start
    return TextGeneration(texts, sum(len(r) for r in rows), sum(len(g) for g in generated),
                          first_token_s, max(total - first_token_s, 0.0) if first_token_s else 0.0,
                          generated)


def generate_text(model, tokenizer: PLDRTokenizer, prompts: str | Sequence[str], *,
                  max_new_tokens: int = 64, on_text: Callable[[int, str], object] | None = None,
                  options: GenerationOptions | None = None, **generation_options
                  ) -> str | list[str]:
    """The continuation of each prompt (a str for a str prompt, else a list), as it reads after
    the prompt (a first word starts with its space). ``on_text(row,
    text)`` is called with every new piece of text as it is generated (streaming).
    ``generation_options``: see :func:`stream_text`."""
    stream = stream_text(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                         options=options, **generation_options)
    while True:
        try:
            pieces = next(stream)
        except StopIteration as done:
            result: TextGeneration = done.value
            break
        if on_text is not None:
            for row, text in enumerate(pieces):
                if text:
                    on_text(row, text)
    return result.texts[0] if isinstance(prompts, str) else result.texts
