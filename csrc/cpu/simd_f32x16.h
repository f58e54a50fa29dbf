// A 16-lane fp32 vector for the CPU kernels (metric learner and attention), in one of three forms:
// AVX-512 intrinsics (one zmm), AVX2 + FMA intrinsics (two ymm), or GCC/Clang generic vectors,
// which the compiler lowers to whatever SIMD the target has (the portable copy). The AVX-512 copy,
// the AVX2 copy and the portable one of each kernel file (cpu/isa.h) take the first, second and
// third. All three use a fused multiply-add where the code asks for one (the fallback only where
// the target has FMA), so one build gives the same bits run after run on one path. This is the
// only place that chooses between them; kernels that need intrinsics beyond it (the in-register
// transposes) test PLDR_SIMD_AVX512 / PLDR_SIMD_AVX2.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu/isa.h"

// __AVX512F__: a build for an AVX-512 target; PLDR_TARGET_AVX512: the AVX-512 copy of a kernel
// file in a build that chooses the ISA at run time (cpu/isa_variant.h).
#if defined(__AVX512F__) || defined(PLDR_TARGET_AVX512)
#include <immintrin.h>
#define PLDR_SIMD_AVX512 1
#elif (defined(__AVX2__) && defined(__FMA__)) || defined(PLDR_TARGET_AVX2)
#include <immintrin.h>
#define PLDR_SIMD_AVX2 1
#endif

// GCC 12's AVX-512 intrinsics (roundscale, scalef, reductions, unpack / shuffle, ...) start from
// _mm512_undefined_ps(), which trips -W(maybe-)uninitialized at every inlined use; the value is
// fully defined. Code that calls such intrinsics sits between these two.
#if defined(__GNUC__) && !defined(__clang__)
#define PLDR_SIMD_BEGIN_INTRINSICS                                    \
  _Pragma("GCC diagnostic push")                                      \
  _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")               \
  _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#define PLDR_SIMD_END_INTRINSICS _Pragma("GCC diagnostic pop")
#else
#define PLDR_SIMD_BEGIN_INTRINSICS
#define PLDR_SIMD_END_INTRINSICS
#endif

namespace pldr::cpu {
inline namespace PLDR_ISA_NAMESPACE {  // one copy per ISA (cpu/isa.h)

// The element types of the CPU kernels, for PLDR_DTYPE_SWITCH (common/dispatch.h): the three
// that load_as_f32 widens.
struct Elements {
  using fp32 = float;
  using bf16 = c10::BFloat16;
  using fp16 = c10::Half;
};

namespace simd {

constexpr int kLanes = 16;

// The polynomials of exp and exp2 (the AVX-512 path, and the generic one where the target has FMA).
// Cephes' degree-6 polynomial for e^r, |r| <= ln2/2.
inline constexpr float kCephesExp[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                       4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
// Taylor series of e^(f·ln2) to degree 7: relative error < 6e-9 on [-0.5, 0.5].
inline constexpr float kTaylorExp2[] = {
    1.5252733804059841e-05f, 1.5403530393381606e-04f, 1.3333558146428443e-03f,
    9.6181291076284770e-03f, 5.5504108664821580e-02f, 2.4022650695910071e-01f,
    6.9314718055994531e-01f, 1.0f};

// Force-inlined: an out-of-line call would spill every register-tile accumulator (no zmm
// register survives a call in the x86-64 ABI).
#define PLDR_SIMD_INLINE inline __attribute__((always_inline))
// Fully unrolls the small loops over a register tile so that its accumulators stay in registers.
#define PLDR_UNROLL _Pragma("GCC unroll 32")

#if defined(PLDR_SIMD_AVX512)
PLDR_SIMD_BEGIN_INTRINSICS

using f32x16 = __m512;

PLDR_SIMD_INLINE f32x16 load(const float* p) { return _mm512_loadu_ps(p); }
PLDR_SIMD_INLINE void store(float* p, f32x16 v) { _mm512_storeu_ps(p, v); }
PLDR_SIMD_INLINE f32x16 splat(float x) { return _mm512_set1_ps(x); }
PLDR_SIMD_INLINE f32x16 zero() { return _mm512_setzero_ps(); }
PLDR_SIMD_INLINE f32x16 fma(f32x16 a, f32x16 b, f32x16 c) { return _mm512_fmadd_ps(a, b, c); }
PLDR_SIMD_INLINE f32x16 add(f32x16 a, f32x16 b) { return _mm512_add_ps(a, b); }
PLDR_SIMD_INLINE f32x16 sub(f32x16 a, f32x16 b) { return _mm512_sub_ps(a, b); }
PLDR_SIMD_INLINE f32x16 mul(f32x16 a, f32x16 b) { return _mm512_mul_ps(a, b); }
PLDR_SIMD_INLINE f32x16 div(f32x16 a, f32x16 b) { return _mm512_div_ps(a, b); }
PLDR_SIMD_INLINE f32x16 sqrt(f32x16 a) { return _mm512_sqrt_ps(a); }
// Lane-wise a > b ? a : b (the second operand when either is NaN, like the instruction).
PLDR_SIMD_INLINE f32x16 max(f32x16 a, f32x16 b) { return _mm512_max_ps(a, b); }

// The first `count` lanes (all 16 when count >= 16); the others are `fill` and are not read.
PLDR_SIMD_INLINE __mmask16 first_lanes(int64_t count) {
  return count >= kLanes ? static_cast<__mmask16>(0xFFFF)
                         : static_cast<__mmask16>((1u << count) - 1u);
}
PLDR_SIMD_INLINE f32x16 load_partial(const float* p, int64_t count, float fill = 0.0f) {
  return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), first_lanes(count), p);
}
// Writes only the first `count` lanes.
PLDR_SIMD_INLINE void store_partial(float* p, f32x16 v, int64_t count) {
  _mm512_mask_storeu_ps(p, first_lanes(count), v);
}

// Horizontal sum / max. The sum pairs lane i with lane i+8, then i+4, i+2, i+1 (the fallback
// does the same), so it does not depend on how the data was split.
PLDR_SIMD_INLINE float reduce_add(f32x16 v) { return _mm512_reduce_add_ps(v); }
PLDR_SIMD_INLINE float reduce_max(f32x16 v) { return _mm512_reduce_max_ps(v); }

// 16 consecutive fp32 / bf16 / fp16 elements as fp32 (exact for all three).
template <typename T>
PLDR_SIMD_INLINE f32x16 load_as_f32(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_loadu_ps(p);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {  // bf16 = the top half of an fp32
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    static_assert(std::is_same_v<T, c10::Half>, "load_as_f32: fp32, bf16 or fp16");
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
}

// Shared by exp and exp2: both write the result as 2^n · p(r) with n a whole number.
PLDR_SIMD_INLINE f32x16 round_to_nearest(f32x16 x) {
  return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
// p · 2^n; scalef also gives the right inf / 0 / denormal at the ends of the range.
PLDR_SIMD_INLINE f32x16 times_pow2(f32x16 p, f32x16 n) { return _mm512_scalef_ps(p, n); }
// c[0]·x^(N−1) + ... + c[N−1] by Horner's rule with fused multiply-adds.
template <int N>
PLDR_SIMD_INLINE f32x16 polynomial(f32x16 x, const float (&c)[N]) {
  f32x16 p = _mm512_set1_ps(c[0]);
  PLDR_UNROLL
  for (int i = 1; i < N; ++i) p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(c[i]));
  return p;
}

// exp(x) to about 1 ulp: x = n·ln2 + r with |r| ≤ ln2/2, Cephes' degree-6 polynomial for e^r,
// then 2^n. NaN passes through (the clamps keep x when x is NaN).
PLDR_SIMD_INLINE f32x16 exp(f32x16 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
  x = _mm512_min_ps(_mm512_set1_ps(89.0f), x);
  const f32x16 n = round_to_nearest(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)));
  // r = x − n·ln2 with ln2 split in two (Cody–Waite) so that r keeps its low bits.
  f32x16 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  const f32x16 p = polynomial(r, kCephesExp);
  return times_pow2(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f))), n);
}

// 2^x to ~1 ulp, for the softmax argument s − m (<= 0): exactly 0 below 2^-126 (so masked keys,
// −inf, give 0), NaN propagates. x = n + f with |f| ≤ 1/2 is exact, so no Cody–Waite split.
PLDR_SIMD_INLINE f32x16 exp2(f32x16 x) {
  const __mmask16 underflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_LT_OQ);
  x = _mm512_max_ps(_mm512_set1_ps(-126.0f), x);  // NaN in x is kept (max returns the 2nd operand)
  const f32x16 n = round_to_nearest(x);
  const f32x16 f = _mm512_sub_ps(x, n);
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~underflow),
                             times_pow2(polynomial(f, kTaylorExp2), n));
}

PLDR_SIMD_END_INTRINSICS
#elif defined(PLDR_SIMD_AVX2)
PLDR_SIMD_BEGIN_INTRINSICS

// Sixteen lanes as two ymm registers: lanes 0-7 in lo, 8-15 in hi. A 64-byte generic vector
// would do the same arithmetic, but GCC 12 keeps it in memory on a 32-byte target (every
// operation a store and reload of both halves: the AVX2 copy of the attention kernel ran slower
// than the portable one). Each operation below is the fallback's with FMA, lane for lane, in the
// same order (reductions, clamps, NaN rules); against GCC's lowering of the generic vectors for
// this target the results differed only in the last bit of a few decode and backward outputs
// (where GCC had contracted a multiply and an add differently), and in no prefill output.
struct f32x16 {
  __m256 lo, hi;
};

PLDR_SIMD_INLINE f32x16 load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
PLDR_SIMD_INLINE void store(float* p, f32x16 v) {
  _mm256_storeu_ps(p, v.lo);
  _mm256_storeu_ps(p + 8, v.hi);
}
PLDR_SIMD_INLINE f32x16 splat(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
PLDR_SIMD_INLINE f32x16 zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
PLDR_SIMD_INLINE f32x16 fma(f32x16 a, f32x16 b, f32x16 c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
PLDR_SIMD_INLINE f32x16 add(f32x16 a, f32x16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
PLDR_SIMD_INLINE f32x16 sub(f32x16 a, f32x16 b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
PLDR_SIMD_INLINE f32x16 mul(f32x16 a, f32x16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
PLDR_SIMD_INLINE f32x16 div(f32x16 a, f32x16 b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
PLDR_SIMD_INLINE f32x16 sqrt(f32x16 a) { return {_mm256_sqrt_ps(a.lo), _mm256_sqrt_ps(a.hi)}; }
// a > b ? a : b lane-wise (the second operand when either is NaN), as on the other paths.
PLDR_SIMD_INLINE f32x16 max(f32x16 a, f32x16 b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }

// All ones in the lanes i < count of eight (count may be negative or above 8).
PLDR_SIMD_INLINE __m256i first_lanes8(int64_t count) {
  const int32_t c = static_cast<int32_t>(std::clamp<int64_t>(count, 0, 8));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(c), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
// The first `count` lanes (all 16 when count >= 16); the others are `fill` and are not read.
PLDR_SIMD_INLINE f32x16 load_partial(const float* p, int64_t count, float fill = 0.0f) {
  if (count >= kLanes) return load(p);
  const __m256i m_lo = first_lanes8(count), m_hi = first_lanes8(count - 8);
  const __m256 f = _mm256_set1_ps(fill);
  return {_mm256_blendv_ps(f, _mm256_maskload_ps(p, m_lo), _mm256_castsi256_ps(m_lo)),
          _mm256_blendv_ps(f, _mm256_maskload_ps(p + 8, m_hi), _mm256_castsi256_ps(m_hi))};
}
// Writes only the first `count` lanes.
PLDR_SIMD_INLINE void store_partial(float* p, f32x16 v, int64_t count) {
  if (count >= kLanes) return store(p, v);
  _mm256_maskstore_ps(p, first_lanes8(count), v.lo);
  _mm256_maskstore_ps(p + 8, first_lanes8(count - 8), v.hi);
}

// Halving trees: lane i meets lane i + width, width 8, 4, 2, 1 (the order the AVX-512 path adds).
PLDR_SIMD_INLINE float reduce_add(f32x16 v) {
  const __m256 a = _mm256_add_ps(v.lo, v.hi);
  const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));                    // b0+b2, b1+b3
  return _mm_cvtss_f32(_mm_add_ss(c, _mm_shuffle_ps(c, c, 1)));
}
PLDR_SIMD_INLINE float reduce_max(f32x16 v) {
  const __m256 a = _mm256_max_ps(v.lo, v.hi);
  const __m128 b = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 c = _mm_max_ps(b, _mm_movehl_ps(b, b));
  return _mm_cvtss_f32(_mm_max_ss(c, _mm_shuffle_ps(c, c, 1)));
}

// 16 consecutive fp32 / bf16 / fp16 elements as fp32 (exact for all three).
template <typename T>
PLDR_SIMD_INLINE f32x16 load_as_f32(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return load(p);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {  // bf16 = the top half of an fp32
    const __m128i* h = reinterpret_cast<const __m128i*>(p);
    return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(h)), 16)),
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(h + 1)), 16))};
  } else {
    static_assert(std::is_same_v<T, c10::Half>, "load_as_f32: fp32, bf16 or fp16");
    const __m128i* h = reinterpret_cast<const __m128i*>(p);
    return {_mm256_cvtph_ps(_mm_loadu_si128(h)), _mm256_cvtph_ps(_mm_loadu_si128(h + 1))};
  }
}

// The portable fallback's exp / exp2 with hardware FMA (docs there), on each half.
namespace half8 {
PLDR_SIMD_INLINE __m256 round_to_nearest(__m256 x) {  // (x + 1.5·2^23) − 1.5·2^23, |x| < 2^22
  const __m256 magic = _mm256_set1_ps(12582912.0f);
  return _mm256_sub_ps(_mm256_add_ps(x, magic), magic);
}
PLDR_SIMD_INLINE __m256 pow2_of_int(__m256i e) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23));
}
PLDR_SIMD_INLINE __m256 times_pow2(__m256 p, __m256 n) {
  const __m256i whole = _mm256_cvttps_epi32(n);
  const __m256i first = _mm256_srai_epi32(_mm256_add_epi32(whole, _mm256_srli_epi32(whole, 31)), 1);
  return _mm256_mul_ps(_mm256_mul_ps(p, pow2_of_int(first)),
                       pow2_of_int(_mm256_sub_epi32(whole, first)));
}
template <int N>
PLDR_SIMD_INLINE __m256 polynomial(__m256 x, const float (&c)[N]) {
  __m256 p = _mm256_set1_ps(c[0]);
  PLDR_UNROLL
  for (int i = 1; i < N; ++i) p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(c[i]));
  return p;
}
PLDR_SIMD_INLINE __m256 exp(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-104.0f), x);  // NaN passes through both clamps
  x = _mm256_min_ps(_mm256_set1_ps(89.0f), x);
  const __m256 n = round_to_nearest(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  const __m256 p = polynomial(r, kCephesExp);
  return times_pow2(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f))), n);
}
PLDR_SIMD_INLINE __m256 exp2(__m256 x) {
  const __m256 underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-126.0f), _CMP_LT_OQ);
  x = _mm256_blendv_ps(x, _mm256_set1_ps(-126.0f), underflow);
  const __m256 big = _mm256_and_ps(_mm256_cmp_ps(x, _mm256_set1_ps(128.0f), _CMP_GT_OQ),
                                   _mm256_cmp_ps(x, _mm256_set1_ps(std::numeric_limits<float>::infinity()), _CMP_LT_OQ));
  x = _mm256_blendv_ps(x, _mm256_set1_ps(128.0f), big);
  const __m256 n = round_to_nearest(x);
  // n is in [−126, 128] here, so 2^n is one power of two built from its bits (2^128's are +inf's,
  // the product's value there anyway) and p·2^n is times_pow2's result with one multiply.
  const __m256 p = polynomial(_mm256_sub_ps(x, n), kTaylorExp2);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, pow2_of_int(_mm256_cvttps_epi32(n))));
}
}  // namespace half8

PLDR_SIMD_INLINE f32x16 exp(f32x16 x) { return {half8::exp(x.lo), half8::exp(x.hi)}; }
PLDR_SIMD_INLINE f32x16 exp2(f32x16 x) { return {half8::exp2(x.lo), half8::exp2(x.hi)}; }

PLDR_SIMD_END_INTRINSICS
#else  // portable fallback

// Everything here is force-inlined, so the ABI note about 64-byte vector arguments is moot.
#pragma GCC diagnostic ignored "-Wpsabi"

typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
// Whole-vector expressions only: GCC scalarises a loop over the lanes of a 64-byte vector into
// one load/store per lane (measured: the AVX2 copy's softmax ~10x slower than its GEMMs).

PLDR_SIMD_INLINE f32x16 load(const float* p) {
  f32x16 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
PLDR_SIMD_INLINE void store(float* p, f32x16 v) { __builtin_memcpy(p, &v, sizeof(v)); }
PLDR_SIMD_INLINE f32x16 splat(float x) { return x - f32x16{}; }  // x − 0 is x, −0 and NaN too
PLDR_SIMD_INLINE f32x16 zero() { return splat(0.0f); }
// Unfused: without hardware FMA, std::fma is a slow software routine.
PLDR_SIMD_INLINE f32x16 fma(f32x16 a, f32x16 b, f32x16 c) { return a * b + c; }
PLDR_SIMD_INLINE f32x16 add(f32x16 a, f32x16 b) { return a + b; }
PLDR_SIMD_INLINE f32x16 sub(f32x16 a, f32x16 b) { return a - b; }
PLDR_SIMD_INLINE f32x16 mul(f32x16 a, f32x16 b) { return a * b; }
PLDR_SIMD_INLINE f32x16 div(f32x16 a, f32x16 b) { return a / b; }
PLDR_SIMD_INLINE f32x16 sqrt(f32x16 a) {
  for (int i = 0; i < kLanes; ++i) a[i] = std::sqrt(a[i]);
  return a;
}
PLDR_SIMD_INLINE f32x16 max(f32x16 a, f32x16 b) { return a > b ? a : b; }
PLDR_SIMD_INLINE f32x16 load_partial(const float* p, int64_t count, float fill = 0.0f) {
  if (count >= kLanes) return load(p);
  f32x16 v = splat(fill);
  for (int i = 0; i < kLanes && i < count; ++i) v[i] = p[i];
  return v;
}
PLDR_SIMD_INLINE void store_partial(float* p, f32x16 v, int64_t count) {
  if (count >= kLanes) return store(p, v);
  for (int i = 0; i < kLanes && i < count; ++i) p[i] = v[i];
}
// Halving trees: lane i meets lane i + width, width 8, 4, 2, 1 (the order the AVX-512 path adds).
PLDR_SIMD_INLINE float reduce_add(f32x16 v) {
  const f32x8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const f32x4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) +
                  __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}
PLDR_SIMD_INLINE float reduce_max(f32x16 v) {
  const f32x8 lo = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const f32x8 hi = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const f32x8 a = lo > hi ? lo : hi;
  const f32x4 a_lo = __builtin_shufflevector(a, a, 0, 1, 2, 3);
  const f32x4 a_hi = __builtin_shufflevector(a, a, 4, 5, 6, 7);
  const f32x4 b = a_lo > a_hi ? a_lo : a_hi;
  const float c0 = b[0] > b[2] ? b[0] : b[2];
  const float c1 = b[1] > b[3] ? b[1] : b[3];
  return c0 > c1 ? c0 : c1;
}
template <typename T>
PLDR_SIMD_INLINE f32x16 load_as_f32(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return load(p);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {  // bf16 = the top half of an fp32
    typedef uint16_t u16x16 __attribute__((vector_size(32)));
    typedef uint32_t u32x16 __attribute__((vector_size(64)));
    u16x16 half;
    __builtin_memcpy(&half, p, sizeof(half));
    const u32x16 bits = __builtin_convertvector(half, u32x16) << 16;
    f32x16 v;
    __builtin_memcpy(&v, &bits, sizeof(v));
    return v;
  } else {
    f32x16 v;
    for (int i = 0; i < kLanes; ++i) v[i] = static_cast<float>(p[i]);
    return v;
  }
}
#if defined(__FMA__)
// With hardware FMA: the AVX-512 path's exp / exp2, lane-wise (GCC contracts each a·b + c below
// into one FMA, as the intrinsics do); 16 libm calls per vector would be slower than the GEMMs.
typedef int32_t i32x16 __attribute__((vector_size(64)));

// Nearest integer, ties to even, for |x| < 2^22 (every x here after the clamps): adding and
// subtracting 1.5·2^23 drops the fraction bits.
PLDR_SIMD_INLINE f32x16 round_to_nearest(f32x16 x) {
  const f32x16 magic = splat(12582912.0f);
  return (x + magic) - magic;
}
// 2^e for whole e in [-126, 127], built from the exponent bits.
PLDR_SIMD_INLINE f32x16 pow2_of_int(i32x16 e) {
  const i32x16 bits = (e + 127) << 23;
  f32x16 v;
  __builtin_memcpy(&v, &bits, sizeof(v));
  return v;
}
// p · 2^n for whole n in [-151, 256] as two normal powers of two, so that a result below 2^-126
// is rounded once, as AVX-512's scalef rounds it (a NaN p stays NaN).
PLDR_SIMD_INLINE f32x16 times_pow2(f32x16 p, f32x16 n) {
  typedef uint32_t u32x16 __attribute__((vector_size(64)));
  const i32x16 whole = __builtin_convertvector(n, i32x16);
  // whole / 2 (rounded toward zero) in shifts: GCC scalarises a vector division
  const i32x16 first = (whole + (i32x16)((u32x16)whole >> 31)) >> 1;
  return (p * pow2_of_int(first)) * pow2_of_int(whole - first);
}
template <int N>
PLDR_SIMD_INLINE f32x16 polynomial(f32x16 x, const float (&c)[N]) {
  f32x16 p = splat(c[0]);
  PLDR_UNROLL
  for (int i = 1; i < N; ++i) p = p * x + c[i];
  return p;
}
PLDR_SIMD_INLINE f32x16 exp(f32x16 x) {
  x = x < -104.0f ? splat(-104.0f) : x;  // NaN passes through both clamps
  x = x > 89.0f ? splat(89.0f) : x;
  const f32x16 n = round_to_nearest(x * 1.44269504088896341f);
  f32x16 r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const f32x16 p = polynomial(r, kCephesExp);
  return times_pow2(p * (r * r) + (r + 1.0f), n);
}
PLDR_SIMD_INLINE f32x16 exp2(f32x16 x) {
  const auto underflow = x < -126.0f;
  x = underflow ? splat(-126.0f) : x;
  // 2^128 is inf already; +inf itself goes on to give NaN (inf − inf), as on the AVX-512 path
  x = (x > 128.0f) & (x < std::numeric_limits<float>::infinity()) ? splat(128.0f) : x;
  const f32x16 n = round_to_nearest(x);
  return underflow ? zero() : times_pow2(polynomial(x - n, kTaylorExp2), n);
}
#else
// The C library's exp / exp2 (correctly rounded or close): a polynomial without hardware FMA
// would be both slower and less accurate.
PLDR_SIMD_INLINE f32x16 exp(f32x16 x) {
  for (int i = 0; i < kLanes; ++i) x[i] = std::exp(x[i]);
  return x;
}
PLDR_SIMD_INLINE f32x16 exp2(f32x16 x) {
  for (int i = 0; i < kLanes; ++i) x[i] = std::exp2(x[i]);
  return x;
}
#endif

#endif

// silu(z) = z / (1 + e^-z), the form PyTorch evaluates.
PLDR_SIMD_INLINE f32x16 silu(f32x16 z) { return div(z, add(splat(1.0f), exp(sub(zero(), z)))); }

}  // namespace simd
}  // namespace PLDR_ISA_NAMESPACE
}  // namespace pldr::cpu
