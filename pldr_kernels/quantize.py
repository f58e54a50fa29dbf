"""Weight-only int8 quantisation of a PLDRForCausalLM (docs/design.md §3.9).

:func:`quantize_int8` (``PLDRForCausalLM.quantize_weights("int8")``) replaces the decoder's
projections (wq, wk, wv, dense), the SwiGLU FFN (gluw1, gluw2, gluw3) and the LM head by
:class:`Int8Linear`: int8 weights with one fp32 scale per output channel (symmetric,
``scale = max|row| / 127``, round to nearest), biases kept fp32. What is never quantised: the G
path (the metric learner, its A/A_LM/G), the LayerNorms, the embedding, and an LM head tied to the
embedding. Activations stay in the model's dtype (fp32 or bf16) and every product is accumulated in
fp32: ``pldr::linear_small`` for a few rows, the weights dequantised to the activation dtype for
more (prefill).

The quantised model saves and loads with ``save_pretrained`` / ``from_pretrained``: the int8
weights and their ``weight_scale`` in model.safetensors, and ``"quantization": "int8"`` in
config.json (loaders.py).
"""
from __future__ import annotations

import torch
from torch import nn

from .nn import GCachedAttention, PackedModule, ParameterPack, SwiGLU, linear_rows

Tensor = torch.Tensor
QUANTIZATIONS = ("int8",)
INT8_MAX = 127


class Int8Linear(PackedModule):
    """A weight-only int8 linear: ``weight`` int8 ``[out, in]``, ``weight_scale`` fp32 ``[out]``,
    ``bias`` fp32 ``[out]`` or None (buffers: inference only). ``y = x·(weight·scale)ᵀ + bias``
    in x's dtype. The scale and bias stay fp32 under ``.to(bfloat16)`` (PackedModule's rule)."""

    fp32_own = True

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8,
                                                   device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach().float()
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, w.device)
        weight, scale = quantize_rows(w)
        q.weight.copy_(weight)
        q.weight_scale.copy_(scale)
        if linear.bias is not None:
            q.bias.copy_(linear.bias.detach().float())
        return q

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return (self.weight.float() * self.weight_scale[:, None]).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        return linear_rows(x, self.weight, self.bias, self.weight_scale)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, int8 per-channel")


def quantize_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 ``w [N, K]`` → (int8 ``[N, K]``, fp32 scale ``[N]``): symmetric per output row,
    ``scale = max|row| / 127`` (1 for an all-zero row), rounded to nearest (ties to even)."""
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def _replace(parent: nn.Module, name: str) -> None:
    linear = getattr(parent, name)
    if isinstance(linear, nn.Linear):
        setattr(parent, name, Int8Linear.from_linear(linear))


def _add_scale_pack(module: PackedModule, pack: str, children: tuple[str, ...]) -> None:
    module.packs[pack] = ParameterPack(module, [f"{c}.weight_scale" for c in children],
                                       (sum(getattr(module, c).out_features for c in children),))


def convert_to_int8(model: nn.Module) -> None:
    """The modules of :func:`quantize_int8` replaced by zero :class:`Int8Linear` ones of the same
    shapes (for a load to fill: loaders.py), packs re-made over them."""
    _swap(model, lambda linear: Int8Linear(linear.in_features, linear.out_features,
                                           linear.bias is not None, linear.weight.device))


def quantize_int8(model: nn.Module) -> nn.Module:
    """Quantise ``model`` (a PLDRForCausalLM) in place, as the module docstring says; returns it."""
    if quantization_of(model) == "int8":
        return model  # already int8: quantising int8 values again would change nothing
    _swap(model, Int8Linear.from_linear)
    return model


def _swap(model: nn.Module, make) -> None:
    with torch.no_grad():
        for layer in model.decoder.dec_layers:
            attention: GCachedAttention = layer.mha1
            for name in ("wq", "wk", "wv", "dense"):
                setattr(attention, name, make(getattr(attention, name)))
            _add_scale_pack(attention, "qkv_scale", ("wq", "wk", "wv"))
            ffn: SwiGLU = layer.ffn
            for name in ("gluw1", "gluw2", "gluw3"):
                setattr(ffn, name, make(getattr(ffn, name)))
            _add_scale_pack(ffn, "s12", ("gluw1", "gluw2"))
            for module in (attention, ffn):
                for pack in module.packs.values():
                    if all(path[0] in QUANTIZED_PACKED for path in pack.paths):
                        pack.repack()  # the metric learner's packs are left alone
        head = model.final_layer
        if head.weight is not model.decoder.embedding.weight:  # a tied head stays as it is
            model.final_layer = make(head)


QUANTIZED_PACKED = ("wq", "wk", "wv", "gluw1", "gluw2")  # the linears inside packs


def quantization_of(model: nn.Module) -> str | None:
    """'int8' for a model :func:`quantize_int8` (or a load of its save) made, else None."""
    return "int8" if any(isinstance(m, Int8Linear) for m in model.modules()) else None
