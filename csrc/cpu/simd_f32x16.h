// A 16-lane fp32 vector for the CPU kernels: AVX-512 intrinsics when the build targets them
// (-march=native on an AVX-512 machine), otherwise GCC/Clang generic vectors, which the compiler
// lowers to whatever SIMD the target has (PLDR_KERNELS_PORTABLE=1 builds). Both paths use a fused
// multiply-add where the code asks for one, so one build gives the same bits run after run.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace pldr {
namespace simd {

constexpr int kLanes = 16;

// Force-inlined: an out-of-line call would spill every register-tile accumulator (no zmm
// register survives a call in the x86-64 ABI).
#define PLDR_SIMD_INLINE inline __attribute__((always_inline))
// Fully unrolls the small loops over a register tile so that its accumulators stay in registers.
#define PLDR_UNROLL _Pragma("GCC unroll 32")

#if defined(__AVX512F__)

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

// exp(x) to about 1 ulp: x = n·ln2 + r with |r| ≤ ln2/2, Cephes' degree-6 polynomial for e^r,
// then scalef by 2^n (which also gives the right inf / 0 / denormal at the ends of the range).
// NaN passes through (the clamps keep x when x is NaN).
PLDR_SIMD_INLINE f32x16 exp(f32x16 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
  x = _mm512_min_ps(_mm512_set1_ps(89.0f), x);
  const f32x16 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  f32x16 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  f32x16 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

#else  // portable fallback

typedef float f32x16 __attribute__((vector_size(64)));

PLDR_SIMD_INLINE f32x16 load(const float* p) {
  f32x16 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
PLDR_SIMD_INLINE void store(float* p, f32x16 v) { __builtin_memcpy(p, &v, sizeof(v)); }
PLDR_SIMD_INLINE f32x16 splat(float x) {
  f32x16 v;
  for (int i = 0; i < kLanes; ++i) v[i] = x;
  return v;
}
PLDR_SIMD_INLINE f32x16 zero() { return splat(0.0f); }
PLDR_SIMD_INLINE f32x16 fma(f32x16 a, f32x16 b, f32x16 c) {
  for (int i = 0; i < kLanes; ++i) c[i] = std::fma(a[i], b[i], c[i]);
  return c;
}
PLDR_SIMD_INLINE f32x16 add(f32x16 a, f32x16 b) { return a + b; }
PLDR_SIMD_INLINE f32x16 sub(f32x16 a, f32x16 b) { return a - b; }
PLDR_SIMD_INLINE f32x16 mul(f32x16 a, f32x16 b) { return a * b; }
PLDR_SIMD_INLINE f32x16 div(f32x16 a, f32x16 b) { return a / b; }
PLDR_SIMD_INLINE f32x16 sqrt(f32x16 a) {
  for (int i = 0; i < kLanes; ++i) a[i] = std::sqrt(a[i]);
  return a;
}
PLDR_SIMD_INLINE f32x16 exp(f32x16 x) {
  for (int i = 0; i < kLanes; ++i) x[i] = std::exp(x[i]);
  return x;
}

#endif

// silu(z) = z / (1 + e^-z), the form PyTorch evaluates.
PLDR_SIMD_INLINE f32x16 silu(f32x16 z) { return div(z, add(splat(1.0f), exp(sub(zero(), z)))); }

}  // namespace simd
}  // namespace pldr
