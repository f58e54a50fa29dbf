// Device wrappers of the tensor-core and async-copy instructions (sm_80+): inline PTX under nvcc,
// the CPU emulation of tools/cuda_emu/mma_emu.h otherwise, so kernels written against these
// wrappers run unchanged through the emulator (DESIGN.md §5).
//
// 16-bit operands travel as raw bits (uint16_t in memory, two per uint32_t register, the lower
// column in the low half, as the PTX fragment layouts define). Element types are tags: Bf16, Fp16.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define PLDR_DEVICE __device__ __forceinline__
// Dynamic shared memory: extern __shared__ on the GPU, a per-block buffer in the emulator.
#define PLDR_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#else
#include "mma_emu.h"
#define PLDR_DEVICE inline
#define PLDR_DYNAMIC_SMEM(name) unsigned char* name = pldr_emu::dynamic_smem()
#endif

namespace pldr::cuda {

struct Bf16 {};
struct Fp16 {};

#if defined(__CUDACC__)
using Vec16 = uint4;  // one 16-byte vector load/store
#else
struct alignas(16) Vec16 {
  uint32_t x, y, z, w;
};
#endif

// ------------------------------------------------------------------------------------------
// Conversions (round to nearest even)
// ------------------------------------------------------------------------------------------
PLDR_DEVICE uint32_t pack2(Bf16, float lo, float hi) {
#if defined(__CUDACC__)
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
#else
  return pldr_emu::float_to_bf16_bits(lo) | (uint32_t{pldr_emu::float_to_bf16_bits(hi)} << 16);
#endif
}
PLDR_DEVICE uint32_t pack2(Fp16, float lo, float hi) {
#if defined(__CUDACC__)
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
#else
  return pldr_emu::float_to_half_bits(lo) | (uint32_t{pldr_emu::float_to_half_bits(hi)} << 16);
#endif
}
// x rounded to the 16-bit type and back to fp32.
PLDR_DEVICE float round_to(Bf16, float x) {
#if defined(__CUDACC__)
  return __bfloat162float(__float2bfloat16_rn(x));
#else
  return pldr_emu::bf16_bits_to_float(pldr_emu::float_to_bf16_bits(x));
#endif
}
PLDR_DEVICE float round_to(Fp16, float x) {
#if defined(__CUDACC__)
  return __half2float(__float2half_rn(x));
#else
  return pldr_emu::half_bits_to_float(pldr_emu::float_to_half_bits(x));
#endif
}

// ------------------------------------------------------------------------------------------
// mma.sync.aligned.m16n8k16.row.col, fp32 accumulators: d = a·b + c (d may alias c)
// ------------------------------------------------------------------------------------------
PLDR_DEVICE void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                   const float (&c)[4]) {
#if defined(__CUDACC__)
#if defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
        "f"(c[2]), "f"(c[3]));
#endif
#else
  pldr_emu::mma_m16n8k16<true>(d, a, b, c);
#endif
}
PLDR_DEVICE void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                  const float (&c)[4]) {
#if defined(__CUDACC__)
#if defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
        "f"(c[2]), "f"(c[3]));
#endif
#else
  pldr_emu::mma_m16n8k16<false>(d, a, b, c);
#endif
}
PLDR_DEVICE void mma_m16n8k16(Bf16, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  mma_m16n8k16_bf16(d, a, b, d);
}
PLDR_DEVICE void mma_m16n8k16(Fp16, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  mma_m16n8k16_f16(d, a, b, d);
}

// ------------------------------------------------------------------------------------------
// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16; `row` is this lane's row address (lanes
// 8j..8j+7 address the 8 rows of matrix j, 16 bytes each, 16-byte aligned).
// ------------------------------------------------------------------------------------------
PLDR_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#if defined(__CUDACC__)
#if defined(__CUDA_ARCH__)
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
#else
  pldr_emu::ldmatrix_x4(r, row, false);
#endif
}
PLDR_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
#if defined(__CUDACC__)
#if defined(__CUDA_ARCH__)
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
#else
  pldr_emu::ldmatrix_x4(r, row, true);
#endif
}

// ------------------------------------------------------------------------------------------
// cp.async: 16 bytes global -> shared, bypassing L1 (.cg). valid = false copies nothing and
// zero-fills the 16 destination bytes (src-size 0), for rows past the end of a tensor.
// ------------------------------------------------------------------------------------------
PLDR_DEVICE void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
#if defined(__CUDACC__)
#if defined(__CUDA_ARCH__)
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src),
               "r"(src_bytes));
#endif
#else
  pldr_emu::cp_async_16(smem_dst, gmem_src, valid ? 16u : 0u);
#endif
}
PLDR_DEVICE void cp_async_commit() {
#if defined(__CUDACC__)
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
#else
  pldr_emu::cp_async_commit();
#endif
}
// Wait until at most N of this thread's committed groups are still in flight. Other threads'
// copies become visible only after a barrier (__syncthreads) that follows their wait.
template <int N>
PLDR_DEVICE void cp_async_wait() {
#if defined(__CUDACC__)
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
#else
  pldr_emu::cp_async_wait(N);
#endif
}

}  // namespace pldr::cuda
