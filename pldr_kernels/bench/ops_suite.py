"""`pldr-bench ops`: each op against the reference and what a user would otherwise run.

The contestants of a case get the same inputs (model layout ``[B, S, H, d]``, fp32 ``G``) and do
the same work: ``pldr_kernels`` (torch.ops.pldr), ``reference`` (the oracle's math), ``eager``
(the authors' HF-eager formulation in the working dtype), ``sdpa_<backend>`` (``q̃ = q·G``, then
SDPA pinned to that backend), ``sdpa_<backend>_qg_given`` (SDPA alone on a precomputed ``q̃``; only
when named in ``--contestants``) and ``flex_compiled`` (``q̃``, then compiled FlexAttention).
Decode reads the first ``L`` cache rows and appends nothing, so every call does the same work. The
metric learner has two: ``reference.metric_tensors`` *is* the eager one.

Per case: one call of each contestant judged by ``pldr_kernels.testing`` against fp64 (a failure is
shouted and its row marked invalid), its peak extra memory, then interleaved timing. Rates: TFLOP/s,
and for decode GB/s (on CUDA also as a share of a device copy's bandwidth).
"""
from __future__ import annotations

import fnmatch
import itertools
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import ops as pk_ops
from .. import reference, testing
from .measure import Clock, measure_interleaved, progress_bar, run_with_peak

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OPS = ("g_attention", "g_attention_decode", "metric_tensors")
ORACLE_CHUNK_ELEMENTS = 1 << 25  # score elements per fp64 oracle / peer chunk (256 MiB)


def selected(name: str, patterns: Sequence[str] | None) -> bool:
    """``--contestants`` patterns (shell style); by default all but the ``*_qg_given`` ones."""
    if patterns is None:
        return not name.endswith("_qg_given")
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


@dataclass(frozen=True)
class OpCase:
    op: str
    B: int
    S: int  # query length (prefill, metric learner) or cache length L (decode)
    H: int
    d: int
    dtype: str
    causal: bool = True

    @property
    def Sq(self) -> int:
        return 1 if self.op == "g_attention_decode" else self.S

    def label(self) -> str:
        return f"B{self.B} {'L' if self.op == 'g_attention_decode' else 'S'}{self.S} " \
               f"H{self.H} d{self.d}"


@dataclass
class OpsConfig:
    ops: Sequence[str] = OPS
    batches: Sequence[int] = (1,)
    prefill_seqlens: Sequence[int] = (256, 1024, 4096)
    decode_seqlens: Sequence[int] = (1024, 4096, 16384)
    metric_seqlens: Sequence[int] = (256, 1024)
    heads: int = 14
    head_dims: Sequence[int] = (64,)
    dtypes: Sequence[str] = ("float32", "bfloat16")
    causal: Sequence[bool] = (True,)
    warmup: int = 2
    repeats: int = 15
    contestants: Sequence[str] | None = None
    flex_skip_reason: str | None = None  # None: FlexAttention is compiled and timed
    memory: bool = True
    memory_check_heads: int = 14
    memory_check_len: int = 4096


QUICK = dict(prefill_seqlens=(512,), decode_seqlens=(4096,), metric_seqlens=(256,), warmup=1,
             repeats=5, memory_check_heads=2,
             flex_skip_reason="--quick: torch.compile of FlexAttention takes ~45 s on a 2-core "
                              "CPU (add --flex)")


def cases(cfg: OpsConfig) -> list[OpCase]:
    lens = {"g_attention": cfg.prefill_seqlens, "g_attention_decode": cfg.decode_seqlens,
            "metric_tensors": cfg.metric_seqlens}
    return [OpCase(op, B, S, cfg.heads, d, dt, c and op == "g_attention")
            for op in cfg.ops
            for B, S, d, dt, c in itertools.product(
                cfg.batches, lens[op], cfg.head_dims, cfg.dtypes,
                cfg.causal if op == "g_attention" else (False,))]


def visible_pairs(Sq: int, Sk: int, causal: bool) -> int:
    """(query, key) pairs a bottom-right causal mask leaves visible."""
    return sum(max(0, min(Sk, i + Sk - Sq + 1)) for i in range(Sq)) if causal else Sq * Sk


def work(case: OpCase) -> tuple[float, float | None]:
    """``(flops, bytes moved)`` of one call (bytes only for decode, which is bandwidth-bound)."""
    B, S, H, d = case.B, case.S, case.H, case.d
    if case.op == "g_attention":
        return 4.0 * B * H * d * visible_pairs(S, S, case.causal) + 2 * B * S * H * d * d, None
    if case.op == "g_attention_decode":
        esize = DTYPES[case.dtype].itemsize
        return (4.0 * B * H * d * S + 2 * B * H * d * d,
                esize * (2 * B * S * H * d + 2 * B * H * d) + 4.0 * B * H * d * d)
    R, Gd, Fd = testing.NUM_RESLAYER_A, testing.NUM_DENSE_A, testing.A_DFF
    return 2.0 * B * S * H * d * d + B * H * d * R * Gd * 6 * d * Fd + 4 * B * H * d ** 3, None


# ---- contestants -------------------------------------------------------------------------------
@dataclass
class Contestant:
    name: str
    fn: Callable[[], object] | None
    skip_reason: str | None = None


def kernel_missing(op: str, device: torch.device) -> str | None:
    """Why ``torch.ops.pldr.<op>`` cannot run on ``device`` (None when it can)."""
    if pk_ops._LOAD_ERROR is not None:
        return f"pldr_kernels._C is not built ({pk_ops._LOAD_ERROR}); run `make build`"
    if device.type not in testing.available_backends(op):
        return (f"this build has no {device.type.upper()} kernel for pldr::{op} "
                "(`python -m pldr_kernels` tells how it was built)")
    return None


def premultiply(q: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``q̃ = q·G`` in fp32, rounded to q's dtype, as ``[B, H, S, d]`` (what a user gives SDPA)."""
    return reference.apply_g(q, G).to(q.dtype).transpose(1, 2)


def eager(q, k, v, G, causal: bool) -> torch.Tensor:
    """The authors' (HF eager) formulation in the working dtype; bottom-right causal mask."""
    Sq, Sk = q.shape[1], k.shape[1]
    scores = torch.matmul(premultiply(q, G), k.permute(0, 2, 3, 1)) / math.sqrt(q.shape[-1])
    if causal:
        blocked = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).triu(Sk - Sq + 1)
        scores = scores.masked_fill(blocked, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v.transpose(1, 2)).transpose(1, 2).contiguous()


def sdpa_backends(device: torch.device) -> dict[str, object]:
    from torch.nn.attention import SDPBackend

    names = ("flash", "efficient", "cudnn", "math") if device.type == "cuda" else ("flash", "math")
    attrs = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
             "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
    return {n: getattr(SDPBackend, attrs[n]) for n in names if hasattr(SDPBackend, attrs[n])}


def make_sdpa(backend, q, k, v, G, causal: bool, qg_given: bool) -> Callable[[], torch.Tensor]:
    from torch.nn.attention import sdpa_kernel

    given = premultiply(q, G) if qg_given else None
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)

    def run():
        with sdpa_kernel([backend]):
            qt = given if qg_given else premultiply(q, G)
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2) \
                .contiguous()
    return run


_FLEX: dict = {}


def make_flex(q, k, v, G, causal: bool) -> Callable[[], torch.Tensor]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _FLEX:  # compiling is the slow part: once per process
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    Sq, Sk = q.shape[1], k.shape[1]
    mask = None
    if causal:
        mask = create_block_mask(lambda b, h, i, j: j <= i + (Sk - Sq), B=None, H=None, Q_LEN=Sq,
                                 KV_LEN=Sk, device=q.device)
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    return lambda: _FLEX["fn"](premultiply(q, G), kt, vt, block_mask=mask).transpose(1, 2) \
        .contiguous()


def attention_contestants(case: OpCase, q, k, v, G, seqlens, cfg: OpsConfig,
                          device: torch.device) -> list[Contestant]:
    causal = case.causal
    missing = kernel_missing(case.op, device)
    if case.op == "g_attention":
        ours = lambda: pk_ops.g_attention(q, k, v, G, None, causal)[0]  # noqa: E731
        ref = lambda: reference.g_attention(q, k, v, G, None, causal)[0]  # noqa: E731
    else:
        ours = lambda: pk_ops.g_attention_decode(q, k, v, seqlens, G=G)  # noqa: E731
        ref = lambda: reference.g_attention_decode(q, k, v, seqlens, G=G)  # noqa: E731
    out = [Contestant("pldr_kernels", None if missing else ours, missing),
           Contestant("reference", ref),
           Contestant("eager", lambda: eager(q, k, v, G, causal))]
    for short, backend in sdpa_backends(device).items():
        for given in (False, True):
            name = f"sdpa_{short}{'_qg_given' if given else ''}"
            if selected(name, cfg.contestants):
                out.append(Contestant(name, make_sdpa(backend, q, k, v, G, causal, given)))
    if selected("flex_compiled", cfg.contestants):
        try:
            out.append(Contestant("flex_compiled", None, cfg.flex_skip_reason)
                       if cfg.flex_skip_reason else
                       Contestant("flex_compiled", make_flex(q, k, v, G, causal)))
        except Exception as exc:  # a torch without FlexAttention, or a mask it cannot build
            out.append(Contestant("flex_compiled", None, f"FlexAttention unavailable: {exc}"))
    return [c for c in out if selected(c.name, cfg.contestants)]


# ---- one case ----------------------------------------------------------------------------------
def by_heads(fn, q, k, v, G, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn(q, k, v, G, causal) → (out, lse)`` over slices of heads, so the S×S scores of an fp64
    oracle or a peer stay small."""
    B, Sq, H, _ = q.shape
    step = max(1, min(H, ORACLE_CHUNK_ELEMENTS // max(1, B * Sq * k.shape[1])))
    parts = [fn(q[:, :, h:h + step], k[:, :, h:h + step], v[:, :, h:h + step], G[:, h:h + step],
                causal) for h in range(0, H, step)]
    return torch.cat([p[0] for p in parts], dim=2), torch.cat([p[1] for p in parts], dim=1)


def fp64_attention(q, k, v, G, causal):
    return reference.g_attention(q.double(), k.double(), v.double(), G.double(), None, causal)


def prepare(case: OpCase, device: torch.device, cfg: OpsConfig, seed: int = 0):
    """``(contestants, judge)``: ``judge(output)`` → the case's :class:`testing.Verdict`."""
    gen = torch.Generator().manual_seed(seed)
    dtype, B, S, H, d = DTYPES[case.dtype], case.B, case.S, case.H, case.d
    if case.op == "metric_tensors":
        q = testing.randn((B, S, H, d), dtype, device, gen)
        weights = {k: w.to(device) for k, w in testing.make_metric_weights(d, H, generator=gen)
                   .items()}
        args = testing.metric_args(weights)
        missing = kernel_missing(case.op, device)
        contestants = [Contestant("pldr_kernels", None if missing else
                                  (lambda: pk_ops.metric_tensors(q, None, *args)), missing),
                       Contestant("reference", lambda: reference.metric_tensors(q, None, *args))]
        oracle = reference.metric_tensors(q.double(), None, *testing.metric_args(weights,
                                                                                 torch.float64))
        judge = lambda out: testing.check_metric_tensors(out, q, None, weights,  # noqa: E731
                                                         oracle=oracle)
        return [c for c in contestants if selected(c.name, cfg.contestants)], judge
    G = testing.random_g(B, H, d, device, gen)
    if case.op == "g_attention":
        q, k, v = testing.random_attention_inputs(B, S, S, H, d, dtype, device, gen)
        oracle = by_heads(fp64_attention, q, k, v, G, case.causal)
        peer = None if dtype == torch.float32 else by_heads(
            lambda *a: testing.g_attention_peer(*a[:4], None, a[4]), q, k, v, G, case.causal)
        judge = lambda out: testing.check_g_attention(out, None, q, k, v, G,  # noqa: E731
                                                      causal=case.causal, oracle=oracle,
                                                      peer=peer)
        return attention_contestants(case, q, k, v, G, None, cfg, device), judge
    q, k_cache, v_cache = testing.random_attention_inputs(B, 1, S, H, d, dtype, device, gen)
    seqlens = torch.full((B,), S, dtype=torch.int32, device=device)
    oracle = by_heads(fp64_attention, q, k_cache, v_cache, G, False)[0]
    judge = lambda out: testing.check_g_attention_decode(out, q, k_cache, v_cache,  # noqa: E731
                                                         seqlens, G=G, oracle=oracle)
    return attention_contestants(case, q, k_cache, v_cache, G, seqlens, cfg, device), judge


def shout(msg: str) -> None:
    bar = "!" * 78
    print(f"\n{bar}\n!! {msg}\n{bar}", file=sys.stderr, flush=True)


def skip(case: OpCase | None, impl: str, reason: str) -> dict:
    return {"bench": "ops", "op": case.op if case else None, "impl": impl, "reason": reason}


def run_case(case: OpCase, device: torch.device, cfg: OpsConfig, clock: Clock,
             skipped: list[dict], copy_gbps: float | None = None) -> list[dict]:
    contestants, judge = prepare(case, device, cfg)
    live, verdicts, notes = {}, {}, {}
    for c in contestants:
        if c.fn is None:
            skipped.append(skip(case, c.name, c.skip_reason))
            continue
        try:
            t0 = time.perf_counter()
            out = c.fn()
            clock.synchronize()
        except Exception as exc:  # e.g. an SDPA backend that does not take these inputs
            skipped.append(skip(case, c.name, f"{case.label()} {case.dtype}: {type(exc).__name__}:"
                                              f" {str(exc).splitlines()[0][:200]}"))
            continue
        if c.name == "flex_compiled":
            notes[c.name] = f"first call (compile) {time.perf_counter() - t0:.1f} s"
        live[c.name] = c.fn
        verdicts[c.name] = judge(out)
        del out
        if not verdicts[c.name]:
            shout(f"DISAGREEMENT in {case.op} {case.label()} {case.dtype}: {c.name}: "
                  f"{verdicts[c.name]} — its row is marked invalid")
    memory = {n: run_with_peak(fn, device)[1:] for n, fn in live.items()} if cfg.memory else {}
    timings = measure_interleaved(live, clock, cfg.warmup, cfg.repeats)
    flops, nbytes = work(case)
    rows = []
    for name, m in timings.items():
        st = m.stats
        rows.append({
            "bench": "ops", "op": case.op, "impl": name, "B": case.B, "Sq": case.Sq,
            "Sk": case.S, "H": case.H, "d": case.d, "dtype": case.dtype, "causal": case.causal,
            **{f"time_ms_{p}": st[p] for p in ("p10", "p20", "p50", "p80", "p90")},
            "samples_ms": m.samples_ms, "calls_per_sample": m.inner,
            "tflops": None if nbytes else flops / (st["p50"] * 1e-3) / 1e12,
            "gbps": nbytes / (st["p50"] * 1e-3) / 1e9 if nbytes else None,
            "copy_fraction": nbytes / (st["p50"] * 1e-3) / 1e9 / copy_gbps
            if nbytes and copy_gbps else None,
            "peak_extra_bytes": memory[name][0] if name in memory else None,
            "memory_method": memory[name][1] if name in memory else None,
            "valid": verdicts[name].ok, "agreement": str(verdicts[name]),
            "note": notes.get(name, "")})
    ref = next((r for r in rows if r["impl"] == "reference"), None)
    # What a user would run instead: not the reference, not SDPA handed a free q̃.
    others = [r for r in rows if r["valid"] and r["impl"] not in ("pldr_kernels", "reference")
              and not r["impl"].endswith("_qg_given")]
    for r in rows:
        r["speedup_vs_reference"] = ref["time_ms_p50"] / r["time_ms_p50"] if ref else None
        if r["impl"] == "pldr_kernels" and others:
            best = min(others, key=lambda o: o["time_ms_p50"])
            r["best_other"], r["speedup_vs_best_other"] = \
                best["impl"], best["time_ms_p50"] / r["time_ms_p50"]
    return rows


def memory_check(device: torch.device, H: int, S: int = 4096, d: int = 64) -> list[dict]:
    """Prefill at S = 4096: the extra memory pldr_kernels needs vs the reference's S×S scores
    (requirement: < 1/10). SDPA's flash backend, also O(S), checks the method."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = testing.random_attention_inputs(1, S, S, H, d, torch.float32, device, gen)
    G = testing.random_g(1, H, d, device, gen)
    case = OpCase("g_attention", 1, S, H, d, "float32", True)
    cfg = OpsConfig(contestants=("pldr_kernels", "reference", "sdpa_flash"))
    measured = {c.name: run_with_peak(c.fn, device)[1:] if c.fn else (None, c.skip_reason)
                for c in attention_contestants(case, q, k, v, G, None, cfg, device)}
    ref = measured.get("reference", (None,))[0]
    rows = []
    for name, (nbytes, method) in measured.items():
        ratio = nbytes / ref if nbytes is not None and ref else None
        rows.append({"bench": "ops_memory", "op": "g_attention", "impl": name, "B": 1, "Sq": S,
                     "Sk": S, "H": H, "d": d, "dtype": "float32", "causal": True,
                     "peak_extra_bytes": nbytes, "memory_method": method if nbytes is not None
                     else None, "skip_reason": None if nbytes is not None else method,
                     "ratio_to_reference": ratio})
        if name == "pldr_kernels":
            rows[-1]["requirement"] = "pldr_kernels extra memory < 0.1 x reference"
            rows[-1]["requirement_met"] = None if ratio is None else ratio < 0.1
    return rows


def copy_bandwidth(device: torch.device, clock: Clock, repeats: int) -> dict:
    """A device-to-device copy (1 GiB on CUDA, 256 MiB on the CPU): bytes read + written per s."""
    nbytes = 1 << (30 if device.type == "cuda" else 28)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    m = measure_interleaved({"copy": lambda: dst.copy_(src)}, clock, warmup=1, repeats=repeats,
                            inner=1)["copy"]
    p50 = m.stats["p50"]
    return {"bench": "copy", "impl": "tensor.copy_", "bytes": nbytes, "time_ms_p50": p50,
            "samples_ms": m.samples_ms, "gbps": 2 * nbytes / (p50 * 1e-3) / 1e9}


def run_ops(cfg: OpsConfig, device: torch.device, show_progress: bool = True
            ) -> tuple[list[dict], list[dict]]:
    """The sweep, the device copy bandwidth (with decode) and the memory check."""
    clock, skipped, results = Clock(device), [], []
    todo = cases(cfg)
    # On a CPU the decode working set of the sweep sits in the caches: no DRAM copy to compare.
    with_copy = "g_attention_decode" in cfg.ops and device.type == "cuda"
    with_memory = cfg.memory and "g_attention" in cfg.ops
    with progress_bar(len(todo) + with_copy + with_memory, "ops", show_progress) as bar:
        copy_gbps = None
        if with_copy:
            results.append(copy_bandwidth(device, clock, max(5, cfg.repeats)))
            copy_gbps = results[-1]["gbps"]
            bar.update(1)
        for case in todo:
            bar.set_postfix_str(f"{case.op} {case.label()} {case.dtype}", refresh=False)
            results += run_case(case, device, cfg, clock, skipped, copy_gbps)
            bar.update(1)
        if with_memory:
            results += memory_check(device, cfg.memory_check_heads, cfg.memory_check_len)
            bar.update(1)
    unique = {(s["op"], s["impl"], s["reason"]): s for s in skipped}
    return results, list(unique.values())
