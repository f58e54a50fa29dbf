"""The carried CUDA wheel: record how it was built, decide whether it fits this machine, unpack it
into the tree, and verify the build that Python imports. Used by `make cuda-check` (which builds
the wheel for the H200 machine's stack into .whl/) and by tools/gpu_check.sh (which uses it there
instead of compiling when it fits).

  python tools/cuda_wheel.py source-hash          sha256 of what the binary is built from
  python tools/cuda_wheel.py record WHEEL         write WHEEL.json (source hash, build info)
  python tools/cuda_wheel.py matches WHEEL        exit 0 if WHEEL fits this Python, torch and tree
  python tools/cuda_wheel.py unpack WHEEL         its _C*.so and _build_info.py into pldr_kernels/
  python tools/cuda_wheel.py verify [--archs A] [--travels]
                                                  import pldr_kernels as `python -m` would in this
                                                  directory, print its report, and fail unless
                                                  every op has CUDA kernels (built for A)
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import json
import os
import platform
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What goes into pldr_kernels/_C: the C++/CUDA sources and the build script. The Python code is
# not part of the binary: a wheel unpacked into a tree runs that tree's Python, as `pip install -e`.
SOURCE_DIRS = ("csrc",)
SOURCE_FILES = ("setup.py",)
SOURCE_SUFFIXES = (".cpp", ".cc", ".cu", ".h", ".hpp", ".cuh")
# Build info "cpu_flags" of CPU code that runs on any x86-64 CPU: setup.py's default (no -march;
# the AVX2 / AVX-512 copies are chosen at run time, csrc/cpu/isa.h) and PLDR_KERNELS_PORTABLE=1.
TRAVELING_CPU_FLAGS = ("runtime ISA avx512/avx2/portable", "portable")


def _atomic_io():
    """pldr_kernels/_io.py (atomic writes, standard library only), loaded by path: importing the
    package would import torch and load the _C that `unpack` is about to replace."""
    spec = importlib.util.spec_from_file_location(
        "pldr_kernels_atomic_io", os.path.join(ROOT, "pldr_kernels", "_io.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def source_hash(root: str = ROOT) -> str:
    paths = [f for f in SOURCE_FILES if os.path.isfile(os.path.join(root, f))]
    for d in SOURCE_DIRS:
        for dirpath, _, files in os.walk(os.path.join(root, d)):
            paths += [os.path.relpath(os.path.join(dirpath, f), root) for f in files
                      if f.endswith(SOURCE_SUFFIXES)]
    h = hashlib.sha256()
    for rel in sorted(paths):
        h.update(rel.encode() + b"\0")
        with open(os.path.join(root, rel), "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def wheel_members(wheel: str) -> tuple[str, str]:
    """(the extension's name, the _build_info.py name) inside the wheel."""
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    so = [n for n in names if n.startswith("pldr_kernels/_C") and n.endswith(".so")]
    info = [n for n in names if n == "pldr_kernels/_build_info.py"]
    if len(so) != 1 or not info:
        raise SystemExit(f"{wheel}: expected one pldr_kernels/_C*.so and "
                         f"pldr_kernels/_build_info.py, found {so + info}")
    return so[0], info[0]


def wheel_build_info(wheel: str) -> dict:
    _, info = wheel_members(wheel)
    with zipfile.ZipFile(wheel) as z:
        text = z.read(info).decode()
    tree = ast.parse(text)
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "BUILD_INFO":
            return ast.literal_eval(node.value)
    raise SystemExit(f"{wheel}: {info} has no BUILD_INFO")


def wheel_tags(wheel: str) -> tuple[str, str, str]:
    """(python, abi, platform) from the file name: name-version-python-abi-platform.whl."""
    parts = os.path.basename(wheel)[: -len(".whl")].split("-")
    if len(parts) < 5:
        raise SystemExit(f"{wheel}: not a wheel file name (name-version-python-abi-platform.whl)")
    return parts[-3], parts[-2], parts[-1]


def sidecar(wheel: str) -> str:
    return wheel + ".json"


def record(wheel: str, root: str = ROOT) -> dict:
    """Write WHEEL.json: the wheel's checksum, its build info and the hash of root's sources."""
    info = wheel_build_info(wheel)
    rec = {"wheel": os.path.basename(wheel), "wheel_sha256": file_sha256(wheel),
           "source_sha256": source_hash(root), "build_info": info,
           "built_in_python": platform.python_version()}
    _atomic_io().atomic_write_text(sidecar(wheel), json.dumps(rec, indent=1) + "\n")
    return rec


def cmd_record(args) -> int:
    rec = record(args.wheel)
    print(f"wrote {sidecar(args.wheel)}: source {rec['source_sha256'][:12]}, {rec['build_info']}")
    return 0


def mismatches(wheel: str, root: str = ROOT) -> list[str]:
    """Why WHEEL cannot stand in for a build from this tree with this Python and torch."""
    import torch

    why = []
    py, abi, plat = wheel_tags(wheel)
    if abi == "abi3":
        need = (int(py[2]), int(py[3:]))  # cp311 -> (3, 11)
        if sys.implementation.name != "cpython" or sys.version_info[:2] < need:
            why.append(f"wheel is {py}-abi3, this is {sys.implementation.name} "
                       f"{platform.python_version()}")
    elif py != f"cp{sys.version_info[0]}{sys.version_info[1]}":
        why.append(f"wheel is for {py}, this is Python {platform.python_version()}")
    if plat != f"linux_{platform.machine()}":
        why.append(f"wheel is for {plat}, this machine is linux_{platform.machine()}")
    info = wheel_build_info(wheel)
    if info.get("built_with_torch") != torch.__version__:
        why.append(f"wheel built with torch {info.get('built_with_torch')}, "
                   f"this is torch {torch.__version__}")
    if info.get("built_with_cuda") != torch.version.cuda:
        why.append(f"wheel built with CUDA {info.get('built_with_cuda')}, "
                   f"this torch has CUDA {torch.version.cuda}")
    if not info.get("with_cuda"):
        why.append("wheel has no CUDA kernels")
    if info.get("cpu_flags") not in TRAVELING_CPU_FLAGS:
        why.append(f"wheel's CPU kernels were built with {info.get('cpu_flags')!r}, not for any "
                   "x86-64 CPU: they may not run on this CPU")
    try:
        with open(sidecar(wheel)) as f:
            record = json.load(f)
    except OSError:
        why.append(f"no {os.path.basename(sidecar(wheel))} beside it (made by `make cuda-check`), "
                   "so its sources are unknown")
    else:
        if record.get("wheel_sha256") != file_sha256(wheel):
            why.append(f"{os.path.basename(sidecar(wheel))} describes another wheel file")
        here = source_hash(root)
        if record.get("source_sha256") != here:
            why.append(f"built from other sources (csrc/, setup.py): "
                       f"{str(record.get('source_sha256'))[:12]} vs this tree's {here[:12]}")
    return why


def cmd_matches(args) -> int:
    why = mismatches(args.wheel)
    if why:
        print(f"{os.path.basename(args.wheel)} does not fit here:\n  " + "\n  ".join(why))
        return 1
    info = wheel_build_info(args.wheel)
    print(f"{os.path.basename(args.wheel)} fits: torch {info['built_with_torch']}, CUDA "
          f"{info['built_with_cuda']}, archs {info['cuda_archs']}, CPU code for any x86-64, "
          "same sources")
    return 0


def unpack(wheel: str, root: str = ROOT) -> tuple[str, str]:
    """Put the wheel's extension and build info into root/pldr_kernels, where an in-place build
    would (root's Python code then runs with this binary)."""
    dest = os.path.join(root, "pldr_kernels")
    so, info = wheel_members(wheel)
    for stale in os.listdir(dest):  # another build's extension would shadow or confuse the import
        if stale.startswith("_C") and stale.endswith(".so"):
            os.remove(os.path.join(dest, stale))
    atomic_io = _atomic_io()
    with zipfile.ZipFile(wheel) as z:
        for member in (so, info):
            atomic_io.atomic_write_bytes(os.path.join(root, member), z.read(member))
    return so, info


def cmd_unpack(args) -> int:
    so, info = unpack(args.wheel)
    print(f"unpacked {so} and {info} from {os.path.basename(args.wheel)} into "
          f"{os.path.join(ROOT, 'pldr_kernels')}")
    return 0


def cmd_verify(args) -> int:
    # Import what `python -m pldr_kernels` would here: the tree in the current directory, if any,
    # else the installed package (not this script's folder, which Python put first on the path).
    sys.path[0] = os.getcwd()
    import pldr_kernels
    from pldr_kernels import ops
    from pldr_kernels.__main__ import report

    print(f"pldr_kernels from {os.path.dirname(pldr_kernels.__file__)}")
    print(report())
    if ops._LOAD_ERROR is not None:
        print(f"verify: the extension did not load: {ops._LOAD_ERROR}")
        return 1
    from pldr_kernels._build_info import BUILD_INFO

    problems = []
    if not BUILD_INFO.get("with_cuda"):
        problems.append("built without CUDA kernels")
    if args.archs and BUILD_INFO.get("cuda_archs") != args.archs:
        problems.append(f"CUDA archs {BUILD_INFO.get('cuda_archs')!r}, expected {args.archs!r}")
    if args.travels and BUILD_INFO.get("cpu_flags") not in TRAVELING_CPU_FLAGS:
        problems.append(f"CPU flags {BUILD_INFO.get('cpu_flags')!r}, expected one of "
                        f"{', '.join(TRAVELING_CPU_FLAGS)}")
    from pldr_kernels.testing import OPS, available_backends

    missing = [op for op in OPS if "cuda" not in available_backends(op, need_device=False)]
    if missing:
        problems.append(f"no CUDA kernel registered for {', '.join(missing)}")
    if problems:
        print("verify: " + "; ".join(problems))
        return 1
    print(f"verify: extension loaded, CUDA kernels for {', '.join(OPS)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[4:]))
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("source-hash")
    for name in ("record", "matches", "unpack"):
        sub.add_parser(name).add_argument("wheel")
    v = sub.add_parser("verify")
    v.add_argument("--archs", help="expected TORCH_CUDA_ARCH_LIST of the build, e.g. 9.0a")
    v.add_argument("--travels", action="store_true",
                   help="expect CPU code that runs on any x86-64 CPU (TRAVELING_CPU_FLAGS)")
    args = p.parse_args(argv)
    if args.cmd == "source-hash":
        print(source_hash())
        return 0
    return {"record": cmd_record, "matches": cmd_matches, "unpack": cmd_unpack,
            "verify": cmd_verify}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
