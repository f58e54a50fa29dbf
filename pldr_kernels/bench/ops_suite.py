"""`pldr-bench ops`: each op against the reference and what a user would otherwise run.

The contestants of a case get the same inputs (model layout ``[B, S, H, d]``, fp32 ``G``) and do
the same work: ``pldr_kernels`` (torch.ops.pldr), ``reference`` (the oracle's math), ``eager``
(the authors' HF-eager formulation in the working dtype), ``sdpa_<backend>`` (``q̃ = q·G``, then
SDPA pinned to that backend), ``sdpa_<backend>_qg_given`` (SDPA alone on a precomputed ``q̃``; only
when named in ``--contestants``) and ``flex_compiled`` (``q̃``, then compiled FlexAttention).
Decode reads the first ``L`` cache rows and appends nothing, so every call does the same work. The
metric learner has two: ``reference.metric_tensors`` *is* the eager one. Each contestant's first
call is judged against fp64 (a failure marks its row invalid) before its memory and its time.
Prefill rows also carry the fp32 rate of ``torch.mm`` timed in the same interleaved repeats on the
same threads (:func:`square_mm`), and their own rate as a fraction of it (``mm_fraction``).
"""
from __future__ import annotations

import fnmatch
import functools
import itertools
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import ops as pk_ops
from .. import reference, testing
from .measure import Clock, measure_interleaved, progress_bar, run_with_peak

OPS = ("g_attention", "g_attention_decode", "metric_tensors")
CAUSAL = {"yes": (True,), "no": (False,), "both": (True, False)}  # --causal: the prefill masks
SDPA_BACKENDS = {"cpu": (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH),
                 "cuda": (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                          SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH)}
ORACLE_CHUNK_ELEMENTS = 1 << 25  # score elements per fp64 oracle / peer chunk (256 MiB)


def selected(name: str, patterns: Sequence[str] | None) -> bool:
    """``--contestants`` patterns (shell style); by default all but the ``*_qg_given`` ones."""
    if patterns is None:
        return not name.endswith("_qg_given")
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


@dataclass(frozen=True)
class OpCase:
    """One measured case; its fields are columns of its result rows."""
    op: str
    B: int
    Sq: int  # queries: S, or 1 for decode
    Sk: int  # keys: S, or the cache length L for decode
    H: int
    d: int
    dtype: str
    causal: bool = True

    def label(self) -> str:
        length = f"L{self.Sk}" if self.op == "g_attention_decode" else f"S{self.Sk}"
        return f"B{self.B} {length} H{self.H} d{self.d}"


@dataclass
class OpsConfig:
    """The sweep; a field is set by the ``pldr-bench`` option of the same name."""
    ops: Sequence[str] = OPS
    batch: Sequence[int] = (1,)
    seqlens: Sequence[int] = (256, 1024, 4096)  # prefill
    metric_seqlens: Sequence[int] = (256, 1024)  # --seqlens sets these too
    cache_lens: Sequence[int] = (1024, 4096, 16384)  # decode
    heads: int = 14
    head_dims: Sequence[int] = (64,)
    dtypes: Sequence[str] = ("float32", "bfloat16")
    causal: str = "yes"  # a key of CAUSAL
    warmup: int = 2
    repeats: int = 15
    contestants: Sequence[str] | None = None
    flex_skip_reason: str | None = None  # None: FlexAttention is compiled and timed
    memory: bool = True
    memory_check_heads: int = 14
    memory_check_len: int = 4096


QUICK = dict(seqlens=(512,), cache_lens=(4096,), metric_seqlens=(256,), warmup=1, repeats=5,
             memory_check_heads=2,
             flex_skip_reason="--quick: torch.compile of FlexAttention takes ~45 s on a 2-core "
                              "CPU (add --flex)")


def cases(cfg: OpsConfig) -> list[OpCase]:
    lens = {"g_attention": cfg.seqlens, "g_attention_decode": cfg.cache_lens,
            "metric_tensors": cfg.metric_seqlens}
    return [OpCase(op, B, 1 if op == "g_attention_decode" else S, S, cfg.heads, d, dt, causal)
            for op in cfg.ops
            for B, S, d, dt, causal in itertools.product(
                cfg.batch, lens[op], cfg.head_dims, cfg.dtypes,
                CAUSAL[cfg.causal] if op == "g_attention" else (False,))]


def visible_pairs(Sq: int, Sk: int, causal: bool) -> int:
    """(query, key) pairs a bottom-right causal mask leaves visible."""
    return sum(max(0, min(Sk, i + Sk - Sq + 1)) for i in range(Sq)) if causal else Sq * Sk


def work(case: OpCase) -> tuple[float, float | None]:
    """``(flops, bytes moved)`` of one call (bytes only for decode, which is bandwidth-bound)."""
    B, S, H, d = case.B, case.Sk, case.H, case.d
    if case.op == "g_attention":
        return 4.0 * B * H * d * visible_pairs(S, S, case.causal) + 2 * B * S * H * d * d, None
    if case.op == "g_attention_decode":
        esize = getattr(torch, case.dtype).itemsize
        return (4.0 * B * H * d * S + 2 * B * H * d * d,
                esize * (2 * B * S * H * d + 2 * B * H * d) + 4.0 * B * H * d * d)
    R, Gd, Fd = testing.NUM_RESLAYER_A, testing.NUM_DENSE_A, testing.A_DFF
    return 2.0 * B * S * H * d * d + B * H * d * R * Gd * 6 * d * Fd + 4 * B * H * d ** 3, None


def square_mm(flops: float, device: torch.device) -> tuple[int, Callable[[], torch.Tensor]]:
    """``(n, call)``: an fp32 ``torch.mm`` of two n×n matrices doing ``flops`` (2n³ = flops), the
    GEMM rate a prefill row is held against. Square, not the attention's own [S,d]·[d,S] and
    [S,S]·[S,d] shapes: those have an inner or outer dimension of only d, which torch.mm runs far
    below its best, so the fraction would flatter the kernel; a square GEMM of the same work is what
    the machine's fp32 GEMM reaches at that size. Sized by the FLOPs, not fixed, so that a tiny case
    is not held against a rate it could not reach. fp32 whatever the case's dtype (the rate the
    issue names; a bf16 torch.mm without AMX is no faster)."""
    n = max(16, round((flops / 2) ** (1 / 3)))
    gen = torch.Generator().manual_seed(1)
    a, b = (torch.randn(n, n, generator=gen).to(device) for _ in range(2))
    out = torch.empty(n, n, device=device)
    return n, lambda: torch.mm(a, b, out=out)


MM_CONTESTANT = "torch.mm fp32"  # timed beside the prefill contestants; no row of its own


# ---- what the rows of both suites share -------------------------------------------------------
def skipped(bench: str, op: str | None, impl: str, reason: str) -> dict:
    """An entry of ``env["skipped"]``: a contestant that did not run, and why."""
    return {"bench": bench, "op": op, "impl": impl, "reason": reason}


def report_disagreement(where: str, verdict: testing.Verdict) -> None:
    """Shout a failed agreement check on stderr."""
    if not verdict:
        bar = "!" * 78
        print(f"\n{bar}\n!! DISAGREEMENT in {where}: {verdict} — its row is marked invalid\n{bar}",
              file=sys.stderr, flush=True)


def add_speedups(rows: list[dict], time_key: str, speedup_key: str) -> None:
    """``row[speedup_key]`` = the reference row's ``time_key`` / the row's (None without either)."""
    ref = next((r for r in rows if r["impl"] == "reference"), None)
    for r in rows:
        r[speedup_key] = ref[time_key] / r[time_key] if ref and r[time_key] else None


# ---- contestants: name → the call to time, or the reason it cannot run -------------------------
Contestants = dict[str, Callable[[], object] | str]


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


def make_sdpa(backend, q, k, v, G, causal: bool, qg_given: bool) -> Callable[[], torch.Tensor]:
    given = premultiply(q, G) if qg_given else None
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)

    def run():
        with sdpa_kernel([backend]):
            qt = given if qg_given else premultiply(q, G)
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2) \
                .contiguous()
    return run


@functools.cache  # compiling is the slow part: once per process
def compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def make_flex(q, k, v, G, causal: bool) -> Callable[[], torch.Tensor]:
    from torch.nn.attention.flex_attention import create_block_mask

    flex, (Sq, Sk), mask = compiled_flex_attention(), (q.shape[1], k.shape[1]), None
    if causal:
        mask = create_block_mask(lambda b, h, i, j: j <= i + (Sk - Sq), B=None, H=None, Q_LEN=Sq,
                                 KV_LEN=Sk, device=q.device)
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    return lambda: flex(premultiply(q, G), kt, vt, block_mask=mask).transpose(1, 2).contiguous()


def rivals(q, k, v, G, causal: bool, cfg: OpsConfig) -> Contestants:
    """What a user would otherwise run for attention: eager, SDPA per backend (with and without
    the q·G GEMM) and compiled FlexAttention."""
    out: Contestants = {"eager": lambda: eager(q, k, v, G, causal)}
    for backend in SDPA_BACKENDS[q.device.type]:
        short = backend.name.lower().removesuffix("_attention")
        for name, given in ((f"sdpa_{short}", False), (f"sdpa_{short}_qg_given", True)):
            if selected(name, cfg.contestants):
                out[name] = make_sdpa(backend, q, k, v, G, causal, given)
    if selected("flex_compiled", cfg.contestants):
        try:
            out["flex_compiled"] = cfg.flex_skip_reason or make_flex(q, k, v, G, causal)
        except Exception as exc:  # e.g. a mask FlexAttention cannot build on this device
            out["flex_compiled"] = f"FlexAttention unavailable: {exc}"
    return out


# ---- one case ----------------------------------------------------------------------------------
def by_heads(fn, q, k, v, G, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn(q, k, v, G, None, causal) → (out, lse)`` (``reference.g_attention`` or its peer) over
    slices of heads, so that the S×S scores of an fp64 oracle or a peer stay small."""
    B, Sq, H, _ = q.shape
    step = max(1, min(H, ORACLE_CHUNK_ELEMENTS // max(1, B * Sq * k.shape[1])))
    parts = [fn(q[:, :, h:h + step], k[:, :, h:h + step], v[:, :, h:h + step], G[:, h:h + step],
                None, causal) for h in range(0, H, step)]
    return torch.cat([p[0] for p in parts], dim=2), torch.cat([p[1] for p in parts], dim=1)


def prepare(case: OpCase, device: torch.device, cfg: OpsConfig, seed: int = 0):
    """``(contestants, judge)``: ``judge(output)`` → the case's :class:`testing.Verdict` (its fp64
    oracle is computed on the first call)."""
    gen = torch.Generator().manual_seed(seed)
    dtype, B, Sq, S, H, d = getattr(torch, case.dtype), case.B, case.Sq, case.Sk, case.H, case.d
    if case.op == "metric_tensors":
        q = testing.randn((B, S, H, d), dtype, device, gen)
        weights = {k: w.to(device) for k, w in testing.make_metric_weights(d, H, generator=gen)
                   .items()}
        args = testing.metric_args(weights)
        contestants = {"pldr_kernels": lambda: pk_ops.metric_tensors(q, None, *args),
                       "reference": lambda: reference.metric_tensors(q, None, *args)}
        oracle = functools.cache(lambda: reference.metric_tensors(
            q.double(), None, *testing.metric_args(weights, torch.float64)))

        def judge(out):
            return testing.check_metric_tensors(out, q, None, weights, oracle=oracle())
    else:
        G = testing.random_g(B, H, d, device, gen)
        q, k, v = testing.random_attention_inputs(B, Sq, S, H, d, dtype, device, gen)
        oracle = functools.cache(lambda: by_heads(reference.g_attention, *(
            t.double() for t in (q, k, v, G)), case.causal))
        if case.op == "g_attention_decode":
            seqlens = torch.full((B,), S, dtype=torch.int32, device=device)
            contestants = {
                "pldr_kernels": lambda: pk_ops.g_attention_decode(q, k, v, seqlens, G=G),
                "reference": lambda: reference.g_attention_decode(q, k, v, seqlens, G=G)}

            def judge(out):
                return testing.check_g_attention_decode(out, q, k, v, seqlens, G=G,
                                                        oracle=oracle()[0])
        else:
            contestants = {
                "pldr_kernels": lambda: pk_ops.g_attention(q, k, v, G, None, case.causal)[0],
                "reference": lambda: reference.g_attention(q, k, v, G, None, case.causal)[0]}
            peer = functools.cache(lambda: None if dtype == torch.float32 else by_heads(
                testing.g_attention_peer, q, k, v, G, case.causal))

            def judge(out):
                return testing.check_g_attention(out, None, q, k, v, G, causal=case.causal,
                                                 oracle=oracle(), peer=peer())
        contestants |= rivals(q, k, v, G, case.causal, cfg)
    contestants["pldr_kernels"] = kernel_missing(case.op, device) or contestants["pldr_kernels"]
    return {n: c for n, c in contestants.items() if selected(n, cfg.contestants)}, judge


def run_case(case: OpCase, device: torch.device, cfg: OpsConfig, clock: Clock,
             skips: list[dict], copy_gbps: float | None = None) -> list[dict]:
    contestants, judge = prepare(case, device, cfg)
    shape = f"{case.label()} {case.dtype}"
    live, verdicts, notes = {}, {}, {}
    for name, fn in contestants.items():
        if isinstance(fn, str):
            skips.append(skipped("ops", case.op, name, fn))
            continue
        try:
            t0 = time.perf_counter()
            out = fn()
            clock.synchronize()
        except Exception as exc:  # e.g. an SDPA backend that does not take these inputs
            first_line = (str(exc).splitlines() or [""])[0][:200]
            skips.append(skipped("ops", case.op, name,
                                 f"{shape}: {type(exc).__name__}: {first_line}"))
            continue
        if name == "flex_compiled":
            notes[name] = f"first call (compile) {time.perf_counter() - t0:.1f} s"
        live[name], verdicts[name] = fn, judge(out)
        del out
        report_disagreement(f"{case.op} {shape}: {name}", verdicts[name])
    memory = {n: run_with_peak(fn, device)[1:] for n, fn in live.items()} if cfg.memory else {}
    flops, nbytes = work(case)
    timed, mm_n = dict(live), None
    if case.op == "g_attention":
        mm_n, timed[MM_CONTESTANT] = square_mm(flops, device)
    measured = measure_interleaved(timed, clock, cfg.warmup, cfg.repeats)
    mm = measured.pop(MM_CONTESTANT, None)
    mm_tflops = 2.0 * mm_n ** 3 / (mm.stats["p50"] * 1e-3) / 1e12 if mm else None
    rows = []
    for name, m in measured.items():
        stats = m.stats
        seconds = stats["p50"] * 1e-3
        gbps = nbytes / seconds / 1e9 if nbytes else None
        peak, method = memory.get(name, (None, None))
        rows.append({
            "bench": "ops", **asdict(case), "impl": name,
            **{f"time_ms_{p}": t for p, t in stats.items()},
            "samples_ms": m.samples_ms, "calls_per_sample": m.inner,
            "tflops": None if nbytes else flops / seconds / 1e12, "gbps": gbps,
            "copy_fraction": gbps / copy_gbps if gbps and copy_gbps else None,
            "mm_n": mm_n, "mm_tflops": mm_tflops,
            "mm_fraction": flops / seconds / 1e12 / mm_tflops if mm_tflops else None,
            "peak_extra_bytes": peak, "memory_method": method,
            "valid": verdicts[name].ok, "agreement": str(verdicts[name]),
            "note": notes.get(name, "")})
    add_speedups(rows, "time_ms_p50", "speedup_vs_reference")
    # What a user would run instead: not the reference, not SDPA handed a free q̃.
    others = [r for r in rows if r["valid"] and r["impl"] not in ("pldr_kernels", "reference")
              and not r["impl"].endswith("_qg_given")]
    ours = next((r for r in rows if r["impl"] == "pldr_kernels"), None)
    if ours and others:
        best = min(others, key=lambda r: r["time_ms_p50"])
        ours["best_other"] = best["impl"]
        ours["speedup_vs_best_other"] = best["time_ms_p50"] / ours["time_ms_p50"]
    return rows


def memory_check(device: torch.device, H: int, S: int = 4096, d: int = 64) -> list[dict]:
    """Prefill at S = 4096: the extra memory pldr_kernels needs vs the reference's S×S scores
    (requirement: < 1/10). SDPA's flash backend, also O(S), checks the method."""
    case = OpCase("g_attention", 1, S, S, H, d, "float32", True)
    contestants, _ = prepare(case, device,
                             OpsConfig(contestants=("pldr_kernels", "reference", "sdpa_flash")))
    measured = {n: (None, fn) if isinstance(fn, str) else run_with_peak(fn, device)[1:]
                for n, fn in contestants.items()}
    ref = measured.get("reference", (None,))[0]
    rows = []
    for name, (nbytes, method) in measured.items():
        ran = nbytes is not None
        ratio = nbytes / ref if ran and ref else None
        rows.append({"bench": "ops_memory", **asdict(case), "impl": name,
                     "peak_extra_bytes": nbytes, "memory_method": method if ran else None,
                     "skip_reason": None if ran else method, "ratio_to_reference": ratio})
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
    clock, skips, results = Clock(device), [], []
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
            results += run_case(case, device, cfg, clock, skips, copy_gbps)
            bar.update(1)
        if with_memory:
            results += memory_check(device, cfg.memory_check_heads, cfg.memory_check_len)
            bar.update(1)
    unique = {(s["op"], s["impl"], s["reason"]): s for s in skips}
    return results, list(unique.values())
