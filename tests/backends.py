"""The backends every op test runs on, and the one list of how they differ.

* ``cpu``  — ``torch.ops.pldr.*`` on CPU tensors (csrc/cpu);
* ``cuda`` — ``torch.ops.pldr.*`` on CUDA tensors (csrc/cuda, a CUDA build and a GPU);
* ``emu``  — the same CUDA kernels and launch logic run on the CPU by the emulator of
  tools/cuda_emu (docs/design.md §5), through the small C++ drivers in tests/emu/. It needs only
  a C++ compiler, so the CUDA device code is tested on every machine.

A test takes a :class:`Backend` as its ``backend`` parameter and calls ``backend.g_attention``,
``backend.g_attention_decode`` or ``backend.metric_tensors`` with the op's signature, on tensors
moved with ``backend.to``; the results come back as tensors on ``backend.device``.

Cases carry a size (``SIZES``): the emulator runs one CUDA thread per host thread, so it gets
only ``tiny`` cases; the CPU kernels run ``tiny`` and ``medium`` ones; a GPU runs them all.

Per-backend exceptions, all here:

* ``EXCLUDED`` — properties a backend does not run, each with the reason (e.g. input
  validation is host code of the op, which the emulator drivers bypass);
* ``Backend.checks_cache_bounds_on_host`` — the one difference in the ops' contract: the CPU
  decode raises on cache lengths that would write past the cache (or ask for rows that are not
  there); CUDA keeps ``cache_seqlens`` on the device (no host sync, CUDA-graph safe), so it leaves
  such a row unwritten and returns NaN for it (csrc/cuda/g_attention_decode_api.cu);
* what the emulator drivers can express: any strided view for g_attention; for decode and
  metric_tensors, contiguous tensors or head slices ``t[:, :, :H]`` of a wider contiguous tensor
  (the drivers' ``pad_heads``), and contiguous weights. A case outside that raises
  :class:`EmulatorCannotExpress`; the tests do not build such cases for ``emu``.
"""
from __future__ import annotations

import math
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from pldr_kernels import ops, triton_kernels
from pldr_kernels.testing import BACKWARD_OPS, OPS, available_backends

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "cuda_emu"))
import harness  # noqa: E402

Tensor = torch.Tensor
EMU_DRIVERS = Path(__file__).resolve().parent / "emu"
SIZES = ("tiny", "medium", "large")

# Properties a backend does not run, and why. (Keys: backend name, property name as the tests
# pass it to ``backends``.)
EXCLUDED: dict[tuple[str, str], str] = {
    ("emu", "input validation"):
        "argument checks are host code of the op (csrc/common/checks.h, the *_api.cu files); the "
        "emulator drivers launch the kernels directly",
    ("emu", "empty inputs"):
        "the CUDA API returns before any launch when an output is empty; the drivers always launch",
    ("emu", "dispatcher"):
        "opcheck, torch.compile and version counters are about the op registered with the "
        "dispatcher; the emulator runs the kernels without it",
    ("emu", "general strides"):
        "the decode and metric_tensors drivers take contiguous arrays or head slices (pad_heads) "
        "only; head slices are tested on emu, other views on cpu and cuda",
    ("emu", "strided weights"):
        "the metric_tensors driver reads contiguous weights; the CUDA API makes them contiguous "
        "before the launch, which only cpu and cuda run",
    ("emu", "backward"):
        "the emulator runs the CUDA C++ kernels, and g_attention_backward has none (its CUDA "
        "kernel is Triton, tested by tests/test_triton_attention.py)",
    ("emu", "thread count"):
        "the emulator runs a fixed number of host threads per CUDA block; thread count is a CPU "
        "backend setting",
    ("cuda", "thread count"): "torch.set_num_threads does not reach CUDA kernels",
}


# What a backend guarantees beyond the rule of pldr_kernels.testing; the tests assert these as
# extra, named checks (``backend.guarantees(name)``), never as a silently different bound.
EXTRA_GUARANTEES: dict[tuple[str, str], str] = {
    ("cpu", "g_attention lse at the fp32 rule"):
        "the CPU kernel computes in fp32 throughout (q·G, scores and P·V on K/V tiles converted "
        "to fp32, csrc/cpu/g_attention_cpu.cpp), so lse, which depends on the inputs through the "
        "scores only, meets the fp32 rule for bf16/fp16 inputs too; CUDA rounds q·G to the input "
        "dtype for the tensor cores, and its lse meets the peer rule",
    ("cpu", "metric_tensors G from A"):
        "the CPU kernel sums W·A in fp64, so steps 9-12 from its own A meet the fp32 rule at once "
        "and G end to end stays within 2x PyTorch-fp32 (testing.check_metric_g_from_a)",
}


class EmulatorCannotExpress(NotImplementedError):
    """The emulator driver of an op cannot take these arguments (see the module doc)."""


def _cuda_skip_reason(op: str) -> str | None:
    """Why ``pldr::<op>`` cannot run on CUDA here. A backward op whose CUDA kernel is the Triton
    path (``triton_kernels.REGISTERED``: g_attention_backward) needs triton and a GPU, not a CUDA
    build; its tests run the forward there too (Triton's, in a build without CUDA kernels). The
    forward ops' own tests keep to CUDA builds (the Triton forward: tests/test_triton_attention)."""
    if ops._LOAD_ERROR is not None:
        return f"pldr_kernels._C is not built ({ops._LOAD_ERROR})"
    if op in triton_kernels.REGISTERED and op in BACKWARD_OPS:
        if not triton_kernels.triton_available():
            return f"pldr::{op}'s CUDA kernel is the Triton path, and triton is not installed"
    elif not ops.built_with_cuda():
        return ("pldr_kernels was built without CUDA kernels (rebuild on a machine with nvcc: "
                "PLDR_KERNELS_FORCE_CUDA=1 pip install --no-build-isolation -e .)")
    if not torch.cuda.is_available():
        return "no CUDA device visible"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"pldr::{op}", "CUDA"):
        return f"this build registers no CUDA kernel for pldr::{op}"
    return None


def _cpu_skip_reason(op: str) -> str | None:
    if ops._LOAD_ERROR is not None:
        return f"pldr_kernels._C is not built ({ops._LOAD_ERROR})"
    if "cpu" not in available_backends(op, need_device=False):
        return f"this build registers no CPU kernel for pldr::{op}"
    return None


def _emu_skip_reason(op: str | None = None) -> str | None:
    if not harness.have_compiler():
        return f"no C++ compiler ({harness.CXX}) to build the CUDA emulator drivers"
    return None


def _same_layout_on(t: Tensor, device: str) -> Tensor:
    """``t`` on ``device`` as the same view of a copy of its whole storage (``Tensor.to`` would
    make a strided view with gaps contiguous)."""
    if t.device.type == torch.device(device).type:
        return t
    storage = torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage())
    return storage.to(device).as_strided(t.shape, t.stride(), t.storage_offset())


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Backend:
    name: str
    device: str
    max_size: str
    checks_cache_bounds_on_host: bool
    marks: tuple = field(default=(), compare=False)

    def __str__(self) -> str:
        return self.name

    def runs(self, prop: str) -> bool:
        """Whether this backend runs property ``prop`` (see ``EXCLUDED``)."""
        return (self.name, prop) not in EXCLUDED

    def guarantees(self, name: str) -> bool:
        """Whether this backend promises the extra ``name`` (see ``EXTRA_GUARANTEES``)."""
        return (self.name, name) in EXTRA_GUARANTEES

    def sized(self, tiny, medium):
        """``tiny`` on a backend that runs only tiny cases (the emulator), else ``medium``: for
        a property whose shape only needs to cross tile boundaries."""
        return tiny if self.max_size == "tiny" else medium

    def fits(self, size: str) -> bool:
        """Whether a case of ``size`` (one of ``SIZES``) is run on this backend."""
        return SIZES.index(size) <= SIZES.index(self.max_size)

    def skip_reason(self, op: str) -> str | None:
        return {"cpu": _cpu_skip_reason, "cuda": _cuda_skip_reason,
                "emu": _emu_skip_reason}[self.name](op)

    def to(self, *tensors):
        """The tensors on this backend's device with their exact layout (strides, storage
        offset, so also 16-byte misalignment); None stays None; one tensor → itself."""
        moved = tuple(None if t is None else _same_layout_on(t, self.device) for t in tensors)
        return moved[0] if len(moved) == 1 else moved

    # The ops, with their dispatcher signatures.
    def g_attention(self, q, k, v, G=None, key_mask=None, causal=False, scale=None):
        return torch.ops.pldr.g_attention(q, k, v, G, key_mask, causal, scale)

    def g_attention_decode(self, q, k_cache, v_cache, cache_seqlens, k_new=None, v_new=None,
                           cache_start=None, G=None, scale=None, num_splits=0):
        return torch.ops.pldr.g_attention_decode(q, k_cache, v_cache, cache_seqlens, k_new,
                                                 v_new, cache_start, G, scale, num_splits)

    def g_attention_backward(self, dout, q, k, v, G, out, lse, key_mask=None, causal=False,
                             scale=None):
        return torch.ops.pldr.g_attention_backward(dout, q, k, v, G, out, lse, key_mask, causal,
                                                   scale)

    def metric_tensors(self, q, q_mask, *weights, eps_ln=1e-6, eps_adj=1e-9):
        return torch.ops.pldr.metric_tensors(q, q_mask, *weights, eps_ln, eps_adj)


class EmulatedBackend(Backend):
    def g_attention(self, q, k, v, G=None, key_mask=None, causal=False, scale=None):
        return emu_g_attention(q, k, v, G, key_mask, causal, scale)

    def g_attention_decode(self, q, k_cache, v_cache, cache_seqlens, k_new=None, v_new=None,
                           cache_start=None, G=None, scale=None, num_splits=0):
        return emu_g_attention_decode(q, k_cache, v_cache, cache_seqlens, k_new, v_new,
                                      cache_start, G, scale, num_splits)[0]

    def metric_tensors(self, q, q_mask, *weights, eps_ln=1e-6, eps_adj=1e-9):
        return emu_metric_tensors(q, q_mask, *weights, eps_ln=eps_ln, eps_adj=eps_adj)


CPU = Backend("cpu", "cpu", "medium", checks_cache_bounds_on_host=True)
CUDA = Backend("cuda", "cuda", "large", checks_cache_bounds_on_host=False,
               marks=(pytest.mark.cuda,))
EMU = EmulatedBackend("emu", "cpu", "tiny", checks_cache_bounds_on_host=False,
                      marks=(pytest.mark.emulation,))
BACKENDS = (CPU, CUDA, EMU)


# For tests of the emulator itself (tests/test_emu_mma.py, tests/test_emu_shim.py).
EMULATOR_MARKS = [pytest.mark.emulation,
                  pytest.mark.skipif(_emu_skip_reason() is not None,
                                     reason=_emu_skip_reason() or "")]


def infer_device() -> str:
    """"cuda" when this build can run the ops on a visible GPU, else "cpu" (Liger-Kernel's idea:
    tests that need one real device ask here instead of hard-coding it)."""
    return "cuda" if all(CUDA.skip_reason(op) is None for op in OPS) else "cpu"


def needs_cuda_kernels(op: str, why: str):
    """Skip mark for a test that needs this build's CUDA kernels of ``op`` on a visible GPU."""
    reason = CUDA.skip_reason(op)
    return pytest.mark.skipif(reason is not None, reason=f"{why} needs CUDA kernels: {reason}")


def _marks(backend: Backend, op: str, extra=()) -> list:
    reason = backend.skip_reason(op)
    return [*backend.marks, *extra, pytest.mark.skipif(reason is not None, reason=reason or "")]


def backends(op: str, prop: str | None = None, *, only: tuple[str, ...] | None = None):
    """``pytest.param`` per backend that runs property ``prop`` of ``op`` (skip marks with the
    reason where this machine cannot run it); ``only`` restricts to the named backends (for a
    property that exists on one backend only, e.g. CUDA streams)."""
    chosen = [b for b in BACKENDS if (only is None or b.name in only)
              and (b.name, prop) not in EXCLUDED]
    return [pytest.param(b, id=b.name, marks=_marks(b, op)) for b in chosen]


def backend_cases(op: str, cases, prop: str | None = None, *, only=None):
    """``pytest.param(backend, case)`` for every backend (as :func:`backends`) and every case
    whose ``size`` fits it, with ids ``<backend>-<case.id>``."""
    out = []
    for b in BACKENDS:
        if (only is not None and b.name not in only) or (b.name, prop) in EXCLUDED:
            continue
        for c in cases:
            if b.fits(c.size):
                out.append(pytest.param(b, c, id=f"{b.name}-{c.id}", marks=_marks(b, op)))
    return out


# Property tests on the emulator take one 16-bit dtype: fp16 and bf16 run the same tensor-core
# kernel (a type tag), and the case tables cover fp16 there.
EMU_DTYPES = (torch.float32, torch.bfloat16)


def backend_dtypes(op: str, dtypes, prop: str | None = None, *, only=None,
                   emu_dtypes=EMU_DTYPES):
    """``pytest.param(backend, dtype)`` for every backend (as :func:`backends`) and dtype, the
    emulator taking only ``emu_dtypes`` (a property whose device code does not depend on the
    dtype passes bf16 alone); ids ``<backend>-<dtype>``."""
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    out = []
    for b in BACKENDS:
        if (only is not None and b.name not in only) or (b.name, prop) in EXCLUDED:
            continue
        for dt in dtypes:
            if b.name != "emu" or dt in emu_dtypes:
                out.append(pytest.param(b, dt, id=f"{b.name}-{names[dt]}", marks=_marks(b, op)))
    return out


# --------------------------------------------------------------------------------------------
# The emulator: torch tensors <-> the drivers' raw arrays
# --------------------------------------------------------------------------------------------
DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_RAW = {torch.float32: (np.float32, None), torch.bfloat16: (np.int16, torch.int16),
        torch.float16: (np.int16, torch.int16), torch.int32: (np.int32, None),
        torch.bool: (np.bool_, None)}


def to_raw(t: Tensor) -> np.ndarray:
    """Contiguous numpy copy of ``t``; 16-bit floats travel as their bit patterns."""
    t = t.detach().contiguous().cpu()
    view = _RAW[t.dtype][1]
    return (t.view(view) if view is not None else t).numpy()


def raw_spec(shape, dtype: torch.dtype):
    return tuple(shape), _RAW[dtype][0]


def from_raw(arr: np.ndarray, dtype: torch.dtype) -> Tensor:
    t = torch.from_numpy(np.array(arr))
    return t.view(dtype) if _RAW[dtype][1] is not None else t


def run_driver(driver: str | Path, inputs, params, outputs):
    """Run a driver (a file name under tests/emu/, or a path) through the emulator."""
    return harness.run_driver(EMU_DRIVERS / driver, inputs, params, outputs)


def _whole_storage(t: Tensor) -> np.ndarray:
    """Every element of ``t``'s storage (the driver applies offset and strides itself)."""
    flat = torch.empty(0, dtype=t.dtype).set_(t.detach().cpu().untyped_storage())
    return to_raw(flat)


def _f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def emu_g_attention(q, k, v, G=None, key_mask=None, causal=False, scale=None):
    """pldr::g_attention through tests/emu/g_attention_driver.cpp: any strided view is passed as
    its storage plus offset and strides, as the CUDA API passes it."""
    B, Sq, H, d = q.shape
    Sk = k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    params = dict(dtype=DTYPE_CODE[q.dtype], d=d, B=B, H=H, H_kv=k.shape[2], Sq=Sq, Sk=Sk,
                  causal=int(causal),
                  scale_bits=_f32_bits(scale), has_G=int(G is not None),
                  has_mask=int(key_mask is not None))
    inputs = {}
    for name, t in (("q", q), ("k", k), ("v", v)):
        inputs[name] = _whole_storage(t)
        params.update({f"{name}_len": inputs[name].size, f"{name}_offset": t.storage_offset(),
                       f"{name}_sb": t.stride(0), f"{name}_ss": t.stride(1),
                       f"{name}_sh": t.stride(2)})
    if G is not None:
        inputs["G"] = _whole_storage(G)
        params.update(G_len=inputs["G"].size, G_offset=G.storage_offset(),
                      G_sb=G.stride(0) if G.shape[0] > 1 else 0, G_sh=G.stride(1),
                      G_sr=G.stride(2))
    if key_mask is not None:
        inputs["key_mask"] = _whole_storage(key_mask).astype(np.uint8)
        params.update(mask_len=inputs["key_mask"].size, mask_offset=key_mask.storage_offset(),
                      mask_sb=key_mask.stride(0), mask_sk=key_mask.stride(1))
    res = run_driver("g_attention_driver.cpp", inputs, params,
                     {"out": raw_spec((B, Sq, H, d), q.dtype),
                      "lse": raw_spec((B, H, Sq), torch.float32)})
    return from_raw(res["out"], q.dtype), from_raw(res["lse"], torch.float32)


def _head_slice_of(t: Tensor) -> tuple[Tensor, int]:
    """``(wide, pad)`` with ``t == wide[:, :, :H]`` for a contiguous ``wide`` of H + pad heads,
    as the decode and metric drivers take strided inputs; raises EmulatorCannotExpress else."""
    if t.is_contiguous():
        return t, 0
    B, S, H, d = t.shape
    Hp = t.stride(1) // d if S > 1 else t.stride(0) // (S * d)
    wide_strides = (S * Hp * d, Hp * d, d, 1)
    same = all(n == 1 or s == w for n, s, w in zip(t.shape, t.stride(), wide_strides))
    if not (same and Hp >= H and t.storage_offset() == 0):
        raise EmulatorCannotExpress(
            f"the emulator drivers take contiguous tensors or head slices t[:, :, :H] of a wider "
            f"contiguous tensor; got shape {tuple(t.shape)} strides {t.stride()} offset "
            f"{t.storage_offset()}")
    return t.as_strided((B, S, Hp, d), wide_strides), Hp - H


def emu_g_attention_decode(q, k_cache, v_cache, cache_seqlens, k_new=None, v_new=None,
                           cache_start=None, G=None, scale=None, num_splits=0, *, num_sms=8,
                           force_scalar=False):
    """pldr::g_attention_decode through tests/emu/decode_driver.cpp; appends into ``k_cache`` /
    ``v_cache`` in place like the op. Returns ``(out, num_splits_used)``; ``num_sms`` is the SM
    count the split choice sees, ``force_scalar`` turns off the 16-byte vector loads."""
    B, Sn, H, d = q.shape
    Smax = k_cache.shape[1]
    wide = [_head_slice_of(t) for t in (q, k_cache, v_cache, k_new, v_new) if t is not None]
    pads = {p for _, p in wide}
    if len(pads) != 1:
        raise EmulatorCannotExpress(f"the decode driver needs one head padding for q, the caches "
                                    f"and k_new/v_new; got {sorted(pads)}")
    pad = pads.pop()
    (q_w, _), (kc_w, _), (vc_w, _) = wide[:3]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    inputs = {"q": to_raw(q_w), "k_cache": to_raw(kc_w), "v_cache": to_raw(vc_w),
              "cache_seqlens": to_raw(cache_seqlens.to(torch.int32)),
              "scale": to_raw(torch.tensor([scale], dtype=torch.float32))}
    if k_new is not None:
        inputs["k_new"], inputs["v_new"] = to_raw(wide[3][0]), to_raw(wide[4][0])
    if cache_start is not None:
        inputs["cache_start"] = to_raw(cache_start.to(torch.int32))
    if G is not None:
        if not G.is_contiguous():
            raise EmulatorCannotExpress("the decode driver reads a contiguous G")
        inputs["G"] = to_raw(G)
    params = dict(B=B, Sn=Sn, Smax=Smax, H=H, H_kv=k_cache.shape[2], d=d,
                  dtype=DTYPE_CODE[q.dtype],
                  num_splits=num_splits, num_sms=num_sms, has_new=int(k_new is not None),
                  has_start=int(cache_start is not None), G_batch=0 if G is None else G.shape[0],
                  force_scalar=int(force_scalar), pad_heads=pad)
    outputs = {"out": raw_spec((B, Sn, H, d), q.dtype),
               "k_cache": raw_spec(kc_w.shape, q.dtype), "v_cache": raw_spec(kc_w.shape, q.dtype),
               "num_splits_used": raw_spec((1,), torch.int32)}
    res = run_driver("decode_driver.cpp", inputs, params, outputs)
    kc_w.copy_(from_raw(res["k_cache"], q.dtype))
    vc_w.copy_(from_raw(res["v_cache"], q.dtype))
    return from_raw(res["out"], q.dtype), int(res["num_splits_used"][0])


def emu_metric_tensors(q, q_mask, *weights, eps_ln=1e-6, eps_adj=1e-9):
    """pldr::metric_tensors through tests/emu/metric_driver.cpp (weights in
    ``METRIC_WEIGHT_ORDER``, fp32)."""
    from pldr_kernels.testing import METRIC_WEIGHT_ORDER

    q_w, pad = _head_slice_of(q)
    B, S, H, d = q.shape
    w = dict(zip(METRIC_WEIGHT_ORDER, weights))
    if not all(t.is_contiguous() for t in weights):
        raise EmulatorCannotExpress("the metric_tensors driver reads contiguous weights")
    R, Gd, F, _ = w["w1"].shape
    inputs = {"q": to_raw(q_w), "eps": to_raw(torch.tensor([eps_ln, eps_adj], dtype=torch.float32))}
    inputs.update({k: to_raw(t) for k, t in w.items()})
    if q_mask is not None:
        inputs["q_mask"] = to_raw(q_mask)
    params = dict(B=B, S=S, H=H, d=d, R=R, Gd=Gd, F=F, dtype=DTYPE_CODE[q.dtype],
                  has_mask=int(q_mask is not None), pad_heads=pad)
    outputs = {n: raw_spec((B, H, d, d), torch.float32) for n in ("A", "A_LM", "G")}
    res = run_driver("metric_driver.cpp", inputs, params, outputs)
    return tuple(from_raw(res[n], torch.float32) for n in ("A", "A_LM", "G"))
