"""Building blocks shared by PLDRForCausalLM (``model.py``, ``nn.py``) and the authors'-style
ReferencePLDR (``reference_model.py``), so that neither model imports from the other.

The modules keep the authors' class roles and attribute names (``gluw1/2/3``, ``denseAs``,
``layernormA``, ``plgatt_layer.{Wlst, blst, pwlst, alst, balst}``), which makes the state-dict keys
those of docs/spec.md §4 in both models.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import reference
from .config import PLDRConfig

Tensor = torch.Tensor
IGNORE_INDEX = -100  # label of a position left out of the loss (the HF convention)


class GLUVariant(nn.Module):
    """SwiGLU: ``gluw3(silu(gluw1(x)) * gluw2(x))``."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, bias: bool = True,
                 linear: type[nn.Linear] = nn.Linear):
        super().__init__()
        self.gluw1 = linear(d_in, d_hidden, bias=bias)
        self.gluw2 = linear(d_in, d_hidden, bias=bias)
        self.gluw3 = linear(d_hidden, d_out, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.gluw3(F.silu(self.gluw1(x)) * self.gluw2(x))


class ResLayerA(nn.Module):
    """Residual unit of the metric learner: ``LN(GLU_g(…GLU_0(A)) + A)``."""

    def __init__(self, depth: int, A_dff: int, num_denseA: int, eps: float, bias: bool = True):
        super().__init__()
        self.denseAs = nn.ModuleList([GLUVariant(depth, A_dff, depth, bias)
                                      for _ in range(num_denseA)])
        self.layernormA = nn.LayerNorm(depth, eps=eps)

    def forward(self, A: Tensor) -> Tensor:
        A_in = A
        for dense in self.denseAs:
            A = dense(A)
        return self.layernormA(A + A_in)


class PlgaLayer(nn.Module):
    """Power law graph attention parameters (``plgatt_layer``) and docs/spec.md §2 steps 9–12."""

    def __init__(self, depth: int, num_heads: int):
        super().__init__()
        shape = (num_heads, depth, depth)
        self.Wlst = nn.Parameter(nn.init.xavier_normal_(torch.empty(shape)))
        self.blst = nn.Parameter(torch.zeros(shape))
        self.pwlst = nn.Parameter(nn.init.xavier_normal_(torch.empty(shape)))
        self.alst = nn.Parameter(nn.init.xavier_normal_(torch.empty(shape)))
        self.balst = nn.Parameter(torch.zeros(shape))

    def g_from_metric(self, A: Tensor) -> tuple[Tensor, Tensor]:
        """Steps 9–12: metric tensor A [B,H,dk,dk] → (A_LM, G_LM)."""
        A_LM = reference.iswiglu(torch.matmul(self.Wlst, A) + self.blst) + reference.EPS_ADJ
        G = torch.matmul(self.alst, torch.pow(A_LM, self.pwlst)) + self.balst
        return A_LM, G


def init_weights(module: nn.Module) -> None:
    """The authors' initialisation of the linear layers (xavier-uniform weights, zero biases)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def attach_lm_head(lm: nn.Module, config: PLDRConfig, linear: type[nn.Linear] = nn.Linear) -> None:
    """The authors' PLDR_Model around ``lm.decoder``: a biased LM head ``final_layer`` (tied to the
    embedding only when the config says so), then xavier init of every Linear. ``linear``: the
    head's class (PLDRForCausalLM's runs few rows on ``pldr::linear_small``)."""
    lm.final_layer = linear(config.hidden_size, config.vocab_size, bias=config.final_bias)
    lm.apply(init_weights)
    if config.tie_word_embeddings:
        lm.final_layer.weight = lm.decoder.embedding.weight


def predefined_g_values(config: PLDRConfig) -> Tensor:
    """Initial ``past_G_values [L, 3, 1, H, dk, dk]`` (A, A_LM, G) of a predefined-G model: identity
    for 'identity' and 'external' (until the user writes G), standard normal for 'random'."""
    L, H, dk = config.num_hidden_layers, config.num_attention_heads, config.head_dim
    eye = torch.eye(dk).expand(L, 3, 1, H, dk, dk).clone()
    if config.custom_G_type == "random":
        eye[:, 2] = torch.randn(L, 1, H, dk, dk)
    return eye


def positions_from_mask(attention_mask: Tensor | None, B: int, S: int,
                        device: torch.device) -> Tensor:
    """RoPE positions ``[B, S]``: counted from each row's first real token, so a left-padded row
    sees the positions it would see alone; pad slots get position 1 (HF generate's rule)."""
    if attention_mask is None:
        return torch.arange(S, device=device)[None, :].expand(B, S)
    m = attention_mask.to(torch.int64)
    return (m.cumsum(dim=1) - 1).masked_fill(m == 0, 1)


# --------------------------------------------------------------------------------------------
# The output of a forward pass
# --------------------------------------------------------------------------------------------
@dataclass
class CausalLMOutput:
    """What ``model(input_ids, labels=...)`` returns, named as HF's ``CausalLMOutput``:
    ``logits [B, S, V]`` and, when labels were given, the mean next-token cross entropy."""
    logits: Tensor
    loss: Tensor | None = None


def next_token_targets(labels: Tensor, batch_and_length) -> Tensor:
    """``labels [B, S]`` shifted by one position (position t predicts ``labels[:, t + 1]``; the
    last position predicts nothing), flattened to int64 ``[B·S]``; -100 = left out."""
    if labels.shape != batch_and_length:
        raise ValueError(f"labels must have the shape of input_ids {tuple(batch_and_length)}, "
                         f"got {tuple(labels.shape)}")
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].flatten().to(torch.int64)


def causal_lm_loss(logits: Tensor, labels: Tensor, lean: bool = False) -> Tensor:
    """HF's causal-LM loss: position t predicts ``labels[:, t + 1]``; labels equal to -100 (and the
    last position, which has no next token) are left out; fp32 mean over the rest.

    ``lean=False``: ``F.cross_entropy`` (the reference model). ``lean=True`` (PLDRForCausalLM):
    the same loss by :class:`LeanCrossEntropy`, whose backward holds one ``[B·S, V]`` buffer where
    ``F.cross_entropy``'s holds three."""
    flat_logits = logits.float().flatten(0, 1)
    targets = next_token_targets(labels, logits.shape[:2])
    if lean:
        return LeanCrossEntropy.apply(flat_logits, targets)
    return F.cross_entropy(flat_logits, targets, ignore_index=IGNORE_INDEX)


class LeanCrossEntropy(torch.autograd.Function):
    """Mean cross entropy of fp32 ``logits [N, V]`` against ``targets [N]`` (-100 rows left out;
    none left gives NaN, as ``F.cross_entropy``). Saved for the backward: the logits themselves
    (no copy) and their log-sum-exp ``[N]``; the backward forms ``(softmax − one_hot)·grad/n`` in
    place in one ``[N, V]`` buffer. ``F.cross_entropy`` saves its ``[N, V]`` log-softmax and its
    backward allocates two more ``[N, V]`` tensors: 250 MB more at the peak of the 110M model's
    training step at S = 1024 (V = 32000; docs/design.md §3.4.2)."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        kept = targets != IGNORE_INDEX
        safe = targets.masked_fill(~kept, 0)[:, None]
        lse = torch.logsumexp(logits, dim=-1)
        nll = (lse - logits.gather(1, safe)[:, 0]).masked_fill(~kept, 0.0)
        count = kept.sum()
        ctx.save_for_backward(logits, safe, kept, lse, count)
        return nll.sum() / count

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, safe, kept, lse, count = ctx.saved_tensors
        g = logits - lse[:, None]
        g.exp_()
        g.scatter_add_(1, safe, torch.full_like(lse, -1.0)[:, None])
        g.mul_(kept[:, None] * (grad / count))
        return g, None
