"""lm-eval with PLDR-LLM directories: ``python -m pldr_kernels.hf.evaluate <lm_eval arguments>``
(or ``pldr-lm-eval``) is ``lm_eval`` with ``pldr_kernels.hf`` imported first, so its ``hf``
model (``--model hf --model_args pretrained=DIR``) finds PldrllmForCausalLM through
AutoModelForCausalLM and never runs a directory's remote code. In-process, ``import
pldr_kernels.hf`` before ``lm_eval.simple_evaluate`` does the same.

The cache mode of its generation tasks is a model argument:
``--model_args pretrained=DIR,pldr_cache_mode=kv`` (none, kv or kvg; a config field). Its
log-likelihood tasks (multiple choice) are one uncached forward per request in lm-eval's ``hf``
model, whatever the mode.

Batches: lm-eval's ``hf`` model right-pads a batch of log-likelihood requests and passes no
attention mask. A causal softmax attention does not see the padding, but PLDR-LLM's G does: it
is formed from QᵀQ over every row of the sequence (docs/spec.md §5.7), so with ``hf`` the scores
depend on the batch size; use ``--batch_size 1`` there. The ``pldr`` model registered here
(``--model pldr``, the same arguments) is ``hf`` with the padding masked, so the pad rows stay out
of G and a batch scores what each request scores alone.
"""
from __future__ import annotations

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from . import PldrllmForCausalLM  # noqa: F401  (registers the Auto classes)


@register_model("pldr")
class PldrLM(HFLM):
    """lm-eval's ``hf`` model for PLDR-LLM directories, with the right padding of its batched
    log-likelihood requests masked (pad id = the tokenizer's, which no text encodes to)."""

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        if attn_mask is not None or labels is not None:
            return super()._model_call(inps, attn_mask, labels)
        with torch.no_grad():
            mask = (inps != self.tokenizer.pad_token_id).long()
            return self.model(inps, attention_mask=mask).logits


def main() -> None:
    from lm_eval.__main__ import cli_evaluate
    cli_evaluate()


if __name__ == "__main__":
    main()
