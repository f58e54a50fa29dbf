"""PldrCache: a ``transformers.Cache`` holding PLDRForCausalLM's own caches for HF ``generate``.

Per decoder layer it holds that layer's :class:`~pldr_kernels.nn.KVCache` (the static
``k, v [B, Smax, H, d]`` and the metric tensors ``A, A_LM, G [rows, H, d, d]``, rows = B: one G
**per sequence**, or 1 with ``cache_first_G``), and for the batch the
:class:`~pldr_kernels.generation.DecodeState` (positions, rows written, first real row of each
left-padded row). The caches belong to this object, not to the model: the model attaches them to
its attention layers for the duration of one forward (docs/design.md §2.1), so two generations on
one model do not share a G, unlike the HF port's model buffer (docs/spec.md §3.2).

Beam search and the batch-changing strategies move the G rows with the KV rows:
:meth:`PldrCache.reorder_cache` (in place, the tensors keep their addresses),
:meth:`PldrCache.batch_select_indices` and :meth:`PldrCache.batch_repeat_interleave`.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..generation import DecodeState
from ..nn import KVCache
from .configuration import HF_CACHE_MODES

Tensor = torch.Tensor
CACHED_MODES = ("kv", "kvg")


class PldrCacheLayer(CacheLayerMixin):
    """One decoder layer's entry: its :class:`KVCache` once the prompt has been run (``kv``).
    The k/v are written by the ops themselves (the append of ``pldr::g_attention_decode``), so
    the HF ``update`` protocol is not used."""

    is_compileable = False
    supports_early_init = False

    def __init__(self, owner: PldrCache):
        super().__init__()
        self.owner = owner
        self.kv: KVCache | None = None

    def lazy_initialization(self, key_states, value_states) -> None:
        raise NotImplementedError("a PldrCache is filled by PldrllmForCausalLM's prefill")

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError("a PldrCache is written by the pldr ops inside "
                                  "PldrllmForCausalLM, not through Cache.update")

    def get_seq_length(self) -> int:
        return self.owner.get_seq_length()

    def get_max_length(self) -> int:
        return self.owner.max_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.get_seq_length() + query_length, 0


class PldrCache(Cache):
    """The KV- and G-caches of one generation with PldrllmForCausalLM.

    ``mode``: 'kvg' (G from the prompt, reused) or 'kv' (A from the prompt, G recomputed from it
    each step); ``max_length``: rows of the static KV-cache (prompt + new tokens). The tensors are
    allocated by the first forward (the prompt), for its batch size."""

    def __init__(self, num_layers: int, max_length: int, mode: str = "kvg"):
        if mode not in CACHED_MODES:
            raise ValueError(f"a PldrCache holds the cache modes {CACHED_MODES}; got mode={mode!r}"
                             f" (mode 'none' runs without a cache; modes: {HF_CACHE_MODES})")
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be an int >= 1 (rows of the static KV-cache), got "
                             f"{max_length!r}")
        super().__init__(layers=[PldrCacheLayer(self) for _ in range(num_layers)])
        self.mode = mode
        self.max_length = max_length
        self.state: DecodeState | None = None

    # ---- what the model reads and writes -------------------------------------------------------
    @property
    def kv_caches(self) -> list[KVCache | None]:
        return [layer.kv for layer in self.layers]

    def store(self, kv_caches: list[KVCache], state: DecodeState) -> None:
        """Take the caches a prefill filled, and where the batch stands after it."""
        for layer, kv in zip(self.layers, kv_caches, strict=True):
            layer.kv = kv
            layer.is_initialized = True
        self.state = state

    # ---- the Cache protocol --------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.state is None else self.state.length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    @property
    def batch_size(self) -> int:
        return -1 if self.state is None else self.state.cache_seqlens.shape[0]

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.state is not None

    def reset(self) -> None:
        """Forget the prompt: the next forward is a prefill again."""
        for layer in self.layers:
            layer.kv, layer.is_initialized = None, False
        self.state = None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("a PldrCache cannot be cropped (the G-cache is the "
                                      "prompt's; assisted decoding is not supported)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i takes row ``beam_idx[i]``'s k/v, metric tensors and decode state,
        in place (the tensors keep their addresses)."""
        self._select(beam_idx.to(self._device()), in_place=True)

    def batch_select_indices(self, indices: Tensor) -> None:
        self._select(indices.to(self._device()), in_place=False)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is None:
            return
        B = self.batch_size
        index = torch.arange(B, device=self._device()).repeat_interleave(repeats)
        self._select(index, in_place=False)

    # ---- helpers -------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        return self.state.cache_seqlens.device if self.state is not None else torch.device("cpu")

    def _select(self, index: Tensor, in_place: bool) -> None:
        """Rows ``index`` of every per-row tensor: k, v, the metric tensors that have a row per
        sequence (a shared G has one row and stays), the decode state."""
        if self.state is None:
            return
        B = self.batch_size

        def take(t: Tensor | None) -> Tensor | None:
            if t is None or t.shape[0] != B:
                return t  # no KV part, or one G shared by the batch
            picked = t.index_select(0, index)
            return t.copy_(picked) if in_place else picked

        for kv in self.kv_caches:
            kv.k, kv.v = take(kv.k), take(kv.v)
            kv.A, kv.A_LM, kv.G = take(kv.A), take(kv.A_LM), take(kv.G)
        s = self.state
        s.positions, s.cache_seqlens = take(s.positions), take(s.cache_seqlens)
        s.cache_start = take(s.cache_start)
