// pldr::linear_small's kernel compiled for AVX2 + FMA: 8 fp32 lanes; the tile shape
// follows the rows of x. Built only with the run-time ISA copies (setup.py compiles csrc/cpu/isa/
// on x86-64 without PLDR_KERNELS_PORTABLE=1) and run when cpu/isa.h's selected_isa() picks this
// ISA. No torch header here (linear_small.h says why), so not cpu/isa_variant.h either.
#include "cpu/linear_small.h"

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <type_traits>

#pragma GCC push_options
// A subset of x86-64-v3, the level selected_isa() requires for avx2.
#pragma GCC target("avx2,fma,bmi2")

namespace pldr::cpu::linear_small {
namespace {

constexpr int kVec = 8;
typedef float Vf __attribute__((vector_size(kVec * 4)));
inline Vf fmadd(Vf a, Vf b, Vf c) { return (Vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c); }
inline Vf load_bf16(const uint16_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return (Vf)_mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline Vf load_int8(const int8_t* p) {
  return (Vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline float lane_sum(Vf v) {  // ((v0+v4)+(v2+v6)) + ((v1+v5)+(v3+v7))
  const __m128 quad = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
  const __m128 pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
  return _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
}
// One 32-byte load; byte j of each 32-bit lane shifted to the top and back (as the AVX-512 file).
constexpr bool kInt8Groups = true;
inline void load_int8_group(const int8_t* p, Vf* out) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  out[0] = (Vf)_mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 24), 24));
  out[1] = (Vf)_mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 16), 24));
  out[2] = (Vf)_mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 8), 24));
  out[3] = (Vf)_mm256_cvtepi32_ps(_mm256_srai_epi32(v, 24));
}

#include "cpu/linear_small_kernel.h"

// bf16 / int8 (linear_small_kernel.h says why one row at a time): 4 chains at one row of x.
template <class W>
void one_row_at_a_time(const Args& a, int64_t f_begin, int64_t f_end) {
  if (a.M == 1) return row_by_row::features<W, 4, 1>(a, f_begin, f_end);
  if (a.M == 2) return row_by_row::features<W, 2, 2>(a, f_begin, f_end);
  row_by_row::features<W, 1, 4>(a, f_begin, f_end);
}

}  // namespace

void features_avx2(const Args& a, int64_t f_begin, int64_t f_end) {
  switch (a.weight_kind) {
    case WeightKind::kFloat32:  // 16 vector registers: at most 8 accumulators
      if (a.M == 1) return side_by_side::features<float, 8, 1>(a, f_begin, f_end);
      if (a.M == 2) return side_by_side::features<float, 4, 2>(a, f_begin, f_end);
      return side_by_side::features<float, 2, 4>(a, f_begin, f_end);
    case WeightKind::kBFloat16: return one_row_at_a_time<uint16_t>(a, f_begin, f_end);
    case WeightKind::kInt8: return one_row_at_a_time<int8_t>(a, f_begin, f_end);
  }
}

}  // namespace pldr::cpu::linear_small

#pragma GCC pop_options
