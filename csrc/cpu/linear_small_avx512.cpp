// pldr::linear_small's kernel compiled for AVX-512 (F, BW, VL, DQ): 16 fp32 lanes, 4 weight rows
// × 4 rows of x in registers. Chosen at run time (linear_small_cpu.cpp), so a portable build runs
// it on any AVX-512 CPU. No torch header here (linear_small.h says why).
#include "cpu/linear_small.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi2")

namespace pldr::cpu::linear_small {
namespace {

constexpr int kVec = 16;
constexpr int kRowsPerTile = 4;
constexpr int kRowsOfX = 4;
typedef float VfArg __attribute__((vector_size(kVec * 4)));
inline VfArg fmadd(VfArg a, VfArg b, VfArg c) {
  return (VfArg)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
}

#include "cpu/linear_small_kernel.h"

}  // namespace

void features_avx512(const Args& a, int64_t f_begin, int64_t f_end) {
  features_any(a, f_begin, f_end);
}

}  // namespace pldr::cpu::linear_small

#pragma GCC pop_options
#endif
