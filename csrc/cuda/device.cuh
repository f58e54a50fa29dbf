// What every CUDA kernel header includes: the one emulation switch, the element types, fp32
// conversions, 16-byte loads, warp reductions, and the launch macros that also run under the CPU
// emulator (tools/cuda_emu, docs/design.md §5).
//
// Emulation switch: PLDR_CUDA_EMULATION, defined by tools/cuda_emu/cuda_cpu_shim.h (which the
// harness force-includes before any kernel header). Kernel code tests nothing else; it is written
// in plain CUDA (__device__, __shared__, __syncthreads, ...), which the shim maps onto CPU threads.
// Under nvcc the launch macros also check the launch (c10), so host launch code may live in the
// kernel headers and serve both builds.
#pragma once

#ifndef PLDR_CUDA_EMULATION
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#else
#include <cstring>
#endif
#include <cstddef>
#include <cstdint>

#include "common/numerics.h"
#include "cuda/params.h"

// Launches `kernel` (a variable holding a kernel function pointer, so that template commas stay
// out of the macro) on `stream` and checks the launch; under the emulator the blocks run one
// after another on CPU threads.
#ifdef PLDR_CUDA_EMULATION
#define PLDR_LAUNCH_KERNEL(kernel, grid, block, smem_bytes, stream, ...) \
  do {                                                                  \
    (void)(stream);                                                     \
    cuda_emu::launch(grid, block, smem_bytes, kernel, __VA_ARGS__);     \
  } while (0)
// Dynamic shared memory: extern __shared__ on the GPU, the launch's buffer in the emulator.
#define PLDR_DYNAMIC_SMEM(name) unsigned char* name = cuda_emu::dynamic_smem()
#else
#define PLDR_LAUNCH_KERNEL(kernel, grid, block, smem_bytes, stream, ...) \
  do {                                                                  \
    kernel<<<grid, block, smem_bytes, stream>>>(__VA_ARGS__);           \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                     \
  } while (0)
#define PLDR_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace pldr::cuda {

// The element types of the CUDA kernels, for PLDR_DTYPE_SWITCH (common/dispatch.h).
struct Elements {
  using fp32 = float;
  using bf16 = __nv_bfloat16;
  using fp16 = __half;
};

// Lets `kernel` use `dynamic_bytes` of dynamic shared memory when, with its `static_bytes`, the
// block needs more than the default 48 KiB (a per-kernel opt-in; nothing to do in the emulator).
template <class Kernel>
inline void allow_dynamic_smem(Kernel kernel, size_t dynamic_bytes, size_t static_bytes = 0) {
#ifndef PLDR_CUDA_EMULATION
  if (dynamic_bytes + static_bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        int(dynamic_bytes)));
  }
#else
  (void)kernel, (void)dynamic_bytes, (void)static_bytes;
#endif
}

// The (b, h) slice of a [B, S, H, d] tensor as T*: row s starts at the result + s·t.row_stride.
template <class T>
__device__ __forceinline__ T* head_rows(const StridedBSHD& t, int b, int h) {
  return static_cast<T*>(t.ptr) + b * t.batch_stride + h * t.head_stride;
}

// G[b, h] (row r at the result + r·G.row_stride), or nullptr when there is no G.
__device__ __forceinline__ const float* head_matrix(const StridedG& G, int b, int h) {
  return G.ptr != nullptr ? G.ptr + b * G.batch_stride + h * G.head_stride : nullptr;
}

// ------------------------------------------------------------------------------------------
// Element conversions (round to nearest even)
// ------------------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }

// ------------------------------------------------------------------------------------------
// 16-byte loads
// ------------------------------------------------------------------------------------------
using Vec16 = uint4;  // one 16-byte vector load / store

// Copies 16 bytes (16 / sizeof(T) elements) from `src` to the register array `dst`. `src` must be
// 16-byte aligned; callers check that once on the host (`vec_ok` in the params).
template <class T>
__device__ __forceinline__ void load_16B(const T* src, T* dst) {
#ifdef PLDR_CUDA_EMULATION
  std::memcpy(dst, src, 16);
#else
  *reinterpret_cast<Vec16*>(dst) = *reinterpret_cast<const Vec16*>(src);
#endif
}

// Loads n consecutive elements as fp32: one 16-byte load per 16 / sizeof(T) elements when
// `vectorized`, element by element otherwise (a block-uniform branch).
template <class T, int N>
__device__ __forceinline__ void load_as_float(const T* src, bool vectorized, float (&dst)[N]) {
  constexpr int kPerLoad = 16 / int(sizeof(T));
  static_assert(N % kPerLoad == 0, "N must be a multiple of the elements per 16-byte load");
  if (vectorized) {
#pragma unroll
    for (int c = 0; c < N / kPerLoad; ++c) {
      alignas(16) T raw[kPerLoad];
      load_16B(src + c * kPerLoad, raw);
#pragma unroll
      for (int e = 0; e < kPerLoad; ++e) dst[c * kPerLoad + e] = to_float(raw[e]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) dst[e] = to_float(src[e]);
  }
}

// ------------------------------------------------------------------------------------------
// Warp reductions (butterfly: every lane ends with the result) and activations
// ------------------------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// As PyTorch evaluates silu: x / (1 + exp(-x)).
__device__ __forceinline__ float silu_f(float x) { return x / (1.0f + expf(-x)); }

}  // namespace pldr::cuda
