// pldr::linear_small's kernel for any CPU: generic 8-lane vectors (GCC/Clang vector extensions,
// lowered to whatever the build's baseline ISA has: SSE2 on x86-64, NEON on AArch64), separate
// multiply and add. What cpu/isa.h's portable path runs: a CPU with neither AVX-512 nor AVX2 + FMA,
// PLDR_KERNELS_ISA=portable, and every PLDR_KERNELS_PORTABLE=1 or non-x86 build.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <type_traits>

#include "cpu/linear_small.h"

namespace pldr::cpu::linear_small {
namespace {

constexpr int kVec = 8;
typedef float Vf __attribute__((vector_size(kVec * 4)));
inline Vf fmadd(Vf a, Vf b, Vf c) { return a * b + c; }
inline Vf load_bf16(const uint16_t* p) {
  Vf v;
  for (int i = 0; i < kVec; ++i) {
    const uint32_t bits = uint32_t(p[i]) << 16;
    __builtin_memcpy(&v[i], &bits, 4);
  }
  return v;
}
inline Vf load_int8(const int8_t* p) {
  Vf v;
  for (int i = 0; i < kVec; ++i) v[i] = float(p[i]);
  return v;
}

inline float lane_sum(Vf v) {
  float s = 0.f;
  for (int i = 0; i < kVec; ++i) s += v[i];
  return s;
}
constexpr bool kInt8Groups = false;  // load_int8 is as fast as anything portable

#include "cpu/linear_small_kernel.h"

// bf16 / int8 (linear_small_kernel.h says why one row at a time).
template <class W>
void one_row_at_a_time(const Args& a, int64_t f_begin, int64_t f_end) {
  if (a.M == 1) return row_by_row::features<W, 4, 1>(a, f_begin, f_end);
  row_by_row::features<W, 2, 2>(a, f_begin, f_end);
}

}  // namespace

void features_generic(const Args& a, int64_t f_begin, int64_t f_end) {
  switch (a.weight_kind) {
    case WeightKind::kFloat32:
      if (a.M == 1) return side_by_side::features<float, 4, 1>(a, f_begin, f_end);
      return side_by_side::features<float, 2, 2>(a, f_begin, f_end);
    case WeightKind::kBFloat16: return one_row_at_a_time<uint16_t>(a, f_begin, f_end);
    case WeightKind::kInt8: return one_row_at_a_time<int8_t>(a, f_begin, f_end);
  }
}

}  // namespace pldr::cpu::linear_small
