// Tile math shared by the CPU prefill and decode attention kernels (csrc/cpu/g_attention_cpu.cpp):
// dtype conversion of rows, the online-softmax update of one score tile, and the small-query
// ("row") products used when a query tile has too few rows for a GEMM to pay off.
//
// Scores are kept in log2 units: the query is pre-multiplied by scale·log2(e), so softmax weights are
// exp2(s − m). All arithmetic is fp32. AVX-512 paths are used when the build targets it
// (-march=native on this machine); the scalar paths give the same math for portable builds.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define PLDR_ATTENTION_AVX512 1
// GCC 12's _mm512_reduce_* and masked intrinsics start from _mm512_undefined_ps(), which trips
// -Wmaybe-uninitialized at every inlined use; the value is fully defined.
#if defined(__GNUC__) && !defined(__clang__)
#define PLDR_SILENCE_UNDEFINED_VECTOR_WARNING 1
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#endif

namespace pldr::cpu {

constexpr float kLog2e = 1.4426950408889634f;
constexpr double kLn2 = 0.69314718055994530942;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ------------------------------------------------------------------------------------------------
// Conversions of a row of n elements between the activation dtype and fp32.
// ------------------------------------------------------------------------------------------------
template <typename T>
inline void load_row_as_float(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
#ifdef PLDR_ATTENTION_AVX512
  if constexpr (std::is_same_v<T, float>) {
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, _mm512_loadu_ps(src + i));
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    for (; i + 16 <= n; i += 16) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
      const __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
      _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(w));
    }
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    for (; i + 16 <= n; i += 16) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
      _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(h));
    }
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
inline void store_row_from_float(const float* src, T* dst, int64_t n, float factor) {
  if constexpr (std::is_same_v<T, float>) {
    int64_t i = 0;
#ifdef PLDR_ATTENTION_AVX512
    const __m512 f = _mm512_set1_ps(factor);
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, _mm512_mul_ps(_mm512_loadu_ps(src + i), f));
#endif
    for (; i < n; ++i) dst[i] = src[i] * factor;
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i] * factor);  // round to nearest even
  }
}

// ------------------------------------------------------------------------------------------------
// Vector helpers (AVX-512): loads, transposes and the softmax passes.
// ------------------------------------------------------------------------------------------------
#ifdef PLDR_ATTENTION_AVX512
// 2^x to ~1 ulp for x <= 0 (the softmax argument s − m); exactly 0 below 2^-126, NaN propagates.
inline __m512 exp2_ps(__m512 x) {
  const __mmask16 underflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_LT_OQ);
  x = _mm512_max_ps(_mm512_set1_ps(-126.0f), x);  // NaN in x is kept (max returns the 2nd operand)
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);  // f in [-0.5, 0.5]
  // Taylor series of e^(f·ln2) to degree 7: relative error < 6e-9 on [-0.5, 0.5].
  __m512 p = _mm512_set1_ps(1.5252733804059841e-05f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381606e-04f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284770e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~underflow), _mm512_scalef_ps(p, n));
}

// 16 consecutive elements as fp32.
template <typename T>
inline __m512 load16_as_float(const T* src) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_loadu_ps(src);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
  }
}

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

inline __mmask16 tail_mask(int64_t remaining) {
  return remaining >= 16 ? static_cast<__mmask16>(0xFFFF)
                         : static_cast<__mmask16>((1u << remaining) - 1u);
}
#endif

inline float row_max(const float* x, int64_t n) {
#ifdef PLDR_ATTENTION_AVX512
  __m512 m = _mm512_set1_ps(kNegInf);
  for (int64_t i = 0; i < n; i += 16) {
    m = _mm512_max_ps(m, _mm512_mask_loadu_ps(_mm512_set1_ps(kNegInf), tail_mask(n - i), x + i));
  }
  return _mm512_reduce_max_ps(m);
#else
  float m = kNegInf;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  return m;
#endif
}

// x[i] = 2^(x[i] − shift) in place; returns the sum (fixed summation order: 16 lanes, then a tree).
inline float exp2_shifted_in_place(float* x, int64_t n, float shift) {
#ifdef PLDR_ATTENTION_AVX512
  const __m512 s = _mm512_set1_ps(shift);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    const __m512 e = exp2_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), s));
    _mm512_mask_storeu_ps(x + i, k, e);
    acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(k, e));
  }
  return _mm512_reduce_add_ps(acc);
#else
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp2(x[i] - shift);
    sum += x[i];
  }
  return sum;
#endif
}

inline void scale_in_place(float* x, int64_t n, float factor) {
  int64_t i = 0;
#ifdef PLDR_ATTENTION_AVX512
  const __m512 f = _mm512_set1_ps(factor);
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, _mm512_mul_ps(_mm512_loadu_ps(x + i), f));
#endif
  for (; i < n; ++i) x[i] *= factor;
}

// ------------------------------------------------------------------------------------------------
// Kᵀ of n key rows as fp32 [D, ld_out] (column j = key row j), for the score GEMM q̃·Kᵀ.
// Columns n .. round_up(n, 16) are filled with zeros (never read as scores).
// ------------------------------------------------------------------------------------------------
template <typename T, int D, typename RowFn>
inline void pack_transposed(const RowFn& row, int64_t n, float* out, int64_t ld_out) {
#ifdef PLDR_ATTENTION_AVX512
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t rows = std::min<int64_t>(16, n - j0);
    for (int c0 = 0; c0 < D; c0 += 16) {
      __m512 r[16];
      for (int64_t i = 0; i < 16; ++i) {
        r[i] = i < rows ? load16_as_float(row(j0 + i) + c0) : _mm512_setzero_ps();
      }
      transpose16x16(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_ps(out + (c0 + i) * ld_out + j0, r[i]);
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
// scores: [M, n] (row stride ld), log2 units, −inf where a key is not visible. Turns it into the
// weights P = 2^(s − m_new), updates the running max m and sum l of each row and rescales the
// running output rows out[r, 0:D] by 2^(m_old − m_new). A row that has seen no visible key yet
// keeps m = −inf, l = 0, out = 0 and gets P = 0.
template <int D>
inline void online_softmax_update(float* scores, int64_t ld, int64_t M, int64_t n, float* m,
                                  float* l, float* out) {
  for (int64_t r = 0; r < M; ++r) {
    float* s = scores + r * ld;
    const float m_new = std::max(m[r], row_max(s, n));
    if (m_new == kNegInf) {
      std::fill(s, s + n, 0.0f);
      continue;
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

// ------------------------------------------------------------------------------------------------
// Row products for tiles with few query rows (decode): no transposed copy of K is needed.
// ------------------------------------------------------------------------------------------------
template <int D>
inline float dot(const float* a, const float* b) {
#ifdef PLDR_ATTENTION_AVX512
  __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(b));
  for (int i = 16; i < D; i += 16) {
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
#else
  float lanes[16] = {};
  for (int i = 0; i < D; i += 16)
    for (int j = 0; j < 16; ++j) lanes[j] += a[i + j] * b[i + j];
  for (int w = 8; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) lanes[j] += lanes[j + w];
  return lanes[0];
#endif
}

// out[0:D] += p · v[0:D]
template <int D>
inline void axpy(float p, const float* v, float* out) {
#ifdef PLDR_ATTENTION_AVX512
  const __m512 pv = _mm512_set1_ps(p);
  for (int i = 0; i < D; i += 16) {
    _mm512_storeu_ps(out + i, _mm512_fmadd_ps(pv, _mm512_loadu_ps(v + i), _mm512_loadu_ps(out + i)));
  }
#else
  for (int i = 0; i < D; ++i) out[i] += p * v[i];
#endif
}

}  // namespace pldr::cpu

#ifdef PLDR_SILENCE_UNDEFINED_VECTOR_WARNING
#pragma GCC diagnostic pop
#endif
