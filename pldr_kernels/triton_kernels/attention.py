"""Triton kernels of ``pldr::g_attention`` (forward: out, lse) and ``pldr::g_attention_backward``
(docs/design.md §3.7), with launchers that take torch tensors.

The launchers run the kernels on CUDA tensors, or on CPU tensors when this module was imported
with ``TRITON_INTERPRET=1`` (Triton's interpreter decides at decoration time, so the variable must
be set before the import; :data:`INTERPRETED` says which mode this import got).

The math (docs/design.md §3.2, §3.4): q̃ = q·G is formed per query tile in fp32 and rounded once to
the input dtype, as the CUDA kernel does; scores q̃·kᵀ·scale and the softmax in fp32, base 2; P is
rounded to the input dtype for P·V. The backward is FlashAttention-2's on q̃, in four launches:

1. ``_bwd_prep_kernel`` — per query block: D = rowsum(dO∘O), lse in log2 units (+inf for rows
   without a visible key, so their P is 0), and q̃ (rounded as in the forward) into a workspace;
2. ``_bwd_dkdv_kernel`` — per key block, over the query blocks: dV = PᵀdO, dK = scale·dSᵀq̃;
3. ``_bwd_dq_kernel`` — per query block, over the key blocks: dq̃ = scale·dS·K, then the fused
   epilogues dq = dq̃·Gᵀ and this block's qᵀ·dq̃ added to its program's partial dG;
4. ``_sum_dg_partials_kernel`` — dG = the partials summed in a fixed order (over the batch too
   when G is shared).

No atomics, and block sizes come from the head dim and dtype only (``config``), so the same inputs
give the same bits run after run.

The interpreter computes bf16 arithmetic wrongly and rounds fp32 → bf16 toward zero, so under it
bf16 values are upcast to fp32 right after each load and rounded to bf16 (to nearest even, in fp32
bits) where the GPU kernels round (``EMULATE_BF16``); fp32 and fp16 run the GPU's code as is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import _checks

Tensor = torch.Tensor
LOG2E = 1.4426950408889634  # the kernels write it, and ln 2, as literals


# ---- device helpers ----------------------------------------------------------------------------
@triton.jit
def _round_to_input(x, DOT_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """fp32 ``x`` rounded to the inputs' dtype (round to nearest even), as a ``tl.dot`` operand:
    ``DOT_DTYPE`` itself, or under the interpreter's bf16 emulation fp32 values that bf16 holds
    exactly (so a later store to bf16 is exact too)."""
    if EMULATE_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(DOT_DTYPE)


@triton.jit
def _split_hi_lo(x, DOT_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """fp32 ``x`` as hi + lo, two terms of the inputs' dtype (``_round_to_input``): hi + lo holds
    x to about the dtype's epsilon squared, so products with them run on the tensor cores."""
    hi = _round_to_input(x, DOT_DTYPE, EMULATE_BF16)
    return hi, _round_to_input(x - hi.to(tl.float32), DOT_DTYPE, EMULATE_BF16)


@triton.jit
def _q_times_g(q_rows, row_ok, g_base, stride_gr, BLOCK_M: tl.constexpr, D: tl.constexpr,
               G_CHUNK: tl.constexpr, DOT_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr,
               LOW_PRECISION: tl.constexpr):
    """q̃ = q·G for one query tile, fp32: ``q_rows`` points at each row's first element; G's rows
    are taken ``G_CHUNK`` at a time, so G never has to sit in registers whole (d = 128). For
    bf16 / fp16 q, as in the CUDA kernel (docs/design.md §3.2): q·G_hi + q·G_lo on the tensor
    cores (the products are exact), whose error is far below q̃'s one rounding to the dtype; for
    fp32 q an exact fp32 product."""
    offs_d = tl.arange(0, D)
    qt = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for c in tl.range(0, D, G_CHUNK, num_stages=1):  # not unrolled: less register pressure
        offs_c = c + tl.arange(0, G_CHUNK)
        q_c = tl.load(q_rows[:, None] + offs_c[None, :], mask=row_ok[:, None], other=0.0)
        g_c = tl.load(g_base + offs_c[:, None] * stride_gr + offs_d[None, :])
        if LOW_PRECISION:
            q_c = q_c.to(DOT_DTYPE)
            g_hi, g_lo = _split_hi_lo(g_c, DOT_DTYPE, EMULATE_BF16)
            qt = tl.dot(q_c, g_hi, qt)
            qt = tl.dot(q_c, g_lo, qt)
        else:
            qt = tl.dot(q_c, g_c, qt, input_precision="ieee")
    return qt


@triton.jit
def _keys_ok(offs_n, Sk, km_base, stride_kms, HAS_KEY_MASK: tl.constexpr):
    """[BLOCK_N]: key j exists and is not masked out by ``key_mask``."""
    ok = offs_n < Sk
    if HAS_KEY_MASK:
        ok = ok & (tl.load(km_base + offs_n * stride_kms, mask=ok, other=0) != 0)
    return ok


# ---- forward -----------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["H", "Sq", "Sk", "causal_offset", "kv_group"])
def _fwd_kernel(Q, K, V, G, KM, OUT, LSE,
                sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, sg_b, sg_h, sg_r,
                skm_b, skm_s, so_b, so_s, so_h, sl_b, sl_h,
                H, Sq, Sk, causal_offset, qk_scale_log2, kv_group,
                HAS_G: tl.constexpr, HAS_KEY_MASK: tl.constexpr, D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, G_CHUNK: tl.constexpr,
                DOT_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr,
                LOW_PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < Sq

    q_rows = Q + b * sq_b + h * sq_h + offs_m * sq_s
    if HAS_G:
        qt = _q_times_g(q_rows, row_ok, G + b * sg_b + h * sg_h, sg_r, BLOCK_M, D, G_CHUNK,
                        DOT_DTYPE, EMULATE_BF16, LOW_PRECISION)
    else:
        qt = tl.load(q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        qt = qt.to(tl.float32)
    qt = _round_to_input(qt, DOT_DTYPE, EMULATE_BF16)

    kv_h = h // kv_group  # grouped-query attention: query head h reads kv head h // (H / H_kv)
    k_base = K + b * sk_b + kv_h * sk_h
    v_base = V + b * sv_b + kv_h * sv_h
    km_base = KM + b * skm_b
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    end_n = tl.minimum(Sk, start_m + BLOCK_M + causal_offset)  # keys past it are hidden
    for start_n in range(0, end_n, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < Sk
        k = tl.load(k_base + offs_n[:, None] * sk_s + offs_d[None, :], mask=col_ok[:, None],
                    other=0.0).to(DOT_DTYPE)
        s = tl.dot(qt, tl.trans(k), input_precision="ieee") * qk_scale_log2
        # query i sees key j ≤ i + causal_offset (Sk − Sq when causal, Sk otherwise)
        visible = (_keys_ok(offs_n, Sk, km_base, skm_s, HAS_KEY_MASK)[None, :]
                   & (offs_n[None, :] <= offs_m[:, None] + causal_offset))
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
        p = tl.exp2(s - m_base[:, None])
        alpha = tl.exp2(m_i - m_base)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * sv_s + offs_d[None, :], mask=col_ok[:, None],
                    other=0.0).to(DOT_DTYPE)
        acc = tl.dot(_round_to_input(p, DOT_DTYPE, EMULATE_BF16), v, acc * alpha[:, None],
                     input_precision="ieee")
        m_i = m_new

    seen = l_i > 0.0
    out = tl.where(seen[:, None], acc / tl.where(seen, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))  # natural log, as the contract has it
    out_rows = OUT + b * so_b + h * so_h + offs_m * so_s
    tl.store(out_rows[:, None] + offs_d[None, :],
             _round_to_input(out, DOT_DTYPE, EMULATE_BF16).to(OUT.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(LSE + b * sl_b + h * sl_h + offs_m, lse, mask=row_ok)


# ---- backward ----------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["H", "Sq"])
def _bwd_prep_kernel(Q, G, O, DO, LSE, QT, DELTA, LSE2,
                     sq_b, sq_s, sq_h, sg_b, sg_h, sg_r, so_b, so_s, so_h, sdo_b, sdo_s, sdo_h,
                     sl_b, sl_h, sqt_b, sqt_s, sqt_h,
                     H, Sq,
                     HAS_G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                     G_CHUNK: tl.constexpr, DOT_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr,
                     LOW_PRECISION: tl.constexpr):
    """D = rowsum(dO∘O), lse·log2(e) (+inf where lse = −inf) into [B, H, Sq] fp32 buffers, and
    with G, q̃ = q·G rounded to the input dtype into the workspace QT [B, Sq, H, d]."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < Sq

    o = tl.load((O + b * so_b + h * so_h + offs_m * so_s)[:, None] + offs_d[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load((DO + b * sdo_b + h * sdo_h + offs_m * sdo_s)[:, None] + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0).to(tl.float32)
    row = (b * H + h) * Sq + offs_m
    tl.store(DELTA + row, tl.sum(o * do, 1), mask=row_ok)
    lse = tl.load(LSE + b * sl_b + h * sl_h + offs_m, mask=row_ok, other=0.0)
    tl.store(LSE2 + row, tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634),
             mask=row_ok)
    if HAS_G:
        q_rows = Q + b * sq_b + h * sq_h + offs_m * sq_s
        qt = _q_times_g(q_rows, row_ok, G + b * sg_b + h * sg_h, sg_r, BLOCK_M, D, G_CHUNK,
                        DOT_DTYPE, EMULATE_BF16, LOW_PRECISION)
        qt = _round_to_input(qt, DOT_DTYPE, EMULATE_BF16).to(QT.dtype.element_ty)
        tl.store((QT + b * sqt_b + h * sqt_h + offs_m * sqt_s)[:, None] + offs_d[None, :], qt,
                 mask=row_ok[:, None])


@triton.jit(do_not_specialize=["H", "Sq", "Sk", "causal_offset", "kv_group"])
def _bwd_dkdv_kernel(QT, K, V, DO, KM, DELTA, LSE2, DK, DV,
                     sqt_b, sqt_s, sqt_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h,
                     sdo_b, sdo_s, sdo_h, skm_b, skm_s, sdk_b, sdk_s, sdk_h,
                     H, Sq, Sk, causal_offset, scale, qk_scale_log2, kv_group,
                     HAS_KEY_MASK: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """One key block of one (b, h), over every query block that sees it: dV = PᵀdO and
    dK = scale·dSᵀq̃, with P and dS held transposed ([keys, queries]) so that each product takes
    them as its left operand. dK and dV share the strides ``sdk_*`` (both are allocated
    contiguous). With grouped-query attention (kv_group > 1) the program of query head h reads
    kv head h // kv_group and writes this head's share to a per-query-head DK, DV."""
    pid_n = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    kv_h = h // kv_group
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    col_ok = offs_n < Sk

    k = tl.load((K + b * sk_b + kv_h * sk_h + offs_n * sk_s)[:, None] + offs_d[None, :],
                mask=col_ok[:, None], other=0.0).to(DOT_DTYPE)
    v = tl.load((V + b * sv_b + kv_h * sv_h + offs_n * sv_s)[:, None] + offs_d[None, :],
                mask=col_ok[:, None], other=0.0).to(DOT_DTYPE)
    keys_ok = _keys_ok(offs_n, Sk, KM + b * skm_b, skm_s, HAS_KEY_MASK)
    qt_base = QT + b * sqt_b + h * sqt_h
    do_base = DO + b * sdo_b + h * sdo_h
    row_base = (b * H + h) * Sq
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    # queries before the first that sees key start_n contribute nothing
    first_m = tl.maximum(start_n - causal_offset, 0) // BLOCK_M * BLOCK_M
    for start_m in range(first_m, Sq, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Sq
        qt = tl.load((qt_base + offs_m * sqt_s)[:, None] + offs_d[None, :],
                     mask=row_ok[:, None], other=0.0).to(DOT_DTYPE)
        do = tl.load((do_base + offs_m * sdo_s)[:, None] + offs_d[None, :],
                     mask=row_ok[:, None], other=0.0).to(DOT_DTYPE)
        lse2 = tl.load(LSE2 + row_base + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(qt), input_precision="ieee") * qk_scale_log2
        visible_t = keys_ok[:, None] & (offs_n[:, None] <= offs_m[None, :] + causal_offset)
        p_t = tl.where(visible_t, tl.exp2(s_t - lse2[None, :]), 0.0)
        dv = tl.dot(_round_to_input(p_t, DOT_DTYPE, EMULATE_BF16), do, dv,
                    input_precision="ieee")
        dp_t = tl.dot(v, tl.trans(do), input_precision="ieee")
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(_round_to_input(ds_t, DOT_DTYPE, EMULATE_BF16), qt, dk,
                    input_precision="ieee")

    out_rows = (b * sdk_b + h * sdk_h + offs_n * sdk_s)[:, None] + offs_d[None, :]
    tl.store(DK + out_rows,
             _round_to_input(dk * scale, DOT_DTYPE, EMULATE_BF16).to(DK.dtype.element_ty),
             mask=col_ok[:, None])
    tl.store(DV + out_rows, _round_to_input(dv, DOT_DTYPE, EMULATE_BF16).to(DV.dtype.element_ty),
             mask=col_ok[:, None])


@triton.jit(do_not_specialize=["H", "Sq", "Sk", "causal_offset", "n_q_blocks", "n_splits",
                               "kv_group"])
def _bwd_dq_kernel(Q, QT, K, V, G, DO, KM, DELTA, LSE2, DQ, DG_PARTIAL,
                   sq_b, sq_s, sq_h, sqt_b, sqt_s, sqt_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h,
                   sg_b, sg_h, sg_r, sdo_b, sdo_s, sdo_h, skm_b, skm_s, sdq_b, sdq_s, sdq_h,
                   B, H, Sq, Sk, causal_offset, scale, qk_scale_log2, n_q_blocks, n_splits,
                   kv_group, HAS_G: tl.constexpr, HAS_KEY_MASK: tl.constexpr, D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, G_CHUNK: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr,
                   LOW_PRECISION: tl.constexpr):
    """Program (split, h, b) takes the query blocks split, split + n_splits, …: for each,
    dq̃ = scale·dS·K over the key blocks it sees, then dq = dq̃·Gᵀ and qᵀ·dq̃ added to the program's
    own partial dG ``DG_PARTIAL[h, b, split]`` (fp32 [d, d], zero-initialised), each G_CHUNK rows of
    G / columns of q at a time. Without G, dq = dq̃."""
    split = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_d = tl.arange(0, D)
    kv_h = h // kv_group  # grouped-query attention
    k_base = K + b * sk_b + kv_h * sk_h
    v_base = V + b * sv_b + kv_h * sv_h
    km_base = KM + b * skm_b
    row_base = (b * H + h) * Sq
    g_base = G + b * sg_b + h * sg_h
    dg_base = DG_PARTIAL + ((h * B + b) * n_splits + split) * D * D
    for q_block in range(split, n_q_blocks, n_splits):
        start_m = q_block * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Sq
        qt = tl.load((QT + b * sqt_b + h * sqt_h + offs_m * sqt_s)[:, None] + offs_d[None, :],
                     mask=row_ok[:, None], other=0.0).to(DOT_DTYPE)
        do = tl.load((DO + b * sdo_b + h * sdo_h + offs_m * sdo_s)[:, None] + offs_d[None, :],
                     mask=row_ok[:, None], other=0.0).to(DOT_DTYPE)
        lse2 = tl.load(LSE2 + row_base + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
        dqt = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        end_n = tl.minimum(Sk, start_m + BLOCK_M + causal_offset)
        for start_n in range(0, end_n, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            col_ok = offs_n < Sk
            k = tl.load(k_base + offs_n[:, None] * sk_s + offs_d[None, :], mask=col_ok[:, None],
                        other=0.0).to(DOT_DTYPE)
            v = tl.load(v_base + offs_n[:, None] * sv_s + offs_d[None, :], mask=col_ok[:, None],
                        other=0.0).to(DOT_DTYPE)
            s = tl.dot(qt, tl.trans(k), input_precision="ieee") * qk_scale_log2
            visible = (_keys_ok(offs_n, Sk, km_base, skm_s, HAS_KEY_MASK)[None, :]
                       & (offs_n[None, :] <= offs_m[:, None] + causal_offset))
            p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")
            ds = p * (dp - delta[:, None])
            dqt = tl.dot(_round_to_input(ds, DOT_DTYPE, EMULATE_BF16), k, dqt,
                         input_precision="ieee")
        dqt = dqt * scale

        dq_rows = DQ + b * sdq_b + h * sdq_h + offs_m * sdq_s
        if HAS_G:
            q_rows = Q + b * sq_b + h * sq_h + offs_m * sq_s
            if LOW_PRECISION:  # tensor-core products of hi + lo terms, as in _q_times_g
                dqt_hi, dqt_lo = _split_hi_lo(dqt, DOT_DTYPE, EMULATE_BF16)
            for c in tl.range(0, D, G_CHUNK, num_stages=1):  # not unrolled: less register pressure
                offs_c = c + tl.arange(0, G_CHUNK)
                # dq[:, c] = dq̃ · (G[c, :])ᵀ
                g_c = tl.load(g_base + offs_c[:, None] * sg_r + offs_d[None, :])
                # dG[c, :] += (q[:, c])ᵀ · dq̃
                q_c = tl.load(q_rows[:, None] + offs_c[None, :], mask=row_ok[:, None], other=0.0)
                dg_ptrs = dg_base + offs_c[:, None] * D + offs_d[None, :]
                dg_c = tl.load(dg_ptrs)
                if LOW_PRECISION:
                    g_hi, g_lo = _split_hi_lo(g_c, DOT_DTYPE, EMULATE_BF16)
                    dq_c = tl.dot(dqt_hi, tl.trans(g_hi))
                    dq_c = tl.dot(dqt_hi, tl.trans(g_lo), dq_c)
                    dq_c = tl.dot(dqt_lo, tl.trans(g_hi), dq_c)
                    q_c_t = tl.trans(q_c.to(DOT_DTYPE))
                    dg_c = tl.dot(q_c_t, dqt_hi, dg_c)
                    dg_c = tl.dot(q_c_t, dqt_lo, dg_c)
                else:
                    dq_c = tl.dot(dqt, tl.trans(g_c), input_precision="ieee")
                    dg_c = tl.dot(tl.trans(q_c), dqt, dg_c, input_precision="ieee")
                tl.store(dq_rows[:, None] + offs_c[None, :],
                         _round_to_input(dq_c, DOT_DTYPE, EMULATE_BF16).to(DQ.dtype.element_ty),
                         mask=row_ok[:, None])
                tl.store(dg_ptrs, dg_c)
            # the next query block reads these partials back, maybe in other threads' layout
            tl.debug_barrier()
        else:
            tl.store(dq_rows[:, None] + offs_d[None, :],
                     _round_to_input(dqt, DOT_DTYPE, EMULATE_BF16).to(DQ.dtype.element_ty),
                     mask=row_ok[:, None])


@triton.jit(do_not_specialize=["partials_per_output"])
def _sum_dg_partials_kernel(DG_PARTIAL, DG, partials_per_output, D: tl.constexpr,
                            BLOCK: tl.constexpr):
    """DG[bg, h] (fp32 [d, d]; program (chunk of BLOCK entries, h, bg)) = the sum, in index order,
    of its ``partials_per_output`` consecutive partials in ``DG_PARTIAL`` [H, B, splits, d, d]: the
    splits of one (b, h) when G is per batch (bG = B), every (b, split) of head h when G is shared
    by the batch (bG = 1)."""
    h = tl.program_id(1)
    bg = tl.program_id(2)
    H = tl.num_programs(1)
    n_out_batch = tl.num_programs(2)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < D * D
    first = DG_PARTIAL + ((h * n_out_batch + bg) * partials_per_output).to(tl.int64) * (D * D)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, partials_per_output):
        acc += tl.load(first + i * (D * D) + offs, mask=ok, other=0.0)
    tl.store(DG + (bg * H + h).to(tl.int64) * (D * D) + offs, acc, mask=ok)


# ---- host side ---------------------------------------------------------------------------------
INTERPRETED = not isinstance(_fwd_kernel, triton.runtime.JITFunction)
"""Whether this import got Triton's interpreter (``TRITON_INTERPRET=1``): kernels on CPU tensors."""
# Triton's own library functions (tl.zeros, tl.sum, …) are decorated when triton is imported: the
# interpreter needs TRITON_INTERPRET=1 from before that import, not only before this one.
_TRITON_IMPORTED_COMPILED = isinstance(tl.zeros, triton.runtime.JITFunction)

_TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16,
                  torch.bfloat16: tl.bfloat16}


@dataclass(frozen=True)
class Config:
    """Block sizes and launch options of the four kernels (rows × columns of each tile)."""
    fwd_m: int
    fwd_n: int
    prep_m: int
    dkdv_m: int
    dkdv_n: int
    dq_m: int
    dq_n: int
    g_chunk: int
    num_warps: int
    num_stages: int
    dq_programs: int  # the dq launch splits each (b, h)'s query blocks until about this many


def config(d: int, dtype: torch.dtype) -> Config:
    """Fixed configurations (no autotuning, so results are the same in every process and the
    interpreter, where ``@triton.autotune`` cannot time anything, runs the same code): small tiles
    under the interpreter, so the tests' tiny shapes still span several tiles and partial ones;
    on a GPU, tensor-core tiles after Triton's fused-attention tutorial for bf16 / fp16, and
    smaller ones for fp32, whose exact (``ieee``) dots run on the FMA units."""
    if INTERPRETED:
        return Config(fwd_m=32, fwd_n=32, prep_m=32, dkdv_m=16, dkdv_n=32, dq_m=32, dq_n=16,
                      g_chunk=32, num_warps=4, num_stages=1, dq_programs=8)
    if dtype == torch.float32:
        if d == 64:
            return Config(fwd_m=64, fwd_n=32, prep_m=64, dkdv_m=32, dkdv_n=32, dq_m=64, dq_n=32,
                          g_chunk=16, num_warps=8, num_stages=2, dq_programs=512)
        return Config(fwd_m=32, fwd_n=16, prep_m=64, dkdv_m=16, dkdv_n=32, dq_m=32, dq_n=32,
                      g_chunk=16, num_warps=8, num_stages=2, dq_programs=512)
    if d == 64:
        return Config(fwd_m=128, fwd_n=64, prep_m=64, dkdv_m=32, dkdv_n=128, dq_m=64, dq_n=32,
                      g_chunk=32, num_warps=4, num_stages=3, dq_programs=512)
    return Config(fwd_m=128, fwd_n=64, prep_m=64, dkdv_m=32, dkdv_n=64, dq_m=64, dq_n=32,
                  g_chunk=32, num_warps=8, num_stages=2, dq_programs=512)


def _dot_types(dtype: torch.dtype) -> tuple[tl.dtype, bool]:
    """(the tl.dot operand dtype, whether bf16 is emulated in fp32) for inputs of ``dtype``."""
    if INTERPRETED and dtype == torch.bfloat16:
        return tl.float32, True
    return _TRITON_DTYPES[dtype], False


def _check_runs_here(q: Tensor) -> None:
    if INTERPRETED and _TRITON_IMPORTED_COMPILED:
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after triton had been imported: Triton's interpreter "
            "needs it before the first `import triton` of the process (set it in the "
            "environment of the process).")
    if INTERPRETED and q.device.type != "cpu":
        raise RuntimeError(
            "pldr_kernels.triton_kernels.attention was imported with TRITON_INTERPRET=1, so its "
            f"kernels run in Triton's interpreter on CPU tensors; got q on {q.device}. Import it "
            "without TRITON_INTERPRET to run them on the GPU.")
    if not INTERPRETED and q.device.type != "cuda":
        raise RuntimeError(
            f"The Triton kernels of pldr_kernels run on CUDA tensors, got q on {q.device}. "
            "(Under TRITON_INTERPRET=1, set before pldr_kernels.triton_kernels.attention is "
            "imported, they run on CPU tensors through Triton's interpreter.)")


def _on_device(t: Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else _NoGuard()


class _NoGuard:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _bshd(t: Tensor) -> tuple[int, int, int]:
    """(batch, row, head) strides of a [B, S, H, d] tensor."""
    return t.stride(0), t.stride(1), t.stride(2)


def _g_args(G: Tensor | None, q: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """G and its (batch, head, row) strides, batch stride 0 when one G is shared by the batch; q as
    a placeholder the kernels never read when there is no G."""
    if G is None:
        return q, (0, 0, 0)
    return G, (0 if G.size(0) == 1 else G.stride(0), G.stride(1), G.stride(2))


def _mask_args(key_mask: Tensor | None, q: Tensor) -> tuple[Tensor, tuple[int, int]]:
    if key_mask is None:
        return q, (0, 0)
    return key_mask, (key_mask.stride(0), key_mask.stride(1))


def _causal_offset(causal: bool, Sq: int, Sk: int) -> int:
    """Query i sees key j ≤ i + offset: bottom-right aligned when causal (docs/design.md §3.2);
    Sk (every key) otherwise."""
    return Sk - Sq if causal else Sk


def _check_grid(B: int, H: int) -> None:
    """Heads and batch are the launch grid's dimensions 1 and 2, at most 65535 each on CUDA."""
    for dim, name, value in ((0, "batch", B), (2, "heads", H)):
        if value > 65535:
            raise RuntimeError(f"q.shape[{dim}] ({name}) must be at most 65535 for the Triton "
                               f"kernels (a CUDA grid dimension), got {value}.")


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.size(-1) <= 1 or t.stride(-1) == 1 else t.contiguous()


def g_attention_forward(q: Tensor, k: Tensor, v: Tensor, G: Tensor | None = None,
                        key_mask: Tensor | None = None, causal: bool = False,
                        scale: float | None = None) -> tuple[Tensor, Tensor]:
    """``pldr::g_attention`` in Triton: ``(out [B,Sq,H,d] in q's dtype, lse [B,H,Sq] fp32)``, the
    contract of docs/design.md §3.2 (arguments checked as the C++ kernels check them)."""
    _checks.check_g_attention_inputs(q, k, v, G, key_mask, scale)
    _check_runs_here(q)
    B, Sq, H, d = q.shape
    _check_grid(B, H)
    Sk = k.size(1)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    out = torch.empty((B, Sq, H, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    cfg = config(d, q.dtype)
    dot_dtype, emulate_bf16 = _dot_types(q.dtype)
    g, g_strides = _g_args(G, q)
    km, km_strides = _mask_args(key_mask, q)
    with _on_device(q):
        _fwd_kernel[(triton.cdiv(Sq, cfg.fwd_m), H, B)](
            q, k, v, g, km, out, lse, *_bshd(q), *_bshd(k), *_bshd(v), *g_strides, *km_strides,
            *_bshd(out), lse.stride(0), lse.stride(1),
            H, Sq, Sk, _causal_offset(causal, Sq, Sk), scale * LOG2E, H // k.size(2),
            HAS_G=G is not None, HAS_KEY_MASK=key_mask is not None, D=d, BLOCK_M=cfg.fwd_m,
            BLOCK_N=cfg.fwd_n, G_CHUNK=cfg.g_chunk, DOT_DTYPE=dot_dtype,
            EMULATE_BF16=emulate_bf16, LOW_PRECISION=q.dtype != torch.float32,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse


def _check_backward_tensors(dout: Tensor, out: Tensor, lse: Tensor, q: Tensor) -> None:
    """dout and out like q (device, dtype, shape), lse fp32 [B, H, Sq] on q's device."""
    B, Sq, H, _ = q.shape
    for t, name in ((dout, "dout"), (out, "out")):
        _checks.check_device(t, name, q.device)
        _checks.check_dtype(t, name, q.dtype, "It must match q.")
        _checks.check_shape(t, name, q.shape)
    _checks.check_device(lse, "lse", q.device)
    _checks.check_dtype(lse, "lse", torch.float32, "Pass the lse that g_attention returned.")
    _checks.check_shape(lse, "lse", (B, H, Sq))


def dq_splits(n_q_blocks: int, B: int, H: int, cfg: Config) -> int:
    """How many dq programs share each (b, h)'s query blocks (block i goes to program i mod
    splits): enough for about ``cfg.dq_programs`` programs in all; from the shapes only."""
    return max(1, min(n_q_blocks, cfg.dq_programs // max(1, B * H)))


def g_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, G: Tensor | None,
                         out: Tensor, lse: Tensor, key_mask: Tensor | None, causal: bool,
                         scale: float | None
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``pldr::g_attention_backward`` in Triton: ``(dq, dk, dv)`` in q's dtype and ``dG`` fp32
    ``[B or 1, H, d, d]`` (None without G) from the forward's ``out`` and ``lse``
    (docs/design.md §3.4). A query row without a visible key gets zero gradient."""
    _checks.check_g_attention_inputs(q, k, v, G, key_mask, scale)
    _check_backward_tensors(dout, out, lse, q)
    _check_runs_here(q)
    dout, out, lse = (_last_dim_contiguous(t) for t in (dout, out, lse))
    B, Sq, H, d = q.shape
    _check_grid(B, H)
    Sk = k.size(1)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    H_kv = k.size(2)
    kv_group = H // H_kv if H_kv else 1
    dq = torch.empty((B, Sq, H, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Sk, H_kv, d), dtype=q.dtype, device=q.device)
    dv = torch.empty_like(dk)
    # Grouped-query attention: dK, dV per query head (fp32, each already rounded as the kernel
    # rounds), then each kv head's group summed in head order (no atomics, docs/design.md §3.4.1).
    dk_heads = dk if kv_group == 1 else torch.empty((B, Sk, H, d), dtype=torch.float32,
                                                    device=q.device)
    dv_heads = dv if kv_group == 1 else torch.empty_like(dk_heads)
    dG = None if G is None else torch.empty((G.size(0), H, d, d), dtype=torch.float32,
                                            device=q.device)
    if B * H * Sq * Sk == 0:  # nothing attends: every gradient is zero
        return dq.zero_(), dk.zero_(), dv.zero_(), None if dG is None else dG.zero_()

    cfg = config(d, q.dtype)
    dot_dtype, emulate_bf16 = _dot_types(q.dtype)
    common = dict(D=d, DOT_DTYPE=dot_dtype, EMULATE_BF16=emulate_bf16, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages)
    g, g_strides = _g_args(G, q)
    km, km_strides = _mask_args(key_mask, q)
    causal_offset = _causal_offset(causal, Sq, Sk)
    delta = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    lse_log2 = torch.empty_like(delta)
    qt = q if G is None else torch.empty((B, Sq, H, d), dtype=q.dtype, device=q.device)
    n_q_blocks = triton.cdiv(Sq, cfg.dq_m)
    splits = dq_splits(n_q_blocks, B, H, cfg)
    dg_partial = (q if G is None else
                  torch.zeros((H, B, splits, d, d), dtype=torch.float32, device=q.device))
    with _on_device(q):
        _bwd_prep_kernel[(triton.cdiv(Sq, cfg.prep_m), H, B)](
            q, g, out, dout, lse, qt, delta, lse_log2, *_bshd(q), *g_strides, *_bshd(out),
            *_bshd(dout), lse.stride(0), lse.stride(1), *_bshd(qt), H, Sq,
            HAS_G=G is not None, BLOCK_M=cfg.prep_m, G_CHUNK=cfg.g_chunk,
            LOW_PRECISION=q.dtype != torch.float32, **common)
        _bwd_dkdv_kernel[(triton.cdiv(Sk, cfg.dkdv_n), H, B)](
            qt, k, v, dout, km, delta, lse_log2, dk_heads, dv_heads, *_bshd(qt), *_bshd(k),
            *_bshd(v), *_bshd(dout), *km_strides, *_bshd(dk_heads), H, Sq, Sk, causal_offset,
            scale, scale * LOG2E, kv_group, HAS_KEY_MASK=key_mask is not None, BLOCK_M=cfg.dkdv_m,
            BLOCK_N=cfg.dkdv_n, **common)
        _bwd_dq_kernel[(splits, H, B)](
            q, qt, k, v, g, dout, km, delta, lse_log2, dq, dg_partial, *_bshd(q), *_bshd(qt),
            *_bshd(k), *_bshd(v), *g_strides, *_bshd(dout), *km_strides, *_bshd(dq),
            B, H, Sq, Sk, causal_offset, scale, scale * LOG2E, n_q_blocks, splits, kv_group,
            HAS_G=G is not None, HAS_KEY_MASK=key_mask is not None, BLOCK_M=cfg.dq_m,
            BLOCK_N=cfg.dq_n, G_CHUNK=cfg.g_chunk, LOW_PRECISION=q.dtype != torch.float32,
            **common)
        if dG is not None:
            per_output = splits * (B if G.size(0) == 1 else 1)
            block = min(1024, d * d)
            _sum_dg_partials_kernel[(triton.cdiv(d * d, block), H, G.size(0))](
                dg_partial, dG, per_output, D=d, BLOCK=block)
    if kv_group > 1:
        for grad, heads in ((dk, dk_heads), (dv, dv_heads)):
            grad.copy_(heads.view(B, Sk, H_kv, kv_group, d).sum(3))
    return dq, dk, dv, dG
