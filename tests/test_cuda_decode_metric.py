"""g_attention_decode and metric_tensors on real CUDA tensors (DESIGN.md §3.1, §3.3, §4).

Skipped without a GPU and a CUDA build of the extension. The same kernels run on the CPU through
the emulator in tests/test_emu_decode.py and tests/test_emu_metric_tensors.py.
"""
from __future__ import annotations

import math

import pytest
import torch
from decode_cases import assert_decode_matches_reference, peer_same_dtype
from testing import (
    METRIC_WEIGHT_ORDER,
    assert_close_to_reference,
    make_metric_weights,
    metric_args,
    random_g,
)

from pldr_kernels import reference


def _built_with_cuda() -> bool:
    try:
        from pldr_kernels._build_info import BUILD_INFO
    except ImportError:
        return False
    return bool(BUILD_INFO.get("with_cuda"))


# Not testing.HAS_CUDA_KERNELS: that one looks at g_attention, another branch's kernel.
HAVE_KERNELS = (torch.cuda.is_available() and _built_with_cuda() and all(
    torch._C._dispatch_has_kernel_for_dispatch_key(f"pldr::{op}", "CUDA")
    for op in ("g_attention_decode", "metric_tensors")))
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not HAVE_KERNELS,
                                 reason="needs a CUDA device and a CUDA build of pldr_kernels")]
DEV = "cuda"


def i32(values):
    return torch.tensor(values, dtype=torch.int32, device=DEV)


def check_decode(dtype, d, H, Smax, Sn, append, starts, g_mode, splits, lens):
    B = len(lens)
    q = torch.randn(B, Sn, H, d, device=DEV).to(dtype)
    k_cache = torch.randn(B, Smax, H, d, device=DEV).to(dtype)
    v_cache = torch.randn(B, Smax, H, d, device=DEV).to(dtype)
    k_new = torch.randn(B, Sn, H, d, device=DEV).to(dtype) if append else None
    v_new = torch.randn(B, Sn, H, d, device=DEV).to(dtype) if append else None
    G = None if g_mode is None else random_g(B if g_mode == "batch" else 1, H, d, device=DEV)
    starts_t = None if starts is None else i32(starts)
    kc, vc = k_cache.clone(), v_cache.clone()
    out = torch.ops.pldr.g_attention_decode(q, kc, vc, i32(lens), k_new, v_new, starts_t, G,
                                            None, splits)
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    reference.g_attention_decode(q, kc_ref, vc_ref, i32(lens), k_new, v_new, starts_t, G)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    assert_decode_matches_reference(out, q, k_cache, v_cache, lens, k_new, v_new, starts, G,
                                    kc_ref, vc_ref)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("splits", [1, 3, 0])
@pytest.mark.parametrize("Sn,append", [(1, True), (3, True), (3, False), (6, True)])
def test_decode_matches_reference(dtype, d, splits, Sn, append):
    lens = [97, 1000, 5] if append else [97, 1000, 7]
    check_decode(dtype, d, 3, 1025, Sn, append, [0, 13, 2], "batch", splits, lens)


@pytest.mark.parametrize("g_mode", [None, "shared"])
def test_decode_g_modes_and_long_cache(g_mode):
    check_decode(torch.bfloat16, 64, 14, 8192, 1, True, None, g_mode, 0, [8191])


def test_decode_past_the_end_nan_and_cache_untouched():
    """CUDA differs from the CPU backend here (which raises): the lengths are on the device and
    are never read on the host, so a row whose append would pass Smax is left unwritten and its
    outputs are NaN; the other rows are computed and appended normally."""
    B, H, d, Smax, Sn = 2, 2, 64, 40, 3
    for splits in (1, 3):
        q = torch.randn(B, Sn, H, d, device=DEV, dtype=torch.bfloat16)
        k_cache = torch.randn(B, Smax, H, d, device=DEV, dtype=torch.bfloat16)
        v_cache = torch.randn_like(k_cache)
        k_new, v_new = torch.randn_like(q), torch.randn_like(q)
        kc, vc = k_cache.clone(), v_cache.clone()
        out = torch.ops.pldr.g_attention_decode(q, kc, vc, i32([Smax - 1, 20]), k_new, v_new,
                                                None, None, None, splits)
        assert torch.isnan(out[0]).all() and not torch.isnan(out[1]).any()
        assert torch.equal(kc[0], k_cache[0]) and torch.equal(vc[0], v_cache[0])
        assert torch.equal(kc[1, 20:23], k_new[1])


def test_decode_strided_views():
    """Only the last dim must be contiguous: a cache that is a head-slice of a wider buffer and a
    q that is a slice of a fused qkv projection are read through their strides."""
    B, Sn, H, d, Smax = 2, 1, 4, 64, 300
    buf_k = torch.randn(B, Smax, 2 * H, d, device=DEV, dtype=torch.bfloat16)
    buf_v = torch.randn_like(buf_k)
    kc, vc = buf_k[:, :, :H], buf_v[:, :, :H]
    qkv = torch.randn(B, Sn, 3, H, d, device=DEV, dtype=torch.bfloat16)
    q = qkv[:, :, 0]
    k_new, v_new = qkv[:, :, 1], qkv[:, :, 2]
    lens = i32([200, 17])
    other_heads = buf_k[:, :, H:].clone()
    ref_k, ref_v = kc.contiguous(), vc.contiguous()
    ref64 = reference.g_attention_decode(q.double(), ref_k.double(), ref_v.double(), lens,
                                         k_new.double(), v_new.double())
    out = torch.ops.pldr.g_attention_decode(q, kc, vc, lens, k_new, v_new, None, None, None, 0)
    reference.g_attention_decode(q, ref_k, ref_v, lens, k_new, v_new)
    assert torch.equal(kc, ref_k) and torch.equal(buf_k[:, :, H:], other_heads)
    peer = peer_same_dtype(q, ref_k, ref_v, [200, 17], Sn, True, [0, 0], None, 1 / math.sqrt(d))
    assert_close_to_reference(out, ref64, peer=peer)


def test_decode_deterministic_and_graph_capturable():
    """Bitwise-identical runs; a captured step replays correctly with other cache_seqlens values
    (the grid depends on shapes only)."""
    B, H, d, Smax = 1, 14, 64, 1024
    q = torch.randn(B, 1, H, d, device=DEV, dtype=torch.bfloat16)
    k_cache = torch.randn(B, Smax, H, d, device=DEV, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    G = random_g(1, H, d, device=DEV)
    lens = i32([500])
    a = torch.ops.pldr.g_attention_decode(q, k_cache, v_cache, lens, None, None, None, G, None, 0)
    b = torch.ops.pldr.g_attention_decode(q, k_cache, v_cache, lens, None, None, None, G, None, 0)
    assert torch.equal(a, b)

    k_new, v_new = torch.randn_like(q), torch.randn_like(q)
    kc, vc = k_cache.clone(), v_cache.clone()
    static_lens = i32([0])
    torch.ops.pldr.g_attention_decode(q, kc, vc, static_lens, k_new, v_new, None, G, None, 0)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.pldr.g_attention_decode(q, kc, vc, static_lens, k_new, v_new, None, G,
                                                None, 0)
    for n in (10, 700, Smax - 1):
        static_lens.fill_(n)
        graph.replay()
        torch.cuda.synchronize()
        ref64 = reference.g_attention_decode(q.double(), kc.double(), vc.double(), i32([n + 1]),
                                             None, None, None, G.double())
        assert torch.equal(kc[0, n], k_new[0, 0])
        peer = peer_same_dtype(q, kc, vc, [n + 1], 1, False, [0], G, 1 / math.sqrt(d))
        assert_close_to_reference(out, ref64, peer=peer)


def test_decode_errors_name_the_argument():
    q = torch.randn(1, 1, 2, 64, device=DEV)
    kc = torch.randn(1, 16, 2, 64, device=DEV)
    with pytest.raises(RuntimeError, match="cache_seqlens"):
        torch.ops.pldr.g_attention_decode(q, kc, kc.clone(), torch.tensor([3], device=DEV))
    with pytest.raises(RuntimeError, match="head dim"):
        torch.ops.pldr.g_attention_decode(q[..., :32], kc[..., :32], kc[..., :32].clone(), i32([3]))


# ---- metric_tensors ---------------------------------------------------------------------------
def check_metric(outs, q, q_mask, w):
    w64 = {k: v.double() for k, v in w.items()}
    ref64 = reference.metric_tensors(q.double(), q_mask, *[w64[k] for k in METRIC_WEIGHT_ORDER])
    ref32 = reference.metric_tensors(q.float(), q_mask, *metric_args(w))
    A, A_LM, G = outs
    assert_close_to_reference(A, ref64[0], name="A")
    # Power stage: see tests/test_emu_metric_tensors.py (stage-wise 1e-5 checks, 2x rule for A_LM).
    assert_close_to_reference(A_LM, ref64[1], peer=ref32[1], name="A_LM",
                              floor=1e-5 * ref64[1].abs().max().item())
    A_LM_stage, _ = reference.g_from_metric(A.double(), w64["W"], w64["b"], w64["pw"], w64["a"],
                                            w64["ba"])
    assert_close_to_reference(A_LM, A_LM_stage, name="A_LM from the kernel's A")
    G_stage = torch.matmul(w64["a"], torch.pow(A_LM.double(), w64["pw"])) + w64["ba"]
    assert_close_to_reference(G, G_stage, name="G from the kernel's A_LM")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,S,masked", [(1, 1, False), (2, 7, True), (1, 33, False),
                                        (2, 1025, True)])
@pytest.mark.parametrize("d", [64, 128])
def test_metric_tensors_matches_reference(dtype, B, S, masked, d):
    H = 3
    q = torch.randn(B, S, H, d, device=DEV).to(dtype)
    q_mask = None
    if masked:
        q_mask = torch.ones(B, S, dtype=torch.bool, device=DEV)
        q_mask[0, : S // 3] = False
    w = make_metric_weights(d=d, H=H, device=DEV)
    outs = torch.ops.pldr.metric_tensors(q, q_mask, *metric_args(w))
    check_metric(outs, q, q_mask, w)


@pytest.mark.parametrize("d", [64, 128])
def test_metric_tensors_large_hidden_size(d):
    """F = 300: two hidden-layer passes, and at d = 128 more than the default 48 KiB of shared
    memory (the API opts in)."""
    B, S, H = 1, 20, 2
    q = torch.randn(B, S, H, d, device=DEV)
    w = make_metric_weights(d=d, H=H, R=2, Gd=2, F=300, device=DEV)
    check_metric(torch.ops.pldr.metric_tensors(q, None, *metric_args(w)), q, None, w)


def test_metric_tensors_strided_q_and_determinism():
    B, S, H, d = 1, 100, 14, 64
    qkv = torch.randn(B, S, 3, H, d, device=DEV)
    q = qkv[:, :, 0]
    w = make_metric_weights(d=d, H=H, device=DEV)
    a = torch.ops.pldr.metric_tensors(q, None, *metric_args(w))
    b = torch.ops.pldr.metric_tensors(q.contiguous(), None, *metric_args(w))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    check_metric(a, q, None, w)


def test_metric_tensors_opcheck():
    q = torch.randn(1, 9, 2, 64, device=DEV)
    w = make_metric_weights(d=64, H=2, device=DEV)
    torch.library.opcheck(torch.ops.pldr.metric_tensors.default, (q, None, *metric_args(w)),
                          test_utils=("test_schema", "test_faketensor"))
