"""pldr::g_attention_backward and autograd through pldr::g_attention (docs/design.md §3.4) on
every backend that has a backward kernel (tests/backends.py), each gradient against fp64 autograd
of the reference by the rule of pldr_kernels.testing (docs/design.md §4.5)."""
from __future__ import annotations

import itertools

import pytest
import torch
from backends import backend_cases, backends
from cases import DTYPE_NAMES, LOW_PRECISION, same_bits
from cases import AttentionCase as Case
from torch._subclasses.fake_tensor import FakeTensorMode

import pldr_kernels
from pldr_kernels import autograd as pk_autograd
from pldr_kernels.testing import (
    DTYPES,
    check_g_attention_grads,
    g_attention_grad_oracle,
    random_attention_inputs,
    random_g,
)

OP = "g_attention_backward"
PROP = "backward"  # the emulator has no backward kernel (tests/backends.py: EXCLUDED)


def forward_backward(backend, dout, q, k, v, G=None, key_mask=None, causal=False, scale=None):
    """The forward on ``backend``, then its backward for ``dout``: ``(dq, dk, dv, dG)`` on the
    CPU (inputs are CPU tensors, moved with their layout)."""
    q, k, v, G, key_mask, dout = backend.to(q, k, v, G, key_mask, dout)
    out, lse = backend.g_attention(q, k, v, G, key_mask, causal, scale)
    grads = backend.g_attention_backward(dout, q, k, v, G, out, lse, key_mask, causal, scale)
    for grad, like in zip(grads, (q, k, v, G)):
        if like is None:
            assert grad is None
        else:
            wanted = torch.float32 if like is G else q.dtype
            assert grad.dtype == wanted and grad.shape == like.shape and grad.is_contiguous()
    return tuple(None if g is None else g.cpu() for g in grads)


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


CASES = list({c.id: c for c in [
    # Awkward shapes in fp32 (S = 1, 7, 97; Sq != Sk both ways; partial tiles), every G mode.
    *(Case(B, Sq, Sk, 2, d, torch.float32, causal, G)
      for (B, Sq, Sk), d, G, causal in itertools.product(
          [(1, 1, 1), (2, 7, 7), (1, 97, 97), (2, 7, 97), (2, 97, 7), (1, 130, 65)],
          (64, 128), ("none", "batch", "shared"), (False, True))),
    # The same in bf16/fp16 (d = 128 with a per-batch G only).
    *(Case(B, Sq, Sk, 2, d, dtype, causal, G)
      for dtype, (B, Sq, Sk), (d, G), causal in itertools.product(
          LOW_PRECISION, [(2, 7, 7), (2, 70, 70), (1, 7, 97), (2, 97, 7)],
          [(64, "none"), (64, "shared"), (128, "batch")], (False, True))),
    # Ragged masks and masks whose holes span whole key tiles; a shared G summed over 3 rows.
    *(Case(2, 50, 200, 2, 64, dtype, causal, "batch", "holes")
      for dtype, causal in itertools.product(DTYPES, (False, True))),
    *(Case(3, 33, 70, 2, 64, dtype, True, "shared", "ragged") for dtype in DTYPES),
    Case(2, 97, 97, 2, 128, torch.float32, False, "none", "ragged"),
    # B·H >= 8: one work item per (b, h) (the other cases split the keys into chunks).
    *(Case(2, 97, 130, 4, 64, dtype, causal, "shared", "ragged")
      for dtype, causal in itertools.product((torch.float32, torch.bfloat16), (False, True))),
    # Explicit scales, negative too.
    *(Case(2, 33, 70, 2, 64, dtype, True, scale=0.3) for dtype in DTYPES),
    Case(1, 33, 70, 2, 64, torch.float32, False, "shared", scale=-0.2),
    # S = 1025 (fp32 only: the fp64 oracle materialises Sq×Sk).
    Case(1, 1025, 1025, 2, 64, torch.float32, True, "shared"),
    Case(1, 1025, 1025, 1, 64, torch.float32, False, "batch", "ragged"),
]}.values())


@pytest.mark.parametrize("backend,case", backend_cases(OP, CASES, PROP))
def test_matches_reference(backend, case):
    dout, q, k, v, G, mask = case.backward_inputs()
    grads = forward_backward(backend, dout, q, k, v, G, mask, case.causal, case.scale)
    check_g_attention_grads(grads, dout, q, k, v, G, mask, case.causal, case.scale).assert_ok()


# --------------------------------------------------------------------------------------------
# Autograd through pldr::g_attention
# --------------------------------------------------------------------------------------------
def leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("backend", backends(OP, PROP))
def test_autograd_gives_the_ops_gradients(backend, dtype):
    """loss.backward() through pldr_kernels.g_attention yields exactly what the backward op
    returns, for every input that requires grad (and none for those that do not)."""
    q, k, v = backend.to(*random_attention_inputs(2, 70, 90, 2, 64, dtype))
    G, key_mask = backend.to(random_g(1, 2, 64), torch.rand(2, 90) > 0.3)
    dout = torch.randn_like(q)
    out, lse = pldr_kernels.g_attention(q, k, v, G, key_mask, True)
    want = backend.g_attention_backward(dout, q, k, v, G, out, lse, key_mask, True)
    lq, lk, lv, lG = leaves(q, k, v, G)
    out, _ = pldr_kernels.g_attention(lq, lk, lv, lG, key_mask, True)
    out.backward(dout)
    for leaf, grad in zip((lq, lk, lv, lG), want):
        assert same_bits(leaf.grad, grad)
    lk = k.detach().clone().requires_grad_()  # only k requires grad
    pldr_kernels.g_attention(q, lk, v, G, key_mask, True)[0].backward(dout)
    assert same_bits(lk.grad, want[1])


@pytest.mark.parametrize("backend", backends(OP, PROP))
def test_lse_is_not_differentiable(backend):
    """lse is returned without a gradient (docs/design.md §3.4): it does not require grad, so a
    loss of lse alone is refused by autograd instead of getting a wrong gradient."""
    q, k, v = leaves(*backend.to(*random_attention_inputs(1, 9, 9, 2, 64)))
    out, lse = pldr_kernels.g_attention(q, k, v, causal=True)
    assert out.requires_grad and not lse.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        lse.sum().backward()


@pytest.mark.parametrize("backend", backends(OP, PROP))
def test_broadcast_gradient_of_a_sum(backend):
    """out.sum() hands the backward an expanded gradient (every stride 0); the formula makes
    its rows contiguous and the gradients are those of dout = 1."""
    q, k, v = random_attention_inputs(2, 20, 30, 2, 64)
    G = random_g(2, 2, 64)
    lq, lk, lv, lG = leaves(*backend.to(q, k, v, G))
    pldr_kernels.g_attention(lq, lk, lv, lG, None, True)[0].sum().backward()
    ones = torch.ones(q.shape)
    grads = [t.grad.cpu() for t in (lq, lk, lv, lG)]
    check_g_attention_grads(grads, ones, q, k, v, G, None, True).assert_ok()


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("backend", backends(OP, PROP))
def test_rows_and_keys_nobody_sees_get_zero_gradients(backend, dtype):
    """A fully masked batch row: every gradient of that row is exactly 0 (dG of its G too); causal
    with Sq > Sk: the first Sq − Sk queries see no key and get dq = 0; masked keys dk = dv = 0."""
    B, Sq, Sk, H, d = 2, 20, 70, 2, 64
    q, k, v = random_attention_inputs(B, Sq, Sk, H, d, dtype)
    dout, G = torch.randn(q.shape).to(dtype), random_g(B, H, d)
    key_mask = torch.rand(B, Sk) > 0.3
    key_mask[1] = False
    dq, dk, dv, dG = grads = forward_backward(backend, dout, q, k, v, G, key_mask)
    check_g_attention_grads(grads, dout, q, k, v, G, key_mask).assert_ok()
    assert not dq[1].any() and not dk[1].any() and not dv[1].any() and not dG[1].any()
    assert not dk[0][~key_mask[0]].any() and not dv[0][~key_mask[0]].any()
    assert dq[0].abs().amax(-1).gt(0).all()
    q, k, v = random_attention_inputs(1, 20, 5, H, d, dtype)
    dout = torch.randn(q.shape).to(dtype)
    dq, dk, dv, _ = grads = forward_backward(backend, dout, q, k, v, None, None, True)
    check_g_attention_grads(grads, dout, q, k, v, None, None, True).assert_ok()
    assert not dq[:, :15].any() and dq[:, 16:].abs().amax(-1).gt(0).all()  # 15 sees one key


@pytest.mark.parametrize("backend", backends(OP, PROP))
def test_empty_inputs(backend):
    """No batch rows, no queries or no keys: gradients of the right shapes, 0 where they exist
    (dG included: a sum over nothing)."""
    q, k, v = backend.to(*random_attention_inputs(2, 7, 9, 2, 64))
    G, G_shared = backend.to(random_g(2, 2, 64), random_g(1, 2, 64))
    for q_, k_, v_, g in ((q[:0], k[:0], v[:0], G_shared), (q[:, :0], k, v, G), (q, k[:, :0],
                                                                                  v[:, :0], G)):
        out, lse = backend.g_attention(q_, k_, v_, g)
        dq, dk, dv, dG = backend.g_attention_backward(torch.ones_like(out), q_, k_, v_, g, out,
                                                      lse)
        assert dq.shape == q_.shape and dk.shape == k_.shape and dv.shape == v_.shape
        assert dG.shape == g.shape and not dG.any() and not dq.any()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("backend", backends(OP, PROP))
def test_strided_views(backend, dtype):
    """Only the last dim must be contiguous: q, k, v sliced from a fused qkv tensor, dout and out
    in a heads-first layout, lse, G and key_mask with strided rows give the bits of the same
    values laid out contiguously (which meet the rule)."""
    B, S, H, d = 2, 70, 3, 64
    qkv = torch.randn(B, S, 3, H, d).to(dtype)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    G = random_g(B, H, 2 * d)[:, :, ::2, :d]
    key_mask = (torch.rand(B, 2 * S) > 0.2)[:, ::2]
    dout = torch.empty(B, H, S, d, dtype=dtype).transpose(1, 2).copy_(torch.randn(B, S, H, d))
    dense = [t.contiguous() for t in (dout, q, k, v, G, key_mask)]
    want = forward_backward(backend, *dense, True, 0.2)
    check_g_attention_grads(want, *dense, True, 0.2).assert_ok()
    q_, k_, v_, G_, mask_, dout_ = backend.to(q, k, v, G, key_mask, dout)
    out, lse = backend.g_attention(q_, k_, v_, G_, mask_, True, 0.2)
    out_ = torch.empty(B, H, S, d, dtype=dtype, device=out.device).transpose(1, 2).copy_(out)
    lse_ = torch.empty(B, H, 2 * S, device=lse.device)[..., ::2].copy_(lse)
    assert not (out_.is_contiguous() or lse_.is_contiguous() or dout_.is_contiguous())
    got = backend.g_attention_backward(dout_, q_, k_, v_, G_, out_, lse_, mask_, True, 0.2)
    for a, b in zip(got, want):
        assert same_bits(a.cpu(), b)


@pytest.mark.parametrize("backend", backends(OP, PROP))
def test_broadcast_views(backend):
    """Stride-0 dims: a query row repeated, keys shared by the heads, a G with identical rows
    (stride(2) = 0, copied once) — by the rule, and bitwise the dense inputs' gradients."""
    B, S, H, d = 2, 33, 2, 64
    q = torch.randn(B, 1, H, d).expand(B, S, H, d)
    k = torch.randn(B, S, 1, d).expand(B, S, H, d)
    v = torch.randn(B, S, H, d)
    G = (0.1 * torch.randn(1, 1, 1, d)).expand(B, H, d, d)
    dout = torch.randn(B, S, H, d)
    got = forward_backward(backend, dout, q, k, v, G, None, True)
    check_g_attention_grads(got, dout, q, k, v, G, None, True).assert_ok()
    dense = forward_backward(backend, dout, *(t.contiguous() for t in (q, k, v, G)), None, True)
    for a, b in zip(got, dense):
        assert same_bits(a, b)


def _deterministic_cases():
    # B·H = 2 splits each (b, h) into key chunks; B·H = 8 gives one work item per (b, h).
    return [pytest.param(B, H, id=f"B{B}H{H}") for B, H in ((1, 2), (2, 4))]


@pytest.mark.parametrize("B,H", _deterministic_cases())
@pytest.mark.parametrize("backend", backends(OP, PROP))
def test_deterministic_bitwise(backend, B, H):
    """Run after run, and on the CPU at 1, 2 and 3 threads: the work partition follows the shapes
    only and every partial is reduced in a fixed order (docs/design.md §3.4)."""
    S = 300
    q, k, v = backend.to(*random_attention_inputs(B, S, S, H, 64))
    G, key_mask = backend.to(random_g(1, H, 64), torch.rand(B, S) > 0.2)
    dout = torch.randn_like(q)
    out, lse = backend.g_attention(q, k, v, G, key_mask, True)

    def run():
        return backend.g_attention_backward(dout, q, k, v, G, out, lse, key_mask, True)

    first = run()
    runs = [run()]
    if backend.runs("thread count"):
        threads = torch.get_num_threads()
        try:
            for n in (1, 3):
                torch.set_num_threads(n)
                runs.append(run())
        finally:
            torch.set_num_threads(threads)
    for again in runs:
        for a, b in zip(first, again):
            assert same_bits(a, b)


@pytest.mark.parametrize("backend", backends(OP, PROP))
def test_nan_stays_in_its_head(backend):
    """A NaN in one visible q element: every gradient that depends on it is NaN (its dq row, dG
    of its (b, h), dk and dv of the keys its row sees), the other rows of dq stay finite, and
    every other (b, h) gets the bits of the clean run. A NaN in a masked key's k or v changes no
    bit at all: masked keys are never read (docs/design.md §3.4)."""
    B, S, H, d, row = 2, 70, 2, 64, 40
    q, k, v = random_attention_inputs(B, S, S, H, d)
    G, dout = random_g(B, H, d), torch.randn(B, S, H, d)
    key_mask = torch.ones(B, S, dtype=torch.bool)
    key_mask[1, 10] = False
    clean = forward_backward(backend, dout, q, k, v, G, key_mask, True)
    q_nan = q.clone()
    q_nan[0, row, 0, 3] = float("nan")
    dq, dk, dv, dG = got = forward_backward(backend, dout, q_nan, k, v, G, key_mask, True)
    assert dq[0, row, 0].isnan().all() and dG[0, 0].isnan().all()
    assert dk[0, : row + 1, 0].isnan().all(1).all() and dv[0, : row + 1, 0].isnan().all(1).all()
    assert torch.isfinite(dq[0, :row, 0]).all() and torch.isfinite(dq[0, row + 1:, 0]).all()
    for a, b in zip(got[:3], clean[:3]):  # [B, S, H, d]
        assert same_bits(a[1], b[1]) and same_bits(a[0, :, 1], b[0, :, 1])
    assert same_bits(dG[1], clean[3][1]) and same_bits(dG[0, 1], clean[3][0, 1])
    # The backward alone (the forward's own NaN rule is docs/design.md §3.2's): given the clean
    # forward's out and lse, a NaN in a masked key's k or v is never read.
    q_, k_, v_, G_, mask_, dout_ = backend.to(q, k, v, G, key_mask, dout)
    out, lse = backend.g_attention(q_, k_, v_, G_, mask_, True)
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[1, 10, 1, 5] = v_nan[1, 10, 0, 7] = float("nan")
    k_nan, v_nan = backend.to(k_nan, v_nan)
    got = backend.g_attention_backward(dout_, q_, k_nan, v_nan, G_, out, lse, mask_, True)
    for a, b in zip(got, clean):
        assert same_bits(a.cpu(), b)


# --------------------------------------------------------------------------------------------
# Bad inputs: the backward's own arguments, on real tensors and on fake ones (same words)
# --------------------------------------------------------------------------------------------
def good_args(device="cpu"):
    q, k, v = random_attention_inputs(2, 5, 6, 2, 64, device=device)
    G, key_mask = random_g(2, 2, 64, device=device), torch.rand(2, 6, device=device) > 0.3
    out, lse = torch.ops.pldr.g_attention(q, k, v, G, key_mask, False, None)
    return dict(dout=torch.randn_like(out), q=q, k=k, v=v, G=G, out=out, lse=lse,
                key_mask=key_mask, causal=False, scale=None)


BAD_INPUTS = {
    "dout_shape": (lambda a: a.update(dout=a["dout"][:, :4]), "dout must have shape"),
    "dout_rank": (lambda a: a.update(dout=a["dout"][0]), "dout must be a 4-D tensor"),
    "dout_dtype": (lambda a: a.update(dout=a["dout"].bfloat16()), "dout must have dtype Float"),
    "dout_last_dim_strided": (lambda a: a.update(dout=torch.randn(2, 5, 2, 128)[..., ::2]),
                              "dout must be contiguous in its last dimension"),
    "out_shape": (lambda a: a.update(out=a["out"][:, :, :1]), "out must have shape"),
    "out_dtype": (lambda a: a.update(out=a["out"].half()), "out must have dtype Float"),
    "lse_dtype": (lambda a: a.update(lse=a["lse"].double()), "lse must have dtype Float"),
    "lse_shape": (lambda a: a.update(lse=a["lse"].transpose(1, 2)), "lse must have shape"),
    "lse_rank": (lambda a: a.update(lse=a["lse"][0]), "lse must be a 3-D tensor"),
    "q_rank": (lambda a: a.update(q=a["q"][0]), "q must be a 4-D tensor"),
    "G_dtype": (lambda a: a.update(G=a["G"].bfloat16()), "G must have dtype Float"),
    "key_mask_dtype": (lambda a: a.update(key_mask=a["key_mask"].float()),
                       "key_mask must have dtype Bool"),
    "scale_nan": (lambda a: a.update(scale=float("nan")), "scale must be a finite float"),
}


def call(a):
    return torch.ops.pldr.g_attention_backward(a["dout"], a["q"], a["k"], a["v"], a["G"],
                                               a["out"], a["lse"], a["key_mask"], a["causal"],
                                               a["scale"])


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("backend", backends(OP, "input validation", only=("cpu",)))
def test_bad_input_raises_naming_the_argument(backend, case):
    """The real kernel and the fake kernel (pldr_kernels/_checks.py) refuse with the same
    message, which names the argument."""
    mutate, message = BAD_INPUTS[case]
    args = good_args()
    call(args)  # the unmutated call is fine
    mutate(args)
    with pytest.raises(RuntimeError, match=message) as real:
        call(args)
    mode = FakeTensorMode()
    fake = {n: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for n, t in args.items()}
    with mode, pytest.raises(RuntimeError) as faked:
        call(fake)
    assert str(faked.value) == str(real.value)


def test_a_device_without_backward_kernel_is_named():
    with pytest.raises(NotImplementedError, match="no backward kernel for xpu tensors"):
        pk_autograd.attention.require_backward_kernel(torch.device("xpu"))


# --------------------------------------------------------------------------------------------
# Dispatcher contract: opcheck (autograd registration, AOT dispatch) and torch.compile training
# --------------------------------------------------------------------------------------------
def grad_samples(device):
    q, k, v = random_attention_inputs(2, 7, 9, 2, 64, device=device)
    mask = (torch.rand(2, 9) > 0.3).to(device)
    fused = torch.randn(1, 5, 3, 2, 128, device=device)
    G, G_shared = random_g(2, 2, 64, device=device), random_g(1, 2, 64, device=device)
    return {
        "plain": (q, k, v, None, None, False, None),
        "G-mask-causal-scale": (q, k, v, G, mask, True, 0.2),
        "bf16-Gshared": (q.bfloat16(), k.bfloat16(), v.bfloat16(), G_shared, None, True, None),
        "strided-d128": (fused[:, :, 0], fused[:, :, 1], fused[:, :, 2], None, None, False, None),
    }


@pytest.mark.parametrize("sample", list(grad_samples("cpu")))
@pytest.mark.parametrize("backend", backends(OP, "dispatcher"))
def test_opcheck_with_gradients(backend, sample):
    """opcheck of g_attention on inputs that require grad (test_autograd_registration,
    test_aot_dispatch_dynamic run the registered formula) and of g_attention_backward itself."""
    q, k, v, G, mask, causal, scale = grad_samples(backend.device)[sample]
    q, k, v, G = leaves(q, k, v, G)
    torch.library.opcheck(torch.ops.pldr.g_attention.default, (q, k, v, G, mask, causal, scale))
    out, lse = torch.ops.pldr.g_attention(q, k, v, G, mask, causal, scale)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(),
            None if G is None else G.detach(), out.detach(), lse, mask, causal, scale)
    torch.library.opcheck(torch.ops.pldr.g_attention_backward.default, args)


@pytest.mark.parametrize("backend", backends(OP, "dispatcher"))
def test_torch_compile_training_step(backend):
    """A training step of a small attention block (projections, G, the op, a loss) compiled with
    fullgraph=True gives the eager loss and gradients of every parameter."""
    B, S, H, d = 2, 11, 2, 64
    torch.manual_seed(0)
    proj = torch.nn.Linear(H * d, 3 * H * d).to(backend.device)
    G = torch.nn.Parameter(backend.to(random_g(1, H, d)))
    x = backend.to(torch.randn(B, S, H * d))
    target = backend.to(torch.randn(B, S, H, d))

    def loss_fn(x):
        q, k, v = proj(x).view(B, S, 3, H, d).unbind(2)
        out, _ = pldr_kernels.g_attention(q, k, v, G, causal=True)
        return (out - target).square().mean()

    def step(fn):
        proj.zero_grad()
        G.grad = None
        loss = fn(x)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in (*proj.parameters(), G)]

    torch._dynamo.reset()
    eager_loss, eager_grads = step(loss_fn)
    compiled_loss, compiled_grads = step(torch.compile(loss_fn, fullgraph=True))
    # Within fp32 rounding, not bitwise: inductor fuses the loss and the projection's bias its own
    # way (measured: one parameter's gradient 9e-10 off, G's gradient bitwise equal).
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=0)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_oracle_is_autograd_of_the_reference():
    """The gradient oracle is what it says: for a loss of out alone, autograd of
    reference.g_attention in fp64 (a check of testing.g_attention_grad_oracle itself)."""
    dout, q, k, v, G, mask = Case(1, 9, 11, 2, 64, torch.float32, True, "shared",
                                  "ragged").backward_inputs()
    oracle = g_attention_grad_oracle(dout, q, k, v, G, mask, True)
    lq, lk, lv, lG = leaves(*(t.double() for t in (q, k, v, G)))
    from pldr_kernels import reference
    (reference.g_attention(lq, lk, lv, lG, mask, True)[0] * dout.double()).sum().backward()
    for a, b in zip(oracle, (lq, lk, lv, lG)):
        assert torch.equal(a, b.grad)

