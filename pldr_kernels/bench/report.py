"""Reporting: the terminal table, the Markdown summary, the JSON file and the PNG plot."""
from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Sequence

# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    def line(cells):
        return "  ".join(str(c).rjust(w) if i >= 1 and _numeric(c) else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep] + [line(r) for r in rows])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |",
           "|" + "|".join("---:" if _numeric(rows[0][i]) else "---" for i in range(len(headers)))
           + "|" if rows else "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _numeric(cell) -> bool:
    s = str(cell).replace("x", "").replace("%", "").replace("–", "").replace(".", "")
    s = s.replace("-", "").replace(" ", "")
    return s.isdigit()


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:.2f}"


def mib(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.1f}"


OPS_HEADERS = ("op", "shape", "dtype", "causal", "impl", "p50 ms", "p20–p80 ms", "rate", "x ref",
               "extra MiB", "check")


def ops_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        if r["bench"] != "ops":
            continue
        shape = (f"B{r['B']} L{r['Sk']} H{r['H']} d{r['d']}" if r["op"] == "g_attention_decode"
                 else f"B{r['B']} S{r['Sq']} H{r['H']} d{r['d']}")
        rate = (f"{fmt(r['tflops'])} TFLOP/s" if r.get("tflops") is not None else
                f"{fmt(r['gbps'])} GB/s" if r.get("gbps") is not None else "-")
        speed = r.get("speedup_vs_reference")
        rows.append([r["op"], shape, r["dtype"], "yes" if r["causal"] else "no", r["impl"],
                     fmt(r["time_ms_p50"]), f"{fmt(r['time_ms_p20'])}–{fmt(r['time_ms_p80'])}",
                     rate, "-" if speed is None else f"{speed:.2f}x",
                     mib(r.get("peak_extra_bytes")), "ok" if r["valid"] else "INVALID"])
    return rows


GEN_HEADERS = ("impl", "mode", "prompt", "new", "TTFT ms", "token p50 ms", "token p90 ms",
               "tokens/s", "peak MiB", "check")


def generate_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        if r["bench"] != "generate":
            continue
        rows.append([r["impl"], r["mode"], str(r["prompt_len"]), str(r["new_tokens"]),
                     fmt(r["ttft_ms"]), fmt(r["per_token_ms_p50"]), fmt(r["per_token_ms_p90"]),
                     fmt(r["tokens_per_s"]), mib(r.get("peak_memory_bytes")),
                     "ok" if r.get("valid", True) else "INVALID"])
    return rows


def memory_lines(results: list[dict]) -> list[str]:
    rows = [r for r in results if r["bench"] == "ops_memory"]
    if not rows:
        return []
    r0 = rows[0]
    method = next((r["memory_method"] for r in rows if r.get("memory_method")), "n/a")
    lines = [f"Peak extra memory, g_attention prefill B1 S{r0['Sq']} H{r0['H']} d{r0['d']} "
             f"{r0['dtype']} causal ({method}):"]
    for r in rows:
        if r["peak_extra_bytes"] is None:
            lines.append(f"  {r['impl']:<13} skipped: {r['skip_reason']}")
            continue
        ratio = r.get("ratio_to_reference")
        extra = "" if ratio is None or r["impl"] == "reference" else f"  = {ratio:.3f} x reference"
        if "requirement_met" in r and r["requirement_met"] is not None:
            extra += f"  [{'PASS' if r['requirement_met'] else 'FAIL'}: {r['requirement']}]"
        lines.append(f"  {r['impl']:<13} {mib(r['peak_extra_bytes']):>9} MiB{extra}")
    return lines


def ordering_lines(results: list[dict]) -> list[str]:
    """Per implementation: is per-token latency kvg <= kv < none (p50)? One line each."""
    gen = [r for r in results if r["bench"] == "generate"]
    lines = []
    for impl in dict.fromkeys(r["impl"] for r in gen):
        for prompt_len, new_tokens in dict.fromkeys((r["prompt_len"], r["new_tokens"]) for r in gen):
            p50 = {r["mode"]: r["per_token_ms_p50"] for r in gen
                   if r["impl"] == impl and r["prompt_len"] == prompt_len
                   and r["new_tokens"] == new_tokens}
            if not all(m in p50 for m in ("none", "kv", "kvg")):
                continue
            ok = p50["kvg"] <= p50["kv"] < p50["none"]
            lines.append(f"  {impl:<13} prompt {prompt_len} +{new_tokens}: per-token p50 kvg "
                         f"{fmt(p50['kvg'])} ms, kv {fmt(p50['kv'])} ms, none {fmt(p50['none'])} ms"
                         f"  [{'PASS' if ok else 'FAIL'}: kvg <= kv < none]")
    return ["Cache-mode ordering:"] + lines if lines else []


def headline_lines(results: list[dict]) -> list[str]:
    lines = []
    for r in results:
        if r["bench"] == "ops" and r["impl"] == "pldr_kernels" and r.get("best_other"):
            length = f"L{r['Sk']}" if r["op"] == "g_attention_decode" else f"S{r['Sk']}"
            lines.append(f"  {r['op']} B{r['B']} {length} {r['dtype']}: pldr_kernels "
                         f"{r['speedup_vs_reference']:.2f}x reference, "
                         f"{r['speedup_vs_best_other']:.2f}x {r['best_other']}")
    gen = {(r["impl"], r["mode"], r["prompt_len"]): r for r in results if r["bench"] == "generate"}
    for (impl, mode, plen), r in gen.items():
        ref = gen.get(("reference", mode, plen))
        if impl == "pldr_kernels" and ref:
            lines.append(f"  generate {mode} prompt {plen}: pldr_kernels per-token "
                         f"{ref['per_token_ms_p50'] / r['per_token_ms_p50']:.2f}x reference")
    return ["Speedups (p50):"] + lines if lines else []


def note_lines(results: list[dict]) -> list[str]:
    lines = []
    for r in results:
        if r.get("note"):
            where = (f"ops {r['op']} B{r['B']} S{r['Sk']} {r['dtype']}" if r["bench"] == "ops"
                     else f"generate {r['mode']} prompt {r['prompt_len']}")
            lines.append(f"  {where} / {r['impl']}: {r['note']}")
    return ["Notes:"] + lines if lines else []


def skip_lines(skipped: list[dict]) -> list[str]:
    if not skipped:
        return []
    lines = ["Skipped:"]
    for s in skipped:
        where = s["bench"] + (f" {s['op']}" if s.get("op") else "")
        lines.append(f"  {where} / {s['impl']}: {s['reason']}")
    return lines


def env_line(env: dict) -> str:
    build = env.get("build_info", {})
    return (f"{env['device_name']} ({env['device']}), {env['threads']} threads, torch {env['torch']}, "
            f"pldr_kernels {env['pldr_kernels']} @ {env['git_commit']} "
            f"(cpu flags {build.get('cpu_flags', '?')}, cuda kernels "
            f"{'yes' if build.get('with_cuda') else 'no'})")


def terminal_report(env: dict, results: list[dict]) -> str:
    parts = [env_line(env)]
    if any(r["bench"] == "ops" for r in results):
        parts += ["", format_table(OPS_HEADERS, ops_rows(results))]
    mem = memory_lines(results)
    if mem:
        parts += [""] + mem
    if any(r["bench"] == "generate" for r in results):
        g0 = next(r for r in results if r["bench"] == "generate")
        parts += ["", f"generate: model {g0.get('model', '?')} ({g0.get('params', 0) / 1e6:.1f}M "
                      f"parameters, {g0.get('weights', '?')} weights), {g0['dtype']}, batch "
                      f"{g0['batch']}, greedy", format_table(GEN_HEADERS, generate_rows(results))]
    for extra in (ordering_lines(results), headline_lines(results), note_lines(results),
                  skip_lines(env.get("skipped", []))):
        if extra:
            parts += [""] + extra
    return "\n".join(parts)


def markdown_report(env: dict, results: list[dict]) -> str:
    parts = [f"Measured with `{' '.join(['pldr-bench'] + list(env.get('argv', [])[1:]))}` on "
             f"{env_line(env)}, {env.get('time_utc', '')}. Times are medians (p50) over interleaved "
             "repeats; p20–p80 shows the spread."]
    if any(r["bench"] == "ops" for r in results):
        parts += ["", "**Ops**", "", markdown_table(OPS_HEADERS, ops_rows(results))]
    mem = memory_lines(results)
    if mem:
        parts += ["", "```", *mem, "```"]
    if any(r["bench"] == "generate" for r in results):
        g0 = next(r for r in results if r["bench"] == "generate")
        parts += ["", f"**Generation** ({g0.get('model', '?')}, {g0.get('params', 0) / 1e6:.1f}M "
                      f"parameters, {g0.get('weights', '?')} weights, {g0['dtype']}, batch "
                      f"{g0['batch']}, greedy)", "",
                  markdown_table(GEN_HEADERS, generate_rows(results))]
    extra = (ordering_lines(results) + headline_lines(results) + note_lines(results)
             + skip_lines(env.get("skipped", [])))
    extra += [f"Warning: {w}" for w in env.get("warnings", [])]
    if extra:
        parts += ["", "```", *extra, "```"]
    return "\n".join(parts) + "\n"


def write_json(path: str, env: dict, results: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump({"env": env, "results": results}, f, indent=1, default=str)


# ---------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------
MATPLOTLIB_HINT = ("--plot needs matplotlib, which is not installed: `pip install matplotlib` "
                   "(into this environment: `{python} -m pip install matplotlib`)")


def write_plot(path: str, env: dict, results: list[dict]) -> bool:
    """Latency against sequence length: generation per (implementation, mode) from the per-step
    samples, and prefill time per contestant from the ops sweep. False if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(MATPLOTLIB_HINT.format(python=sys.executable), file=sys.stderr)
        return False
    gen = [r for r in results if r["bench"] == "generate"]
    pre = [r for r in results if r["bench"] == "ops" and r["op"] == "g_attention"]
    panels = [p for p in (("gen", gen), ("pre", pre)) if p[1]]
    if not panels:
        print("--plot: no generate or g_attention results to plot", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.6), squeeze=False)
    styles = {"none": ":", "kv": "--", "kvg": "-"}
    for ax, (kind, rows) in zip(axes[0], panels):
        if kind == "gen":
            for r in rows:
                steps = r.get("step_ms") or []
                if not steps:
                    continue
                n = min(len(s) for s in steps)
                med = [statistics.median(s[i] for s in steps) for i in range(n)]
                xs = [r["prompt_len"] + 1 + i for i in range(n)]
                ax.plot(xs, med, styles.get(r["mode"], "-"), marker="." if n < 40 else None,
                        label=f"{r['impl']} {r['mode']} (prompt {r['prompt_len']})")
            ax.set_xlabel("sequence length at the step (tokens)")
            ax.set_ylabel("per-token latency, median over repeats (ms)")
            ax.set_title("generate: latency per decode step")
        else:
            groups: dict[tuple, list] = {}
            for r in rows:
                groups.setdefault((r["impl"], r["dtype"], r["causal"], r["B"]), []).append(r)
            for (impl, dtype, causal, B), rs in groups.items():
                rs = sorted(rs, key=lambda r: r["Sq"])
                ax.errorbar([r["Sq"] for r in rs], [r["time_ms_p50"] for r in rs],
                            yerr=[[r["time_ms_p50"] - r["time_ms_p20"] for r in rs],
                                  [r["time_ms_p80"] - r["time_ms_p50"] for r in rs]],
                            marker="o", capsize=3,
                            label=f"{impl} {dtype}{' causal' if causal else ''} B{B}")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length S")
            ax.set_ylabel("time p50 (ms), bars p20–p80")
            ax.set_title("g_attention prefill")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(env_line(env), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
