"""The backward of ``pldr::g_attention``: ``pldr::g_attention_backward`` (docs/design.md §3.4).

Saved for the backward: q, k, v, G, key_mask and the forward's outputs (out, lse), nothing of size
Sq×Sk; the kernel recomputes the softmax from lse. Gradients flow to q, k, v and G. ``lse`` is
returned as a non-differentiable output (like FlashAttention-2's, whose backward ignores it): it
does not require grad, so a loss that uses it gets no gradient through it — detach-like, and
visible as ``lse.requires_grad == False``. key_mask, causal and scale get no gradient.
"""
from __future__ import annotations

import torch

OP = "pldr::g_attention_backward"
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def require_backward_kernel(device: torch.device) -> None:
    """Raise a clear error when this installation has no backward kernel for ``device``."""
    if device.type == "meta":  # the fake kernel answers
        return
    key = _DISPATCH_KEYS.get(device.type)
    if key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(OP, key):
        return
    hint = ("the GPU backward of g_attention is the Triton path: install triton "
            "(`pip install triton`) so that pldr_kernels registers it"
            if device.type == "cuda" else
            "only CPU (C++) and CUDA (Triton) backward kernels exist")
    raise NotImplementedError(
        f"pldr::g_attention has no backward kernel for {device.type} tensors in this installation:"
        f" {hint}; or run the training step on CPU tensors (docs/design.md §3.4).")


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, G, key_mask, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, G, out, lse, key_mask)
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, G, out, lse, key_mask = ctx.saved_tensors
    require_backward_kernel(q.device)
    if grad_out.stride(-1) != 1:  # e.g. the expanded gradient of out.sum(); the op needs rows
        grad_out = grad_out.contiguous()
    dq, dk, dv, dG = torch.ops.pldr.g_attention_backward(grad_out, q, k, v, G, out, lse, key_mask,
                                                         ctx.causal, ctx.scale)
    # One gradient per input the autograd function received: the dispatcher drops trailing
    # arguments equal to their defaults (G=None, key_mask=None, ...), so there may be fewer than 7.
    wants = ctx.needs_input_grad
    grads = (dq, dk, dv, dG, None, None, None)[:len(wants)]
    return tuple(g if want else None for g, want in zip(grads, wants))


torch.library.register_autograd("pldr::g_attention", _backward, setup_context=_setup_context)
