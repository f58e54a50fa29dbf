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

from . import ops, reference
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
# The linear layers of PLDRForCausalLM's training step (not the reference model's)
# --------------------------------------------------------------------------------------------
# torch's CPU ``mm`` is MKL's sgemm, which on AMD CPUs takes a code path measured at ~95 GFLOP/s
# on 2 Zen 5 cores for the 110M model's shapes, where oneDNN's fp32 matmul (an exact fp32 GEMM,
# JIT-compiled for the CPU it runs on) measured ~205; the forward of a linear layer measured
# 2.1-2.4x faster through oneDNN for every shape of the tiny and the 110M model. So the CPU fp32
# linears of PLDRForCausalLM run forward and backward through oneDNN, at inference and in
# training alike (a training forward is bitwise the inference forward; docs/design.md §3.4.2).


def _onednn_matmul_available() -> bool:
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


ONEDNN_MATMUL = _onednn_matmul_available()


def _onednn_serves(a: Tensor, b: Tensor) -> bool:
    """oneDNN's matmul for these operands: CPU fp32, oneDNN there, outside autocast, and not
    while torch.compile traces (inductor lowers ``mkldnn._linear_pointwise`` only for frozen,
    constant weights, and picks its own GEMMs for ``F.linear`` / ``mm``)."""
    return (ONEDNN_MATMUL and a.device.type == "cpu" and a.dtype == b.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def _onednn_mm(a: Tensor, b_t: Tensor, bias: Tensor | None = None) -> Tensor:
    """``a [..., K] · b_tᵀ (+ bias)`` for ``b_t [N, K]`` (any strides), fp32 accumulation."""
    return torch.ops.mkldnn._linear_pointwise(a, b_t, bias, "none", [], "")


def _mm_t(a: Tensor, b_t: Tensor) -> Tensor:
    """``a · b_tᵀ``: through oneDNN where :func:`_onednn_serves`, else ``torch.mm``."""
    return _onednn_mm(a, b_t) if _onednn_serves(a, b_t) else a.mm(b_t.t())


def _weight_grad(grad: Tensor, x: Tensor) -> Tensor:
    """``gradᵀ · x`` for ``grad [N, out]``, ``x [N, in]`` (a linear layer's weight gradient,
    ``[out, in]``) through oneDNN. oneDNN reads its first operand contiguous, so one of the two
    must be transposed into a copy (:func:`_transposed`; torch's transposed copy is
    single-threaded: 4 ms for 16 MB here): either ``gradᵀ`` (``N·out`` elements), or ``xᵀ`` to
    form ``xᵀ·grad`` and transpose that ``[in, out]`` result back (``N·in + in·out``) —
    whichever copies less. Measured on 2 Zen 5 cores: the tiny model's LM head (N 2048, out
    2000, in 128) 7.3 → 3.4 ms; the 110M model's FFN (N 1024, out 4864, in 896) stays on
    ``gradᵀ`` (34.7 vs 36.9 ms). ``torch.mm`` where :func:`_onednn_serves` says no."""
    if not _onednn_serves(grad, x):
        return grad.t().mm(x)
    N, out = grad.shape
    inner = x.shape[1]
    if N * inner + inner * out < N * out:
        return _transposed(_onednn_mm(_transposed(x), grad.t()))
    return _onednn_mm(_transposed(grad), x.t())


def _transposed(t: Tensor) -> Tensor:
    """``t.t().contiguous()`` of a 2-D CPU fp32 tensor: ``pldr::transpose_2d`` over the intra-op
    threads (torch's transposed copy runs on one), else torch's."""
    if ops._LOAD_ERROR is None and t.stride(-1) == 1:
        return ops.transpose_2d(t)
    return t.t().contiguous()


class _LinearOneDNNBackward(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` whose backward runs dX and dW through oneDNN."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return dense_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        grad2 = grad.reshape(-1, grad.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _onednn_mm(grad2, weight.t()).view(x.shape)
        if ctx.needs_input_grad[1]:
            dw = _weight_grad(grad2, x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = grad2.sum(0)
        return dx, dw, db


def _onednn_linear_applies(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """:func:`_onednn_serves` x (of at least 2 dims) and weight, and an fp32 bias or none."""
    return (x.dim() >= 2 and _onednn_serves(x, weight)
            and (bias is None or bias.dtype == torch.float32))


def _onednn_backward_applies(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    return (_onednn_linear_applies(x, weight, bias) and torch.is_grad_enabled()
            and (x.requires_grad or weight.requires_grad
                 or (bias is not None and bias.requires_grad)))


def dense_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` without autograd of its own: CPU fp32 through oneDNN (see
    above), else torch's."""
    if _onednn_linear_applies(x, weight, bias):
        return _onednn_mm(x, weight, bias)
    return F.linear(x, weight, bias)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear``: CPU fp32 through oneDNN forward and, in a training step (autograd on, a
    gradient wanted), backward; elsewhere torch's."""
    if _onednn_backward_applies(x, weight, bias):
        return _LinearOneDNNBackward.apply(x, weight, bias)
    return dense_linear(x, weight, bias)


def is_plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` whose forward is ``F.linear(x, weight, bias)`` — the class itself, or a
    subclass that says so with ``computes_linear = True`` (nn.SmallRowsLinear) — without hooks:
    the training step may compute it through its own GEMMs (a replaced or wrapped module — LoRA,
    quantised, hooked — is called as it is)."""
    return (isinstance(module, nn.Linear)
            and (type(module) is nn.Linear or getattr(type(module), "computes_linear", False))
            and not (module._forward_hooks or module._forward_pre_hooks))


def apply_linear(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)``, through :func:`linear` when :func:`is_plain_linear` says it may be (a
    SmallRowsLinear at inference keeps its own forward: a few rows take pldr::linear_small)."""
    if is_plain_linear(module):
        if _onednn_backward_applies(x, module.weight, module.bias):
            return _LinearOneDNNBackward.apply(x, module.weight, module.bias)
        if type(module) is nn.Linear:
            return dense_linear(x, module.weight, module.bias)
    return module(x)


# --------------------------------------------------------------------------------------------
# The output of a forward pass
# --------------------------------------------------------------------------------------------
@dataclass
class CausalLMOutput:
    """What ``model(input_ids, labels=...)`` returns, named as HF's ``CausalLMOutput``:
    ``logits [B, S, V]`` and, when labels were given, the mean next-token cross entropy."""
    logits: Tensor
    loss: Tensor | None = None


def next_token_targets(labels: Tensor, batch_and_length, vocab_size: int | None = None) -> Tensor:
    """``labels [B, S]`` shifted by one position (position t predicts ``labels[:, t + 1]``; the
    last position predicts nothing), flattened to int64 ``[B·S]``; -100 = left out. With
    ``vocab_size``, CPU labels are checked to be token ids (a ValueError naming the first bad
    one) in eager mode; on other devices the check would cost a device read per step, and under
    torch.compile a data-dependent branch (the loss kernels refuse bad targets there too)."""
    if labels.shape != batch_and_length:
        raise ValueError(f"labels must have the shape of input_ids {tuple(batch_and_length)}, "
                         f"got {tuple(labels.shape)}")
    if (vocab_size is not None and labels.device.type == "cpu"
            and not torch.compiler.is_compiling()):
        bad = ((labels < 0) | (labels >= vocab_size)) & (labels != IGNORE_INDEX)
        if bool(bad.any()):
            where = tuple(bad.nonzero()[0].tolist())
            raise ValueError(f"labels{list(where)} = {int(labels[where])} is not a token id: "
                             f"expected 0 <= label < {vocab_size} (vocab_size), or "
                             f"{IGNORE_INDEX} to leave the position out")
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].flatten().to(torch.int64)


def causal_lm_loss(logits: Tensor, labels: Tensor, lean: bool = False) -> Tensor:
    """HF's causal-LM loss: position t predicts ``labels[:, t + 1]``; labels equal to -100 (and the
    last position, which has no next token) are left out; fp32 mean over the rest.

    ``lean=False``: ``F.cross_entropy`` (the reference model). ``lean=True`` (PLDRForCausalLM):
    the same loss by :class:`LeanCrossEntropy`, whose backward holds one ``[B·S, V]`` buffer where
    ``F.cross_entropy``'s holds three."""
    flat_logits = logits.float().flatten(0, 1)
    targets = next_token_targets(labels, logits.shape[:2], logits.shape[-1])
    if lean:
        return LeanCrossEntropy.apply(flat_logits, targets)
    return F.cross_entropy(flat_logits, targets, ignore_index=IGNORE_INDEX)


def lm_head_applies_fused(head: nn.Module, hidden: Tensor) -> bool:
    """Whether :func:`lm_head_causal_lm_loss` serves this step: autograd on, a plain biased or
    unbiased linear head (:func:`is_plain_linear`), fp32 on CPU without autocast (elsewhere the
    model runs the head and :class:`LeanCrossEntropy`)."""
    return (is_plain_linear(head) and torch.is_grad_enabled() and hidden.device.type == "cpu"
            and hidden.dtype == head.weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
            and (hidden.requires_grad or head.weight.requires_grad))


def lm_head_causal_lm_loss(hidden: Tensor, head: nn.Linear, labels: Tensor
                           ) -> tuple[Tensor, Tensor]:
    """``(logits [B, S, V], loss)`` of the LM head ``head`` on ``hidden [B, S, D]`` and the
    causal-LM loss of :func:`causal_lm_loss`, by :class:`LMHeadCrossEntropy`: the logits are
    bitwise ``apply_linear(head, hidden)`` at inference, the backward never holds a ``[B·S, V]``
    gradient."""
    B, S, D = hidden.shape
    targets = next_token_targets(labels, (B, S), head.weight.shape[0])
    loss, logits = LMHeadCrossEntropy.apply(hidden.reshape(B * S, D), head.weight, head.bias,
                                            targets)
    return logits.view(B, S, -1), loss


GRAD_CHUNK_ELEMENTS = 1 << 22  # fp32 elements of one vocabulary chunk of the backward (16 MB)
MIN_GRAD_CHUNK = 1024  # columns: below this the d hidden GEMM's K gets short


def vocab_chunk(rows: int, vocab: int) -> int:
    """Columns of one chunk of :class:`LMHeadCrossEntropy`'s backward: ~16 MB of fp32, at
    least ``MIN_GRAD_CHUNK`` columns (16 MB is under glibc's largest mmap threshold, so the
    chunk buffers are reused from the heap instead of page-faulted in anew each time)."""
    return min(vocab, max(MIN_GRAD_CHUNK, GRAD_CHUNK_ELEMENTS // max(rows, 1)))


def _kernel_serves(logits: Tensor) -> bool:
    """Whether ``pldr::cross_entropy_forward / _backward`` (C++, CPU fp32) take these logits."""
    return (logits.device.type == "cpu" and logits.dtype == torch.float32
            and ops._LOAD_ERROR is None)


def cross_entropy_rows(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """``(lse [N], nll [N])`` of ``logits [N, V]`` against ``targets [N]`` (-100: nll 0): on the
    CPU one pass over each row (``pldr::cross_entropy_forward``, docs/design.md §3.10), elsewhere
    ``torch.logsumexp`` and a gather."""
    if _kernel_serves(logits):
        return ops.cross_entropy_forward(logits, targets, IGNORE_INDEX)
    kept = targets != IGNORE_INDEX
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, targets.masked_fill(~kept, 0)[:, None])[:, 0]
    return lse, (lse - picked).masked_fill(~kept, 0.0)


def cross_entropy_rows_grad(logits: Tensor, lse: Tensor, targets: Tensor, grad_nll: Tensor,
                            start: int, end: int, grad_logits: Tensor | None) -> Tensor:
    """The gradient of ``grad_nll·Σ nll`` (:func:`cross_entropy_rows`; ``grad_nll`` a 0-D
    tensor) for the logits' columns ``[start, end)``: ``(softmax − one_hot)·grad_nll`` (0 in the
    -100 rows), plus ``grad_logits[:, start:end]`` when given; a new ``[N, end − start]``
    tensor."""
    if grad_logits is not None and grad_logits.stride(-1) != 1:
        grad_logits = grad_logits.contiguous()  # e.g. the expanded gradient of a .sum()
    if _kernel_serves(logits):
        return ops.cross_entropy_backward(logits, lse, targets, grad_nll.expand(logits.shape[0]),
                                          start, end, grad_logits, IGNORE_INDEX)
    kept = targets != IGNORE_INDEX
    scale = kept * grad_nll
    g = logits[:, start:end] - lse[:, None]
    g.exp_()
    g.mul_(scale[:, None])
    here = kept & (targets >= start) & (targets < end)
    g.scatter_add_(1, (targets - start).clamp_(0, max(end - start - 1, 0))[:, None],
                   (-scale * here)[:, None])
    if grad_logits is not None:
        g.add_(grad_logits[:, start:end])
    return g


class LMHeadCrossEntropy(torch.autograd.Function):
    """LM head and mean cross entropy in one function: ``hidden [N, D]``, ``weight [V, D]``,
    ``bias [V]`` (or None), ``targets [N]`` (-100 left out) → ``(loss, logits [N, V])``.

    Forward: the logits by :func:`dense_linear` (the bits of the unfused head at inference; they
    are the model's output), their log-sum-exp and the loss (:func:`cross_entropy_rows`).
    Saved: hidden, weight, the logits, the lse.
    Backward, Liger-Kernel's idea on the CPU: by chunks of the vocabulary (``Vc`` columns,
    ``N·Vc ≈ 4M`` elements: :func:`vocab_chunk`), the chunk of
    ``d logits = (softmax − one_hot)·grad/n`` (+ the incoming gradient of the logits, when the
    caller used them too; :func:`cross_entropy_rows_grad`), then ``dW[chunk] = d logitsᵀ·hidden``,
    ``db[chunk]``, ``d hidden += d logits·W[chunk]`` (the GEMMs through oneDNN, as
    :func:`linear`'s). The whole ``[N, V]`` gradient, 131 MB at S = 1024 for V = 32000, never
    exists (docs/design.md §3.4.2)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor):
        logits = dense_linear(hidden, weight, bias)
        lse, nll = cross_entropy_rows(logits, targets)
        count = (targets != IGNORE_INDEX).sum()
        ctx.save_for_backward(hidden, weight, logits, targets, lse, count)
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)  # an unused logits output must not cost a [N, V] zeros
        return nll.sum() / count, logits

    @staticmethod
    def backward(ctx, grad_loss: Tensor, grad_logits: Tensor | None):
        hidden, weight, logits, targets, lse, count = ctx.saved_tensors
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        want_bias = want_bias and ctx.has_bias
        N, V = logits.shape
        if grad_loss is None:
            grad_loss = torch.zeros((), dtype=logits.dtype, device=logits.device)
        grad_nll = grad_loss / count  # d loss / d nll of every kept row
        chunk = vocab_chunk(N, V)
        d_hidden = None
        d_weight = torch.empty_like(weight) if want_weight else None
        d_bias = torch.empty(V, dtype=logits.dtype, device=logits.device) if want_bias else None
        for c0 in range(0, V, chunk):
            c1 = min(V, c0 + chunk)
            g = cross_entropy_rows_grad(logits, lse, targets, grad_nll, c0, c1, grad_logits)
            if want_weight:
                d_weight[c0:c1] = _weight_grad(g, hidden)
            if want_bias:
                d_bias[c0:c1] = g.sum(0)
            if want_hidden:
                part = _mm_t(g, weight[c0:c1].t())
                d_hidden = part if d_hidden is None else d_hidden.add_(part)
        return d_hidden, d_weight, d_bias, None


class LeanCrossEntropy(torch.autograd.Function):
    """Mean cross entropy of fp32 ``logits [N, V]`` against ``targets [N]`` (-100 rows left out;
    none left gives NaN, as ``F.cross_entropy``). Saved for the backward: the logits themselves
    (no copy) and their log-sum-exp ``[N]``; the backward forms ``(softmax − one_hot)·grad/n`` in
    one ``[N, V]`` buffer (:func:`cross_entropy_rows_grad`). ``F.cross_entropy`` saves its
    ``[N, V]`` log-softmax and its backward allocates two more ``[N, V]`` tensors: 250 MB more at
    the peak of the 110M model's training step at S = 1024 (V = 32000; docs/design.md §3.4.2)."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        lse, nll = cross_entropy_rows(logits, targets)
        count = (targets != IGNORE_INDEX).sum()
        ctx.save_for_backward(logits, targets, lse, count)
        return nll.sum() / count

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, targets, lse, count = ctx.saved_tensors
        return cross_entropy_rows_grad(logits, lse, targets, grad / count, 0, logits.shape[1],
                                       None), None
