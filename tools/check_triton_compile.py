"""Compile the Triton kernels of pldr_kernels for a CUDA target without a GPU (docs/design.md §3.7).

The launchers of pldr_kernels/triton_kernels/attention.py run on small CPU tensors with every
kernel launch replaced by a recorder; each distinct recorded variant (dtype, head dim, G or not,
key mask or not) is then compiled by ``triton.compile`` for the target, and its PTX assembled by
Triton's own ptxas with ``-v``. Prints shared memory, registers and spill stores per kernel
variant; exits 1 when a variant does not compile or needs more shared memory than the target has.
Register spills are reported, not failed on (a spill costs speed, not correctness).

    python tools/check_triton_compile.py [--arch 90] [--dtypes bf16 fp16 fp32] [--head-dims 64 128]

Needs triton with its NVIDIA backend (the pip wheel has one), no GPU, and no TRITON_INTERPRET.
The divisibility hints approximate the JIT's specialisation for contiguous inputs (pointers and
strides that are multiples of 16), so registers may differ a little from a real launch.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes per block, opt-in maximum
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                torch.bool: "i1"}
KERNELS = ("_fwd_kernel", "_bwd_prep_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel",
           "_sum_dg_partials_kernel")


class Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, fn, launches):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.fn, args, kwargs))
        return launch


def signature(fn, args, kwargs):
    """(signature, constexprs, attrs) of one launch for ``triton.compiler.ASTSource``."""
    values = dict(zip(fn.arg_names, args)) | kwargs
    sig, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        name, value = param.name, values[param.name]
        if param.is_constexpr:
            sig[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            sig[name] = "*" + TRITON_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i32"
            if value % 16 == 0 and i not in fn.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(value).__name__}")
    return sig, constexprs, attrs


def record_launches(attention, testing, dtype, d, with_g, with_mask):
    launches = []
    originals = {name: getattr(attention, name) for name in KERNELS}
    for name, fn in originals.items():
        setattr(attention, name, Recorder(fn, launches))
    checker = attention._check_runs_here
    attention._check_runs_here = lambda q: None  # CPU tensors stand in for CUDA ones
    try:
        B, S, H = 2, 100, 2
        q, k, v = testing.random_attention_inputs(B, S, S, H, d, dtype)
        G = testing.random_g(B, H, d) if with_g else None
        mask = torch.ones(B, S, dtype=torch.bool) if with_mask else None
        out, lse = torch.zeros_like(q), torch.zeros(B, H, S)
        attention.g_attention_forward(q, k, v, G, mask, True)
        attention.g_attention_backward(q, q, k, v, G, out, lse, mask, True, None)
    finally:
        for name, fn in originals.items():
            setattr(attention, name, fn)
        attention._check_runs_here = checker
    return launches


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90,
                        help="compute capability × 10 (90: H100 / H200, 80: A100)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--head-dims", nargs="+", type=int, default=[64, 128], choices=[64, 128])
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: this compiles the kernels for a GPU")

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    from pldr_kernels import testing
    from pldr_kernels.triton_kernels import attention

    target = GPUTarget("cuda", args.arch, 32)
    ptxas = get_ptxas(target.arch).path
    gpu_name = f"sm_{args.arch}a" if args.arch >= 90 else f"sm_{args.arch}"
    limit = SHARED_LIMIT.get(args.arch, 101376)
    done, failures = set(), 0
    print(f"Triton {triton.__version__}, target {gpu_name}, shared memory limit {limit} B")
    for dtype_name, d, with_g, with_mask in itertools.product(args.dtypes, args.head_dims,
                                                               (True, False), (True, False)):
        launches = record_launches(attention, testing, DTYPES[dtype_name], d, with_g, with_mask)
        for fn, fn_args, kwargs in launches:
            kwargs = dict(kwargs)
            options = dict(num_warps=kwargs.pop("num_warps", 4),
                           num_stages=kwargs.pop("num_stages", 3))
            sig, constexprs, attrs = signature(fn, fn_args, kwargs)
            key = (fn.__name__, repr(sig), repr(constexprs), repr(options))
            if key in done:
                continue
            done.add(key)
            what = (f"{fn.__name__:24s} {dtype_name} d{d} G={'yes' if with_g else 'no'} "
                    f"mask={'yes' if with_mask else 'no'} warps={options['num_warps']} "
                    f"stages={options['num_stages']}")
            t0 = time.perf_counter()
            try:
                compiled = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=target,
                                          options=options)
            except Exception as exc:  # report every variant, then fail
                failures += 1
                print(f"{what}: FAILED to compile: {type(exc).__name__}: {str(exc)[:400]}",
                      flush=True)
                continue
            with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
                ptx.write(compiled.asm["ptx"])
                ptx.flush()
                report = subprocess.run(
                    [ptxas, "-v", f"--gpu-name={gpu_name}", ptx.name, "-o", os.devnull],
                    capture_output=True, text=True).stderr
            regs = re.search(r"Used (\d+) registers", report)
            spills = re.search(r"(\d+) bytes spill stores", report)
            shared = compiled.metadata.shared
            failures += shared > limit
            print(f"{what}: shared {shared:6d} B{' OVER THE LIMIT' if shared > limit else ''}, "
                  f"registers {regs.group(1) if regs else '?'}, spill stores "
                  f"{spills.group(1) if spills else '?'} B ({time.perf_counter() - t0:.1f} s)",
                  flush=True)
    print(f"{len(done)} variants, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
