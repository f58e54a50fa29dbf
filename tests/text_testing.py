"""Shared helpers of the text tests (tokenizer, pldr-generate, pldr-inspect): a tiny tokenizer
trained on the project's own English prose, fitting tests/model_testing.py's tiny config."""
from __future__ import annotations

import functools
import os

import pytest

pytest.importorskip("sentencepiece")

from pldr_kernels.tokenizer import PLDRTokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINING_TEXT = os.path.join(ROOT, "docs", "spec.md")  # ~40 KB of English and formulas
TINY_VOCAB = 256  # tiny_config()'s vocab_size


@functools.cache
def tiny_tokenizer(vocab_size: int = TINY_VOCAB) -> PLDRTokenizer:
    """Trained once per session (~1 s); deterministic."""
    return PLDRTokenizer.train([TRAINING_TEXT], vocab_size)
