// pldr::linear_small's kernel for any CPU: generic 8-lane vectors (GCC/Clang vector extensions,
// lowered to whatever the build's baseline ISA has: SSE2 on x86-64, NEON on AArch64), separate
// multiply and add. The fallback when cpuid finds neither AVX-512 nor AVX2 + FMA, and the path
// PLDR_KERNELS_ISA=portable forces.
#include <cmath>
#include <cstdint>

#include "cpu/linear_small.h"

namespace pldr::cpu::linear_small {
namespace {

constexpr int kVec = 8;
constexpr int kRowsPerTile = 2;
constexpr int kRowsOfX = 2;
typedef float VfArg __attribute__((vector_size(kVec * 4)));
inline VfArg fmadd(VfArg a, VfArg b, VfArg c) { return a * b + c; }

#include "cpu/linear_small_kernel.h"

}  // namespace

void features_generic(const Args& a, int64_t f_begin, int64_t f_end) {
  features_any(a, f_begin, f_end);
}

}  // namespace pldr::cpu::linear_small
