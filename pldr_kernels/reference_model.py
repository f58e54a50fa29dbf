"""Pure-PyTorch PLDR-LLM v510 structured like the authors' code: the oracle of the model tests and
the "reference" contestant of the benchmarks.

Module tree and names follow ``pldr_model_v510.py`` (and the HF port), so the state-dict keys are
those of docs/spec.md §4 and the same checkpoint loads here and into :class:`PLDRForCausalLM`.
Math as the authors write it: ``F.linear`` projections, torchtune-style RoPE
(``reference.apply_rope``), the metric learner as a stack of modules per layer, matmul/softmax
attention with an additive ``-1e9`` mask, a KV-cache ``[k, v, A]`` grown by concatenation and a
G-cache list ``[A_LM, G]``. The building blocks it shares with PLDRForCausalLM live in
``layers.py``, the generation options and token choice in ``sampling.py``.

Batching additions the authors' single-sequence code does not need: RoPE positions and the key
padding mask come from ``attention_mask`` (left padding), and by default pad rows are left out of
QᵀQ (``include_pad_in_g=True`` keeps them, as the HF port does). Runs in the dtype of its weights:
fp32 as a benchmark contestant, fp64 as a test oracle.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import reference
from .config import PLDRConfig
from .layers import (
    CausalLMOutput,
    GLUVariant,
    PlgaLayer,
    ResLayerA,
    attach_lm_head,
    causal_lm_loss,
    positions_from_mask,
    predefined_g_values,
)
from .sampling import GenerationOptions, TokenPicker

Tensor = torch.Tensor
MASK_PENALTY = -1e9


def plga_attention(q: Tensor, k: Tensor, v: Tensor, G: Tensor, mask: Tensor | None) -> Tensor:
    """Steps 13–14 as the authors write them, on ``[B,H,S,dk]``:
    softmax((q·G)·kᵀ/√dk + mask·-1e9)·v.

    Batching addition: a query row with every key blocked (a left-pad row) outputs 0, the op
    contract (docs/design.md §3.2); the authors' batch-1 decoding never has such rows."""
    dk = q.shape[-1]
    scores = torch.matmul(torch.matmul(q, G.to(q.dtype)), k.transpose(-1, -2)) / math.sqrt(dk)
    if mask is None:
        return torch.matmul(F.softmax(scores, dim=-1), v)
    scores = scores + mask.to(scores.dtype) * MASK_PENALTY
    out = torch.matmul(F.softmax(scores, dim=-1), v)
    all_blocked = (mask >= 1).all(dim=-1, keepdim=True)
    return out.masked_fill(all_blocked, 0.0) if bool(all_blocked.any()) else out


class PlgMultiHeadAttention(nn.Module):
    """``mha1``: projections, RoPE, metric learner (steps 6–8) and PLGA."""

    def __init__(self, config: PLDRConfig):
        super().__init__()
        D, H, dk = config.hidden_size, config.num_attention_heads, config.head_dim
        self.config = config
        self.num_heads, self.depth = H, dk
        self.wq = nn.Linear(D, D, bias=config.attention_bias)
        self.wk = nn.Linear(D, D, bias=config.attention_bias)
        self.wv = nn.Linear(D, D, bias=config.attention_bias)
        self.dense = nn.Linear(D, D, bias=config.attention_bias)
        if config.has_metric_learner:
            self.plgatt_layer = PlgaLayer(dk, H)
            self.reslayerAs = nn.ModuleList([
                ResLayerA(dk, config.A_dff, config.num_denseA, config.layer_norm_eps,
                          config.glu_bias) for _ in range(config.num_reslayerA)])
            self.layernorm1 = nn.LayerNorm(dk, eps=config.layer_norm_eps)

    def rope(self, x: Tensor, positions: Tensor) -> Tensor:
        return reference.apply_rope(x, positions, interleaved=self.config.reference_rope,
                                    theta=self.config.rope_theta)

    def metric_tensor(self, q: Tensor, q_mask: Tensor | None) -> Tensor:
        """Steps 6–8 on post-RoPE ``q [B,H,S,dk]``: A = LN(qᵀq), then the residual metric
        learner."""
        if q_mask is not None:
            q = q * q_mask[:, None, :, None].to(q.dtype)
        A = self.layernorm1(torch.matmul(q.transpose(-1, -2), q))
        for res in self.reslayerAs:
            A = res(A)
        return A

    def forward(self, x: Tensor, positions: Tensor, mask: Tensor | None,
                kvcache: list | None = None, Gcache: list | None = None,
                q_mask: Tensor | None = None):
        """Returns ``(output, [A, A_LM, G], kvcache=[k, v, A])``; k/v in ``[B,S,H,dk]``."""
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, self.num_heads, self.depth)
        k = self.wk(x).view(B, S, self.num_heads, self.depth)
        v = self.wv(x).view(B, S, self.num_heads, self.depth)
        q, k = self.rope(q, positions), self.rope(k, positions)
        qh = q.permute(0, 2, 1, 3)
        if kvcache is None:
            A = self.metric_tensor(qh, q_mask) if self.config.has_metric_learner else None
        else:
            k = torch.cat([kvcache[0], k], dim=1)
            v = torch.cat([kvcache[1], v], dim=1)
            A = kvcache[2]
        kvcache = [k, v, A]
        if Gcache is None:
            A_LM, G = self.plgatt_layer.g_from_metric(A)
        else:
            A_LM, G = Gcache
        out = plga_attention(qh, k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3), G, mask)
        out = out.permute(0, 2, 1, 3).reshape(B, S, self.num_heads * self.depth)
        return self.dense(out), [A, A_LM, G], kvcache


class PLDRDecoderLayer(nn.Module):
    def __init__(self, config: PLDRConfig):
        super().__init__()
        self.mha1 = PlgMultiHeadAttention(config)
        self.ffn = GLUVariant(config.hidden_size, config.intermediate_size, config.hidden_size,
                              config.glu_bias)
        self.layernorm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layernorm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x, positions, mask, kvcache=None, Gcache=None, q_mask=None):
        attn, deductive, kvcache = self.mha1(x, positions, mask, kvcache, Gcache, q_mask)
        out1 = self.layernorm1(attn + x)
        out2 = self.layernorm2(self.ffn(out1) + out1)
        return out2, deductive, kvcache


class PLDRDecoder(nn.Module):
    def __init__(self, config: PLDRConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dec_layers = nn.ModuleList([PLDRDecoderLayer(config)
                                         for _ in range(config.num_hidden_layers)])
        self.layernorm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if not config.has_metric_learner:
            # HF port: persistent buffers, saved with the checkpoint (docs/spec.md §3.2).
            self.register_buffer("past_G_values", predefined_g_values(config))
            self.register_buffer("past_G_values_status",
                                 torch.ones(config.num_hidden_layers, dtype=torch.bool))

    def forward(self, ids, positions, mask, kvcachelst, Gcachelst, q_mask=None):
        x = self.embedding(ids) * self.config.embedding_scale
        x = self.layernorm1(x)
        deductive, new_kv = [], []
        for layer, kvcache, Gcache in zip(self.dec_layers, kvcachelst, Gcachelst):
            x, ded, kv = layer(x, positions, mask, kvcache, Gcache, q_mask)
            deductive.append(ded)
            new_kv.append(kv)
        return x, deductive, new_kv


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
class ReferencePLDR(nn.Module):
    """The authors' PLDR_Model (decoder + biased LM head) with a batched generate loop."""

    def __init__(self, config: PLDRConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.decoder = PLDRDecoder(config)
        attach_lm_head(self, config)

    @classmethod
    def from_model(cls, model: nn.Module, dtype: torch.dtype | None = None) -> ReferencePLDR:
        """A reference model with the weights of ``model`` (e.g. a PLDRForCausalLM) in ``dtype``."""
        ref = cls(model.config)
        ref.load_state_dict(model.state_dict())
        ref.to(device=next(model.parameters()).device)
        return ref.to(dtype) if dtype is not None else ref

    # ----------------------------------------------------------------------------------------
    def predefined_gcache(self) -> list[list] | None:
        if self.config.has_metric_learner:
            return None
        dtype = self.final_layer.weight.dtype
        return [[g[1].to(dtype), g[2].to(dtype)] for g in self.decoder.past_G_values]

    def step(self, ids: Tensor, positions: Tensor, mask: Tensor | None,
             kvcachelst: list | None = None, Gcachelst: list | None = None,
             q_mask: Tensor | None = None):
        """One call of the authors' ``PLDR_Model.forward``: ``(logits, deductive, kvcachelst)``.

        ``mask`` is 1 where blocked (look-ahead ∪ key padding), broadcastable to [B,1,Sq,Sk]."""
        L = self.config.num_hidden_layers
        kvcachelst = kvcachelst if kvcachelst is not None else [None] * L
        if Gcachelst is None:
            Gcachelst = self.predefined_gcache() or [None] * L
        x, deductive, kvcachelst = self.decoder(ids, positions, mask, kvcachelst, Gcachelst,
                                                q_mask)
        return self.final_layer(x), deductive, kvcachelst

    def prefill_mask(self, attention_mask: Tensor | None, S: int, device) -> Tensor:
        blocked = torch.triu(torch.ones(S, S, device=device), diagonal=1)[None, None]
        if attention_mask is not None:
            blocked = torch.maximum(blocked, 1.0 - attention_mask.float()[:, None, None, :])
        return blocked

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                include_pad_in_g: bool = False, labels: Tensor | None = None) -> CausalLMOutput:
        """Full uncached forward: ``.logits [B, S, V]`` and, with ``labels``, ``.loss`` (as
        PLDRForCausalLM)."""
        B, S = input_ids.shape
        positions = positions_from_mask(attention_mask, B, S, input_ids.device)
        q_mask = None if (attention_mask is None or include_pad_in_g) else attention_mask.bool()
        mask = self.prefill_mask(attention_mask, S, input_ids.device)
        logits = self.step(input_ids, positions, mask, q_mask=q_mask)[0]
        loss = None if labels is None else causal_lm_loss(logits, labels)
        return CausalLMOutput(logits=logits, loss=loss)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int | None = None, *,
                 attention_mask: Tensor | None = None, return_deductive: bool = False,
                 options: GenerationOptions | None = None, **fields):
        """Greedy or sampled generation; ``[B, S + new]`` token ids (+ per-layer (A, A_LM, G)).
        Arguments as ``PLDRForCausalLM.generate`` (the same :class:`GenerationOptions`); this model
        grows its caches by concatenation, so ``max_length`` is not needed, and it has no
        CUDA-graph path.

        Cache modes (docs/spec.md §3.1 matrix): 'none' re-runs the whole sequence and recomputes
        G; 'g' re-runs it with G frozen from the prompt; 'kv' caches k, v and A and recomputes G
        from A; 'kvg' caches k, v, A and G."""
        o = GenerationOptions.of(options, max_new_tokens, **fields)
        o.check(input_ids, attention_mask, self.config.vocab_size)
        if o.cuda_graph:
            raise ValueError("cuda_graph=True: ReferencePLDR has no CUDA-graph decode path "
                             "(PLDRForCausalLM has)")
        device = input_ids.device
        B, S = input_ids.shape
        ids = input_ids.long()
        mask = (torch.ones_like(ids) if attention_mask is None else attention_mask.long())
        padded = attention_mask is not None and bool((mask == 0).any())
        pick = TokenPicker(o, self.config, B, device)

        def full_forward(Gcachelst):
            q_mask = mask.bool() if padded and not o.include_pad_in_g else None
            positions = positions_from_mask(mask if padded else None, B, ids.shape[1], device)
            blocked = self.prefill_mask(mask if padded else None, ids.shape[1], device)
            return self.step(ids, positions, blocked, None, Gcachelst, q_mask)

        logits, deductive, kvcachelst = full_forward(None)
        Gcachelst = [[d[1], d[2]] for d in deductive] if o.cache in ("g", "kvg") else None
        for step in range(o.max_new_tokens):
            nxt = pick(logits[:, -1])
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if step == o.max_new_tokens - 1 or pick.all_finished():
                break
            if o.cache in ("none", "g"):
                logits, deductive, _ = full_forward(Gcachelst if o.cache == "g" else None)
            else:
                positions = mask[:, :-1].sum(dim=1, keepdim=True)  # real tokens before the new one
                key_mask = (1.0 - mask.float())[:, None, None, :] if padded else None
                logits, deductive, kvcachelst = self.step(nxt[:, None], positions, key_mask,
                                                          kvcachelst, Gcachelst)
        if return_deductive:
            if not self.config.has_metric_learner:  # A of a predefined-G model lives in the buffer
                deductive = [[g[0], d[1], d[2]] for g, d in zip(self.decoder.past_G_values,
                                                                 deductive)]
            return ids, [(d[0], d[1], d[2]) for d in deductive]
        return ids
