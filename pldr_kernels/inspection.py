"""The paper's claim, measured (arXiv 2502.13502, docs/spec.md §7): G_LM is (nearly) invariant to
the input, so caching it after the prompt (cache 'kvg') changes little.

:func:`deductive_outputs` gives a prompt's per-layer A, A_LM, A_P, G_LM (docs/spec.md §2 steps
7–12) from the caches a prefill writes (``generate(..., return_deductive=True)``); A_P =
A_LM ^ pwlst is recomputed from A_LM as in ``PlgaLayer.g_from_metric``. :func:`inspect_model`
adds, per layer and head, determinants (sign and log|det| in fp64: a 64×64 det over- or
underflows), Frobenius norms, the RMSE of G_LM between prompts and between cache 'none' (G from
the whole sequence) and 'kvg' (G of the prompt), and :func:`perplexity` scores a text
token by token in each cache mode.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

Tensor = torch.Tensor
DEDUCTIVE = ("A", "A_LM", "A_P", "G_LM")
PERPLEXITY_MODES = ("none", "kv", "kvg")


def deductive_outputs(model, ids: Sequence[int]) -> list[dict[str, Tensor | None]]:
    """Per layer ``{"A", "A_LM", "A_P", "G_LM"}``, each fp32 ``[H, dk, dk]``, of one prompt
    (``ids``, no padding). A predefined-G model has no power stage: its A_P is None."""
    input_ids = torch.tensor([list(ids)], dtype=torch.long, device=model.device)
    _, per_layer = model.generate(input_ids, 0, cache="kvg", return_deductive=True)
    out = []
    for layer, (A, A_LM, G) in zip(model.decoder.dec_layers, per_layer, strict=True):
        plga = getattr(layer.mha1, "plgatt_layer", None)
        A_P = None if plga is None else torch.pow(A_LM[0], plga.pwlst.detach().float())
        out.append({"A": A[0].float(), "A_LM": A_LM[0].float(), "A_P": A_P,
                    "G_LM": G[0].float()})
    return out


def final_G(model, ids: Sequence[int], new_tokens: int, cache: str) -> list[Tensor]:
    """Per layer the G_LM ``[H, dk, dk]`` in use after ``new_tokens`` greedy steps: with cache
    'none' recomputed from the whole sequence, with 'kvg' the prompt's."""
    input_ids = torch.tensor([list(ids)], dtype=torch.long, device=model.device)
    _, per_layer = model.generate(input_ids, new_tokens, cache=cache, eos_token_id=None,
                                  return_deductive=True)
    return [G[0].float() for _, _, G in per_layer]


def rmse(x: Tensor, y: Tensor) -> Tensor:
    """Root mean square of x - y over the last two axes (fp64)."""
    return (x.double() - y.double()).pow(2).mean(dim=(-2, -1)).sqrt()


def matrix_stats(X: Tensor) -> dict[str, list]:
    """Per head of ``X [H, d, d]``: determinant sign and log|det| (fp64 slogdet; -inf for a
    singular matrix) and the Frobenius norm."""
    sign, logabsdet = torch.linalg.slogdet(X.double().cpu())
    fro = torch.linalg.matrix_norm(X.double().cpu(), ord="fro")
    return {"sign": sign.tolist(), "logabsdet": logabsdet.tolist(), "fro": fro.tolist()}


def perplexity(model, ids: Sequence[int], mode: str, context: int = 1) -> float:
    """exp of the mean cross entropy of ``ids[context:]``, each token predicted from the ones
    before it as generation would: 'none' runs the whole prefix again for every token (G from the
    prefix), 'kv' decodes with the KV-cache and G recomputed from the A cached from
    ``ids[:context]``, 'kvg' with the G cached from ``ids[:context]``. So 'kv' and 'kvg' use the
    same (frozen) G, and a model whose G does not depend on the input scores alike in all three
    modes."""
    from .generation import DecodeState
    if mode not in PERPLEXITY_MODES:
        raise ValueError(f"mode must be one of {PERPLEXITY_MODES}, got {mode!r}")
    ids = list(ids)
    if not 1 <= context < len(ids):
        raise ValueError(f"context must be in [1, {len(ids)}) for a text of {len(ids)} tokens, "
                         f"got {context}")
    seq = torch.tensor([ids], dtype=torch.long, device=model.device)
    n = len(ids)
    nll = 0.0
    with torch.inference_mode():
        try:
            if mode == "none":
                model.setup_caches(1, None)
                for j in range(context, n):
                    logits = model.prefill(seq[:, :j])
                    nll -= torch.log_softmax(logits.double(), -1)[0, ids[j]].item()
            else:
                model.setup_caches(1, n)
                logits = model.prefill(seq[:, :context])
                state = DecodeState.after_prompt(None, 1, context, n, seq.device)
                for j in range(context, n):
                    nll -= torch.log_softmax(logits.double(), -1)[0, ids[j]].item()
                    if j == n - 1:
                        break
                    logits = model.decode_step(seq[:, j:j + 1], state.positions,
                                               state.cache_seqlens, None, mode == "kv")
                    state.advance()
        finally:
            model.clear_caches()
    return math.exp(nll / (n - context))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def inspect_model(model, tokenizer, prompts: Sequence[str], *, text: str | None = None,
                  new_tokens: int = 16, context: int = 1, max_text_tokens: int | None = None
                  ) -> dict:
    """Everything ``pldr-inspect`` reports, as a JSON-ready dict (see docs/design.md §2):

    - ``layers[l]["heads"][h][name]`` for name in A, A_LM, A_P, G_LM: per-prompt lists of
      ``sign``, ``logabsdet``, ``fro`` (A_P absent for a predefined-G model);
    - ``...["G_rmse_across_prompts"]``: the mean over prompt pairs of RMSE(G_i, G_j) (None with
      one prompt); ``...["G_rms"]``: the mean RMS of G itself, the scale to read it against;
    - ``...["G_rmse_none_vs_kvg"]``: per prompt, RMSE between G after ``new_tokens`` steps with
      cache 'none' and the prompt's G ('kvg');
    - ``perplexity``: ``{mode: value}`` of ``text`` for none, kv, kvg (None without a text).
    """
    if not prompts:
        raise ValueError("prompts must hold at least one prompt, got none")
    tokenizer.check_fits(model.config)
    max_positions = model.config.max_position_embeddings
    encoded = [tokenizer.encode(p) for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"prompt {i} ({prompts[i]!r}) encodes to no tokens")
        if len(ids) + new_tokens > max_positions:
            raise ValueError(f"prompt {i} has {len(ids)} tokens: with new_tokens={new_tokens} "
                             f"it passes the model's context of max_position_embeddings="
                             f"{max_positions}")
    per_prompt = [deductive_outputs(model, ids) for ids in encoded]
    G_none = [final_G(model, ids, new_tokens, "none") for ids in encoded]
    config = model.config
    layers = []
    for layer in range(config.num_hidden_layers):
        stats = {name: [None if p[layer][name] is None else matrix_stats(p[layer][name])
                        for p in per_prompt] for name in DEDUCTIVE}
        Gs = [p[layer]["G_LM"] for p in per_prompt]
        pairs = list(itertools.combinations(range(len(Gs)), 2))
        across = (torch.stack([rmse(Gs[i], Gs[j]) for i, j in pairs]).mean(0).tolist()
                  if pairs else None)
        G_rms = torch.stack([G.double().pow(2).mean(dim=(-2, -1)).sqrt() for G in Gs]
                            ).mean(0).tolist()
        none_vs_kvg = torch.stack([rmse(G_none[i][layer], Gs[i])
                                   for i in range(len(Gs))]).tolist()  # [prompt][head]
        heads = []
        for h in range(config.num_attention_heads):
            head: dict = {"head": h}
            for name in DEDUCTIVE:
                if stats[name][0] is None:
                    continue
                head[name] = {key: [s[key][h] for s in stats[name]]
                              for key in ("sign", "logabsdet", "fro")}
            head["G_rms"] = G_rms[h]
            head["G_rmse_across_prompts"] = None if across is None else across[h]
            head["G_rmse_none_vs_kvg"] = [row[h] for row in none_vs_kvg]
            heads.append(head)
        layers.append({"layer": layer, "heads": heads})
    result = {"prompts": list(prompts), "prompt_tokens": [len(e) for e in encoded],
              "new_tokens": new_tokens, "layers": layers, "perplexity": None,
              "text_tokens": None, "perplexity_context": None}
    if text is not None:
        ids = tokenizer.encode(text)
        ids = ids[:min(max_text_tokens or max_positions, max_positions)]
        if len(ids) <= context:
            raise ValueError(f"the text has {len(ids)} tokens; perplexity needs more than the "
                             f"context of {context}")
        result["perplexity"] = {mode: perplexity(model, ids, mode, context)
                                for mode in PERPLEXITY_MODES}
        result["text_tokens"] = len(ids)
        result["perplexity_context"] = context
    return result


def format_table(result: dict) -> str:
    """The terminal report: one row per layer and head; determinants as mean log|det| over the
    prompts (± their spread) with the sign (+, - or ± when the prompts disagree)."""
    def det(entry) -> str:
        if entry is None:
            return "-"
        signs = set(entry["sign"])
        sign = "+" if signs == {1.0} else "-" if signs == {-1.0} else "0" if signs == {0.0} else "±"
        logs = entry["logabsdet"]
        spread = max(logs) - min(logs)
        return f"{sign}{_mean(logs):9.3f}±{spread:.1e}"

    def num(x) -> str:
        return "-" if x is None else f"{x:.3e}"

    names = [n for n in DEDUCTIVE if n in result["layers"][0]["heads"][0]]
    header = (["layer", "head"] + [f"logdet {n}" for n in names] + [f"|{n}|_F" for n in names]
              + ["G rms", "G rmse prompts", "G rmse none/kvg"])
    rows = []
    for layer in result["layers"]:
        for head in layer["heads"]:
            rows.append([str(layer["layer"]), str(head["head"])]
                        + [det(head[n]) for n in names]
                        + [f"{_mean(head[n]['fro']):.3e}" for n in names]
                        + [num(head["G_rms"]), num(head["G_rmse_across_prompts"]),
                           num(_mean(head["G_rmse_none_vs_kvg"]))])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True))
             for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"{len(result['prompts'])} prompt(s); G rmse none/kvg after "
                 f"{result['new_tokens']} greedy tokens; logdet: mean over prompts ± (max - min)")
    if result["perplexity"]:
        ppl = ", ".join(f"{m} {v:.4f}" for m, v in result["perplexity"].items())
        lines.append(f"perplexity of the text ({result['text_tokens']} tokens, the first "
                     f"{result['perplexity_context']} as context): {ppl}")
    return "\n".join(lines)


def plot(result: dict, G: Tensor, layer: int, head: int, path: str) -> None:
    """PNG: a heat map of ``G`` (layer ``layer``, head ``head``, the first prompt) beside the
    RMSE of G across prompts per layer (each head a dot, the mean a line) and none/kvg."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import _io
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    bound = float(G.abs().max()) or 1.0  # a symmetric scale: white is 0
    image = left.imshow(G.double().cpu().numpy(), cmap="RdBu_r", vmin=-bound, vmax=bound)
    fig.colorbar(image, ax=left)
    left.set_title(f"G_LM, layer {layer} head {head} (prompt 0)")
    layers = [entry["layer"] for entry in result["layers"]]
    for key, label in (("G_rmse_across_prompts", "across prompts"),
                       ("G_rmse_none_vs_kvg", "cache none vs kvg")):
        values = []
        for entry in result["layers"]:
            heads = [h[key] if not isinstance(h[key], list) else _mean(h[key])
                     for h in entry["heads"] if h[key] is not None]
            values.append(heads)
        if not all(values):
            continue
        means = [_mean(v) for v in values]
        line, = right.plot(layers, means, marker="o", label=label)
        for x, v in zip(layers, values, strict=True):
            right.scatter([x] * len(v), v, s=8, color=line.get_color(), alpha=0.4)
    right.set_xlabel("layer")
    right.set_ylabel("RMSE of G_LM")
    right.set_xticks(layers)
    right.set_title("G-RMSE per layer (dots: heads)")
    right.legend()
    fig.tight_layout()
    try:
        _io.atomic_write(path, lambda temp: fig.savefig(temp, dpi=100))
    finally:
        plt.close(fig)
