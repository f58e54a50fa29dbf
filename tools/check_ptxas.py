"""Read a `-Xptxas -v` build log: print registers per kernel and fail on any register spill.

Usage: python tools/check_ptxas.py build/cuda-build.log
"""
import re
import subprocess
import sys


def demangle(names):
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                             check=True).stdout.splitlines()
        return dict(zip(names, out))
    except (OSError, subprocess.CalledProcessError):
        return {n: n for n in names}


def main(path: str) -> int:
    text = open(path, errors="replace").read()
    entry = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
    spill = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
    regs = re.compile(r"Used (\d+) registers")
    rows, current = [], None
    for line in text.splitlines():
        m = entry.search(line)
        if m:
            current = {"fn": m.group(1), "arch": m.group(2), "regs": None, "spill": (0, 0)}
            rows.append(current)
            continue
        if current is None:
            continue
        m = spill.search(line)
        if m:
            current["spill"] = (int(m.group(1)), int(m.group(2)))
        m = regs.search(line)
        if m:
            current["regs"] = int(m.group(1))
    if not rows:
        print(f"check_ptxas: no ptxas -v output in {path} (was PLDR_KERNELS_PTXAS_VERBOSE=1 set?)")
        return 1
    names = demangle(sorted({r["fn"] for r in rows}))
    bad = [r for r in rows if r["spill"] != (0, 0)]
    for r in rows:
        flag = "  SPILL" if r in bad else ""
        print(f"{r['arch']:>7} regs {r['regs']!s:>4} spill st/ld {r['spill'][0]}/{r['spill'][1]}"
              f"  {names[r['fn']][:110]}{flag}")
    # ptxas's own warnings (-warn-spills, -warn-lmem-usage), not the command lines with the flags
    warn = [l for l in text.splitlines() if l.lstrip().startswith("ptxas") and "warning" in l
            and ("spill" in l.lower() or "local memory" in l.lower())]
    if warn:
        print("\n".join(warn))
        return 1
    if bad:
        print(f"check_ptxas: {len(bad)} kernel(s) spill registers")
        return 1
    print(f"check_ptxas: {len(rows)} kernel compilations, no register spills")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
