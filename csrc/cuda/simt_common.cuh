// Small device helpers shared by the SIMT kernels (decode, metric learner): element conversion to
// and from fp32, 16-byte vector loads, warp reductions and a launch macro that also runs under the
// CPU emulator (tools/cuda_emu, DESIGN.md §5). Device-side only; no torch headers.
#pragma once

#ifndef PLDR_CUDA_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#else
#include <cstring>
#endif
#include <cstdint>

namespace pldr_cuda {

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

// Copies 16 bytes (16 / sizeof(T) elements) from `src` to the register array `dst`. `src` must be
// 16-byte aligned; callers check that once on the host (`vec_ok` in the params).
template <class T>
__device__ __forceinline__ void load_16B(const T* src, T* dst) {
#ifdef PLDR_CUDA_EMULATION
  std::memcpy(dst, src, 16);
#else
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
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

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float sigmoid_f(float x) { return 1.0f / (1.0f + expf(-x)); }
// As PyTorch evaluates silu: x / (1 + exp(-x)).
__device__ __forceinline__ float silu_f(float x) { return x / (1.0f + expf(-x)); }

}  // namespace pldr_cuda

// Launch `kernel` (a variable holding a kernel function pointer, so template commas stay out of the
// macro) on `stream`; under the emulator blocks run one after another on CPU threads.
#ifdef PLDR_CUDA_EMULATION
#define PLDR_LAUNCH_KERNEL(kernel, grid, block, smem_bytes, stream, ...) \
  ((void)(stream), CUSIM_LAUNCH_SMEM(kernel, grid, block, smem_bytes, __VA_ARGS__))
#else
#define PLDR_LAUNCH_KERNEL(kernel, grid, block, smem_bytes, stream, ...) \
  kernel<<<grid, block, smem_bytes, stream>>>(__VA_ARGS__)
#endif
