"""Rendering a run — the dict ``{"env", "results"}`` that ``--json`` writes — as the terminal
report, Markdown, or a PNG. Everything here reads only that dict, so a saved JSON file renders the
same (``pldr-bench --from-json RUN.json --markdown --plot RUN.png``)."""
from __future__ import annotations

import os
import statistics
import textwrap
from collections.abc import Callable, Iterable

from .._io import atomic_write


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0 or abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.3g}" if abs(x) < 1 else f"{x:.2f}"


def mib(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.1f}"


def times(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def grouped(rows: Iterable[dict], key: Callable[[dict], object]) -> dict[object, list[dict]]:
    """Rows by ``key(row)``, groups and rows in the order first seen."""
    groups: dict[object, list[dict]] = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    return groups


def machine(env: dict) -> str:
    """The CPU model and thread count (and the GPU) — named by every table."""
    cpu = f"{env['cpu']}, {env['threads']} threads"
    return f"{env['device_name']} (host {cpu})" if env["device"].startswith("cuda") else cpu


def env_line(env: dict) -> str:
    build = env.get("build_info", {})
    return (f"{machine(env)}, torch {env['torch']}, pldr_kernels {env['pldr_kernels']} @ "
            f"{env['git_commit']} (cpu flags {build.get('cpu_flags', '?')}, cuda kernels "
            f"{'yes' if build.get('with_cuda') else 'no'})")


# ---- the tables: (header, right-aligned, the cell of a result row) per column ------------------
def length(r: dict) -> str:
    return f"{'L' if r['op'] == 'g_attention_decode' else 'S'}{r['Sk']}"


def rate(r: dict) -> str:
    if r.get("tflops") is not None:  # GFLOP/s below 1 TFLOP/s (CPU rows)
        t = r["tflops"]
        return f"{fmt(t)} TFLOP/s" if t >= 1 else f"{fmt(t * 1e3)} GFLOP/s"
    share = f" ({r['copy_fraction']:.0%} of copy)" if r.get("copy_fraction") else ""
    return f"{fmt(r['gbps'])} GB/s{share}"


def check(r: dict) -> str:
    return "ok" if r["valid"] else "INVALID"


OPS_COLUMNS = (
    ("op", False, lambda r: r["op"]),
    ("shape", False, lambda r: f"B{r['B']} {length(r)} H{r['H']} d{r['d']}"),
    ("dtype", False, lambda r: r["dtype"]),
    ("causal", False, lambda r: "yes" if r["causal"] else "no"),
    ("impl", False, lambda r: r["impl"]),
    ("p50 ms", True, lambda r: fmt(r["time_ms_p50"])),
    ("p20–p80 ms", True, lambda r: f"{fmt(r['time_ms_p20'])}–{fmt(r['time_ms_p80'])}"),
    ("rate", True, rate),
    ("x mm", True, lambda r: "-" if r.get("mm_fraction") is None else f"{r['mm_fraction']:.2f}"),
    ("x ref", True, lambda r: times(r.get("speedup_vs_reference"))),
    ("extra MiB", True, lambda r: mib(r.get("peak_extra_bytes"))),
    ("check", False, check))
GEN_COLUMNS = (
    ("impl", False, lambda r: r["impl"]),
    ("dtype", False, lambda r: r["dtype"]),
    ("mode", False, lambda r: r["mode"]),
    ("prompt", True, lambda r: str(r["prompt_len"])),
    ("new", True, lambda r: str(r["new_tokens"])),
    ("TTFT ms", True, lambda r: fmt(r["ttft_ms"])),
    ("token p50 ms", True, lambda r: fmt(r["per_token_ms_p50"])),
    ("token p90 ms", True, lambda r: fmt(r["per_token_ms_p90"])),
    ("tokens/s", True, lambda r: fmt(r["tokens_per_s"])),
    ("x ref", True, lambda r: times(r.get("speedup_vs_reference"))),
    ("step MB", True, lambda r: fmt(r["step_bytes"] / 1e6) if r.get("step_bytes") else "-"),
    ("step GB/s", True, lambda r: fmt(r.get("step_gbps")) if r.get("step_gbps") else "-"),
    ("copy GB/s", True, lambda r: (f"{fmt(r['copy_gbps'])} ({r['copy_fraction']:.0%})"
                                   if r.get("copy_gbps") else "-")),
    ("peak MiB", True, lambda r: mib(r.get("peak_memory_bytes"))),
    ("check", False, check))


def train_shape(r: dict) -> str:
    heads = "" if r["part"] == "model" else f" H{r['H']} d{r['d']}"
    return f"B{r['B']} S{r['S']}{heads}"


def train_rate(r: dict) -> str:
    if r.get("tokens_per_s") is not None:
        return f"{fmt(r['tokens_per_s'])} tok/s"
    return f"{fmt(r['tflops'])} TFLOP/s" if r.get("tflops") is not None else "-"


TRAIN_COLUMNS = (
    ("part", False, lambda r: r["part"]),
    ("shape", False, train_shape),
    ("dtype", False, lambda r: r["dtype"]),
    ("causal", False, lambda r: ("yes" if r["causal"] else "no") if r["part"] == "g_attention"
     else "-"),
    ("impl", False, lambda r: r["impl"]),
    ("p50 ms", True, lambda r: fmt(r["time_ms_p50"])),
    ("p20–p80 ms", True, lambda r: f"{fmt(r['time_ms_p20'])}–{fmt(r['time_ms_p80'])}"),
    ("rate", True, train_rate),
    ("x ref", True, lambda r: times(r.get("speedup_vs_reference"))),
    ("extra MiB", True, lambda r: mib(r.get("peak_extra_bytes"))),
    ("check", False, check))


def table(columns, rows: list[dict], markdown: bool) -> str:
    headers = [header for header, _, _ in columns]
    right = [right for _, right, _ in columns]
    cells = [[cell(r) for _, _, cell in columns] for r in rows]
    if markdown:
        return "\n".join(["| " + " | ".join(headers) + " |",
                          "|" + "|".join("---:" if r else "---" for r in right) + "|",
                          *("| " + " | ".join(line) + " |" for line in cells)])
    widths = [max(len(h), *(len(line[i]) for line in cells)) for i, h in enumerate(headers)]

    def line(texts, right):
        return "  ".join(t.rjust(w) if r else t.ljust(w)
                         for t, w, r in zip(texts, widths, right)).rstrip()
    return "\n".join([line(headers, [False] * len(headers)), "  ".join("-" * w for w in widths),
                      *(line(texts, right) for texts in cells)])


# ---- the lines below the tables ----------------------------------------------------------------
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
        ratio, extra = r.get("ratio_to_reference"), ""
        if ratio is not None and r["impl"] != "reference":
            extra = f"  = {ratio:.3f} x reference"
        if r.get("requirement_met") is not None:
            extra += f"  [{'PASS' if r['requirement_met'] else 'FAIL'}: {r['requirement']}]"
        lines.append(f"  {r['impl']:<13} {mib(r['peak_extra_bytes']):>9} MiB{extra}")
    return lines


def ordering_lines(results: list[dict]) -> list[str]:
    """Per implementation and prompt: is the per-token p50 kvg <= kv < none?"""
    lines = []
    runs = grouped((r for r in results if r["bench"] == "generate"),
                   lambda r: (r["impl"], r["dtype"], r["prompt_len"], r["new_tokens"]))
    for (impl, dtype, plen, new), rows in runs.items():
        t = {r["mode"]: r["per_token_ms_p50"] for r in rows}
        if {"none", "kv", "kvg"} <= t.keys():
            ok = t["kvg"] <= t["kv"] < t["none"]
            lines.append(f"  {impl:<13} {dtype:<9} prompt {plen} +{new}: per-token p50 kvg "
                         f"{fmt(t['kvg'])} ms, kv {fmt(t['kv'])} ms, none {fmt(t['none'])} ms"
                         f"  [{'PASS' if ok else 'FAIL'}: kvg <= kv < none]")
    return ["Cache-mode ordering:"] + lines if lines else []


def train_ratio_lines(results: list[dict]) -> list[str]:
    """pldr_kernels' training rows against every other contestant of the same case: time ratio
    (their p50 / ours) and peak extra memory ratio (ours / theirs)."""
    keys = ("part", "B", "S", "H", "d", "dtype", "causal")
    rows = [r for r in results if r["bench"] == "train"]
    lines = []
    for r in (r for r in rows if r["impl"] == "pldr_kernels"):
        same = [o for o in rows if o is not r and all(o[k] == r[k] for k in keys)]
        speed = ", ".join(f"{o['time_ms_p50'] / r['time_ms_p50']:.2f}x {o['impl']}" for o in same)
        memory = ", ".join(f"{r['peak_extra_bytes'] / o['peak_extra_bytes']:.3f}x {o['impl']}'s"
                           for o in same if o.get("peak_extra_bytes") and r["peak_extra_bytes"])
        lines.append(f"  train {r['part']} {train_shape(r)} {r['dtype']}: {speed}"
                     + (f"; peak extra memory {memory}" if memory else ""))
    return lines


def mm_lines(results: list[dict]) -> list[str]:
    """The torch.mm rate behind each prefill case's "x mm" column."""
    cases = grouped((r for r in results if r["bench"] == "ops" and r.get("mm_tflops")),
                    lambda r: (r["op"], r["B"], r["Sk"], r["H"], r["d"], r["dtype"], r["causal"]))
    lines = [f"  {r['op']} B{r['B']} {length(r)} H{r['H']} d{r['d']} {r['dtype']}"
             f"{' causal' if r['causal'] else ''}: torch.mm fp32 {r['mm_n']}x{r['mm_n']} (same "
             f"FLOPs) {fmt(r['mm_tflops'] * 1e3)} GFLOP/s" for r, *_ in cases.values()]
    return (["x mm = the row's FLOP rate / torch.mm's fp32 rate, timed in the same interleaved "
             "repeats on the same threads:"] + lines) if lines else []


def summary_lines(env: dict, results: list[dict]) -> list[str]:
    lines = [f"Device copy bandwidth: {fmt(r['gbps'])} GB/s ({r['impl']} of {r['bytes'] >> 20} "
             "MiB, read + write)" for r in results if r["bench"] == "copy"]
    lines += mm_lines(results)
    longest = max((r["prompt_len"] for r in results if r["bench"] == "generate"), default=0)
    heads = []
    for r in (r for r in results if r.get("impl") == "pldr_kernels"):
        if r["bench"] == "ops" and r.get("best_other"):
            vs_ref = r["speedup_vs_reference"]
            heads.append(f"  {r['op']} B{r['B']} {length(r)} {r['dtype']}: "
                         + (f"{vs_ref:.2f}x reference, " if vs_ref else "")
                         + f"{r['speedup_vs_best_other']:.2f}x {r['best_other']}")
        if r["bench"] == "generate" and r["speedup_vs_reference"] and r["prompt_len"] == longest:
            heads.append(f"  generate {r['dtype']} {r['mode']} prompt {r['prompt_len']}: "
                         f"per token {r['speedup_vs_reference']:.2f}x, TTFT "
                         f"{r['ttft_speedup_vs_reference']:.2f}x the fp32 reference")
    heads += train_ratio_lines(results)
    lines += ["Speedups of pldr_kernels (p50):"] + heads if heads else []
    notes = [f"  {r.get('op', r.get('part'))} {r['impl']}: {r['note']}" for r in results
             if r.get("note")]
    notes += [f"  {s['bench']} {s.get('op') or ''} / {s['impl']}: {s['reason']}"
              for s in env.get("skipped", [])]
    return lines + (["Notes and skipped contestants:"] + notes if notes else [])


def render(data: dict, markdown: bool = False) -> str:
    env, results = data["env"], data["results"]
    bold = (lambda text: f"**{text}**") if markdown else (lambda text: text)
    if markdown:
        parts = [f"Measured with `{' '.join(['pldr-bench', *env['argv'][1:]])}` on "
                 f"{env_line(env)}, {env['time_utc']}; {env['wall_s']:.0f} s of wall time. Times "
                 "are medians (p50) over interleaved repeats; p20–p80 shows the spread."]
    else:
        parts = [env_line(env)]
    ops = [r for r in results if r["bench"] == "ops"]
    if ops:
        parts += ["", f"{bold('Ops')} on {machine(env)}:", "", table(OPS_COLUMNS, ops, markdown)]
    gen = [r for r in results if r["bench"] == "generate"]
    if gen:
        g = gen[0]
        parts += ["", f"{bold('Generation')} ({g['model']}, {g['params'] / 1e6:.1f}M parameters, "
                      f"{g['weights']} weights, batch {g['batch']}, greedy; x ref = per-token "
                      f"speedup over the fp32 reference; step MB = what one decode step reads "
                      f"(weights in their dtype + K/V + G), step GB/s = that per p50 token time, "
                      f"copy GB/s = tensor.copy_ of as many bytes (read + written per s) in the "
                      f"same run, (%) = step GB/s over it; int8 = weight-only int8, fp32 "
                      f"activations; decode linears: {g.get('cpu_isa') or 'torch'}) on "
                      f"{machine(env)}:", "",
                  table(GEN_COLUMNS, gen, markdown)]
    train = [r for r in results if r["bench"] == "train"]
    if train:
        models = {r["model"]: r["params"] for r in train if r.get("model")}
        about = "".join(f"; model {m}, {n / 1e6:.1f}M parameters" for m, n in models.items())
        method = next((r["memory_method"] for r in train if r.get("memory_method")), None)
        parts += ["", f"{bold('Training')} (forward + backward, each call returns the gradients"
                      f"{about}{'; extra MiB: ' + method if method else ''}) on {machine(env)}:",
                  "", table(TRAIN_COLUMNS, train, markdown)]
    llama = [r for r in results if r["bench"] == "llama"]
    if llama:
        from .llama_suite import LLAMA_COLUMNS, heading
        parts += ["", f"{bold(heading(llama))} on {machine(env)}:", "",
                  table(LLAMA_COLUMNS, llama, markdown)]
    extra = (memory_lines(results) + ordering_lines(results) + summary_lines(env, results)
             + [f"WARNING: {w}" for w in env.get("warnings", [])])
    if any(not r.get("valid", True) for r in results):
        extra.append("WARNING: some rows are INVALID (contestants disagreed; see the messages)")
    if extra:
        parts += [""] + (["```", *extra, "```"] if markdown else extra)
    return "\n".join(parts) + "\n"


# ---- the plot ----------------------------------------------------------------------------------
MODE_COLOURS = {"none": "tab:red", "kv": "tab:blue", "kvg": "tab:green"}
LINE_STYLES = ["-", "--", ":", "-."]


def write_plot(path: str, data: dict) -> None:
    """Generation: per-token latency against the sequence length, and time to first token against
    the prompt length (colour = cache mode, line style = implementation); the ops sweep: prefill
    time against S per contestant; training: forward + backward time against S per contestant
    (line style = part)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    env, results = data["env"], data["results"]
    gen = [r for r in results if r["bench"] == "generate"]
    pre = [r for r in results if r["bench"] == "ops" and r["op"] == "g_attention"]
    train = [r for r in results if r["bench"] == "train"]
    if not gen and not pre and not train:
        raise ValueError("nothing to plot: the run has no generate, g_attention or train results")
    n = 2 * bool(gen) + bool(pre) + bool(train)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n + 2.2, 4.8), layout="constrained",
                             squeeze=False)
    axes = list(axes[0])
    if gen:
        steps_ax, ttft_ax = axes.pop(0), axes.pop(0)
        impls = grouped(gen, lambda r: f"{r['impl']} {r['dtype']}")
        style = {impl: LINE_STYLES[i % len(LINE_STYLES)] for i, impl in enumerate(impls)}
        for impl, rows in impls.items():
            for r in rows:  # the median over repeats of each decode step
                med = [statistics.median(step) for step in zip(*r["step_ms"])]
                steps_ax.plot(range(r["prompt_len"] + 1, r["prompt_len"] + 1 + len(med)), med,
                              style[impl], color=MODE_COLOURS[r["mode"]], lw=1.6)
            for mode, rs in grouped(rows, lambda r: r["mode"]).items():
                rs.sort(key=lambda r: r["prompt_len"])
                ttft_ax.plot([r["prompt_len"] for r in rs], [r["ttft_ms"] for r in rs],
                             style[impl], color=MODE_COLOURS[mode], marker="o", ms=4, lw=1.4)
        steps_ax.set(title="Per-token latency as the context grows",
                     xlabel="tokens in the sequence at the step",
                     ylabel="ms per token (median over repeats)")
        ttft_ax.set(title="Time to first token (prefill)", xlabel="prompt length (tokens)",
                    ylabel="ms (median over repeats)")
        handles = [Line2D([], [], color=c, lw=2, label=f"cache {m}")
                   for m, c in MODE_COLOURS.items() if any(r["mode"] == m for r in gen)]
        handles += [Line2D([], [], color="black", ls=style[i], lw=1.6, label=i) for i in impls]
        fig.legend(handles=handles, loc="outside right upper", fontsize=8,
                   title="colour: cache mode\nline: implementation", title_fontsize=8)
    if pre:
        ax = axes.pop(0)
        colour = {impl: f"C{i}" for i, impl in enumerate(dict.fromkeys(r["impl"] for r in pre))}
        dtypes = list(dict.fromkeys(r["dtype"] for r in pre))
        for (impl, dtype, causal, B), rs in grouped(
                pre, lambda r: (r["impl"], r["dtype"], r["causal"], r["B"])).items():
            rs.sort(key=lambda r: r["Sq"])
            which = dtypes.index(dtype) % len(LINE_STYLES)
            ax.errorbar([r["Sq"] for r in rs], [r["time_ms_p50"] for r in rs],
                        yerr=[[r["time_ms_p50"] - r["time_ms_p20"] for r in rs],
                              [r["time_ms_p80"] - r["time_ms_p50"] for r in rs]],
                        color=colour[impl], ls=LINE_STYLES[which], marker="os^v"[which], ms=4,
                        capsize=3, label=f"{impl} {dtype}{' causal' if causal else ''} B{B}")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set(title="g_attention prefill", xlabel="sequence length S",
               ylabel="ms, p50 (bars p20–p80)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.16), ncol=2, frameon=False)
    if train:
        ax = axes.pop(0)
        colour = {impl: f"C{i}" for i, impl in enumerate(dict.fromkeys(r["impl"] for r in train))}
        parts = list(dict.fromkeys(r["part"] for r in train))
        for (part, impl, dtype, B), rs in grouped(
                train, lambda r: (r["part"], r["impl"], r["dtype"], r["B"])).items():
            rs.sort(key=lambda r: r["S"])
            which = parts.index(part) % len(LINE_STYLES)
            ax.plot([r["S"] for r in rs], [r["time_ms_p50"] for r in rs], color=colour[impl],
                    ls=LINE_STYLES[which], marker="os^v"[which], ms=4,
                    label=f"{part}: {impl} {dtype} B{B}")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set(title="Training: forward + backward", xlabel="sequence length S", ylabel="ms, p50")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.16), ncol=2, frameon=False)
    for ax in fig.axes:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("\n".join(textwrap.wrap(f"pldr-bench on {env_line(env)}, {env['time_utc']}",
                                         110)), fontsize=9)
    try:  # the format from path's suffix, which the temporary file keeps (PNG without one)
        fmt = os.path.splitext(path)[1][1:] or "png"
        atomic_write(path, lambda temp: fig.savefig(temp, dpi=120, format=fmt))
    finally:
        plt.close(fig)
