// Weight-streaming linears for a few rows (the decode step's projections, SwiGLU FFN and LM head;
// docs/design.md §3.9): the plain interface between the op (linear_small_cpu.cpp, torch headers)
// and the per-ISA kernels (isa/linear_small_{avx512,avx2}.cpp, linear_small_generic.cpp; no torch
// headers: each is compiled under its own `#pragma GCC target`, and an inline function of a torch
// header compiled there could be the copy the linker keeps for every caller).
#pragma once

#include <cstdint>

namespace pldr::cpu::linear_small {

enum class WeightKind : int { kFloat32 = 0, kBFloat16 = 1, kInt8 = 2 };

struct Args {
  const float* x;       // [M, K] fp32, rows ldx apart
  int64_t M, K, ldx;
  const void* weight;   // [rows, K] contiguous, of weight_kind
  WeightKind weight_kind;
  const float* scale;   // [rows] per-output-channel scale (int8), or nullptr
  const float* bias;    // [rows] fp32, or nullptr
  void* y;              // [M, features] fp32 or bf16, rows ldy apart
  bool y_bf16;
  int64_t ldy;
  int64_t features;     // linear: rows of weight; swiglu: half of them
  bool swiglu;          // y = silu(x·W[:H]ᵀ + b[:H]) * (x·W[H:]ᵀ + b[H:]), H = features
  // How far ahead (bytes) a one-row-at-a-time stream (bf16, int8) prefetches its weights; 0: not
  // at all (linear_small_cpu.cpp's row_prefetch_bytes() says which CPUs want it).
  int64_t row_prefetch_bytes;
};

// Output features [feature_begin, feature_end) of y, every row of x.
using FeaturesFn = void (*)(const Args&, int64_t feature_begin, int64_t feature_end);

// Only in a build with PLDR_WITH_ISA_VARIANTS (csrc/cpu/isa/).
void features_avx512(const Args&, int64_t, int64_t);
void features_avx2(const Args&, int64_t, int64_t);
// Every build.
void features_generic(const Args&, int64_t, int64_t);

}  // namespace pldr::cpu::linear_small
