// Torch-free building blocks of the metric-learner backward on the CPU
// (metric_tensors_backward_cpu.cpp; docs/design.md §3.4). They work on the transposed row blocks
// of the forward (metric_row_blocks.h): Xt[j][m] = X[row0 + m][j], features j down, the rows m of
// a block across the lanes, here always kBwdBlockRows = 64 rows (4 vectors) per block.
#pragma once

#include <cmath>
#include <cstdint>

#include "cpu/attention_tile.h"
#include "cpu/metric_row_blocks.h"

namespace pldr::cpu {
inline namespace PLDR_ISA_NAMESPACE {  // one copy per ISA (cpu/isa.h)

// Rows per block of the backward. Fixed, not chosen from the thread count: the per-block partial
// sums of the LayerNorm weight gradients must be the same whatever the number of threads. B·H·d
// is a multiple of it (d is 64 or 128), so a block holds rows of one head only.
constexpr int64_t kBwdBlockRows = 64;
constexpr int kBwdVecs = static_cast<int>(kBwdBlockRows / kLanes);
// Register tiles over a block's columns take kTileVecs of its kBwdVecs vectors at a time.
static_assert(kBwdVecs % kTileVecs == 0, "a block is a whole number of register tiles wide");

// acc[r][v] += Σ_k A[r·a_rs + k·a_ks] · B[k·ldb + 16v], k < K (tile_product without the zeroing).
template <int R, int NV>
PLDR_SIMD_INLINE void tile_accumulate(int64_t K, const float* A, int64_t a_rs, int64_t a_ks,
                                      const float* B, int64_t ldb, f32x16 (&acc)[R][NV]) {
  for (int64_t k = 0; k < K; ++k) {
    f32x16 bv[NV];
    PLDR_UNROLL
    for (int v = 0; v < NV; ++v) bv[v] = simd::load(B + k * ldb + v * kLanes);
    PLDR_UNROLL
    for (int r = 0; r < R; ++r) {
      const f32x16 ar = simd::splat(A[r * a_rs + k * a_ks]);
      PLDR_UNROLL
      for (int v = 0; v < NV; ++v) acc[r][v] = simd::fma(ar, bv[v], acc[r][v]);
    }
  }
}

// LayerNorm backward on a block, the forward's layer_norm_columns reversed: T [d][64] is the
// LayerNorm's input, gY [d][64] the gradient of its output; writes the input's gradient gT and the
// block's sums Σ_m gY·x̂ and Σ_m gY (the weight and bias gradients of these rows) into gw, gb [d].
// mean and rstd are computed by the forward's sequence of operations, so x̂ is the forward's.
inline void layer_norm_backward_columns(const float* T, const float* gY, float* gT, int64_t d,
                                        const float* w, float eps, float* gw, float* gb) {
  constexpr int64_t ld = kBwdBlockRows;
  const f32x16 inv_d = simd::splat(1.0f / static_cast<float>(d));
  f32x16 mean[kBwdVecs], rstd[kBwdVecs], sum_g[kBwdVecs], sum_gx[kBwdVecs];
  PLDR_UNROLL
  for (int v = 0; v < kBwdVecs; ++v) {
    const float* x = T + v * kLanes;
    f32x16 sum = simd::zero();
    for (int64_t j = 0; j < d; ++j) sum = simd::add(sum, simd::load(x + j * ld));
    mean[v] = simd::mul(sum, inv_d);
    f32x16 sq = simd::zero();
    for (int64_t j = 0; j < d; ++j) {
      const f32x16 c = simd::sub(simd::load(x + j * ld), mean[v]);
      sq = simd::fma(c, c, sq);
    }
    rstd[v] = simd::div(simd::splat(1.0f),
                        simd::sqrt(simd::add(simd::mul(sq, inv_d), simd::splat(eps))));
    sum_g[v] = sum_gx[v] = simd::zero();
  }
  for (int64_t j = 0; j < d; ++j) {
    const f32x16 wj = simd::splat(w[j]);
    f32x16 w_part = simd::zero(), b_part = simd::zero();
    PLDR_UNROLL
    for (int v = 0; v < kBwdVecs; ++v) {
      const f32x16 x_hat = simd::mul(simd::sub(simd::load(T + j * ld + v * kLanes), mean[v]),
                                     rstd[v]);
      const f32x16 g = simd::load(gY + j * ld + v * kLanes);
      const f32x16 g_hat = simd::mul(g, wj);
      sum_g[v] = simd::add(sum_g[v], g_hat);
      sum_gx[v] = simd::fma(g_hat, x_hat, sum_gx[v]);
      w_part = simd::fma(g, x_hat, w_part);
      b_part = simd::add(b_part, g);
    }
    gw[j] = simd::reduce_add(w_part);
    gb[j] = simd::reduce_add(b_part);
  }
  PLDR_UNROLL
  for (int v = 0; v < kBwdVecs; ++v) {
    sum_g[v] = simd::mul(sum_g[v], inv_d);
    sum_gx[v] = simd::mul(sum_gx[v], inv_d);
  }
  for (int64_t j = 0; j < d; ++j) {
    const f32x16 wj = simd::splat(w[j]);
    PLDR_UNROLL
    for (int v = 0; v < kBwdVecs; ++v) {
      const f32x16 x_hat = simd::mul(simd::sub(simd::load(T + j * ld + v * kLanes), mean[v]),
                                     rstd[v]);
      const f32x16 g_hat = simd::mul(simd::load(gY + j * ld + v * kLanes), wj);
      // gT = rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂))
      const f32x16 inner = simd::sub(simd::sub(g_hat, sum_g[v]), simd::mul(x_hat, sum_gx[v]));
      simd::store(gT + j * ld + v * kLanes, simd::mul(rstd[v], inner));
    }
  }
}

// One SwiGLU's backward on a block. gY [d][64] is the gradient of its output
// Y = W3·(silu(H1) ⊙ H2) + b3, where H1 = W1·X + b1 and H2 = W2·X + b2 [F][64] are its hidden
// pre-activations from its input X [d][64], as the forward's swiglu_block computed them (it
// stores them when asked). Writes U = silu(H1) ⊙ H2 and the gradients of the pre-activations,
// gH1, gH2 [F][64] (the weight gradients are products of these with X and gY over all rows),
// and the input's gradient gX = W1ᵀ·gH1 + W2ᵀ·gH2 [d][64].
inline void swiglu_backward_block(const float* gY, int64_t d, int64_t F, const float* w1,
                                  const float* w2, const float* w3, const float* H1,
                                  const float* H2, float* U, float* gH1, float* gH2, float* gX) {
  constexpr int64_t ld = kBwdBlockRows;
  constexpr int NV = kTileVecs;
  // gU = W3ᵀ·gY (w3 [d][F]: column f of W3 is w3[j·F + f]), and from it the gate's gradients:
  // with s = silu(h1) = h1·σ(h1), gH2 = gU·s, gH1 = gU·h2·σ·(1 + h1·(1 − σ)).
  const f32x16 one = simd::splat(1.0f);
  for_row_tiles<kTileRows>(static_cast<int>(F), [&](int f0, auto rows) {
    constexpr int R = decltype(rows)::value;
    for (int c0 = 0; c0 < kBwdVecs * kLanes; c0 += NV * kLanes) {  // column chunks
      f32x16 acc[R][NV];
      tile_product<R, NV>(d, w3 + f0, 1, F, gY + c0, ld, acc);
      PLDR_UNROLL
      for (int r = 0; r < R; ++r)
        PLDR_UNROLL
        for (int v = 0; v < NV; ++v) {
          const int64_t off = (f0 + r) * ld + c0 + v * kLanes;
          const f32x16 h1 = simd::load(H1 + off), h2 = simd::load(H2 + off);
          const f32x16 den = simd::add(one, simd::exp(simd::sub(simd::zero(), h1)));
          const f32x16 sig = simd::div(one, den);
          const f32x16 s = simd::mul(h1, sig);
          simd::store(U + off, simd::mul(s, h2));
          simd::store(gH2 + off, simd::mul(acc[r][v], s));
          const f32x16 dsilu = simd::mul(sig, simd::fma(h1, simd::sub(one, sig), one));
          simd::store(gH1 + off, simd::mul(simd::mul(acc[r][v], h2), dsilu));
        }
    }
  });
  // gX = W1ᵀ·gH1 + W2ᵀ·gH2 (w1, w2 [F][d]: column k of W1 is w1[f·d + k]).
  for_row_tiles<kTileRows>(static_cast<int>(d), [&](int k0, auto rows) {
    constexpr int R = decltype(rows)::value;
    for (int c0 = 0; c0 < kBwdVecs * kLanes; c0 += NV * kLanes) {  // column chunks
      f32x16 acc[R][NV];
      tile_product<R, NV>(F, w1 + k0, 1, d, gH1 + c0, ld, acc);
      tile_accumulate<R, NV>(F, w2 + k0, 1, d, gH2 + c0, ld, acc);
      PLDR_UNROLL
      for (int r = 0; r < R; ++r)
        PLDR_UNROLL
        for (int v = 0; v < NV; ++v)
          simd::store(gX + (k0 + r) * ld + c0 + v * kLanes, acc[r][v]);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Weight gradients: sums over every row of the problem, so over all blocks. Block b of P is at
// P + b·p_bs, [M][64] (the transposed layout); block b of Q at Q + b·q_bs, [64][N] (row layout,
// N a multiple of 64). Each output element is summed by one register tile over the blocks in
// order, so the result does not depend on how tiles are spread over threads.
// ---------------------------------------------------------------------------------------------

// Rows [i_begin, i_end) of C = Σ_b P_b·Q_b into C [i_end − i_begin][N] (row-major), added to
// what C holds when accumulate (the blocks of an earlier group; the same operations as one pass
// over all blocks): the blocks outside, so each Q_b is read from memory once and then from L1 by
// every row tile; each element accumulates over the blocks in order.
inline void block_sum_products(int64_t i_begin, int64_t i_end, int64_t N, int64_t nblocks,
                               const float* P, int64_t p_bs, const float* Q, int64_t q_bs,
                               float* C, bool accumulate) {
  constexpr int64_t ld = kBwdBlockRows;
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const float* Pb = P + blk * p_bs;
    const float* Qb = Q + blk * q_bs;
    const float* P_next = blk + 1 < nblocks ? Pb + p_bs : nullptr;
    const bool from_zero = blk == 0 && !accumulate;
    for_row_tiles<kTileRows>(static_cast<int>(i_end - i_begin), [&](int i0, auto rows) {
      constexpr int R = decltype(rows)::value;
      // A tile's rows of P are R short streams (4 cache lines each) in a block of its own, too
      // short for the hardware prefetcher: fetch the next block's while this one is summed.
      if (P_next != nullptr)
        PLDR_UNROLL
        for (int r = 0; r < R; ++r)
          for (int64_t m = 0; m < ld; m += kLanes)
            __builtin_prefetch(P_next + (i_begin + i0 + r) * ld + m, 0, 3);
      for (int64_t n0 = 0; n0 < N; n0 += kTileVecs * kLanes) {
        float* Ct = C + i0 * N + n0;
        f32x16 acc[R][kTileVecs];
        PLDR_UNROLL
        for (int r = 0; r < R; ++r)
          PLDR_UNROLL
          for (int v = 0; v < kTileVecs; ++v)
            acc[r][v] = from_zero ? simd::zero() : simd::load(Ct + r * N + v * kLanes);
        tile_accumulate<R, kTileVecs>(ld, Pb + (i_begin + i0) * ld, ld, 1, Qb + n0, N, acc);
        PLDR_UNROLL
        for (int r = 0; r < R; ++r)
          PLDR_UNROLL
          for (int v = 0; v < kTileVecs; ++v) simd::store(Ct + r * N + v * kLanes, acc[r][v]);
      }
    });
  }
}

// dst[c][r] = src[r][c] for r < rows, c < cols (both multiples of 16): between the transposed
// block layout and the row layout.
inline void transpose_tile(const float* src, int64_t rows, int64_t cols, int64_t ld_src,
                           float* dst, int64_t ld_dst) {
#ifdef PLDR_SIMD_AVX512
  for (int64_t r0 = 0; r0 < rows; r0 += kLanes)
    for (int64_t c0 = 0; c0 < cols; c0 += kLanes) {
      f32x16 v[kLanes];
      PLDR_UNROLL
      for (int i = 0; i < kLanes; ++i) v[i] = simd::load(src + (r0 + i) * ld_src + c0);
      transpose16x16(v);
      PLDR_UNROLL
      for (int i = 0; i < kLanes; ++i) simd::store(dst + (c0 + i) * ld_dst + r0, v[i]);
    }
#elif defined(PLDR_SIMD_AVX2)
  for (int64_t r0 = 0; r0 < rows; r0 += 8)
    for (int64_t c0 = 0; c0 < cols; c0 += 8) {
      __m256 v[8];
      PLDR_UNROLL
      for (int i = 0; i < 8; ++i) v[i] = _mm256_loadu_ps(src + (r0 + i) * ld_src + c0);
      transpose8x8(v);
      PLDR_UNROLL
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + (c0 + i) * ld_dst + r0, v[i]);
    }
#else
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
#endif
}

// Xrow [64][d] = the block Xt [d][64] in row layout (for block_sum_products).
inline void block_to_rows(const float* Xt, int64_t d, float* Xrow) {
  transpose_tile(Xt, d, kBwdBlockRows, kBwdBlockRows, Xrow, d);
}

// The bias gradients: lanes[i][0..15] (+)= the sum over blocks of P_b[i][m] for m ≡ lane
// (mod 16), for i in [i_begin, i_end), added to what lanes holds when accumulate; reduce_lanes
// turns them into the sums once every block is in, so the result does not depend on how the
// blocks were grouped.
inline void block_sum_rows(int64_t i_begin, int64_t i_end, int64_t nblocks, const float* P,
                           int64_t p_bs, float* lanes, bool accumulate) {
  constexpr int64_t ld = kBwdBlockRows;
  for (int64_t i = i_begin; i < i_end; ++i) {
    f32x16 acc = accumulate ? simd::load(lanes + i * kLanes) : simd::zero();
    for (int64_t blk = 0; blk < nblocks; ++blk)
      PLDR_UNROLL
      for (int v = 0; v < kBwdVecs; ++v)
        acc = simd::add(acc, simd::load(P + blk * p_bs + i * ld + v * kLanes));
    simd::store(lanes + i * kLanes, acc);
  }
}

// out[i] = the sum of lanes[i][0..15], i < n.
inline void reduce_lanes(const float* lanes, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = simd::reduce_add(simd::load(lanes + i * kLanes));
}

// ---------------------------------------------------------------------------------------------
// Steps 9-12 reversed, per (b, h), in fp64 (as the forward sums W·A and a·A_P in fp64, so here:
// the gradients pass the power stage, where the exponents amplify every rounding; 4·d³ fp64
// multiply-adds per head, little next to the residual network).
// ---------------------------------------------------------------------------------------------

// out[i][n] += Σ_k L[i·l_rs + k·l_ks] · Rd[k·d + n], everything fp64 [d][d]; d a multiple of 32.
inline void product_f64_accumulate(const double* L, int64_t l_rs, int64_t l_ks, const double* Rd,
                                   int64_t d, double* out) {
  constexpr int kRows = 4, kVecs = kF64TileVecs;
  for (int64_t i0 = 0; i0 < d; i0 += kRows) {
    for (int64_t n0 = 0; n0 < d; n0 += kVecs * kF64Lanes) {
      f64vec acc[kRows][kVecs];
      PLDR_UNROLL
      for (int r = 0; r < kRows; ++r)
        PLDR_UNROLL
        for (int v = 0; v < kVecs; ++v)
          __builtin_memcpy(&acc[r][v], out + (i0 + r) * d + n0 + v * kF64Lanes, sizeof(f64vec));
      for (int64_t k = 0; k < d; ++k) {
        f64vec rv[kVecs];
        PLDR_UNROLL
        for (int v = 0; v < kVecs; ++v)
          __builtin_memcpy(&rv[v], Rd + k * d + n0 + v * kF64Lanes, sizeof(f64vec));
        PLDR_UNROLL
        for (int r = 0; r < kRows; ++r) {
          const double l = L[(i0 + r) * l_rs + k * l_ks];
          PLDR_UNROLL
          for (int v = 0; v < kVecs; ++v) acc[r][v] += l * rv[v];
        }
      }
      PLDR_UNROLL
      for (int r = 0; r < kRows; ++r)
        PLDR_UNROLL
        for (int v = 0; v < kVecs; ++v)
          __builtin_memcpy(out + (i0 + r) * d + n0 + v * kF64Lanes, &acc[r][v], sizeof(f64vec));
    }
  }
}

// Scratch of power_stage_backward: four fp32 and four fp64 [d][d] arrays.
struct PowerStageScratch {
  float *Z, *A_LM, *A_P, *dA_LM;
  double *Ad, *At, *Pd, *Gd;
};

// Gradients of one (b, h) through steps 9-12. A [d][d] is the forward's metric tensor, W, bW,
// pw, a of head h; gA, gA_LM, gG the given output gradients (nullptr = zero). Adds the weight
// gradients to acc_W, acc_b, acc_pw, acc_a, acc_ba (fp64 [d][d], summed over the batch by the
// caller in batch order) and writes the gradient that reaches A, gA + Wᵀ·gZ, to gA_total.
inline void power_stage_backward(const float* A, int64_t d, const float* W, const float* bW,
                                 const float* pw, const float* a, float eps_adj, const float* gA,
                                 const float* gA_LM, const float* gG, PowerStageScratch& sc,
                                 double* acc_W, double* acc_b, double* acc_pw, double* acc_a,
                                 double* acc_ba, float* gA_total) {
  const int64_t n = d * d;
  // The forward's A_LM and A_P, bit for bit (metric_head_outputs).
  for (int64_t i = 0; i < n; ++i) sc.Ad[i] = A[i];
  product_f64(W, sc.Ad, bW, d, sc.Z);
  const f32x16 eps = simd::splat(eps_adj), one = simd::splat(1.0f);
  for (int64_t i = 0; i < n; i += kLanes) {
    const f32x16 z = simd::load(sc.Z + i);
    const f32x16 den = simd::add(one, simd::exp(simd::sub(simd::zero(), z)));
    const f32x16 silu = simd::div(z, den);  // simd::silu's operations
    simd::store(sc.A_LM + i, simd::add(simd::mul(z, silu), eps));
    // d A_LM / dz = silu(z) + z·σ(z)·(1 + z·(1 − σ(z)))
    const f32x16 sig = simd::div(one, den);
    const f32x16 dsilu = simd::mul(sig, simd::fma(z, simd::sub(one, sig), one));
    simd::store(sc.dA_LM + i, simd::fma(z, dsilu, silu));
  }
  for (int64_t i = 0; i < n; ++i) sc.A_P[i] = std::pow(sc.A_LM[i], pw[i]);
  // sc.Gd: the gradient of A_P, aᵀ·gG; then that of A_LM; then that of Z.
  for (int64_t i = 0; i < n; ++i) sc.Gd[i] = 0.0;
  if (gG != nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      acc_ba[i] += gG[i];
      sc.Pd[i] = gG[i];
    }
    for (int64_t i = 0; i < d; ++i)  // At = A_Pᵀ
      for (int64_t k = 0; k < d; ++k) sc.At[k * d + i] = sc.A_P[i * d + k];
    product_f64_accumulate(sc.Pd, d, 1, sc.At, d, acc_a);  // += gG·A_Pᵀ
    for (int64_t i = 0; i < n; ++i) sc.At[i] = a[i];
    product_f64_accumulate(sc.At, 1, d, sc.Pd, d, sc.Gd);  // aᵀ·gG
  }
  for (int64_t i = 0; i < n; ++i) {
    double g = gA_LM != nullptr ? static_cast<double>(gA_LM[i]) : 0.0;
    if (gG != nullptr) {
      // d A_P / d A_LM = pw·A_LM^(pw − 1) = pw·A_P / A_LM; d A_P / d pw = A_P·ln A_LM.
      const double a_p = sc.A_P[i], g_ap = sc.Gd[i];
      g += g_ap * static_cast<double>(pw[i]) * (a_p / static_cast<double>(sc.A_LM[i]));
      acc_pw[i] += g_ap * a_p * static_cast<double>(std::log(sc.A_LM[i]));
    }
    const double g_z = g * static_cast<double>(sc.dA_LM[i]);
    sc.Gd[i] = g_z;
    acc_b[i] += g_z;
  }
  for (int64_t i = 0; i < d; ++i)  // At = Aᵀ
    for (int64_t k = 0; k < d; ++k) sc.At[k * d + i] = sc.Ad[i * d + k];
  product_f64_accumulate(sc.Gd, d, 1, sc.At, d, acc_W);  // += gZ·Aᵀ
  for (int64_t i = 0; i < n; ++i) {
    sc.At[i] = W[i];
    sc.Pd[i] = gA != nullptr ? static_cast<double>(gA[i]) : 0.0;
  }
  product_f64_accumulate(sc.At, 1, d, sc.Gd, d, sc.Pd);  // gA + Wᵀ·gZ
  for (int64_t i = 0; i < n; ++i) gA_total[i] = static_cast<float>(sc.Pd[i]);
}

}  // namespace PLDR_ISA_NAMESPACE
}  // namespace pldr::cpu
