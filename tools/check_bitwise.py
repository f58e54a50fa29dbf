"""Bitwise-identity check for refactors: every op output, logit and generated token of a fixed set
of cases, saved from one tree and compared with another.

    python tools/check_bitwise.py save before.pt     # on the old tree (PYTHONPATH=old checkout)
    python tools/check_bitwise.py save after.pt      # on the new tree
    python tools/check_bitwise.py compare before.pt after.pt

Only public entry points are used (ops, PLDRForCausalLM, ReferencePLDR, the nn modules), with small
adapters where the refactor may add to an API (``model(...)`` returning an object with ``.logits``),
so the same file runs on both trees. Comparison is ``torch.equal`` (NaN-aware) on every tensor; any
difference is listed and the exit status is 1.
"""
from __future__ import annotations

import math
import sys
import warnings

import torch

import pldr_kernels
from pldr_kernels import PLDRConfig, PLDRForCausalLM
from pldr_kernels import nn as pnn
from pldr_kernels._io import atomic_write
from pldr_kernels.reference_model import ReferencePLDR

ops = torch.ops.pldr
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Generation without early stopping, said explicitly (a refactor may default eos_token_id to the
# config's; an explicit None means "no EOS" in both trees).
NO_EOS = {"eos_token_id": None}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, dtype, seed):
    return torch.randn(shape, generator=gen(seed)).to(dtype)


def random_g(B, H, d, seed):
    noise = torch.randn(B, H, d, d, generator=gen(seed))
    return (torch.eye(d) + 0.3 * noise / math.sqrt(d)).float()


def metric_weights(d, H, R=2, Gd=2, F=170, seed=0):
    g = gen(seed)

    def u(shape, bound):
        return (torch.rand(shape, generator=g) * 2 - 1) * bound

    xi, xs = math.sqrt(6.0 / (d + F)), math.sqrt(6.0 / (2 * d))
    return [1 + 0.1 * u((d,), 1), 0.1 * u((d,), 1),
            u((R, Gd, F, d), xi), 0.05 * u((R, Gd, F), 1), u((R, Gd, F, d), xi),
            0.05 * u((R, Gd, F), 1), u((R, Gd, d, F), xi), 0.05 * u((R, Gd, d), 1),
            1 + 0.1 * u((R, d), 1), 0.1 * u((R, d), 1), u((H, d, d), xs), 0.1 * u((H, d, d), 1),
            u((H, d, d), 1.0), u((H, d, d), xs), 0.1 * u((H, d, d), 1)]


def logits_of(out):
    return getattr(out, "logits", out)


# --------------------------------------------------------------------------------------------
def op_cases(res: dict) -> None:
    seed = 100
    for dtype in DTYPES:
        for (B, Sq, Sk, H, d) in [(1, 1, 1, 2, 64), (2, 7, 97, 2, 64), (1, 130, 65, 3, 64),
                                  (2, 97, 97, 2, 128), (1, 300, 300, 2, 64)]:
            for g_mode in ("none", "batch", "shared"):
                for causal in (False, True):
                    seed += 1
                    q = randn((B, Sq, H, d), dtype, seed)
                    k = randn((B, Sk, H, d), dtype, seed + 1000)
                    v = randn((B, Sk, H, d), dtype, seed + 2000)
                    G = {"none": None, "batch": random_g(B, H, d, seed),
                         "shared": random_g(1, H, d, seed)}[g_mode]
                    key = f"g_attention/{dtype}/B{B}Sq{Sq}Sk{Sk}H{H}d{d}/{g_mode}/c{int(causal)}"
                    out, lse = ops.g_attention(q, k, v, G, None, causal, None)
                    res[key + "/out"], res[key + "/lse"] = out, lse
        # key mask with holes, strided q/k/v out of a fused tensor, explicit scale
        qkv = randn((2, 77, 3, 2, 64), dtype, 7)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        km = torch.rand(2, 77, generator=gen(8)) > 0.4
        km[0, :50] = False
        out, lse = ops.g_attention(q, k, v, random_g(2, 2, 64, 9), km, True, 0.3)
        res[f"g_attention/{dtype}/strided_mask_scale/out"] = out
        res[f"g_attention/{dtype}/strided_mask_scale/lse"] = lse

    for dtype in DTYPES:
        for (B, Sn, Smax, H, d, lens, starts, g_mode, splits) in [
                (1, 1, 64, 2, 64, [10], None, "batch", 0),
                (2, 1, 300, 2, 64, [250, 17], [0, 5], "shared", 0),
                (2, 3, 200, 2, 128, [100, 40], None, "batch", 0),
                (1, 1, 5000, 2, 64, [4500], None, "none", 0),
                (1, 1, 5000, 2, 64, [4500], None, "batch", 3),
                (3, 1, 600, 2, 64, [599, 300, 1], [0, 100, 0], "batch", 1)]:
            seed += 1
            q = randn((B, Sn, H, d), dtype, seed)
            kc = randn((B, Smax, H, d), dtype, seed + 1)
            vc = randn((B, Smax, H, d), dtype, seed + 2)
            append = not (Sn == 1 and lens[0] == 4500 and splits == 0)
            kn = randn((B, Sn, H, d), dtype, seed + 3) if append else None
            vn = randn((B, Sn, H, d), dtype, seed + 4) if append else None
            G = {"none": None, "batch": random_g(B, H, d, seed),
                 "shared": random_g(1, H, d, seed)}[g_mode]
            cs = torch.tensor(lens, dtype=torch.int32)
            st = None if starts is None else torch.tensor(starts, dtype=torch.int32)
            out = ops.g_attention_decode(q, kc, vc, cs, kn, vn, st, G, None, splits)
            key = f"decode/{dtype}/B{B}Sn{Sn}Smax{Smax}d{d}/{g_mode}/s{splits}"
            res[key + "/out"], res[key + "/k_cache"], res[key + "/v_cache"] = out, kc, vc

    for dtype in (torch.float32, torch.bfloat16):
        for (B, S, H, d, masked) in [(1, 1, 2, 64, False), (2, 33, 3, 64, True),
                                     (1, 200, 2, 128, False), (2, 70, 14, 64, False)]:
            seed += 1
            q = randn((B, S, H, d), dtype, seed)
            qm = (torch.rand(B, S, generator=gen(seed)) > 0.3) if masked else None
            if qm is not None:
                qm[:, 0] = True
            A, A_LM, G = ops.metric_tensors(q, qm, *metric_weights(d, H, seed=seed), 1e-6, 1e-9)
            key = f"metric/{dtype}/B{B}S{S}H{H}d{d}/m{int(masked)}"
            res[key + "/A"], res[key + "/A_LM"], res[key + "/G"] = A, A_LM, G


# --------------------------------------------------------------------------------------------
def tiny_config(**overrides) -> PLDRConfig:
    fields = dict(vocab_size=256, hidden_size=128, intermediate_size=341, num_hidden_layers=2,
                  num_attention_heads=2, head_dim=64, A_dff=170, num_reslayerA=2, num_denseA=2,
                  max_position_embeddings=128)
    fields.update(overrides)
    return PLDRConfig(**fields)


def seeded_model(seed, **overrides) -> PLDRForCausalLM:
    torch.manual_seed(seed)
    model = PLDRForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "blst", "balst")):
                p.add_(0.02 * torch.randn_like(p))
    return model


def prompt(n, seed, vocab=256):
    return torch.randint(4, vocab, (1, n), generator=gen(seed))


def left_pad(prompts):
    S = max(p.shape[1] for p in prompts)
    ids = torch.zeros(len(prompts), S, dtype=torch.long)
    mask = torch.zeros(len(prompts), S, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, S - p.shape[1]:] = p[0]
        mask[i, S - p.shape[1]:] = 1
    return ids, mask


def store_deductive(res, key, ded):
    for layer, triple in enumerate(ded):
        for name, t in zip(("A", "A_LM", "G"), triple):
            if t is not None:
                res[f"{key}/ded{layer}/{name}"] = t


def model_cases(res: dict) -> None:
    variants = {
        "base": {}, "neox_rope": dict(reference_rope=False),
        "identity_G": dict(custom_G_type="identity"), "random_G": dict(custom_G_type="random"),
        "cache_first_G": dict(cache_first_G=True),
        "d128": dict(hidden_size=256, head_dim=128, num_attention_heads=2),
    }
    ids, mask = left_pad([prompt(14, 8), prompt(5, 9), prompt(10, 10)])
    single = prompt(11, 4)
    for vname, overrides in variants.items():
        model = seeded_model(3, **overrides)
        for dtype in (torch.float32, torch.bfloat16):
            m = model if dtype == torch.float32 else seeded_model(3, **overrides).to(dtype)
            key = f"model/{vname}/{dtype}"
            with torch.no_grad():
                res[key + "/logits"] = logits_of(m(single))
                res[key + "/logits_padded"] = logits_of(m(ids, mask))
                res[key + "/logits_padded_padg"] = logits_of(m(ids, mask, include_pad_in_g=True))
            for cache in ("none", "g", "kv", "kvg"):
                out, ded = m.generate(single, 12, cache=cache, return_deductive=True, **NO_EOS)
                res[f"{key}/gen/{cache}"] = out
                store_deductive(res, f"{key}/gen/{cache}", ded)
                res[f"{key}/gen_padded/{cache}"] = m.generate(ids, 9, cache=cache,
                                                              attention_mask=mask, **NO_EOS)
            res[key + "/sample"] = m.generate(ids, 10, cache="kvg", attention_mask=mask,
                                              do_sample=True, temperature=0.8, top_k=20,
                                              top_p=0.9, seed=5, **NO_EOS)
            res[key + "/eos"] = m.generate(single, 16, cache="kvg", eos_token_id=int(
                m.generate(single, 3, cache="kvg", **NO_EOS)[0, -1]))
            res[key + "/stream"] = torch.stack(list(m.generate_stream(single, 6, cache="kv",
                                                                      **NO_EOS)))
            res[key + "/padg"] = m.generate(ids, 6, cache="kvg", attention_mask=mask,
                                            include_pad_in_g=True, **NO_EOS)
    # the reference model (the oracle; it must not change either)
    model = seeded_model(3)
    for dtype in (torch.float32, torch.float64):
        ref = ReferencePLDR.from_model(model, dtype).eval()
        key = f"reference/{dtype}"
        with torch.no_grad():
            res[key + "/logits_padded"] = logits_of(ref(ids, mask))
        for cache in ("none", "g", "kv", "kvg"):
            out, ded = ref.generate(single, 8, cache=cache, return_deductive=True, **NO_EOS)
            res[f"{key}/gen/{cache}"] = out
            store_deductive(res, f"{key}/gen/{cache}", ded)
    # training fallback (autograd through the reference math): output and gradients
    model = seeded_model(4).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logits = logits_of(model(ids, mask))
    res["train/logits"] = logits.detach()
    logits.float().logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        if p.grad is not None and ("mha1" in name or name.startswith("final_layer")):
            res[f"train/grad/{name}"] = p.grad


def nn_cases(res: dict) -> None:
    torch.manual_seed(11)
    B, S, D, H, d = 2, 29, 128, 2, 64
    x = torch.randn(B, S, D, generator=gen(12))
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, :9] = 0
    plga = pnn.PowerLawGraphAttention(D, H, d, num_reslayerA=2).eval()
    with torch.no_grad():
        out, (A, A_LM, G) = plga(x, attention_mask=mask, return_metric=True)
        res["nn/plga/out"], res["nn/plga/A"] = out, A
        res["nn/plga/A_LM"], res["nn/plga/G"] = A_LM, G
        res["nn/plga/out_nomask"] = plga(x)
        gca = pnn.GCachedAttention(D, H, d).eval()
        res["nn/gca/out"] = gca(x, random_g(B, H, d, 13))
        res["nn/gca/out_noG"] = gca(x, None)
        ml = pnn.MetricLearner(d, H, num_reslayerA=2).eval()
        q = torch.randn(B, S, H, d, generator=gen(14))
        for name, t in zip(("A", "A_LM", "G"), ml(q)):
            res[f"nn/ml/{name}"] = t
        plga16 = pnn.PowerLawGraphAttention(D, H, d, num_reslayerA=2).eval().to(torch.bfloat16)
        res["nn/plga_bf16/out"] = plga16(x.to(torch.bfloat16), attention_mask=mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plga.train()
        xg = x.clone().requires_grad_(True)
        out = plga(xg, attention_mask=mask)
    out.sum().backward()
    res["nn/plga_train/out"] = out.detach()
    res["nn/plga_train/dx"] = xg.grad


def save(path: str) -> None:
    torch.set_num_threads(2)
    res: dict = {}
    op_cases(res)
    model_cases(res)
    nn_cases(res)
    res = {k: v.detach().cpu().clone() for k, v in res.items()}
    atomic_write(path, lambda temp: torch.save(res, temp))
    print(f"saved {len(res)} tensors to {path} (pldr_kernels from {pldr_kernels.__file__})")


def same(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Same shape, dtype and bits (NaN equal to NaN in the same places)."""
    if x.shape != y.shape or x.dtype != y.dtype:
        return False
    if x.is_floating_point():
        return (torch.equal(x.isnan(), y.isnan())
                and torch.equal(x.nan_to_num(0.0), y.nan_to_num(0.0)))
    return torch.equal(x, y)


def compare(a_path: str, b_path: str) -> int:
    a = torch.load(a_path, weights_only=True)
    b = torch.load(b_path, weights_only=True)
    bad = [k for k in a if k in b and not same(a[k], b[k])]
    missing = sorted(set(a) ^ set(b))
    for k in bad:
        print(f"DIFFERENT {k}")
    for k in missing:
        print(f"ONLY IN {'first' if k in a else 'second'}: {k}")
    n_same = len(a) - len(bad) - len(set(a) - set(b))
    print(f"{n_same} of {len(a)} tensors bitwise identical; {len(bad)} different; "
          f"{len(missing)} in one file only")
    return 1 if bad or missing else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "save":
        save(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(__doc__)
