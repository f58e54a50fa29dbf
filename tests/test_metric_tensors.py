"""pldr::metric_tensors (docs/design.md §3.1) on every backend (tests/backends.py) against the
fp64 reference, by the rule of pldr_kernels.testing (docs/design.md §4; check_metric_tensors
explains why the power stage is judged stage by stage).

One body per property, the backend a parameter; the cases are defined once, below, each sized
for the backends that run it (the emulator runs every d×d row of every head as a CUDA thread:
it gets the few tiny cases)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch
from backends import CUDA, backend_cases, backend_dtypes, backends, needs_cuda_kernels
from cases import DTYPE_NAMES, LOW_PRECISION, generator, param_case

from pldr_kernels import reference
from pldr_kernels.testing import (
    A_DFF,
    METRIC_WEIGHT_ORDER,
    NUM_DENSE_A,
    NUM_RESLAYER_A,
    check_metric_g_from_a,
    check_metric_tensors,
    make_metric_weights,
    metric_args,
    randn,
)

OP = "metric_tensors"


def run(backend, q, q_mask, weights, **eps):
    """The op on ``backend`` from CPU inputs."""
    return backend.metric_tensors(*backend.to(q, q_mask), *backend.to(*metric_args(weights)), **eps)


def check(backend, out, q, q_mask, weights, **eps):
    """The rule, plus what ``backend`` guarantees beyond it (tests/backends.py)."""
    B, _, H, d = q.shape
    for name, t in zip(("A", "A_LM", "G"), out):
        assert t.dtype == torch.float32 and t.shape == (B, H, d, d), name
        assert torch.isfinite(t).all(), f"{name}: finite inputs must give finite outputs"
    oracle = reference.metric_tensors(q.double(), q_mask, *metric_args(weights, torch.float64),
                                      **eps)
    check_metric_tensors(out, q, q_mask, weights, **eps, oracle=oracle).assert_ok()
    if backend.guarantees("metric_tensors G from A"):
        check_metric_g_from_a(out, q, q_mask, weights, **eps, oracle=oracle).assert_ok()


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    B: int
    S: int
    H: int
    d: int
    dtype: torch.dtype = torch.float32
    masked: bool = False      # row 0 left-padded over its first third, garbage in the padding
    q_scale: float = 1.0
    mlp: tuple[int, int, int] = (NUM_RESLAYER_A, NUM_DENSE_A, A_DFF)   # R, Gd, F
    eps: tuple[float, float] = (1e-6, 1e-9)                            # eps_ln, eps_adj
    size: str = "medium"

    @property
    def id(self) -> str:
        parts = [f"B{self.B}", f"S{self.S}", f"H{self.H}", f"d{self.d}", DTYPE_NAMES[self.dtype]]
        if self.masked:
            parts.append("masked")
        if self.q_scale != 1.0:
            parts.append(f"qscale{self.q_scale:g}")
        if self.mlp != (NUM_RESLAYER_A, NUM_DENSE_A, A_DFF):
            parts.append("R{}-Gd{}-F{}".format(*self.mlp))
        if self.eps != (1e-6, 1e-9):
            parts.append("eps{:g}_{:g}".format(*self.eps))
        return "-".join(parts)

    def inputs(self):
        """``q, q_mask, weights`` on the CPU. Masked rows of q hold large garbage: they are left
        out of QᵀQ and must not leak into the result."""
        gen = generator(self.id)
        q = randn((self.B, self.S, self.H, self.d), generator=gen) * self.q_scale
        q_mask = None
        if self.masked:
            q_mask = torch.ones(self.B, self.S, dtype=torch.bool)
            q_mask[0, : self.S // 3] = False
            q[0, : self.S // 3] = 1e3 * randn((self.S // 3, self.H, self.d), generator=gen)
        R, Gd, F = self.mlp
        weights = make_metric_weights(d=self.d, H=self.H, R=R, Gd=Gd, F=F, generator=gen)
        return q.to(self.dtype), q_mask, weights

    @property
    def eps_kwargs(self):
        return dict(eps_ln=self.eps[0], eps_adj=self.eps[1])


CASES = [
    # Awkward shapes (S = 1, 7, 97, 1025) in fp32; bf16/fp16 q (the op computes in fp32 from
    # the given values, so the oracle input is that same q upcast, exactly).
    *(Case(B, S, H, d, q_scale=0.7) for B, S, H, d in [
        (1, 1, 2, 64), (2, 7, 3, 64), (2, 97, 2, 64), (1, 1025, 2, 64),
        (1, 1, 1, 128), (2, 97, 2, 128), (1, 1025, 1, 128)]),
    *(Case(B, S, H, d, dt) for dt, (B, S, H, d) in itertools.product(
        LOW_PRECISION, [(2, 97, 2, 64), (1, 33, 2, 128)])),
    # Large activations: QᵀQ grows with S·|q|² (docs/spec.md §5.4); LayerNorm removes the scale.
    Case(1, 1025, 1, 64, q_scale=30.0),
    # Other metric-learner sizes come from the weight shapes: F > 256 takes two hidden-layer
    # passes, and at d = 128 more than the default 48 KiB of CUDA shared memory.
    *(Case(1, 20, 2, d, mlp=(2, 2, 300)) for d in (64, 128)),
    # Tiny enough for the emulator: one row (with the paper's learner), a mask, two QᵀQ chunks
    # (S = 70), d = 128, an F that is no multiple of the staging chunks, non-default eps. Two
    # residual layers instead of eight where the case is about the other sizes: R is a loop
    # count, and each layer costs the emulator seconds.
    Case(1, 1, 2, 64, size="tiny"),
    Case(2, 7, 2, 64, torch.bfloat16, masked=True, mlp=(2, NUM_DENSE_A, A_DFF), size="tiny"),
    Case(1, 33, 2, 64, torch.float16, mlp=(2, NUM_DENSE_A, A_DFF), size="tiny"),
    Case(1, 70, 2, 64, masked=True, mlp=(2, NUM_DENSE_A, A_DFF), size="tiny"),
    Case(1, 7, 1, 128, mlp=(2, NUM_DENSE_A, A_DFF), size="tiny"),
    Case(1, 5, 1, 64, mlp=(2, 1, 300), eps=(1e-5, 1e-7), size="tiny"),
    # GPU-sized.
    *(Case(B, S, 3, d, dt, masked, size="large") for dt, (B, S, masked), d in itertools.product(
        (torch.float32, torch.bfloat16),
        [(1, 1, False), (2, 7, True), (1, 33, False), (2, 1025, True)], (64, 128))),
]


@pytest.mark.parametrize("backend,case", backend_cases(OP, CASES))
def test_matches_reference(backend, case):
    q, q_mask, weights = case.inputs()
    out = run(backend, q, q_mask, weights, **case.eps_kwargs)
    check(backend, out, q, q_mask, weights, **case.eps_kwargs)


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------
SMALL_MLP = dict(R=2, Gd=1, F=32)  # for properties that do not depend on the learner's size


@pytest.mark.parametrize("backend", backends(OP))
def test_eps_arguments_are_used(backend):
    weights = make_metric_weights(H=2, **SMALL_MLP)
    q = randn((1, 9, 2, 64))
    eps = dict(eps_ln=1e-3, eps_adj=1e-4)
    out = run(backend, q, None, weights, **eps)
    check(backend, out, q, None, weights, **eps)
    default = run(backend, q, None, weights)
    assert not torch.equal(out[0], default[0]) and not torch.equal(out[1], default[1])


def ragged_q_mask(B, S):
    """Row 0 full, row 1 right-padded, row 2 left-padded with a hole, row 3 empty."""
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, S // 3:] = False
    mask[2, : S // 2] = False
    mask[2, S - 3] = False
    mask[3] = False
    return mask


@pytest.mark.parametrize("backend,case", backend_cases(
    OP, [param_case(S=37, d=64), param_case(S=1025, d=64), param_case(S=20, d=128)]))
def test_ragged_rows_equal_each_row_alone(backend, case):
    """Each batch row of a ragged q_mask equals that row run alone without its padding, bitwise
    (an empty row included); an all-True mask is the same as no mask."""
    B, H = 4, 2
    weights = make_metric_weights(d=case.d, H=H)
    q = randn((B, case.S, H, case.d))
    mask = ragged_q_mask(B, case.S)
    out = run(backend, q, mask, weights)
    check(backend, out, q, mask, weights)
    for b in range(B):
        alone = run(backend, q[b:b + 1, mask[b]], None, weights)
        for name, padded, single in zip(("A", "A_LM", "G"), out, alone):
            assert torch.equal(padded[b:b + 1], single), f"{name}: batch row {b} differs"
    all_true = run(backend, q, torch.ones(B, case.S, dtype=torch.bool), weights)
    assert all(torch.equal(x, y) for x, y in zip(all_true, run(backend, q, None, weights)))


@pytest.mark.parametrize("backend", backends(OP))
def test_head_slice_of_q(backend):
    """q as a head slice of a wider tensor (a fused projection) gives its contiguous copy's
    bits."""
    B, S, H, pad, d = 1, 6, 1, 2, 64
    q_full = randn((B, S, H + pad, d))
    q = q_full[:, :, :H]
    weights = make_metric_weights(d=d, H=H, **SMALL_MLP)
    strided = run(backend, q, None, weights)
    assert all(torch.equal(x, y) for x, y in zip(strided, run(backend, q.contiguous(), None,
                                                               weights)))
    check(backend, strided, q, None, weights)


@pytest.mark.parametrize("backend,dtype", backend_dtypes(OP, (torch.float32, torch.bfloat16),
                                                         "general strides"))
def test_strided_q(backend, dtype):
    """q as a view of a fused qkv-like buffer: every other token, heads offset, d a slice of a
    longer last dim (still stride 1)."""
    B, S, H, d = 2, 23, 3, 64
    weights = make_metric_weights(d=d, H=H)
    q = randn((B, 2 * S, H + 2, d + 16), dtype)[:, ::2, 1:H + 1, 8:8 + d]
    assert not q.is_contiguous() and q.stride(-1) == 1
    out = run(backend, q, None, weights)
    assert all(torch.equal(x, y) for x, y in zip(out, run(backend, q.contiguous(), None, weights)))
    check(backend, out, q, None, weights)


@pytest.mark.parametrize("backend", backends(OP, "strided weights"))
def test_strided_weights_give_the_same_result(backend):
    weights = make_metric_weights(H=2)
    q = randn((1, 11, 2, 64))
    strided = {k: v.transpose(-1, -2).contiguous().transpose(-1, -2) if v.dim() >= 2 else v
               for k, v in weights.items()}
    assert not strided["w1"].is_contiguous()
    assert all(torch.equal(x, y) for x, y in zip(run(backend, q, None, strided),
                                                 run(backend, q, None, weights)))


@pytest.mark.parametrize("backend,case", backend_cases(OP, [param_case(B=2, H=3),
                                                            param_case(B=1, H=1)]))
def test_deterministic_bitwise(backend, case):
    """Run after run, and on the CPU at any thread count: (B, H) = (1, 1) is 64 rows, which the
    CPU kernel cuts into 16-row blocks on 2 threads and 32-row blocks on 1 thread."""
    weights = make_metric_weights(H=case.H)
    q = randn((case.B, 300, case.H, 64))
    mask = torch.rand(case.B, 300) > 0.2
    first = run(backend, q, mask, weights)
    for _ in range(2):
        assert all(torch.equal(x, y) for x, y in zip(first, run(backend, q, mask, weights)))
    if backend.runs("thread count"):
        threads = torch.get_num_threads()
        try:
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                assert all(torch.equal(x, y) for x, y in zip(first, run(backend, q, mask,
                                                                        weights)))
        finally:
            torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# Bad inputs: each class of mistake raises an error that names the argument.
# --------------------------------------------------------------------------------------------
def call_with(backend, q=None, q_mask=None, **overrides):
    weights = make_metric_weights(H=2, device=backend.device)
    weights.update(overrides)
    q = torch.randn(1, 5, 2, 64, device=backend.device) if q is None else q
    return backend.metric_tensors(q, q_mask, *(weights[k] for k in METRIC_WEIGHT_ORDER))


@pytest.mark.parametrize("name", METRIC_WEIGHT_ORDER)
@pytest.mark.parametrize("backend", backends(OP, "input validation"))
def test_weight_wrong_dtype(backend, name):
    w = make_metric_weights(H=2, device=backend.device)[name]
    with pytest.raises(RuntimeError, match=rf"{name} must have dtype"):
        call_with(backend, **{name: w.double()})


@pytest.mark.parametrize("name", METRIC_WEIGHT_ORDER)
@pytest.mark.parametrize("backend", backends(OP, "input validation"))
def test_weight_wrong_shape(backend, name):
    w = make_metric_weights(H=2, device=backend.device)[name]
    bad = w[..., :-1].contiguous()  # one short in the last dim
    with pytest.raises(RuntimeError, match=rf"\b{name}\b.*(must have shape|must be a)"):
        call_with(backend, **{name: bad})


@pytest.mark.parametrize("name", METRIC_WEIGHT_ORDER)
@pytest.mark.parametrize("backend", backends(OP, "input validation"))
def test_weight_wrong_rank(backend, name):
    w = make_metric_weights(H=2, device=backend.device)[name]
    with pytest.raises(RuntimeError, match=rf"\b{name}\b.*(must have shape|must be a)"):
        call_with(backend, **{name: w.unsqueeze(0)})


HEAD_DIM = r"q.shape\[-1\] \(head dim d\) must be 64 or 128"
BAD_Q = {
    "float64": (lambda: torch.randn(1, 5, 2, 64, dtype=torch.float64),
                r"q must be float32, bfloat16 or float16"),
    "int64": (lambda: torch.randint(0, 3, (1, 5, 2, 64)),
              r"q must be float32, bfloat16 or float16"),
    "rank3": (lambda: torch.randn(5, 2, 64), r"q must be a 4-D tensor"),
    "head_dim_32": (lambda: torch.randn(1, 5, 2, 32), HEAD_DIM),
    "head_dim_96": (lambda: torch.randn(1, 5, 2, 96), HEAD_DIM),
    "last_dim_strided": (lambda: torch.randn(1, 5, 64, 2).transpose(-1, -2),
                         r"q must be contiguous in its last dimension"),
}
BAD_Q_MASK = {
    "int64": (lambda: torch.ones(1, 5, dtype=torch.int64), r"q_mask must have dtype Bool"),
    "float": (lambda: torch.ones(1, 5), r"q_mask must have dtype Bool"),
    "rank1": (lambda: torch.ones(5, dtype=torch.bool), r"q_mask must be a 2-D tensor"),
    "batch": (lambda: torch.ones(2, 5, dtype=torch.bool), r"q_mask.shape\[0\] \(batch\) must be 1"),
    "length": (lambda: torch.ones(1, 6, dtype=torch.bool),
               r"q_mask.shape\[1\] \(sequence\) must be 5"),
}


@pytest.mark.parametrize("case", list(BAD_Q))
@pytest.mark.parametrize("backend", backends(OP, "input validation"))
def test_bad_q(backend, case):
    make, pattern = BAD_Q[case]
    with pytest.raises(RuntimeError, match=pattern):
        call_with(backend, q=backend.to(make()))


@pytest.mark.parametrize("case", list(BAD_Q_MASK))
@pytest.mark.parametrize("backend", backends(OP, "input validation"))
def test_bad_q_mask(backend, case):
    make, pattern = BAD_Q_MASK[case]
    with pytest.raises(RuntimeError, match=pattern):
        call_with(backend, q_mask=backend.to(make()))


@pytest.mark.parametrize("backend", backends(OP, "input validation"))
def test_weights_sized_for_other_shapes(backend):
    w3 = make_metric_weights(H=3, device=backend.device)  # PLGA weights for 3 heads, q has 2
    with pytest.raises(RuntimeError, match=r"W must have shape \[2, 64, 64\]"):
        call_with(backend, W=w3["W"])
    w128 = make_metric_weights(d=128, H=2, device=backend.device)
    with pytest.raises(RuntimeError, match=r"ln0_w must have shape \[64\]"):
        backend.metric_tensors(torch.randn(1, 5, 2, 64, device=backend.device), None,
                               *metric_args(w128))


@needs_cuda_kernels(OP, "a mixed-device call")
@pytest.mark.parametrize("anchor", ["cpu", "cuda"])
@pytest.mark.parametrize("name", ["q_mask", "ln0_w", "w1", "ba"])
def test_mixed_devices_are_refused(anchor, name):
    other = "cuda" if anchor == "cpu" else "cpu"
    weights = make_metric_weights(H=2, device=anchor)
    q = torch.randn(1, 5, 2, 64, device=anchor)
    q_mask = torch.ones(1, 5, dtype=torch.bool, device=other if name == "q_mask" else anchor)
    if name != "q_mask":
        weights[name] = weights[name].to(other)
    with pytest.raises(RuntimeError, match=f"{name} must be on the same device as q"):
        CUDA.metric_tensors(q, q_mask, *metric_args(weights))


# --------------------------------------------------------------------------------------------
# Dispatcher contract (docs/design.md §3.5)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_mask", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("backend", backends(OP, "dispatcher"))
def test_opcheck(backend, with_mask):
    weights = make_metric_weights(H=2, device=backend.device)
    q = torch.randn(2, 6, 2, 64, device=backend.device)
    mask = None
    if with_mask:
        mask = backend.to(torch.tensor([[True] * 6, [False, True, True, False, True, True]]))
    torch.library.opcheck(torch.ops.pldr.metric_tensors.default, (q, mask, *metric_args(weights)),
                          {"eps_ln": 1e-6, "eps_adj": 1e-9})


@pytest.mark.parametrize("backend", backends(OP, "dispatcher"))
def test_torch_compile_fullgraph(backend):
    weights = make_metric_weights(H=2, device=backend.device)
    q, mask = backend.to(randn((2, 9, 2, 64)), torch.rand(2, 9) > 0.3)
    wargs = metric_args(weights)

    def learner(q, mask, *w):
        A, A_LM, G = torch.ops.pldr.metric_tensors(q, mask, *w)
        return A, A_LM, G

    torch._dynamo.reset()
    compiled = torch.compile(learner, fullgraph=True)
    for got, want in zip(compiled(q, mask, *wargs), learner(q, mask, *wargs)):
        assert torch.equal(got, want)
