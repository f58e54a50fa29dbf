// Device wrappers of the tensor-core and async-copy instructions (sm_80+): inline PTX under nvcc,
// the CPU emulation of tools/cuda_emu/mma_emu.h under PLDR_CUDA_EMULATION, so kernels written
// against these wrappers run unchanged through the emulator (docs/design.md §5).
//
// 16-bit operands travel as raw bits (uint16_t in memory, two per uint32_t register, the lower
// column in the low half, as the PTX fragment layouts define). The element type T (__nv_bfloat16
// or __half) is a template argument.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda/device.cuh"
#ifdef PLDR_CUDA_EMULATION
#include "mma_emu.h"
#endif

namespace pldr::cuda {

// ------------------------------------------------------------------------------------------
// Two fp32 values rounded (to nearest even) into one register of 16-bit values, lo in the low half
// ------------------------------------------------------------------------------------------
template <class T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
#ifndef PLDR_CUDA_EMULATION
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
#else
  return cuda_emu::float_to_bf16_bits(lo) | (uint32_t{cuda_emu::float_to_bf16_bits(hi)} << 16);
#endif
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
#ifndef PLDR_CUDA_EMULATION
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
#else
  return cuda_emu::float_to_half_bits(lo) | (uint32_t{cuda_emu::float_to_half_bits(hi)} << 16);
#endif
}
// x rounded to T and back to fp32.
template <class T>
__device__ __forceinline__ float round_to(float x) {
  return to_float(from_float<T>(x));
}

// ------------------------------------------------------------------------------------------
// mma.sync.aligned.m16n8k16.row.col, fp32 accumulators, T = __nv_bfloat16 or __half:
// d = a·b + c (d may alias c), and the accumulating form d += a·b.
// ------------------------------------------------------------------------------------------
// The instruction for operand type TYPE ("bf16" or "f16"), as a string literal for asm.
#define PLDR_MMA_M16N8K16(TYPE)                                                              \
  "mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, " \
  "{%8,%9}, {%10,%11,%12,%13};\n"
#define PLDR_MMA_OPERANDS                                                                   \
  : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])                                           \
  : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), \
    "f"(c[2]), "f"(c[3])

template <class T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2], const float (&c)[4]) {
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  static_assert(kBf16 || std::is_same_v<T, __half>, "mma_m16n8k16: bf16 or fp16 operands");
#ifndef PLDR_CUDA_EMULATION
#if defined(__CUDA_ARCH__)
  if constexpr (kBf16) {
    asm volatile(PLDR_MMA_M16N8K16("bf16") PLDR_MMA_OPERANDS);
  } else {
    asm volatile(PLDR_MMA_M16N8K16("f16") PLDR_MMA_OPERANDS);
  }
#endif
#else
  cuda_emu::mma_m16n8k16<kBf16>(d, a, b, c);
#endif
}
template <class T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
  mma_m16n8k16<T>(d, a, b, d);
}
#undef PLDR_MMA_M16N8K16
#undef PLDR_MMA_OPERANDS

// ------------------------------------------------------------------------------------------
// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16; `row` is this lane's row address (lanes
// 8j..8j+7 address the 8 rows of matrix j, 16 bytes each, 16-byte aligned).
// ------------------------------------------------------------------------------------------
template <bool kTrans>
__device__ __forceinline__ void ldmatrix_m8n8_x4(uint32_t (&r)[4], const void* row) {
#ifndef PLDR_CUDA_EMULATION
#if defined(__CUDA_ARCH__)
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
  }
#endif
#else
  cuda_emu::ldmatrix_x4(r, row, kTrans);
#endif
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  ldmatrix_m8n8_x4<false>(r, row);
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  ldmatrix_m8n8_x4<true>(r, row);
}

// ------------------------------------------------------------------------------------------
// cp.async: 16 bytes global -> shared, bypassing L1 (.cg). valid = false copies nothing and
// zero-fills the 16 destination bytes (src-size 0), for rows past the end of a tensor.
// ------------------------------------------------------------------------------------------
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
#ifndef PLDR_CUDA_EMULATION
#if defined(__CUDA_ARCH__)
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src),
               "r"(src_bytes));
#endif
#else
  cuda_emu::cp_async_16(smem_dst, gmem_src, valid ? 16u : 0u);
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifndef PLDR_CUDA_EMULATION
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
#else
  cuda_emu::cp_async_commit();
#endif
}
// Wait until at most N of this thread's committed groups are still in flight. Other threads'
// copies become visible only after a barrier (__syncthreads) that follows their wait.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifndef PLDR_CUDA_EMULATION
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
#else
  cuda_emu::cp_async_wait(N);
#endif
}

}  // namespace pldr::cuda
