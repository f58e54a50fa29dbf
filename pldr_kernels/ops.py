"""Thin Python entry points of the pldr ops, the loading of ``_C`` and the fake (meta) kernels.

The ops are defined and validated in C++ (csrc/ops.cpp, csrc/common/checks.h); the wrappers do not
re-check inputs, so they cost what ``torch.ops.pldr.*`` costs. The fake kernels run the same checks
in Python (``_checks.py``) because under FakeTensor the C++ ones never run.

When ``_C`` is missing or does not load, ``import pldr_kernels`` still works (the reference and the
reference model need no build): ``_LOAD_ERROR`` says why, in words that say what to do, and the op
wrappers raise that (``require_built``).
"""
from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch

from . import _checks

Tensor = torch.Tensor

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


@functools.cache
def build_info() -> dict[str, Any]:
    """How ``_C`` was built (setup.py writes ``_build_info.py`` beside it); empty when it never
    was. Read from this directory, like ``_C``, never from another tree's copy."""
    spec = importlib.machinery.PathFinder.find_spec(f"{__package__}._build_info", [PACKAGE_DIR])
    if spec is None:
        return {}
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.BUILD_INFO)


def built_with_cuda() -> bool:
    """Whether this build of ``_C`` holds CUDA kernels (setup.py records it in _build_info)."""
    return bool(build_info().get("with_cuda"))


# ---- loading _C ------------------------------------------------------------------------------
def _is_source_tree(package_dir: str = PACKAGE_DIR) -> bool:
    root = os.path.dirname(package_dir)
    return (os.path.isfile(os.path.join(root, "setup.py"))
            and os.path.isdir(os.path.join(root, "csrc")))


def _rebuild_command(package_dir: str = PACKAGE_DIR) -> str:
    if _is_source_tree(package_dir):
        return "`pip install --no-build-isolation -e .` (or `make build`) in " + os.path.dirname(
            package_dir)
    return "`pip install --no-build-isolation .` in the pldr-kernels source tree"


def _has_extension(package_dir: str) -> bool:
    return any(os.path.isfile(os.path.join(package_dir, "_C" + suffix))
               for suffix in importlib.machinery.EXTENSION_SUFFIXES)


def _other_copies(package_dir: str = PACKAGE_DIR) -> list[str]:
    """Directories of other ``pldr_kernels`` packages Python could import (on sys.path, or mapped by
    an editable install's finder), those with a built ``_C`` first."""
    here = os.path.realpath(package_dir)
    found: list[str] = []
    for entry in sys.path:
        candidate = os.path.join(entry or os.getcwd(), "pldr_kernels")
        if os.path.isfile(os.path.join(candidate, "__init__.py")):
            found.append(candidate)
    for finder in sys.meta_path:
        try:
            spec = finder.find_spec("pldr_kernels", None)
        except Exception:  # a third-party finder; this is only a hint
            continue
        if spec is not None and spec.origin:
            found.append(os.path.dirname(spec.origin))
    unique = list(dict.fromkeys(os.path.realpath(p) for p in found if os.path.realpath(p) != here))
    return sorted(unique, key=lambda p: not _has_extension(p))


def _torch_mismatch() -> tuple[str, str] | None:
    """(built against, installed) when ``_C`` was built against another torch than this one."""
    built = build_info().get("built_with_torch")
    if built and built != str(torch.__version__):
        return built, str(torch.__version__)
    return None


def _not_built_message(package_dir: str = PACKAGE_DIR) -> str:
    if not _is_source_tree(package_dir):
        return (f"pldr_kernels._C is missing from {package_dir}: this installation has no compiled "
                f"extension. Reinstall it with {_rebuild_command(package_dir)}.")
    others = _other_copies(package_dir)
    if others:
        return (f"pldr_kernels was imported from the source tree {package_dir}, where the "
                "extension (_C) is not built. Python looks in the current directory (and "
                f"PYTHONPATH) first, so this copy shadows the installed one at {others[0]}. Run "
                "Python from another directory to use the installed package, or build this tree "
                f"in place with {_rebuild_command(package_dir)}.")
    return (f"pldr_kernels._C is not built: {package_dir} is the source tree and holds no compiled "
            "extension. Build it with `pip install torch ninja` and then "
            f"{_rebuild_command(package_dir)}.")


def _mismatch_message(built: str, installed: str) -> str:
    return (f"pldr_kernels was built against torch {built} but torch {installed} is installed; "
            f"rebuild with {_rebuild_command()}.")


def _load_extension() -> None:
    """Load the ``_C`` that sits beside this file (the static initialisers register
    torch.ops.pldr.*). Not ``from . import _C``: an editable install's finder would hand over
    another tree's ``_C``, and a missing one would read "most likely due to a circular import"."""
    name = f"{__package__}._C"
    spec = importlib.machinery.PathFinder.find_spec(name, [PACKAGE_DIR])
    if spec is None:
        raise ImportError(_not_built_message(), name=name)
    try:
        module = importlib.util.module_from_spec(spec)  # dlopen happens here
        sys.modules[name] = module
        spec.loader.exec_module(module)
    except ImportError as exc:
        sys.modules.pop(name, None)
        mismatch = _torch_mismatch()
        reason = (_mismatch_message(*mismatch) if mismatch else
                  f"pldr_kernels._C ({spec.origin}) failed to load; rebuild with "
                  f"{_rebuild_command()}.")
        raise ImportError(f"{reason} The loader said: {exc}", name=name,
                          path=spec.origin) from exc
    sys.modules[__package__]._C = module
    mismatch = _torch_mismatch()
    if mismatch:  # it loaded, but against other headers anything can happen
        warnings.warn(_mismatch_message(*mismatch) + " (It loaded, but kernels built against "
                      "other torch headers can crash or compute wrong results.)", RuntimeWarning,
                      stacklevel=2)


try:
    _load_extension()
    _LOAD_ERROR: ImportError | None = None
except ImportError as exc:  # keep `import pldr_kernels` (and the reference) usable without a build
    _LOAD_ERROR = exc


def require_built() -> None:
    """Raise a clear error (why, and what to do) when the compiled extension is not loaded."""
    if _LOAD_ERROR is not None:
        raise RuntimeError(str(_LOAD_ERROR)) from _LOAD_ERROR


def _needs_extension(fn: Callable) -> Callable:
    """The wrapper itself when ``_C`` loaded; else a stand-in that raises ``require_built``'s error
    (not torch.ops' AttributeError), so the hot path carries no check."""
    if _LOAD_ERROR is None:
        return fn

    @functools.wraps(fn)
    def unavailable(*args, **kwargs):
        require_built()

    return unavailable


# ---- the ops -----------------------------------------------------------------------------------
@_needs_extension
def metric_tensors(q: Tensor, q_mask: Tensor | None, ln0_w: Tensor, ln0_b: Tensor, w1: Tensor,
                   b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor, b3: Tensor, lnA_w: Tensor,
                   lnA_b: Tensor, W: Tensor, b: Tensor, pw: Tensor, a: Tensor, ba: Tensor,
                   eps_ln: float = 1e-6, eps_adj: float = 1e-9) -> tuple[Tensor, Tensor, Tensor]:
    """Fused metric learner: ``q [B,S,H,d]`` → fp32 ``(A, A_LM, G)`` ``[B,H,d,d]``
    (docs/design.md §3.1)."""
    return torch.ops.pldr.metric_tensors(q, q_mask, ln0_w, ln0_b, w1, b1, w2, b2, w3, b3, lnA_w,
                                         lnA_b, W, b, pw, a, ba, eps_ln, eps_adj)


@_needs_extension
def metric_tensors_backward(grad_A: Tensor | None, grad_A_LM: Tensor | None,
                            grad_G: Tensor | None, q: Tensor, q_mask: Tensor | None,
                            ln0_w: Tensor, ln0_b: Tensor, w1: Tensor, b1: Tensor, w2: Tensor,
                            b2: Tensor, w3: Tensor, b3: Tensor, lnA_w: Tensor, lnA_b: Tensor,
                            W: Tensor, b: Tensor, pw: Tensor, a: Tensor, ba: Tensor,
                            eps_ln: float = 1e-6, eps_adj: float = 1e-9) -> tuple[Tensor, ...]:
    """Gradients of :func:`metric_tensors` from those of its outputs (None = zero), recomputing
    the forward from the inputs: ``(grad_q, grad_ln0_w, …, grad_ba)``, grad_q in q's dtype, each
    weight's in its shape, fp32 (docs/design.md §3.4)."""
    return torch.ops.pldr.metric_tensors_backward(grad_A, grad_A_LM, grad_G, q, q_mask, ln0_w,
                                                  ln0_b, w1, b1, w2, b2, w3, b3, lnA_w, lnA_b,
                                                  W, b, pw, a, ba, eps_ln, eps_adj)


@_needs_extension
def g_attention(q: Tensor, k: Tensor, v: Tensor, G: Tensor | None = None,
                key_mask: Tensor | None = None, causal: bool = False,
                scale: float | None = None) -> tuple[Tensor, Tensor]:
    """``softmax((q·G)·kᵀ·scale + mask)·v`` → ``(out [B,Sq,H,d], lse [B,H,Sq])``
    (docs/design.md §3.2)."""
    return torch.ops.pldr.g_attention(q, k, v, G, key_mask, causal, scale)


@_needs_extension
def g_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, G: Tensor | None,
                         out: Tensor, lse: Tensor, key_mask: Tensor | None, causal: bool,
                         scale: float | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Gradients of ``g_attention`` from its inputs, its ``(out, lse)`` and ``dout`` = ∂L/∂out →
    ``(dq, dk, dv, dG)``; dq/dk/dv in q's dtype, dG fp32 in G's shape, None without G
    (docs/design.md §3.4). Autograd calls it (``pldr_kernels.autograd``); lse gets no gradient."""
    return torch.ops.pldr.g_attention_backward(dout, q, k, v, G, out, lse, key_mask, causal, scale)


@_needs_extension
def g_attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                       k_new: Tensor | None = None, v_new: Tensor | None = None,
                       cache_start: Tensor | None = None, G: Tensor | None = None,
                       scale: float | None = None, num_splits: int = 0) -> Tensor:
    """Decode step over a KV-cache, appending ``k_new/v_new`` in place first
    (docs/design.md §3.3)."""
    return torch.ops.pldr.g_attention_decode(q, k_cache, v_cache, cache_seqlens, k_new, v_new,
                                             cache_start, G, scale, num_splits)


@_needs_extension
def linear_small(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                 scale: Tensor | None = None) -> Tensor:
    """``x·weightᵀ·scale + bias`` for a few rows of ``x [..., K]`` (fp32 or bf16; the output in
    x's dtype), ``weight [N, K]`` fp32, bf16 or int8 (then ``scale [N]`` fp32 per output row):
    the CPU decode step's weight-streaming kernel (docs/design.md §3.9). No autograd."""
    return torch.ops.pldr.linear_small(x, weight, bias, scale)


@_needs_extension
def swiglu_small(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                 scale: Tensor | None = None) -> Tensor:
    """``silu(x·W1ᵀ + b1) · (x·W2ᵀ + b2)`` with ``weight = [W1; W2]`` ``[2H, K]`` (SwiGLU's
    packed gluw1/gluw2), in one pass over both: ``[..., H]`` in x's dtype (docs/design.md §3.9)."""
    return torch.ops.pldr.swiglu_small(x, weight, bias, scale)


@_needs_extension
def decode_layer(x: Tensor, qkv_weight: Tensor, qkv_bias: Tensor | None,
                 qkv_scale: Tensor | None, dense_weight: Tensor, dense_bias: Tensor | None,
                 dense_scale: Tensor | None, ln1_weight: Tensor, ln1_bias: Tensor,
                 ffn_w12: Tensor, ffn_b12: Tensor | None, ffn_s12: Tensor | None,
                 ffn_w3: Tensor, ffn_b3: Tensor | None, ffn_s3: Tensor | None,
                 ln2_weight: Tensor, ln2_bias: Tensor, k_cache: Tensor, v_cache: Tensor,
                 cache_seqlens: Tensor, cache_start: Tensor | None, G: Tensor | None,
                 rope_cos: Tensor, rope_sin: Tensor, interleaved_rope: bool,
                 eps: float) -> Tensor:
    """One post-LN PLDR decoder layer of a CPU decode step, ``x [B, 1, D]`` → ``[B, 1, D]``:
    the fused q/k/v projection, RoPE by the step's tables (:meth:`RotaryEmbedding.tables
    <pldr_kernels.nn.RotaryEmbedding.tables>`), :func:`g_attention_decode` (appending k/v to the
    caches in place) with G, ``dense``, ``LN1(attn + x)``, the SwiGLU FFN
    (:func:`swiglu_small`, ``ffn_w3``), ``LN2(ffn + out1)``. Weights as :func:`linear_small` takes
    them (an int8 one with its scale). The bits of the layer's Python forward, in one call
    (docs/design.md §3.12). Inference only."""
    return torch.ops.pldr.decode_layer(
        x, qkv_weight, qkv_bias, qkv_scale, dense_weight, dense_bias, dense_scale, ln1_weight,
        ln1_bias, ffn_w12, ffn_b12, ffn_s12, ffn_w3, ffn_b3, ffn_s3, ln2_weight, ln2_bias, k_cache,
        v_cache, cache_seqlens, cache_start, G, rope_cos, rope_sin, interleaved_rope, eps)


@_needs_extension
def cross_entropy_forward(logits: Tensor, targets: Tensor,
                          ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """The rows of a cross entropy: fp32 ``logits [N, V]``, int64 ``targets [N]`` →
    ``(lse [N], nll [N])``, ``lse = logsumexp(logits[i])`` and ``nll = lse − logits[i,
    targets[i]]`` (0 where ``targets[i] == ignore_index``); one pass over each row. CPU only
    (the LM head's fused loss, docs/design.md §3.10). No autograd."""
    return torch.ops.pldr.cross_entropy_forward(logits, targets, ignore_index)


@_needs_extension
def cross_entropy_backward(logits: Tensor, lse: Tensor, targets: Tensor, grad_nll: Tensor,
                           start: int, end: int, grad_logits: Tensor | None = None,
                           ignore_index: int = -100) -> Tensor:
    """The gradient of ``Σ grad_nll·nll`` (:func:`cross_entropy_forward`) for the columns
    ``[start, end)`` of the logits, ``[N, end − start]``: ``(softmax − one_hot)·grad_nll``, plus
    ``grad_logits[:, start:end]`` when given; rows whose target is ``ignore_index`` get only
    ``grad_logits`` (docs/design.md §3.10). No autograd."""
    return torch.ops.pldr.cross_entropy_backward(logits, lse, targets, grad_nll, start, end,
                                                 grad_logits, ignore_index)


@_needs_extension
def transpose_2d(x: Tensor) -> Tensor:
    """``x.t().contiguous()`` of a 2-D fp32 CPU tensor (last dimension contiguous), over the
    intra-op threads — torch's transposed copy runs on one (docs/design.md §3.11). No
    autograd."""
    return torch.ops.pldr.transpose_2d(x)


@_needs_extension
def release_cpu_workspace() -> int:
    """Free the scratch memory the CPU kernels keep between calls (csrc/cpu/workspace.h: the
    metric learner's backward leases it, ~40 MB for the 110M model's learner, so that each call
    does not fault in fresh pages) and return how many bytes were freed (0 when none was kept or
    a kernel is using it). The next call that needs it allocates it again."""
    import ctypes

    fn = ctypes.CDLL(sys.modules[__package__]._C.__file__).pldr_kernels_release_cpu_workspace
    fn.restype = ctypes.c_int64
    return int(fn())


# ---- fake kernels: the C++ checks, then outputs of the kernels' shapes and dtypes --------------
# The dispatcher also picks these for a call that mixes real and meta tensors (Meta outranks CPU
# and CUDA); the device checks against q refuse it there, as the real kernels would.
if _LOAD_ERROR is None:

    @torch.library.register_fake("pldr::metric_tensors")
    def _metric_tensors_fake(q, q_mask, ln0_w, ln0_b, w1, b1, w2, b2, w3, b3, lnA_w, lnA_b, W, b,
                             pw, a, ba, eps_ln=1e-6, eps_adj=1e-9):
        _checks.check_metric_tensors_inputs(q, q_mask, ln0_w, ln0_b, w1, b1, w2, b2, w3, b3,
                                            lnA_w, lnA_b, W, b, pw, a, ba, eps_ln, eps_adj)
        B, _, H, d = q.shape
        return tuple(q.new_empty((B, H, d, d), dtype=torch.float32) for _ in range(3))

    @torch.library.register_fake("pldr::metric_tensors_backward")
    def _metric_tensors_backward_fake(grad_A, grad_A_LM, grad_G, q, q_mask, ln0_w, ln0_b, w1, b1,
                                      w2, b2, w3, b3, lnA_w, lnA_b, W, b, pw, a, ba,
                                      eps_ln=1e-6, eps_adj=1e-9):
        weights = (ln0_w, ln0_b, w1, b1, w2, b2, w3, b3, lnA_w, lnA_b, W, b, pw, a, ba)
        _checks.check_metric_tensors_backward_inputs(grad_A, grad_A_LM, grad_G, q, q_mask,
                                                     *weights, eps_ln, eps_adj)
        return (q.new_empty(q.shape), *(w.new_empty(w.shape) for w in weights))

    @torch.library.register_fake("pldr::g_attention")
    def _g_attention_fake(q, k, v, G=None, key_mask=None, causal=False, scale=None):
        _checks.check_g_attention_inputs(q, k, v, G, key_mask, scale)
        B, Sq, H, d = q.shape
        out = q.new_empty((B, Sq, H, d))
        lse = q.new_empty((B, H, Sq), dtype=torch.float32)
        return out, lse

    @torch.library.register_fake("pldr::g_attention_backward")
    def _g_attention_backward_fake(dout, q, k, v, G, out, lse, key_mask, causal, scale):
        _checks.check_g_attention_backward_inputs(dout, q, k, v, G, out, lse, key_mask, scale)
        return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
                None if G is None else G.new_empty(G.shape))

    @torch.library.register_fake("pldr::g_attention_decode")
    def _g_attention_decode_fake(q, k_cache, v_cache, cache_seqlens, k_new=None, v_new=None,
                                 cache_start=None, G=None, scale=None, num_splits=0):
        _checks.check_g_attention_decode_inputs(q, k_cache, v_cache, cache_seqlens, k_new, v_new,
                                                cache_start, G, scale, num_splits)
        return q.new_empty(q.shape)

    @torch.library.register_fake("pldr::linear_small")
    def _linear_small_fake(x, weight, bias=None, scale=None):
        _, features = _checks.check_linear_small_inputs(x, weight, bias, scale, swiglu=False)
        return x.new_empty((*x.shape[:-1], features))

    @torch.library.register_fake("pldr::swiglu_small")
    def _swiglu_small_fake(x, weight, bias=None, scale=None):
        _, features = _checks.check_linear_small_inputs(x, weight, bias, scale, swiglu=True)
        return x.new_empty((*x.shape[:-1], features))

    @torch.library.register_fake("pldr::decode_layer")
    def _decode_layer_fake(x, qkv_weight, qkv_bias, qkv_scale, dense_weight, dense_bias,
                           dense_scale, ln1_weight, ln1_bias, ffn_w12, ffn_b12, ffn_s12, ffn_w3,
                           ffn_b3, ffn_s3, ln2_weight, ln2_bias, k_cache, v_cache, cache_seqlens,
                           cache_start, G, rope_cos, rope_sin, interleaved_rope, eps):
        linear, names = _checks.DecodeLayerLinear, _checks.LinearArgNames
        _checks.check_decode_layer_inputs(
            x, linear(qkv_weight, qkv_bias, qkv_scale,
                      names("qkv_weight", "qkv_bias", "qkv_scale")),
            linear(dense_weight, dense_bias, dense_scale,
                   names("dense_weight", "dense_bias", "dense_scale")),
            ln1_weight, ln1_bias, linear(ffn_w12, ffn_b12, ffn_s12,
                                         names("ffn_w12", "ffn_b12", "ffn_s12")),
            linear(ffn_w3, ffn_b3, ffn_s3, names("ffn_w3", "ffn_b3", "ffn_s3")),
            ln2_weight, ln2_bias, k_cache, rope_cos, rope_sin, interleaved_rope, eps)
        # The attention's own checks, on its q/k/v of the shapes the projection gives.
        B, H, d = x.shape[0], k_cache.shape[2], k_cache.shape[3]
        q, k_new, v_new = (x.new_empty((B, 1, H, d)) for _ in range(3))
        _checks.check_g_attention_decode_inputs(q, k_cache, v_cache, cache_seqlens, k_new, v_new,
                                                cache_start, G, None, 0)
        return x.new_empty(x.shape)

    @torch.library.register_fake("pldr::cross_entropy_forward")
    def _cross_entropy_forward_fake(logits, targets, ignore_index=-100):
        _checks.check_cross_entropy_inputs(logits, targets)
        return logits.new_empty((logits.shape[0],)), logits.new_empty((logits.shape[0],))

    @torch.library.register_fake("pldr::cross_entropy_backward")
    def _cross_entropy_backward_fake(logits, lse, targets, grad_nll, start, end,
                                     grad_logits=None, ignore_index=-100):
        _checks.check_cross_entropy_backward_inputs(logits, lse, targets, grad_nll, start, end,
                                                    grad_logits)
        return logits.new_empty((logits.shape[0], end - start))

    @torch.library.register_fake("pldr::transpose_2d")
    def _transpose_2d_fake(x):
        _checks.check_transpose_2d_input(x)
        return x.new_empty((x.shape[1], x.shape[0]))
