"""Autograd through ``pldr::metric_tensors`` (docs/design.md §3.4).

The forward saves its inputs and nothing else; the backward is ``pldr::metric_tensors_backward``,
which recomputes the metric learner from them (the eager formulation would keep ~164 MB of
activations per sample at S = 1024 for the 110M model). Its kernels:

* CPU: the fused fp32 C++ backward (csrc/cpu/metric_tensors_backward_cpu.cpp);
* CUDA: :func:`metric_tensors_backward_reference`, the gradients of the fp32 reference math
  (``reference.metric_tensors``) written out in PyTorch and recomputed inside the call, so its
  activations live only while the backward runs. It runs on CPU tensors too, which is how it is
  tested here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _checks, ops, reference

Tensor = torch.Tensor

# Inputs of pldr::metric_tensors after q and q_mask, in schema order.
_NUM_WEIGHTS = 15


def metric_tensors_backward_reference(grad_A: Tensor | None, grad_A_LM: Tensor | None,
                                      grad_G: Tensor | None, q: Tensor, q_mask: Tensor | None,
                                      *weights: Tensor, eps_ln: float = reference.LN_EPS,
                                      eps_adj: float = reference.EPS_ADJ) -> tuple[Tensor, ...]:
    """``pldr::metric_tensors_backward`` in plain PyTorch, fp32: the checks and errors of the C++
    kernels, then :func:`metric_backward_math`. Returns ``(grad_q in q's dtype, the gradient of
    each weight in fp32)``, all contiguous."""
    _checks.check_metric_tensors_backward_inputs(grad_A, grad_A_LM, grad_G, q, q_mask, *weights,
                                                 eps_ln, eps_adj)
    grads = metric_backward_math(grad_A, grad_A_LM, grad_G, q.float(), q_mask, *weights,
                                 eps_ln=eps_ln, eps_adj=eps_adj)
    return (grads[0].to(q.dtype), *grads[1:])


def metric_backward_math(grad_A: Tensor | None, grad_A_LM: Tensor | None, grad_G: Tensor | None,
                         q: Tensor, q_mask: Tensor | None, ln0_w: Tensor, ln0_b: Tensor,
                         w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor, b3: Tensor,
                         lnA_w: Tensor, lnA_b: Tensor, W: Tensor, b: Tensor, pw: Tensor,
                         a: Tensor, ba: Tensor, eps_ln: float = reference.LN_EPS,
                         eps_adj: float = reference.EPS_ADJ) -> tuple[Tensor, ...]:
    """The gradients of ``reference.metric_tensors`` written out (no autograd, so it also runs
    inside dispatcher modes), in the dtype of q and the weights; None output gradients count as
    zero. The forward is recomputed keeping only the input of each SwiGLU and of each LayerNorm;
    each SwiGLU's hidden layer is recomputed again on the way back (docs/design.md §3.4)."""
    d = q.shape[-1]
    R, Gd = w1.shape[:2]
    # Rows left out by q_mask are excluded, not multiplied by 0: whatever they hold (a pad row
    # may hold inf or NaN) reaches neither QᵀQ nor grad_q, as in the kernels.
    keep = None if q_mask is None else q_mask[:, :, None, None]
    qf = q if keep is None else torch.where(keep, q, 0)
    # Forward, keeping the checkpoints.
    A0 = torch.einsum("bshi,bshj->bhij", qf, qf)
    X = F.layer_norm(A0, (d,), ln0_w, ln0_b, eps_ln)
    glu_inputs, ln_inputs = [], []
    for r in range(R):
        unit_in = X
        for g in range(Gd):
            glu_inputs.append(X)
            X = reference.swiglu(X, w1[r, g], b1[r, g], w2[r, g], b2[r, g], w3[r, g], b3[r, g])
        ln_inputs.append(X + unit_in)
        X = F.layer_norm(ln_inputs[-1], (d,), lnA_w[r], lnA_b[r], eps_ln)
    A = X
    # Power stage, steps 9-12: Z = W·A + b, A_LM = Z·silu(Z) + eps_adj, A_P = A_LM^pw,
    # G = a·A_P + ba.
    Z = torch.matmul(W, A) + b
    silu_Z = F.silu(Z)
    A_LM = Z * silu_Z + eps_adj
    A_P = torch.pow(A_LM, pw)
    g_A_LM = torch.zeros_like(A_LM) if grad_A_LM is None else grad_A_LM.to(A_LM.dtype)
    if grad_G is None:
        g_a = g_ba = g_pw = torch.zeros_like(a)
    else:
        gG = grad_G.to(A_P.dtype)
        g_ba = gG.sum(0)
        g_a = torch.matmul(gG, A_P.transpose(-1, -2)).sum(0)
        g_A_P = torch.matmul(a.transpose(-1, -2), gG)
        g_A_LM = g_A_LM + g_A_P * pw * torch.pow(A_LM, pw - 1)
        g_pw = (g_A_P * A_P * torch.log(A_LM)).sum(0)
    sig = torch.sigmoid(Z)
    g_Z = g_A_LM * (silu_Z + Z * sig * (1 + Z * (1 - sig)))
    g_b = g_Z.sum(0)
    g_W = torch.matmul(g_Z, A.transpose(-1, -2)).sum(0)
    g_X = torch.matmul(W.transpose(-1, -2), g_Z)
    if grad_A is not None:
        g_X = g_X + grad_A.to(g_X.dtype)
    # The residual units, last first.
    g_w1, g_b1, g_w2, g_b2, g_w3, g_b3 = (torch.zeros_like(t) for t in (w1, b1, w2, b2, w3, b3))
    g_lnA_w, g_lnA_b = torch.zeros_like(lnA_w), torch.zeros_like(lnA_b)
    for r in reversed(range(R)):
        g_T, g_lnA_w[r], g_lnA_b[r] = _layer_norm_backward(ln_inputs[r], g_X, lnA_w[r], eps_ln)
        g_X = g_T
        for g in reversed(range(Gd)):
            X = glu_inputs[r * Gd + g]
            h1 = F.linear(X, w1[r, g], b1[r, g])
            h2 = F.linear(X, w2[r, g], b2[r, g])
            silu_h1 = F.silu(h1)
            U = silu_h1 * h2
            g_w3[r, g] = torch.einsum("...ij,...if->jf", g_X, U)
            g_b3[r, g] = g_X.sum(tuple(range(g_X.dim() - 1)))
            g_U = torch.matmul(g_X, w3[r, g])
            sig = torch.sigmoid(h1)
            g_h1 = g_U * h2 * sig * (1 + h1 * (1 - sig))
            g_h2 = g_U * silu_h1
            g_w1[r, g] = torch.einsum("...if,...ij->fj", g_h1, X)
            g_w2[r, g] = torch.einsum("...if,...ij->fj", g_h2, X)
            g_b1[r, g] = g_h1.sum(tuple(range(g_h1.dim() - 1)))
            g_b2[r, g] = g_h2.sum(tuple(range(g_h2.dim() - 1)))
            g_X = torch.matmul(g_h1, w1[r, g]) + torch.matmul(g_h2, w2[r, g])
        g_X = g_X + g_T  # the residual
    g_A0, g_ln0_w, g_ln0_b = _layer_norm_backward(A0, g_X, ln0_w, eps_ln)
    g_q = torch.einsum("bshi,bhij->bshj", qf, g_A0 + g_A0.transpose(-1, -2))
    if keep is not None:
        g_q = torch.where(keep, g_q, 0)
    return tuple(t.contiguous() for t in (
        g_q, g_ln0_w, g_ln0_b, g_w1, g_b1, g_w2, g_b2, g_w3, g_b3, g_lnA_w, g_lnA_b, g_W, g_b,
        g_pw, g_a, g_ba))


def _layer_norm_backward(x: Tensor, grad_y: Tensor, weight: Tensor,
                         eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``F.layer_norm`` over the last axis: the gradients of its input, weight and bias."""
    mean = x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    x_hat = (x - mean) * rstd
    g_x_hat = grad_y * weight
    g_x = rstd * (g_x_hat - g_x_hat.mean(-1, keepdim=True)
                  - x_hat * (g_x_hat * x_hat).mean(-1, keepdim=True))
    outer = tuple(range(x.dim() - 1))
    return g_x, (grad_y * x_hat).sum(outer), grad_y.sum(outer)


def _setup_context(ctx, inputs, output) -> None:
    q, q_mask, *weights, eps_ln, eps_adj = inputs
    ctx.save_for_backward(q, q_mask, *weights)
    ctx.eps = (eps_ln, eps_adj)


def _backward(ctx, grad_A, grad_A_LM, grad_G):
    q, q_mask, *weights = ctx.saved_tensors
    grad_q, *grad_weights = torch.ops.pldr.metric_tensors_backward(
        grad_A, grad_A_LM, grad_G, q, q_mask, *weights, *ctx.eps)
    needs = ctx.needs_input_grad
    return (grad_q if needs[0] else None, None,
            *(g if need else None for g, need in zip(grad_weights, needs[2:2 + _NUM_WEIGHTS])),
            None, None)


if ops._LOAD_ERROR is None:
    torch.library.register_autograd("pldr::metric_tensors", _backward,
                                    setup_context=_setup_context)
    torch.library.impl("pldr::metric_tensors_backward", "CUDA")(metric_tensors_backward_reference)
