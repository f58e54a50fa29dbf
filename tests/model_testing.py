"""Shared helpers of the model tests: a tiny config, kernel availability, seeded models, the
same-dtype peer of a whole model."""
from __future__ import annotations

import contextlib

import pytest
import torch

from pldr_kernels import PLDRConfig, PLDRForCausalLM
from pldr_kernels import nn as pnn
from pldr_kernels.testing import OPS, available_backends, g_attention_peer, metric_tensors_peer

_missing = [op for op in OPS if "cpu" not in available_backends(op)]
needs_cpu_kernels = pytest.mark.skipif(
    bool(_missing), reason=f"CPU kernel(s) not available in this build: "
                           f"{', '.join('pldr::' + m for m in _missing)}")


def tiny_config(**overrides) -> PLDRConfig:
    fields = dict(vocab_size=256, hidden_size=128, intermediate_size=341, num_hidden_layers=2,
                  num_attention_heads=2, head_dim=64, A_dff=170, num_reslayerA=2, num_denseA=2,
                  max_position_embeddings=128)
    fields.update(overrides)
    return PLDRConfig(**fields)


def tiny_model(seed: int = 0, **overrides) -> PLDRForCausalLM:
    torch.manual_seed(seed)
    model = PLDRForCausalLM(tiny_config(**overrides)).eval()
    # Non-zero biases everywhere, so a bias dropped on the way is caught.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.endswith("blst") or name.endswith("balst"):
                p.add_(0.02 * torch.randn_like(p))
    return model


def prompt(length: int, seed: int, vocab: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (1, length), generator=g)


def left_pad(prompts, pad_id: int = 0):
    """Left-pad a list of [1, S_i] prompts → (ids [B, S], attention_mask [B, S])."""
    S = max(p.shape[1] for p in prompts)
    ids = torch.full((len(prompts), S), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), S, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, S - p.shape[1]:] = p[0]
        mask[i, S - p.shape[1]:] = 1
    return ids, mask


def _without_autocast(fn):
    def run(*args, **kwargs):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)
    return run


@contextlib.contextmanager
def ops_replaced_by_peers():
    """Inside, the nn modules (and so PLDRForCausalLM) call the same-dtype PyTorch peers of
    ``pldr_kernels.testing`` instead of the pldr ops: the model's own math in plain PyTorch, with
    PyTorch's autograd — the peer of the model's outputs and gradients (docs/design.md §4.1).
    The peers see what the ops see (autocast does not reach into them either)."""
    saved = pnn.ops.g_attention, pnn.ops.metric_tensors
    pnn.ops.g_attention = _without_autocast(g_attention_peer)
    pnn.ops.metric_tensors = _without_autocast(metric_tensors_peer)
    try:
        yield
    finally:
        pnn.ops.g_attention, pnn.ops.metric_tensors = saved
