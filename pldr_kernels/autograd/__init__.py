"""Autograd formulas of the pldr ops, registered with ``torch.library.register_autograd``
(docs/design.md §3.4).

Importing this package (``pldr_kernels`` does when ``_C`` is loaded) makes ``torch.ops.pldr.*``
differentiable: ``attention`` registers the backward of ``pldr::g_attention``, which runs
``pldr::g_attention_backward``; ``metric`` that of ``pldr::metric_tensors``, which runs
``pldr::metric_tensors_backward``. The formulas work in eager mode, under ``torch.compile`` and in
``torch.library.opcheck``.
"""
from . import attention, metric  # noqa: F401
