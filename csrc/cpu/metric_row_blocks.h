// Torch-free building blocks of the fused metric-learner CPU kernel (metric_tensors_cpu.cpp):
// register-tiled products, LayerNorm and SwiGLU on a transposed row block, and the per-head
// output stage. Plain pointers, no torch: metric_tensors_cpu.cpp does the tensor plumbing.
//
// A row block is held transposed, Xt[j][m] = A[m0 + m][j] (features j down, rows m across the
// 16 lanes), so that a product X·Wᵀ is W·Xt with W's entries broadcast as
// stored and Xt's rows loaded as vectors, and LayerNorm over j is a sum of vectors.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cpu/simd_f32x16.h"

namespace pldr::cpu {
inline namespace PLDR_ISA_NAMESPACE {  // one copy per ISA (cpu/isa.h)

using simd::f32x16;
using simd::kLanes;

// QᵀQ sums over S in chunks: each chunk accumulates in registers from zero, then is added to the
// running total, which keeps the fp32 rounding error of long sequences small (blocked summation).
constexpr int kQtqChunk = 256;

// Calls fn(row0, std::integral_constant<int, R>) for row tiles of kMaxRows rows covering
// [0, rows), the last tile narrower when rows is not a multiple of kMaxRows.
template <int R, class Fn>
inline void call_with_tail(int rem, int row0, Fn& fn) {
  if constexpr (R >= 1) {
    if (rem == R) {
      fn(row0, std::integral_constant<int, R>{});
    } else {
      call_with_tail<R - 1>(rem, row0, fn);
    }
  }
}
template <int kMaxRows, class Fn>
inline void for_row_tiles(int rows, Fn&& fn) {
  int row0 = 0;
  for (; row0 + kMaxRows <= rows; row0 += kMaxRows)
    fn(row0, std::integral_constant<int, kMaxRows>{});
  if (row0 < rows) call_with_tail<kMaxRows - 1>(rows - row0, row0, fn);
}

// acc[r][v] = Σ_k A[r·a_rs + k·a_ks] · B[k·ldb + 16v .. +16], k < K: R rows of a broadcast operand
// times NV vectors of a row-major operand.
template <int R, int NV>
PLDR_SIMD_INLINE void tile_product(int64_t K, const float* A, int64_t a_rs, int64_t a_ks,
                                   const float* B, int64_t ldb, f32x16 (&acc)[R][NV]) {
  PLDR_UNROLL
  for (int r = 0; r < R; ++r)
    PLDR_UNROLL
    for (int v = 0; v < NV; ++v) acc[r][v] = simd::zero();
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

// Register tiles: kTileRows rows of a broadcast operand times kTileVecs vectors; kGluTileRows
// rows when two products share the tile (W1 and W2 of a SwiGLU). AVX-512: 4 vectors (64
// columns), 24 accumulators of its 32 registers. Elsewhere one vector, 12 ymm accumulators of
// AVX2's 16 (an f32x16 is two ymm; four xmm on SSE), 8 in a SwiGLU tile: wider tiles spill to
// the stack. The tiling decides only which elements are computed together, never an element's
// arithmetic.
#ifdef PLDR_SIMD_AVX512
constexpr int kTileVecs = 4;
constexpr int kGluTileRows = 3;
#else
constexpr int kTileVecs = 1;
constexpr int kGluTileRows = 2;
#endif
constexpr int kTileRows = 6;

// Calls fn(v0, std::integral_constant<int, NV>) over column chunks of kTileVecs vectors covering
// [0, nvec), the last chunk narrower when nvec is not a multiple of kTileVecs.
template <class Fn>
inline void for_col_chunks(int nvec, Fn&& fn) {
  int v0 = 0;
  for (; v0 + kTileVecs <= nvec; v0 += kTileVecs) fn(v0, std::integral_constant<int, kTileVecs>{});
  switch (nvec - v0) {
    case 3: fn(v0, std::integral_constant<int, 3>{}); break;
    case 2: fn(v0, std::integral_constant<int, 2>{}); break;
    case 1: fn(v0, std::integral_constant<int, 1>{}); break;
    default: break;
  }
}

// ---------------------------------------------------------------------------------------------
// Phase 1 building blocks, on a transposed block Xt [features][ld] of nvec·16 rows of A
// (ld = nvec·16). Rows of several heads may share a block: the MLP weights are shared by heads.
// Every element's arithmetic is independent of the tiling, so results do not depend on how
// rows are grouped into blocks or threads.
// ---------------------------------------------------------------------------------------------

// Xt[j][m] = Σ_s Qs[s][j] · Qs[s][i0 + m] for m < nvec·16: rows i0… of QᵀQ (= columns, by
// symmetry) from the S fp32 rows of Qs [S][d], q_rs floats apart (d when gathered; a
// contiguous fp32 q without a mask is read in place, rows H·d apart).
inline void qtq_columns(const float* Qs, int64_t q_rs, int64_t S, int64_t d, int64_t i0, int nvec,
                        float* Xt, int64_t ld) {
  for (int64_t j = 0; j < d; ++j)
    for (int m = 0; m < nvec * kLanes; ++m) Xt[j * ld + m] = 0.0f;
  for (int64_t s0 = 0; s0 < S; s0 += kQtqChunk) {
    const int64_t len = std::min<int64_t>(kQtqChunk, S - s0);
    const float* Qc = Qs + s0 * q_rs;
    for_row_tiles<kTileRows>(static_cast<int>(d), [&](int j0, auto rows) {
      constexpr int R = decltype(rows)::value;
      for_col_chunks(nvec, [&](int v0, auto vecs) {
        constexpr int NV = decltype(vecs)::value;
        f32x16 acc[R][NV];
        tile_product<R, NV>(len, Qc + j0, 1, q_rs, Qc + i0 + v0 * kLanes, q_rs, acc);
        PLDR_UNROLL
        for (int r = 0; r < R; ++r)
          PLDR_UNROLL
          for (int v = 0; v < NV; ++v) {
            float* out = Xt + (j0 + r) * ld + (v0 + v) * kLanes;
            simd::store(out, simd::add(simd::load(out), acc[r][v]));
          }
      });
    });
  }
}

// out[j][m] = LN over j of in[j][m] (biased variance, eps inside the root), as F.layer_norm.
inline void layer_norm_columns(const float* in, float* out, int64_t d, int nvec, int64_t ld,
                               const float* w, const float* b, float eps) {
  const f32x16 inv_d = simd::splat(1.0f / static_cast<float>(d));
  for (int v = 0; v < nvec; ++v) {
    const float* x = in + v * kLanes;
    f32x16 sum = simd::zero();
    for (int64_t j = 0; j < d; ++j) sum = simd::add(sum, simd::load(x + j * ld));
    const f32x16 mean = simd::mul(sum, inv_d);
    f32x16 sq = simd::zero();
    for (int64_t j = 0; j < d; ++j) {
      const f32x16 c = simd::sub(simd::load(x + j * ld), mean);
      sq = simd::fma(c, c, sq);
    }
    const f32x16 rstd =
        simd::div(simd::splat(1.0f), simd::sqrt(simd::add(simd::mul(sq, inv_d), simd::splat(eps))));
    float* y = out + v * kLanes;
    for (int64_t j = 0; j < d; ++j) {
      const f32x16 c = simd::mul(simd::sub(simd::load(x + j * ld), mean), rstd);
      simd::store(y + j * ld, simd::add(simd::mul(c, simd::splat(w[j])), simd::splat(b[j])));
    }
  }
}

// One SwiGLU on the block: Ut = silu(W1·Xt + b1) ⊙ (W2·Xt + b2) [F][ld], then
// Yt = W3·Ut + b3 [d][ld]. Weights as stored: w1, w2 [F][d], w3 [d][F]. Row tiles outside,
// column chunks inside, so a tile's weight rows come from memory once per block and then from L1.
// H1t, H2t given: the pre-activations W1·Xt + b1, W2·Xt + b2 [F][ld] stored there too (the
// backward's recompute keeps them for swiglu_backward_block).
inline void swiglu_block(const float* Xt, float* Ut, float* Yt, int64_t d, int64_t F, int nvec,
                         const float* w1, const float* b1, const float* w2, const float* b2,
                         const float* w3, const float* b3, float* H1t = nullptr,
                         float* H2t = nullptr) {
  const int64_t ld = static_cast<int64_t>(nvec) * kLanes;
  for_row_tiles<kGluTileRows>(static_cast<int>(F), [&](int f0, auto rows) {
    constexpr int R = decltype(rows)::value;
    const float* a1 = w1 + f0 * d;
    const float* a2 = w2 + f0 * d;
    for_col_chunks(nvec, [&](int v0, auto vecs) {
      constexpr int NV = decltype(vecs)::value;
      const float* X = Xt + v0 * kLanes;
      f32x16 h1[R][NV], h2[R][NV];
      PLDR_UNROLL
      for (int r = 0; r < R; ++r)
        PLDR_UNROLL
        for (int v = 0; v < NV; ++v) h1[r][v] = h2[r][v] = simd::zero();
      for (int64_t k = 0; k < d; ++k) {
        f32x16 xv[NV];
        PLDR_UNROLL
        for (int v = 0; v < NV; ++v) xv[v] = simd::load(X + k * ld + v * kLanes);
        PLDR_UNROLL
        for (int r = 0; r < R; ++r) {
          const f32x16 c1 = simd::splat(a1[r * d + k]);
          const f32x16 c2 = simd::splat(a2[r * d + k]);
          PLDR_UNROLL
          for (int v = 0; v < NV; ++v) {
            h1[r][v] = simd::fma(c1, xv[v], h1[r][v]);
            h2[r][v] = simd::fma(c2, xv[v], h2[r][v]);
          }
        }
      }
      PLDR_UNROLL
      for (int r = 0; r < R; ++r) {
        const f32x16 bias1 = simd::splat(b1[f0 + r]);
        const f32x16 bias2 = simd::splat(b2[f0 + r]);
        PLDR_UNROLL
        for (int v = 0; v < NV; ++v) {
          const int64_t off = (f0 + r) * ld + (v0 + v) * kLanes;
          const f32x16 pre1 = simd::add(h1[r][v], bias1), pre2 = simd::add(h2[r][v], bias2);
          if (H1t != nullptr) {  // the backward keeps the pre-activations
            simd::store(H1t + off, pre1);
            simd::store(H2t + off, pre2);
          }
          simd::store(Ut + off, simd::mul(simd::silu(pre1), pre2));
        }
      }
    });
  });
  for_row_tiles<kTileRows>(static_cast<int>(d), [&](int j0, auto rows) {
    constexpr int R = decltype(rows)::value;
    for_col_chunks(nvec, [&](int v0, auto vecs) {
      constexpr int NV = decltype(vecs)::value;
      f32x16 acc[R][NV];
      tile_product<R, NV>(F, w3 + j0 * F, F, 1, Ut + v0 * kLanes, ld, acc);
      PLDR_UNROLL
      for (int r = 0; r < R; ++r) {
        const f32x16 bias = simd::splat(b3[j0 + r]);
        PLDR_UNROLL
        for (int v = 0; v < NV; ++v)
          simd::store(Yt + (j0 + r) * ld + (v0 + v) * kLanes, simd::add(acc[r][v], bias));
      }
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Phase 2 (per head): Z = W·A + b, A_LM = Z·silu(Z) + eps_adj, A_P = A_LM^pw, G = a·A_P + ba.
// ---------------------------------------------------------------------------------------------

// The fp64 vector of the products below: one zmm on AVX-512; elsewhere 32 bytes (one ymm on
// AVX2), since GCC keeps a 64-byte vector in memory on a target without 64-byte registers.
// kF64TileVecs of them per row of a register tile (4 rows): 16 accumulators of AVX-512's 32
// registers, 8 of AVX2's 16.
#ifdef PLDR_SIMD_AVX512
typedef double f64vec __attribute__((vector_size(64)));
constexpr int kF64Lanes = 8;
constexpr int kF64TileVecs = 4;
#else
typedef double f64vec __attribute__((vector_size(32)));
constexpr int kF64Lanes = 4;
constexpr int kF64TileVecs = 2;
#endif

// out[i][n] = fp32(Σ_k L[i][k]·Rd[k][n] + bias[i][n]) with the sum in fp64: the product of two
// fp32 values is exact in fp64, so only the final rounding to fp32 remains. This is the one
// place where the kernel goes beyond fp32: Z = W·A + b cancels to nearly 0 in some entries, where
// A_LM ≈ Z²/2 and a negative pw turn the absolute fp32 error of Z into the largest errors of G
// (docs/spec.md §5.1); it costs ~2·d³ multiply-adds per head, nothing next to the MLPs.
// Register tile: 4 rows × kF64TileVecs vectors; d is a multiple of 32.
inline void product_f64(const float* L, const double* Rd, const float* bias, int64_t d,
                        float* out) {
  constexpr int kRows = 4, kVecs = kF64TileVecs;
  for (int64_t i0 = 0; i0 < d; i0 += kRows) {
    for (int64_t n0 = 0; n0 < d; n0 += kVecs * kF64Lanes) {
      f64vec acc[kRows][kVecs] = {};
      for (int64_t k = 0; k < d; ++k) {
        f64vec rv[kVecs];
        PLDR_UNROLL
        for (int v = 0; v < kVecs; ++v)
          __builtin_memcpy(&rv[v], Rd + k * d + n0 + v * kF64Lanes, sizeof(f64vec));
        PLDR_UNROLL
        for (int r = 0; r < kRows; ++r) {
          const double l = L[(i0 + r) * d + k];
          PLDR_UNROLL
          for (int v = 0; v < kVecs; ++v) acc[r][v] += l * rv[v];
        }
      }
      for (int r = 0; r < kRows; ++r)
        for (int v = 0; v < kVecs; ++v)
          for (int e = 0; e < kF64Lanes; ++e) {
            const int64_t off = (i0 + r) * d + n0 + v * kF64Lanes + e;
            out[off] = static_cast<float>(acc[r][v][e] + static_cast<double>(bias[off]));
          }
    }
  }
}

// One (b, h): A [d][d] → A_LM, G. Scratch: A_P [d][d] floats, Md [d][d] doubles.
inline void metric_head_outputs(const float* A, int64_t d, const float* W, const float* bW,
                                const float* pw, const float* a, const float* ba, float eps_adj,
                                float* A_LM, float* A_P, double* Md, float* G) {
  for (int64_t i = 0; i < d * d; ++i) Md[i] = A[i];
  product_f64(W, Md, bW, d, A_LM);  // Z, turned into A_LM in place below
  const f32x16 eps = simd::splat(eps_adj);
  for (int64_t i = 0; i < d * d; i += kLanes) {
    const f32x16 z = simd::load(A_LM + i);
    // docs/spec.md §5.2/5.3: z·silu(z) first, then + eps_adj.
    simd::store(A_LM + i, simd::add(simd::mul(z, simd::silu(z)), eps));
  }
  for (int64_t i = 0; i < d * d; ++i) A_P[i] = std::pow(A_LM[i], pw[i]);
  for (int64_t i = 0; i < d * d; ++i) Md[i] = A_P[i];
  product_f64(a, Md, ba, d, G);
}

}  // namespace PLDR_ISA_NAMESPACE
}  // namespace pldr::cpu
