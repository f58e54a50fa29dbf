"""The backward of pldr::metric_tensors (docs/design.md §3.4) against fp64 autograd of the
reference, by the rule of docs/design.md §4.5 (pldr_kernels.testing: check_metric_tensors_grads,
check_metric_tensors_grads_over_seeds, check_metric_grads_given_a), and autograd through the op.

The implementations of ``pldr::metric_tensors_backward`` under test:

* ``cpu`` — the fused C++ kernel (csrc/cpu/metric_tensors_backward_cpu.cpp);
* ``reference`` — ``autograd.metric.metric_tensors_backward_reference``, the written-out fp32
  math that the op runs on CUDA, here on CPU tensors;
* ``cuda`` — the op on CUDA tensors (a GPU), i.e. that same function through the dispatcher.

There is no CUDA kernel of the backward, so the emulator has nothing to run here. What the CPU
kernel promises beyond the rule is ``EXTRA_GUARANTEES`` below (as in tests/backends.py for the
forward ops)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch
from backends import CUDA as CUDA_BACKEND
from cases import DTYPE_NAMES, LOW_PRECISION, generator

from pldr_kernels import ops
from pldr_kernels.autograd.metric import metric_backward_math, metric_tensors_backward_reference
from pldr_kernels.testing import (
    A_DFF,
    METRIC_GRAD_NAMES,
    METRIC_WEIGHT_ORDER,
    NUM_DENSE_A,
    NUM_RESLAYER_A,
    Verdict,
    check_metric_grads_given_a,
    check_metric_tensors_grads,
    check_metric_tensors_grads_over_seeds,
    make_metric_weights,
    metric_args,
    metric_grad_errors,
    metric_tensors_grad_peer,
    metric_tensors_grads,
    randn,
)

pytestmark = pytest.mark.skipif(ops._LOAD_ERROR is not None, reason=f"{ops._LOAD_ERROR}")


@dataclass(frozen=True)
class Impl:
    name: str
    device: str

    def __str__(self) -> str:
        return self.name

    def to(self, *tensors):
        moved = tuple(None if t is None else t.to(self.device) for t in tensors)
        return moved[0] if len(moved) == 1 else moved

    def backward(self, grad_outputs, q, q_mask, weights, **eps):
        """The implementation's gradients (METRIC_GRAD_NAMES order) from CPU inputs, on the CPU."""
        args = (*self.to(*grad_outputs), *self.to(q, q_mask), *self.to(*metric_args(weights)))
        if self.name == "reference":
            out = metric_tensors_backward_reference(*args, **eps)
        else:
            out = torch.ops.pldr.metric_tensors_backward(*args, **eps)
        return tuple(t.cpu() for t in out)


CPU, REFERENCE, CUDA = Impl("cpu", "cpu"), Impl("reference", "cpu"), Impl("cuda", "cuda")
CUDA_SKIP = CUDA_BACKEND.skip_reason("metric_tensors")  # the tests run the forward there too
# What an implementation guarantees beyond the rule; asserted as extra, named checks.
EXTRA_GUARANTEES = {
    ("cpu", "given its own A"):
        "the CPU kernel reverses steps 9-12 in fp64 from the A its forward returns (recomputed bit "
        "for bit), so stage by stage from that A its gradients meet check_metric_grads_given_a "
        "for losses through G too",
}


def impls(*names):
    chosen = [i for i in (CPU, REFERENCE, CUDA) if not names or i.name in names]
    return [pytest.param(i, id=i.name, marks=[pytest.mark.cuda, pytest.mark.skipif(
        CUDA_SKIP is not None, reason=CUDA_SKIP or "")] if i.name == "cuda" else [])
        for i in chosen]


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------
LOSSES = {"A": (0,), "A_LM": (1,), "A+A_LM": (0, 1), "G": (2,), "all": (0, 1, 2)}


@dataclass(frozen=True)
class Case:
    B: int
    S: int
    H: int
    d: int
    dtype: torch.dtype = torch.float32
    masked: bool = False      # row 0 left-padded over its first third, garbage in the padding
    mlp: tuple[int, int, int] = (NUM_RESLAYER_A, NUM_DENSE_A, A_DFF)   # R, Gd, F
    seed: int = 0

    @property
    def id(self) -> str:
        parts = [f"B{self.B}", f"S{self.S}", f"H{self.H}", f"d{self.d}", DTYPE_NAMES[self.dtype]]
        if self.masked:
            parts.append("masked")
        if self.mlp != (NUM_RESLAYER_A, NUM_DENSE_A, A_DFF):
            parts.append("R{}-Gd{}-F{}".format(*self.mlp))
        if self.seed:
            parts.append(f"seed{self.seed}")
        return "-".join(parts)

    def inputs(self, loss: str):
        """``grad_outputs, q, q_mask, weights`` on the CPU; the output gradients of the outputs
        ``loss`` goes through are standard normal, the others None."""
        gen = generator(self.id)
        q = randn((self.B, self.S, self.H, self.d), generator=gen) * 0.7
        q_mask = None
        if self.masked:
            q_mask = torch.ones(self.B, self.S, dtype=torch.bool)
            q_mask[0, : self.S // 3] = False
            q[0, : self.S // 3] = 1e3 * randn((self.S // 3, self.H, self.d), generator=gen)
        R, Gd, F = self.mlp
        weights = make_metric_weights(d=self.d, H=self.H, R=R, Gd=Gd, F=F, generator=gen)
        grads = [randn((self.B, self.H, self.d, self.d), generator=gen) for _ in range(3)]
        grad_outputs = tuple(g if i in LOSSES[loss] else None for i, g in enumerate(grads))
        return grad_outputs, q.to(self.dtype), q_mask, weights


def check_shapes(grads, q, weights):
    assert grads[0].shape == q.shape and grads[0].dtype == q.dtype, "grad_q"
    for name, g in zip(METRIC_WEIGHT_ORDER, grads[1:]):
        assert g.shape == weights[name].shape and g.dtype == torch.float32, f"grad_{name}"
    for name, g in zip(METRIC_GRAD_NAMES, grads):
        assert torch.isfinite(g).all(), f"grad_{name}: finite inputs must give finite gradients"


# --------------------------------------------------------------------------------------------
# Losses through A and A_LM: the rule case by case
# --------------------------------------------------------------------------------------------
CASES = [
    *(Case(B, S, H, d, masked=masked) for B, S, H, d, masked in [
        (1, 1, 2, 64, False), (2, 7, 3, 64, True), (2, 97, 2, 64, False), (1, 1025, 1, 64, False),
        (1, 1, 1, 128, False), (2, 97, 2, 128, True), (1, 1025, 1, 128, False)]),
    *(Case(2, 33, 2, 64, dt, masked=True) for dt in LOW_PRECISION),
    Case(1, 20, 2, 64, mlp=(2, 3, 40)),  # other learner sizes: Gd = 3, F not a tile multiple
    # More than one group of rows (1024 rows: 16 heads at d = 64, 8 at d = 128) at 2 threads.
    Case(3, 5, 6, 64, masked=True, mlp=(2, NUM_DENSE_A, A_DFF)),
    Case(2, 5, 5, 128, mlp=(2, NUM_DENSE_A, A_DFF)),
]


@pytest.mark.parametrize("loss", ["A", "A_LM", "A+A_LM"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.parametrize("impl", impls())
def test_grads_through_A_and_A_LM(impl, case, loss):
    grad_outputs, q, q_mask, weights = case.inputs(loss)
    grads = impl.backward(grad_outputs, q, q_mask, weights)
    check_shapes(grads, q, weights)
    check_metric_tensors_grads(grads, grad_outputs, q, q_mask, weights).assert_ok()


# --------------------------------------------------------------------------------------------
# Losses through G: the statistical form over seeds, and on the CPU stage by stage
# --------------------------------------------------------------------------------------------
# Two residual units instead of eight: what makes G ill-conditioned is the power stage, and each
# unit costs every seed four autograd passes of the reference.
SEEDED = {
    "d64": [Case(2, 37, 2, 64, masked=True, mlp=(2, NUM_DENSE_A, A_DFF), seed=s)
            for s in range(1, 9)],
    "d128": [Case(1, 20, 1, 128, mlp=(2, NUM_DENSE_A, A_DFF), seed=s) for s in range(1, 9)],
}


@pytest.mark.parametrize("loss", ["G", "all"])
@pytest.mark.parametrize("shape", list(SEEDED))
@pytest.mark.parametrize("impl", impls())
def test_grads_through_G_over_seeds(impl, shape, loss):
    errors, peer_errors = [], []
    for case in SEEDED[shape]:
        grad_outputs, q, q_mask, weights = case.inputs(loss)
        grads = impl.backward(grad_outputs, q, q_mask, weights)
        check_shapes(grads, q, weights)
        oracle = metric_tensors_grads(grad_outputs, q, q_mask, weights)
        errors.append(metric_grad_errors(grads, oracle))
        peer_errors.append(metric_grad_errors(
            metric_tensors_grad_peer(grad_outputs, q, q_mask, weights), oracle))
        if q_mask is not None:
            assert (grads[0][~q_mask] == 0).all(), "grad_q of rows left out by q_mask"
        if (impl.name, "given its own A") in EXTRA_GUARANTEES:
            A = torch.ops.pldr.metric_tensors(*impl.to(q, q_mask),
                                              *impl.to(*metric_args(weights)))[0]
            check_metric_grads_given_a(grads, grad_outputs, q, q_mask, weights,
                                       A.cpu()).assert_ok()
    check_metric_tensors_grads_over_seeds(errors, peer_errors).assert_ok()


def test_the_checks_reject_wrong_gradients():
    """The rule is not vacuous: a gradient off by 1e-4 of its largest entry fails it, through A
    and, stage by stage, through G; so does a nonzero pad row and a systematically worse kernel
    over seeds."""
    case = Case(1, 9, 2, 64, masked=True, mlp=(2, 2, 32))
    for loss, check, names in (("A", check_metric_tensors_grads, METRIC_GRAD_NAMES[:11]),
                               ("G", check_metric_grads_given_a,
                                ("q", "w1", "lnA_b", "W", "pw", "ba"))):
        grad_outputs, q, q_mask, weights = case.inputs(loss)
        grads = CPU.backward(grad_outputs, q, q_mask, weights)
        extra = () if loss == "A" else (torch.ops.pldr.metric_tensors(
            q, q_mask, *metric_args(weights))[0],)
        assert check(grads, grad_outputs, q, q_mask, weights, *extra)
        for name in names:
            i = METRIC_GRAD_NAMES.index(name)
            wrong = list(grads)
            wrong[i] = grads[i].clone()
            wrong[i].view(-1)[-1] += 1e-4 * grads[i].abs().max()
            assert not check(wrong, grad_outputs, q, q_mask, weights, *extra), (loss, name)
    wrong = list(grads)
    wrong[0] = grads[0].clone()
    wrong[0][0, 0, 0, 0] = 1e-30
    assert not check_metric_tensors_grads(wrong, grad_outputs, q, q_mask, weights)
    samples = [{n: 1e-3 for n in METRIC_GRAD_NAMES}] * 5
    assert check_metric_tensors_grads_over_seeds(samples, samples)
    worse = [{n: 3e-3 for n in METRIC_GRAD_NAMES}] * 5
    assert not check_metric_tensors_grads_over_seeds(worse, samples)


def test_written_out_backward_is_autograd_in_fp64():
    """metric_backward_math (what CUDA runs) is the gradient of reference.metric_tensors: in fp64
    the two agree to rounding, for every output and every learner shape."""
    for (R, Gd, F), loss in itertools.product([(2, 2, 32), (1, 3, 20)], LOSSES):
        case = Case(2, 7, 2, 64, masked=True, mlp=(R, Gd, F))
        grad_outputs, q, q_mask, weights = case.inputs(loss)
        grad64 = tuple(None if g is None else g.double() for g in grad_outputs)
        written = metric_backward_math(*grad64, q.double(), q_mask,
                                       *metric_args(weights, torch.float64))
        autograd = metric_tensors_grads(grad64, q, q_mask, weights)
        for name, got, want in zip(METRIC_GRAD_NAMES, written, autograd):
            err = (got - want).abs().max().item()
            assert err <= 1e-12 * max(want.abs().max().item(), 1e-300), (loss, name, err)


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------
SMALL = dict(R=2, Gd=2, F=32)  # for properties that do not depend on the learner's size


def ragged_q_mask(B, S):
    """Row 0 full, row 1 right-padded, row 2 left-padded with a hole, row 3 empty."""
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, S // 3:] = False
    mask[2, : S // 2] = False
    mask[2, S - 3] = False
    mask[3] = False
    return mask


@pytest.mark.parametrize("d", [64, 128])
def test_cpu_ragged_rows_equal_each_row_alone(d):
    """grad_q of each batch row of a ragged q_mask equals that row run alone without its padding,
    bitwise, and is exactly 0 on the pad rows (all of them for the empty row)."""
    B, S, H = 4, 37, 2
    weights = make_metric_weights(d=d, H=H, **SMALL)
    q = randn((B, S, H, d))
    mask = ragged_q_mask(B, S)
    grad_outputs = tuple(randn((B, H, d, d)) for _ in range(3))
    grad_q = CPU.backward(grad_outputs, q, mask, weights)[0]
    assert (grad_q[~mask] == 0).all() and (grad_q[3] == 0).all()
    for b in range(3):
        alone = CPU.backward(tuple(g[b:b + 1] for g in grad_outputs), q[b:b + 1, mask[b]], None,
                             weights)[0]
        assert torch.equal(grad_q[b, mask[b]], alone[0]), f"batch row {b} differs"


@pytest.mark.parametrize("impl", impls())
def test_non_finite_pad_rows_do_not_leak(impl):
    """Pad rows are left out, not multiplied by 0: inf and NaN there change no gradient."""
    weights = make_metric_weights(H=2, **SMALL)
    q = randn((2, 8, 2, 64))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, :3] = False
    grad_outputs = tuple(randn((2, 2, 64, 64)) for _ in range(3))
    clean = impl.backward(grad_outputs, q, mask, weights)
    q_bad = q.clone()
    q_bad[0, 0], q_bad[0, 1] = float("nan"), float("inf")
    for name, x, y in zip(METRIC_GRAD_NAMES, impl.backward(grad_outputs, q_bad, mask, weights),
                          clean):
        assert torch.equal(x, y), f"grad_{name}"


@pytest.mark.parametrize("B, H, S", [(2, 3, 300), (1, 1, 300), (2, 14, 40)])
def test_cpu_deterministic_bitwise(B, H, S):
    """Run after run and at any thread count (blocks have a fixed size; every weight gradient is
    summed by one work item in a fixed order). 28 heads are two groups of rows at up to 8
    threads and one at 16 (the groups grow with the thread count): the same bits."""
    weights = make_metric_weights(H=H, R=2 if H > 3 else NUM_RESLAYER_A)
    q = randn((B, S, H, 64))
    mask = torch.rand(B, S) > 0.2
    grad_outputs = tuple(randn((B, H, 64, 64)) for _ in range(3))
    first = CPU.backward(grad_outputs, q, mask, weights)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3, 16, threads):
            torch.set_num_threads(n)
            again = CPU.backward(grad_outputs, q, mask, weights)
            for name, x, y in zip(METRIC_GRAD_NAMES, first, again):
                assert torch.equal(x, y), f"grad_{name} differs at {n} threads"
    finally:
        torch.set_num_threads(threads)


def _poisoning_then(problem):
    """(the gradients of problem computed with a freshly allocated workspace, a call that leaves
    NaN in the kept one): a kernel that read its workspace before writing it would differ."""
    ops.release_cpu_workspace()
    fresh = CPU.backward(*problem)
    grad_outputs, q, mask, weights = problem
    CPU.backward(grad_outputs, torch.full_like(q, float("nan")), mask, weights)
    return fresh


def _backward_problem(B, S, H, d=64, masked=False):
    weights = make_metric_weights(d=d, H=H, **SMALL)
    q = randn((B, S, H, d))
    mask = torch.rand(B, S) > 0.3 if masked else None
    return tuple(randn((B, H, d, d)) for _ in range(3)), q, mask, weights


@pytest.mark.parametrize("d", [64, 128])
def test_cpu_q_read_in_place_equals_gathered(d):
    """An fp32 q with contiguous rows and no mask is read in place, rows H·d apart, by the
    forward and the backward; an all-True mask takes the gathering path: the same bits."""
    B, S, H = 2, 70, 3
    weights = make_metric_weights(d=d, H=H, **SMALL)
    q = randn((B, S, H, d))
    everything = torch.ones(B, S, dtype=torch.bool)
    grad_outputs = tuple(randn((B, H, d, d)) for _ in range(3))
    in_place = ops.metric_tensors(q, None, *metric_args(weights))
    gathered = ops.metric_tensors(q, everything, *metric_args(weights))
    for name, x, y in zip(("A", "A_LM", "G"), in_place, gathered):
        assert torch.equal(x, y), f"forward {name} differs"
    for name, x, y in zip(METRIC_GRAD_NAMES, CPU.backward(grad_outputs, q, None, weights),
                          CPU.backward(grad_outputs, q, everything, weights)):
        assert torch.equal(x, y), f"grad_{name} differs"


def test_cpu_kept_workspace_is_reused_across_calls():
    """The CPU backward leases memory kept between calls (csrc/cpu/workspace.h): a call after a
    larger or a smaller one, or after one that left NaN in it, gives the bits of a call with a
    fresh workspace; release_cpu_workspace frees it (and the next call allocates it again)."""
    problems = [_backward_problem(2, 300, 3, masked=True), _backward_problem(1, 9, 1),
                _backward_problem(1, 40, 2, d=128)]
    fresh = [_poisoning_then(p) for p in problems]
    for _ in range(2):
        for p, want in zip(problems, fresh):
            for name, x, y in zip(METRIC_GRAD_NAMES, CPU.backward(*p), want):
                assert torch.equal(x, y), f"grad_{name} differs with a reused workspace"
    assert ops.release_cpu_workspace() > 0
    assert ops.release_cpu_workspace() == 0  # nothing kept any more


def test_cpu_concurrent_calls_get_their_own_workspace():
    """Two Python threads in the CPU backward at once (torch.ops release the GIL): one leases the
    kept workspace, the other allocates its own for that call; both get their own bits."""
    import threading
    problems = [_backward_problem(1, 200, 2), _backward_problem(2, 50, 1, masked=True)]
    want = [CPU.backward(*p) for p in problems]
    failures = []

    def run(p, expected):
        for _ in range(4):
            got = CPU.backward(*p)
            if not all(torch.equal(x, y) for x, y in zip(got, expected)):
                failures.append(p[1].shape)

    threads = [threading.Thread(target=run, args=pair) for pair in zip(problems, want)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, f"differing gradients from concurrent calls: {failures}"


@pytest.mark.parametrize("impl", impls())
def test_none_means_zero(impl):
    weights = make_metric_weights(H=2, **SMALL)
    q = randn((2, 5, 2, 64))
    grad_G = randn((2, 2, 64, 64))
    zeros = torch.zeros_like(grad_G)
    with_none = impl.backward((None, None, grad_G), q, None, weights)
    with_zeros = impl.backward((zeros, zeros, grad_G), q, None, weights)
    for name, x, y in zip(METRIC_GRAD_NAMES, with_none, with_zeros):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=0, msg=f"grad_{name}")
    for name, g in zip(METRIC_GRAD_NAMES, impl.backward((None, None, None), q, None, weights)):
        assert not g.any(), f"grad_{name} without any output gradient must be 0"


@pytest.mark.parametrize("impl", impls("cpu", "cuda"))
def test_strided_inputs(impl):
    """q as a view of a wider buffer, output gradients and weights not contiguous: the results of
    their contiguous copies, bitwise, and gradients always contiguous."""
    B, S, H, d = 2, 11, 2, 64
    weights = make_metric_weights(d=d, H=H, **SMALL)
    q = randn((B, 2 * S, H + 1, d + 16))[:, ::2, 1:, 8:8 + d]
    grad_outputs = tuple(randn((B, H, d, d)).transpose(-1, -2) for _ in range(3))
    strided_w = {k: v.transpose(-1, -2).contiguous().transpose(-1, -2) if v.dim() >= 2 else v
                 for k, v in weights.items()}
    got = impl.backward(grad_outputs, q, None, strided_w)
    want = impl.backward(tuple(g.contiguous() for g in grad_outputs), q.contiguous(), None,
                         weights)
    for name, x, y in zip(METRIC_GRAD_NAMES, got, want):
        assert x.is_contiguous() and torch.equal(x, y), f"grad_{name}"


@pytest.mark.parametrize("impl", impls("cpu", "cuda"))
def test_empty_batch(impl):
    weights = make_metric_weights(H=2, **SMALL)
    grads = impl.backward((torch.zeros(0, 2, 64, 64), None, None), randn((0, 5, 2, 64)), None,
                          weights)
    assert grads[0].shape == (0, 5, 2, 64)
    assert all(not g.any() for g in grads[1:])


# --------------------------------------------------------------------------------------------
# Autograd through pldr::metric_tensors
# --------------------------------------------------------------------------------------------
def leaves(q, weights, requires_grad=True):
    return (q.clone().requires_grad_(requires_grad),
            [w.clone().requires_grad_() for w in metric_args(weights)])


def linear_loss(outputs, coefficients):
    return sum((o * c).sum() for o, c in zip(outputs, coefficients))


@pytest.mark.parametrize("impl", impls("cpu", "cuda"))
def test_autograd_calls_the_backward_op(impl):
    """loss.backward() through the op gives the backward op's gradients of the same output
    gradients, bitwise, for q and every weight; q_mask and the eps get none, and a q that does
    not require grad gets none."""
    weights = {k: v.to(impl.device) for k, v in make_metric_weights(H=2, **SMALL).items()}
    q = randn((2, 9, 2, 64), device=impl.device)
    mask = impl.to(torch.rand(2, 9) > 0.3)
    coefficients = [randn((2, 2, 64, 64), device=impl.device) for _ in range(3)]
    direct = torch.ops.pldr.metric_tensors_backward(*coefficients, q, mask,
                                                    *metric_args(weights), 1e-5, 1e-8)
    for q_requires_grad in (True, False):
        q_leaf, w_leaves = leaves(q, weights, q_requires_grad)
        outputs = torch.ops.pldr.metric_tensors(q_leaf, mask, *w_leaves, eps_ln=1e-5,
                                                eps_adj=1e-8)
        linear_loss(outputs, coefficients).backward()
        got = [q_leaf.grad, *(w.grad for w in w_leaves)]
        if not q_requires_grad:
            assert got[0] is None
        for name, x, y in zip(METRIC_GRAD_NAMES, got, direct):
            if x is not None:
                assert torch.equal(x, y), f"grad_{name}"


@pytest.mark.parametrize("impl", impls("cpu", "cuda"))
def test_autograd_through_the_op_matches_the_reference(impl):
    """Training through the op: the gradients of an ordinary loss (of the outputs the model uses,
    A_LM and G, as in a layer) by the rule, through a bf16 q."""
    case = Case(1, 33, 2, 64, torch.bfloat16, masked=True, mlp=(2, 2, 32))
    _, q, q_mask, weights = case.inputs("A")
    weights = {k: impl.to(v) for k, v in weights.items()}
    q_leaf, w_leaves = leaves(impl.to(q), weights)
    A, A_LM, G = torch.ops.pldr.metric_tensors(q_leaf, impl.to(q_mask), *w_leaves)
    (A.square().mean() + A_LM.mean()).backward()
    grads = [q_leaf.grad.cpu(), *(w.grad.cpu() for w in w_leaves)]
    n = A.numel()
    grad_outputs = (2 * A.detach().cpu() / n, torch.full_like(A_LM.cpu(), 1 / n), None)
    check_metric_tensors_grads(grads, grad_outputs, q, q_mask,
                               {k: v.cpu() for k, v in weights.items()}).assert_ok()


@pytest.mark.parametrize("with_mask", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("impl", impls("cpu", "cuda"))
def test_opcheck(impl, with_mask):
    """opcheck of the forward op with inputs that require grad (so test_autograd_registration
    and test_aot_dispatch_dynamic run its backward), and of the backward op itself."""
    weights = make_metric_weights(H=2, R=2, Gd=1, F=32, device=impl.device)
    q = torch.randn(2, 6, 2, 64, device=impl.device)
    mask = None
    if with_mask:
        mask = impl.to(torch.tensor([[True] * 6, [False, True, True, False, True, True]]))
    q_leaf, w_leaves = leaves(q, weights)
    eps = {"eps_ln": 1e-6, "eps_adj": 1e-9}
    torch.library.opcheck(torch.ops.pldr.metric_tensors.default, (q_leaf, mask, *w_leaves), eps)
    grad_outputs = [torch.randn(2, 2, 64, 64, device=impl.device), None,
                    torch.randn(2, 2, 64, 64, device=impl.device)]
    torch.library.opcheck(torch.ops.pldr.metric_tensors_backward.default,
                          (*grad_outputs, q, mask, *metric_args(weights)), eps)


@pytest.mark.parametrize("impl", impls("cpu", "cuda"))
def test_torch_compile_training_step(impl):
    """A training step under torch.compile(fullgraph=True): every gradient equals eager's,
    bitwise (the compiled backward calls the same op on the same output gradients); the loss is
    a sum that inductor may reduce in another order."""
    weights = make_metric_weights(H=2, **SMALL, device=impl.device)
    q = randn((2, 9, 2, 64), device=impl.device)
    mask = impl.to(torch.rand(2, 9) > 0.3)
    coefficients = [randn((2, 2, 64, 64), device=impl.device) for _ in range(3)]

    def loss_fn(q, mask, *w):
        return linear_loss(torch.ops.pldr.metric_tensors(q, mask, *w), coefficients)

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)
    results = []
    for fn in (loss_fn, compiled):
        q_leaf, w_leaves = leaves(q, weights)
        loss = fn(q_leaf, mask, *w_leaves)
        loss.backward()
        results.append([loss.detach(), q_leaf.grad, *(w.grad for w in w_leaves)])
    (eager_loss, *eager_grads), (compiled_loss, *compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=0)
    for name, x, y in zip(METRIC_GRAD_NAMES, eager_grads, compiled_grads):
        assert torch.equal(x, y), f"grad_{name}"


# --------------------------------------------------------------------------------------------
# Bad inputs: the backward's own arguments (the rest are the forward's checks, tested there)
# --------------------------------------------------------------------------------------------
BAD_GRADS = {
    "dtype": (lambda: torch.zeros(1, 2, 64, 64, dtype=torch.float64), r"must have dtype Float"),
    "shape": (lambda: torch.zeros(1, 2, 64, 32), r"must have shape \[1, 2, 64, 64\]"),
    "batch": (lambda: torch.zeros(2, 2, 64, 64), r"must have shape \[1, 2, 64, 64\]"),
}


def backward_call(impl, name, bad):
    weights = make_metric_weights(H=2, R=2, Gd=1, F=8)
    grads = dict(grad_A=None, grad_A_LM=torch.zeros(1, 2, 64, 64), grad_G=None) | {name: bad}
    args = (*grads.values(), randn((1, 5, 2, 64)), None, *metric_args(weights))
    if impl == "reference":
        return metric_tensors_backward_reference(*args)
    if impl == "fake":
        with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
            fake = [None if t is None else mode.from_tensor(t) for t in args]
            return torch.ops.pldr.metric_tensors_backward(*fake)
    return torch.ops.pldr.metric_tensors_backward(*args)


@pytest.mark.parametrize("bad", list(BAD_GRADS))
@pytest.mark.parametrize("name", ["grad_A", "grad_A_LM", "grad_G"])
def test_bad_output_gradient(name, bad):
    """The C++ kernel, the CUDA path's Python function and the fake kernel give the same error,
    naming the argument."""
    make, pattern = BAD_GRADS[bad]
    messages = []
    for impl in ("cpu", "reference", "fake"):
        with pytest.raises(RuntimeError, match=rf"^{name} {pattern}") as info:
            backward_call(impl, name, make())
        messages.append(str(info.value))
    assert messages[0] == messages[1] == messages[2]


def test_backward_of_a_bad_forward_call_is_refused_by_the_forward_checks():
    weights = make_metric_weights(H=2, R=2, Gd=1, F=8)
    with pytest.raises(RuntimeError, match=r"q must be float32, bfloat16 or float16"):
        torch.ops.pldr.metric_tensors_backward(None, None, None, randn((1, 5, 2, 64)).double(),
                                               None, *metric_args(weights))


def test_verdict_names_each_gradient():
    case = Case(1, 5, 1, 64, mlp=(1, 1, 16))
    grad_outputs, q, q_mask, weights = case.inputs("A")
    verdict = check_metric_tensors_grads(CPU.backward(grad_outputs, q, q_mask, weights),
                                         grad_outputs, q, q_mask, weights)
    assert isinstance(verdict, Verdict) and verdict
    assert [p.name for p in verdict.parts] == [f"grad_{n}" for n in METRIC_GRAD_NAMES]
