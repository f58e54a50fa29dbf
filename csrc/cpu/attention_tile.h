// Tile math of the CPU attention kernels (through cpu/attention_core.h):
// dtype conversion of rows, the online-softmax update of one score tile, and the small-query
// ("row") products used when a query tile has too few rows for a GEMM to pay off.
//
// Scores are kept in log2 units: the query is pre-multiplied by scale·log2(e), so softmax weights are
// exp2(s − m). All arithmetic is fp32. Vector code goes through the shared 16-lane layer
// (simd_f32x16.h); only the transposes are ISA specific.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu/simd_f32x16.h"

namespace pldr::cpu {
inline namespace PLDR_ISA_NAMESPACE {  // one copy per ISA (cpu/isa.h)

using simd::f32x16;
using simd::kLanes;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ------------------------------------------------------------------------------------------------
// Conversions of a row of n elements between the activation dtype and fp32.
// ------------------------------------------------------------------------------------------------
template <typename T>
inline void load_row_as_float(const T* src, float* dst, int64_t n) {
  const int64_t vector_end = n - n % kLanes;
  for (int64_t i = 0; i < vector_end; i += kLanes) simd::store(dst + i, simd::load_as_f32(src + i));
  for (int64_t i = vector_end; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void scale_in_place(float* x, int64_t n, float factor) {
  const f32x16 f = simd::splat(factor);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) simd::store(x + i, simd::mul(simd::load(x + i), f));
  if (i < n) simd::store_partial(x + i, simd::mul(simd::load_partial(x + i, n - i), f), n - i);
}

template <typename T>
inline void store_row_from_float(const float* src, T* dst, int64_t n, float factor) {
  if constexpr (std::is_same_v<T, float>) {
    const f32x16 f = simd::splat(factor);
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) simd::store(dst + i, simd::mul(simd::load(src + i), f));
    for (; i < n; ++i) dst[i] = src[i] * factor;
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i] * factor);  // round to nearest even
  }
}

// ------------------------------------------------------------------------------------------------
// Softmax passes over one score row.
// ------------------------------------------------------------------------------------------------
inline float row_max(const float* x, int64_t n) {
  f32x16 m = simd::splat(kNegInf);
  for (int64_t i = 0; i < n; i += kLanes) m = simd::max(m, simd::load_partial(x + i, n - i, kNegInf));
  return simd::reduce_max(m);
}

// x[i] = 2^(x[i] − shift) in place; returns the sum (fixed summation order: 16 lanes, then a tree).
inline float exp2_shifted_in_place(float* x, int64_t n, float shift) {
  const f32x16 s = simd::splat(shift);
  f32x16 acc = simd::zero();
  for (int64_t i = 0; i < n; i += kLanes) {
    // Lanes past n load −inf, whose 2^(−inf − shift) is exactly 0: the sum is unchanged.
    const f32x16 e = simd::exp2(simd::sub(simd::load_partial(x + i, n - i, kNegInf), s));
    simd::store_partial(x + i, e, n - i);
    acc = simd::add(acc, e);
  }
  return simd::reduce_add(acc);
}

// ------------------------------------------------------------------------------------------------
// In-register transposes: 16x16 on AVX-512, 8x8 on AVX2 (their users have a scalar loop otherwise).
// ------------------------------------------------------------------------------------------------
#ifdef PLDR_SIMD_AVX512
PLDR_SIMD_BEGIN_INTRINSICS
// In-register transpose of a 16x16 fp32 block (r[i] = row i in, column i out).
[[gnu::always_inline]] inline void transpose16x16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0x88);
    t[4 + i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0xdd);
    t[8 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xdd);
    r[4 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0x88);
    r[12 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0xdd);
  }
}
PLDR_SIMD_END_INTRINSICS
#elif defined(PLDR_SIMD_AVX2)
PLDR_SIMD_BEGIN_INTRINSICS
// In-register transpose of an 8x8 fp32 block (r[i] = row i in, column i out).
[[gnu::always_inline]] inline void transpose8x8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {  // t[2i] = a0 b0 a1 b1 | a4 b4 a5 b5, t[2i+1] = a2 b2 a3 b3 | ...
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {  // u[4i + c] = column c (and c + 4) of rows 4i .. 4i+3
    u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
    r[4 + c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
  }
}
// 8 consecutive fp32 / bf16 / fp16 elements as fp32 (exact).
template <typename T>
[[gnu::always_inline]] inline __m256 load8_as_f32(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(p);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
}
PLDR_SIMD_END_INTRINSICS
#endif

// ------------------------------------------------------------------------------------------------
// Kᵀ of n key rows as fp32 [D, ld_out] (column j = key row j), for the score GEMM q̃·Kᵀ.
// Columns n .. round_up(n, 16) are filled with zeros (never read as scores).
// ------------------------------------------------------------------------------------------------
template <typename T, int D, typename RowFn>
inline void pack_transposed(const RowFn& row, int64_t n, float* out, int64_t ld_out) {
#ifdef PLDR_SIMD_AVX512
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t rows = std::min<int64_t>(16, n - j0);
    for (int c0 = 0; c0 < D; c0 += 16) {
      f32x16 r[16];
      for (int64_t i = 0; i < 16; ++i) {
        r[i] = i < rows ? simd::load_as_f32(row(j0 + i) + c0) : simd::zero();
      }
      transpose16x16(r);
      for (int i = 0; i < 16; ++i) simd::store(out + (c0 + i) * ld_out + j0, r[i]);
    }
  }
#elif defined(PLDR_SIMD_AVX2)
  const int64_t padded = (n + 15) / 16 * 16;
  for (int64_t j0 = 0; j0 < padded; j0 += 8) {
    const int64_t rows = std::clamp<int64_t>(n - j0, 0, 8);
    for (int c0 = 0; c0 < D; c0 += 8) {
      __m256 r[8];
      for (int64_t i = 0; i < 8; ++i) {
        r[i] = i < rows ? load8_as_f32(row(j0 + i) + c0) : _mm256_setzero_ps();
      }
      transpose8x8(r);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(out + (c0 + i) * ld_out + j0, r[i]);
    }
  }
#else
  for (int64_t j = 0; j < n; ++j) {
    const T* src = row(j);
    for (int c = 0; c < D; ++c) out[c * ld_out + j] = static_cast<float>(src[c]);
  }
#endif
}

// ------------------------------------------------------------------------------------------------
// Online softmax over one score tile.
// ------------------------------------------------------------------------------------------------
// Whether any of the n scores is NaN (the rare branch of online_softmax_update only).
inline bool any_nan(const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(x[i])) return true;
  }
  return false;
}

// acc + x·0 over the D elements of a row, lane by lane: NaN in a lane once the row has a NaN or
// an Inf there, else acc unchanged. (One reduction for many rows: see hidden_v_not_finite.)
template <int D, typename T>
inline f32x16 accumulate_nonfinite(const T* row, f32x16 acc) {
  PLDR_UNROLL
  for (int c = 0; c < D / kLanes; ++c) acc = simd::fma(simd::load_as_f32(row + c * kLanes), simd::zero(), acc);
  return acc;
}

// scores: [M, n] (row stride ld), log2 units, −inf where a key is not visible. Turns it into the
// weights P = 2^(s − m_new), updates the running max m and sum l of each row and rescales the
// running output rows out[r, 0:D] by 2^(m_old − m_new). A row that has seen no visible key yet
// keeps m = −inf, l = 0, out = 0 and gets P = 0.
//
// NaN (docs/design.md §3.5): the vector max keeps or drops a NaN lane by position, so m_new may
// ignore a NaN score; its weight 2^(NaN − m_new) is NaN all the same and makes l and the row's
// output NaN. The one place a NaN could be lost is the shortcut for rows with nothing visible in
// the tile, which therefore checks for one; a +inf score gives m = +inf and 2^(inf − inf) = NaN.
template <int D>
inline void online_softmax_update(float* scores, int64_t ld, int64_t M, int64_t n, float* m,
                                  float* l, float* out) {
  for (int64_t r = 0; r < M; ++r) {
    float* s = scores + r * ld;
    float m_new = std::max(m[r], row_max(s, n));
    if (m_new == kNegInf) {
      if (!any_nan(s, n)) {
        std::fill(s, s + n, 0.0f);
        continue;
      }
      m_new = std::numeric_limits<float>::quiet_NaN();
    }
    const float row_sum = exp2_shifted_in_place(s, n, m_new);
    if (m_new != m[r]) {
      const float alpha = std::exp2(m[r] - m_new);  // 0 when m_old = −inf
      l[r] *= alpha;
      scale_in_place(out + r * D, D, alpha);
      m[r] = m_new;
    }
    l[r] += row_sum;
  }
}

// The factor that normalises a finished row's output, 1/l, or 0 for a row that saw no key
// (l = 0); a NaN l (a NaN among the row's scores) stays NaN.
inline float inverse_sum(float l) { return l == 0.0f ? 0.0f : 1.0f / l; }

// ------------------------------------------------------------------------------------------------
// Row products for tiles with few query rows (decode): no transposed copy of K is needed. Key and
// value rows are read in their own dtype and widened in registers (exact), so a bf16/fp16 row
// costs no extra pass through memory. Each output gets the same fused multiply-adds in the same
// order whatever the dtype or M, so results are bitwise those of one scalar-row product per key.
// ------------------------------------------------------------------------------------------------
// scores[r · ld] = q̃[r, 0:D] · k[0:D] for the M rows of q̃ (row stride D); k is read once.
template <int D, typename T>
inline void dot_query_rows(const float* q_tilde, int64_t M, const T* k, float* scores, int64_t ld) {
  constexpr int kChunks = D / kLanes;
  f32x16 key[kChunks];
  PLDR_UNROLL
  for (int c = 0; c < kChunks; ++c) key[c] = simd::load_as_f32(k + c * kLanes);
  for (int64_t r = 0; r < M; ++r) {
    const float* a = q_tilde + r * D;
    f32x16 acc = simd::mul(simd::load(a), key[0]);
    PLDR_UNROLL
    for (int c = 1; c < kChunks; ++c) acc = simd::fma(simd::load(a + c * kLanes), key[c], acc);
    scores[r * ld] = simd::reduce_add(acc);
  }
}

// out[0:D] += Σ_j p[j] · v_row(j)[0:D] for j = 0 .. n−1, in key order, with the output row held
// in registers across the keys (not stored and reloaded per key). on_key(j) runs once per key
// (the caller's prefetches).
template <int D, typename T, typename RowFn, typename KeyFn>
inline void accumulate_weighted_rows(const float* p, int64_t n, const RowFn& v_row, float* out,
                                     const KeyFn& on_key) {
  constexpr int kChunks = D / kLanes;
  f32x16 acc[kChunks];
  PLDR_UNROLL
  for (int c = 0; c < kChunks; ++c) acc[c] = simd::load(out + c * kLanes);
  for (int64_t j = 0; j < n; ++j) {
    on_key(j);
    const f32x16 pv = simd::splat(p[j]);
    const T* v = v_row(j);
    PLDR_UNROLL
    for (int c = 0; c < kChunks; ++c) acc[c] = simd::fma(pv, simd::load_as_f32(v + c * kLanes), acc[c]);
  }
  PLDR_UNROLL
  for (int c = 0; c < kChunks; ++c) simd::store(out + c * kLanes, acc[c]);
}

// out[0:D] += p · v[0:D]
template <int D>
inline void axpy(float p, const float* v, float* out) {
  const f32x16 pv = simd::splat(p);
  for (int i = 0; i < D; i += kLanes) {
    simd::store(out + i, simd::fma(pv, simd::load(v + i), simd::load(out + i)));
  }
}

}  // namespace PLDR_ISA_NAMESPACE
}  // namespace pldr::cpu
