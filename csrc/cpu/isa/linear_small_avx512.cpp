// pldr::linear_small's kernel compiled for AVX-512 (F, BW, VL, DQ): 16 fp32 lanes; the tile shape
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
// A subset of x86-64-v4, the level selected_isa() requires for avx512.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi2")

namespace pldr::cpu::linear_small {
namespace {

constexpr int kVec = 16;
typedef float Vf __attribute__((vector_size(kVec * 4)));
inline Vf fmadd(Vf a, Vf b, Vf c) { return (Vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c); }
inline Vf load_bf16(const uint16_t* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return (Vf)_mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline Vf load_int8(const int8_t* p) {
  return (Vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline float lane_sum(Vf v) { return _mm512_reduce_add_ps((__m512)v); }  // a fixed tree
// One 64-byte load; byte j of each 32-bit lane shifted to the top and back, sign-extending.
// (Zen 4, 2 threads, int8 LM-head-sized rows from DRAM: 1.15–1.27× the sign-extending
// vpmovsxbd per 16 weights, though slower in L2.)
constexpr bool kInt8Groups = true;
inline void load_int8_group(const int8_t* p, Vf* out) {
  const __m512i v = _mm512_loadu_si512(p);
  out[0] = (Vf)_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 24), 24));
  out[1] = (Vf)_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 16), 24));
  out[2] = (Vf)_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 8), 24));
  out[3] = (Vf)_mm512_cvtepi32_ps(_mm512_srai_epi32(v, 24));
}

#include "cpu/linear_small_kernel.h"

// bf16 / int8 (linear_small_kernel.h says why one row at a time): 4 chains at one row of x (the
// widening converts, not the FMA latency, bound the rate: 4 measured as fast as 8); more rows of
// x: fewer chains each.
template <class W>
void one_row_at_a_time(const Args& a, int64_t f_begin, int64_t f_end) {
  if (a.M == 1) return row_by_row::features<W, 4, 1>(a, f_begin, f_end);
  if (a.M == 2) return row_by_row::features<W, 2, 2>(a, f_begin, f_end);
  if (a.M <= 4) return row_by_row::features<W, 1, 4>(a, f_begin, f_end);
  row_by_row::features<W, 1, 8>(a, f_begin, f_end);
}

}  // namespace

void features_avx512(const Args& a, int64_t f_begin, int64_t f_end) {
  switch (a.weight_kind) {
    case WeightKind::kFloat32:  // 8 weight rows at 1–2 rows of x; more rows: fewer weight rows
      if (a.M == 1) return side_by_side::features<float, 8, 1>(a, f_begin, f_end);
      if (a.M == 2) return side_by_side::features<float, 8, 2>(a, f_begin, f_end);
      if (a.M <= 4) return side_by_side::features<float, 4, 4>(a, f_begin, f_end);
      return side_by_side::features<float, 2, 8>(a, f_begin, f_end);
    case WeightKind::kBFloat16: return one_row_at_a_time<uint16_t>(a, f_begin, f_end);
    case WeightKind::kInt8: return one_row_at_a_time<int8_t>(a, f_begin, f_end);
  }
}

}  // namespace pldr::cpu::linear_small

#pragma GCC pop_options
