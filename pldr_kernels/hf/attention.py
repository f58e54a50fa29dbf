"""``attn_implementation="pldr"`` for any Hugging Face model (docs/design.md §3.8).

Importing this module registers, in transformers' global registries:

* ``AttentionInterface["pldr"]`` = :func:`pldr_attention_forward`: the model's attention runs
  through ``pldr::g_attention`` (G = None, i.e. the identity: plain softmax attention) in prefill
  and training, and through ``pldr::g_attention_decode`` for a one-token step where the mask
  allows (below). k and v keep their H_kv heads: grouped-query / multi-query attention is done
  by the kernels (query head h reads kv head h // (H / H_kv), transformers' ``repeat_kv``
  order), no ``repeat_kv`` copy.
* ``AttentionMaskInterface["pldr"]`` = transformers' ``sdpa_mask``. transformers builds no mask
  at all for an attention key without a registered mask function (with 5.24 a newly registered
  key got ``attention_mask=None``, silently dropping the padding); with ``sdpa_mask`` the model
  passes the boolean ``[B, 1, Sq, Sk]`` mask (True = attend), or None where SDPA's ``is_causal``
  would do.

The mask is converted exactly, or refused: keys no query of the batch sees at the end are cut off
(a StaticCache's unfilled rows), and what is left must be ``key_mask[b, j]`` alone or
``key_mask[b, j] and j <= i + Sk - Sq`` (our bottom-right causal), compared entry by entry with
the given mask (once per mask: the layers of one forward share it). Anything else — a sliding
window, packed sequences, a custom 4-D mask with other values, a per-head mask — raises a
``ValueError`` that says so, never a silently different attention. A float mask is accepted
when it holds only 0 (attend) and −inf or the dtype's minimum (hidden). With ``attention_mask``
None, SDPA's rule applies: causal (top-left aligned, as ``is_causal=True``) when Sq > 1 and the
module is causal, else every key.

What runs, by case:

* prefill, training, DynamicCache or StaticCache with Sq > 1: ``pldr::g_attention`` on views of
  the model's tensors (``query.transpose(1, 2)`` is ``[B, Sq, H, d]`` with a contiguous last
  dim, which the op reads through its strides: no copy), left padding as ``key_mask``; its
  autograd formula gives the backward (``pldr::g_attention_backward``).
* a one-token step (Sq = 1) without grad (with or without a mask; generate passes none once no
  row is padded): ``pldr::g_attention_decode`` on the cache tensors the
  model passes (DynamicCache's concatenated ``[B, H_kv, S, d]``, StaticCache's
  ``[B, H_kv, Smax, d]``, as ``[B, S, H_kv, d]`` views), ``cache_seqlens`` = one past each row's
  last visible key and ``cache_start`` = its first (left padding), when every row's visible keys
  are one contiguous run; no append (the model's cache already holds the new token, so
  ``cache_seqlens`` counts it). Otherwise (holes in a row's keys, grad mode with q requiring
  grad) ``pldr::g_attention`` with ``key_mask``. Our own static KV layout ``[B, Smax, H, d]``
  with in-kernel append is not what transformers' caches hold, so the decode op never appends
  here.
* refused with an error naming the argument: dropout > 0, ``softcap``, attention sinks
  (``s_aux``), ``position_bias``, ``output_attentions`` (no weights are formed), head dims other
  than 64 and 128 (the kernels' own error).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["ATTENTION_NAME", "pldr_attention_forward", "register_pldr_attention",
           "mask_to_key_mask"]

ATTENTION_NAME = "pldr"

_UNSUPPORTED_KWARGS = {
    "softcap": "attention logit soft-capping",
    "s_aux": "attention sinks",
    "position_bias": "an additive position bias",
}


class _Conversion:
    """A mask converted for the kernels: attend to keys [:key_end], ``key_mask [B, key_end]``
    (None = all), ``causal`` bottom-right aligned; ``rows`` = per-row (start, end) int32 of the
    visible keys when each row's are one contiguous run and Sq = 1 (else None)."""

    __slots__ = ("key_end", "key_mask", "causal", "rows")

    def __init__(self, key_end, key_mask, causal, rows=None):
        self.key_end, self.key_mask, self.causal, self.rows = key_end, key_mask, causal, rows


def _refuse(why: str, mask: Tensor) -> ValueError:
    return ValueError(
        f"attn_implementation='pldr' cannot express this attention mask (shape "
        f"{list(mask.shape)}, dtype {mask.dtype}): {why}. pldr::g_attention takes a key padding "
        "mask [B, Sk] and a bottom-right causal mask only (docs/design.md §3.8); use "
        "attn_implementation='sdpa' for this model or input.")


def _as_bool(mask: Tensor) -> Tensor:
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise _refuse("an integer 4-D mask (expected bool, True = attend, or an additive float "
                      "mask)", mask)
    hidden = (mask == float("-inf")) | (mask == torch.finfo(mask.dtype).min)
    if not bool((hidden | (mask == 0)).all()):
        raise _refuse("an additive mask with values other than 0 and -inf / the dtype's minimum "
                      "(a bias, e.g. ALiBi)", mask)
    return ~hidden


def mask_to_key_mask(mask: Tensor, B: int, Sq: int, Sk: int) -> _Conversion:
    """The exact ``(key_end, key_mask, causal)`` of a 4-D attention mask ``[B | 1, 1 | H, Sq, Sk]``
    (bool True = attend, or additive float), or a ``ValueError`` if there is none."""
    if mask.dim() != 4 or mask.shape[-2:] != (Sq, Sk) or mask.shape[0] not in (1, B):
        raise _refuse(f"expected shape [B or 1, 1, Sq, Sk] = [{B}, 1, {Sq}, {Sk}]", mask)
    allowed = _as_bool(mask)
    if allowed.shape[1] != 1:
        if not bool((allowed == allowed[:, :1]).all()):
            raise _refuse("a mask that differs between heads", mask)
    m = allowed[:, 0].expand(B, Sq, Sk)
    seen = m.any(dim=1)  # [B, Sk]: keys some query of the row sees
    keys = torch.arange(Sk, device=m.device)
    key_end = int(torch.where(seen, keys + 1, 0).max()) if Sk else 0
    if key_end == 0:  # no query sees any key: every output row is 0
        return _Conversion(Sk, torch.zeros(B, Sk, dtype=torch.bool, device=m.device), False)
    m, seen = m[..., :key_end], seen[:, :key_end]
    key_mask = m[:, -1]  # the last query row sees every visible key under either form
    plain = key_mask[:, None, :].expand(B, Sq, key_end)
    causal = False
    if not torch.equal(m, plain):
        diag = torch.arange(Sq, device=m.device)[:, None] + (key_end - Sq)
        plain = plain & (keys[None, :key_end] <= diag)
        if not torch.equal(m, plain):
            raise _refuse("not a key padding mask, with or without a causal diagonal (a sliding "
                          "window, packed sequences or a custom pattern)", mask)
        causal = True
    rows = None
    if Sq == 1:
        first = torch.where(key_mask, keys[:key_end], key_end).amin(dim=1)
        last = torch.where(key_mask, keys[:key_end] + 1, 0).amax(dim=1)
        if bool((key_mask.sum(dim=1) == last - first).all()) and bool((last > 0).all()):
            rows = (first.to(torch.int32), last.to(torch.int32))
    return _Conversion(key_end, None if bool(key_mask.all()) else key_mask, causal, rows)


# The layers of one forward pass share one mask object: convert it once.
_last_conversion: tuple | None = None


def _converted(mask: Tensor, B: int, Sq: int, Sk: int) -> _Conversion:
    global _last_conversion
    key = (mask._version, B, Sq, Sk)
    if _last_conversion is not None and _last_conversion[0] is mask and _last_conversion[1] == key:
        return _last_conversion[2]
    conversion = mask_to_key_mask(mask, B, Sq, Sk)
    _last_conversion = (mask, key, conversion)
    return conversion


def _needs_grad(*tensors: Tensor) -> bool:
    # g_attention_decode has no backward (docs/design.md §3.5): only steps without grad take it
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def pldr_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                           attention_mask: Tensor | None, dropout: float = 0.0,
                           scaling: float | None = None, is_causal: bool | None = None,
                           **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-function signature: ``query [B, H, Sq, d]``, ``key, value
    [B, H_kv, Sk, d]`` → ``(out [B, Sq, H, d], None)``."""
    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation='pldr' does not support {what} ({name} was "
                             "given); use attn_implementation='eager' or 'sdpa'.")
    if kwargs.get("output_attentions", False):
        raise ValueError("attn_implementation='pldr' forms no attention weights "
                         "(output_attentions=True); use attn_implementation='eager'.")
    if dropout:
        raise ValueError(f"attn_implementation='pldr' has no attention dropout, got dropout = "
                         f"{dropout}; set the model's attention_dropout to 0 or use 'sdpa'.")
    B, H, Sq, d = query.shape
    Sk = key.shape[2]
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    scale = 1.0 / math.sqrt(d) if scaling is None else float(scaling)
    if attention_mask is None:
        # SDPA's rule: is_causal (top-left aligned) when Sq > 1 and the module is causal.
        causal = Sq > 1 and (is_causal if is_causal is not None
                             else getattr(module, "is_causal", True))
        if causal and Sq < Sk:
            k, v = k[:, :Sq], v[:, :Sq]  # top-left: keys past Sq are hidden from every query
        elif causal and Sq > Sk:
            raise ValueError(f"attn_implementation='pldr': a causal call without a mask and more "
                             f"queries ({Sq}) than keys ({Sk}) is top-left aligned in SDPA, which "
                             "pldr::g_attention (bottom-right) does not express; pass a mask.")
        if Sq == 1 and Sk > 0 and not _needs_grad(query, key, value):  # a step: every key
            lens = torch.full((B,), Sk, dtype=torch.int32, device=query.device)
            return torch.ops.pldr.g_attention_decode(q, k, v, lens, None, None, None, None,
                                                     scale, 0), None
        out, _ = torch.ops.pldr.g_attention(q, k, v, None, None, causal, scale)
        return out, None
    conv = _converted(attention_mask, B, Sq, Sk)
    if conv.rows is not None and not _needs_grad(query, key, value):
        first, last = conv.rows
        out = torch.ops.pldr.g_attention_decode(q, k, v, last, None, None, first, None, scale, 0)
        return out, None
    k, v = k[:, :conv.key_end], v[:, :conv.key_end]
    out, _ = torch.ops.pldr.g_attention(q, k, v, None, conv.key_mask, conv.causal, scale)
    return out, None


def register_pldr_attention() -> None:
    """Register ``"pldr"`` with transformers' ``AttentionInterface`` and its mask function with
    ``AttentionMaskInterface`` (idempotent). Needs ``transformers`` (``pldr-kernels[hf]``)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    import pldr_kernels  # noqa: F401  (loads the ops and their autograd)

    AttentionInterface.register(ATTENTION_NAME, pldr_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


register_pldr_attention()
