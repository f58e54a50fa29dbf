// pldr::linear_small's kernel compiled for AVX2 + FMA: 8 fp32 lanes; the tile shape
// follows the rows of x. Built only with the run-time ISA copies (setup.py compiles csrc/cpu/isa/
// on x86-64 without PLDR_KERNELS_PORTABLE=1) and run when cpu/isa.h's selected_isa() picks this
// ISA. No torch header here (linear_small.h says why), so not cpu/isa_variant.h either.
#include "cpu/linear_small.h"

#include <immintrin.h>

#include <cmath>
#include <cstdint>

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

#include "cpu/linear_small_kernel.h"

}  // namespace

void features_avx2(const Args& a, int64_t f_begin, int64_t f_end) {
  // 16 vector registers: at most 8 accumulators.
  if (a.M == 1) return features_any<8, 1>(a, f_begin, f_end);
  if (a.M == 2) return features_any<4, 2>(a, f_begin, f_end);
  features_any<2, 4>(a, f_begin, f_end);
}

}  // namespace pldr::cpu::linear_small

#pragma GCC pop_options
