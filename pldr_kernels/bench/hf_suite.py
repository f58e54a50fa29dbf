"""`pldr-bench hf`: the cost of Hugging Face's generation loop. HF ``generate`` on
``PldrllmForCausalLM`` (``pldr_kernels.hf``) against ``PLDRForCausalLM.generate``, the same weights,
prompt and greedy work (default: the 110M model, B=1, prompt 128, fp32, cache kvg; docs/design.md
§2.1, goal: HF within 1.25x per token).

The runs are the generate suite's (``generate_suite.run_prompt``): interleaved rotating repeats,
each step timed where its logits leave ``final_layer`` (the module both classes share), HF's
tokens checked against the fp32 reference model's before timing. Rows: ``impl`` pldr_kernels and
``pldr_kernels_hf``; the HF row's ``per_token_vs_pldr_kernels`` is its per-token p50 over
PLDRForCausalLM's.
"""
from __future__ import annotations

import dataclasses

import torch

from .generate_suite import GenerateConfig, load_models, model_description, run_prompt
from .measure import progress_bar
from .ops_suite import skipped

HF_IMPL = "pldr_kernels_hf"
DEFAULTS = dict(prompt_lens=(128,), modes=("kvg",), new_tokens=32)
QUICK = dict(prompt_lens=(16,), modes=("kvg",), new_tokens=6, repeats=3)


class HFGenerate:
    """PldrllmForCausalLM behind the generate suite's calls: ``generate(ids, n, cache=...,
    do_sample=False, eos_token_id=None)`` is HF ``generate`` with ``pldr_cache_mode``."""

    def __init__(self, model):
        self.model = model
        self.final_layer = model.final_layer  # where the suite's clock hooks
        # what decode_step_bytes reads (the step's bytes and GB/s columns)
        self.config, self.dtype = model.pldr_config, model.dtype

    def state_dict(self):
        return self.model.state_dict()

    def generate(self, ids, new_tokens, cache="kvg", do_sample=False, eos_token_id=None,
                 cuda_graph=False):
        if cuda_graph:
            raise ValueError("HF generate has no CUDA-graph path here")
        return self.model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                   do_sample=do_sample, pldr_cache_mode=cache,
                                   eos_token_id=eos_token_id, pad_token_id=0)

    def __call__(self, ids):
        return self.model(ids)


def run_hf(cfg: GenerateConfig, device: torch.device, show_progress: bool = True
           ) -> tuple[list[dict], list[dict]]:
    try:
        from ..hf import PldrllmForCausalLM
    except ImportError as e:
        return [], [skipped("hf", None, HF_IMPL, f"transformers is not installed ({e}): pip "
                                                 f"install 'pldr-kernels[hf]'")]
    cfg = dataclasses.replace(cfg, contestants=["pldr_kernels"], gen_dtypes=("float32",),
                              cuda_graph=False)
    models, skips, source, ref32 = load_models(cfg, device)
    if not models:
        return [], skips
    models[(HF_IMPL, "float32")] = HFGenerate(PldrllmForCausalLM.from_pldr(source).to(device))
    c, desc = source.config, model_description(source, cfg, device)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    refs, results = {torch.float32: ref32}, []
    with progress_bar(len(cfg.prompt_lens) * (1 + cfg.repeats), "hf", show_progress) as bar:
        for prompt_len in cfg.prompt_lens:
            ids = torch.randint(4, c.vocab_size, (cfg.batch_size, prompt_len), generator=gen)
            rows = run_prompt(models, cfg, ids.to(device), device, source, refs, bar)
            for mode in cfg.modes:
                base = next(r for r in rows if r["mode"] == mode and r["impl"] == "pldr_kernels")
                for r in rows:
                    if r["mode"] == mode and base["per_token_ms_p50"] and r["per_token_ms_p50"]:
                        r["per_token_vs_pldr_kernels"] = (r["per_token_ms_p50"]
                                                          / base["per_token_ms_p50"])
            results += [{**r, **desc} for r in rows]
    return results, skips
