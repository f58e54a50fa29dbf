// CPU emulation of CUDA SIMT device code (docs/design.md §5): one std::thread per CUDA thread,
// __syncthreads as a std::barrier, warp shuffles through a per-warp exchange buffer. Blocks run one
// at a time (__shared__ becomes static), so keep emulated grids tiny. Compile kernels with
//   g++ -std=c++20 -O1 -g -pthread [-fsanitize=thread|address] -include cuda_cpu_shim.h ...
// (tools/cuda_emu/harness.py does). This header defines PLDR_CUDA_EMULATION, the one switch the
// kernel headers test (csrc/cuda/device.cuh), and cuda_emu::launch(grid, block, smem_bytes,
// kernel, args...), which csrc's PLDR_LAUNCH_KERNEL becomes. Tensor-core instructions (mma.sync,
// ldmatrix, cp.async) are emulated in mma_emu.h. Everything of the emulator lives in namespace
// cuda_emu; the CUDA built-ins keep their CUDA names.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#define PLDR_CUDA_EMULATION 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __restrict__ __restrict
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
typedef struct CUstream_st* cudaStream_t;

namespace cuda_emu {
inline thread_local dim3 tIdx, bIdx;
inline dim3 bDim, gDim;
inline std::unique_ptr<std::barrier<>> block_bar;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
inline std::vector<uint64_t> warp_xchg;  // 32 slots per warp, for shuffles
// Dynamic shared memory of the running launch, refilled with 0xFF (NaN in fp32, bf16 and fp16)
// before every block, so a read of never-written shared memory shows up instead of silently
// reusing the previous block's data. Kernels reach it through dynamic_smem().
inline std::vector<std::max_align_t> dyn_smem;
inline size_t dyn_smem_bytes = 0;

inline unsigned linear_tid() { return tIdx.x + bDim.x * (tIdx.y + bDim.y * tIdx.z); }
inline unsigned lane_id() { return linear_tid() % 32; }
template <class T = unsigned char>
T* dynamic_smem() {
  return reinterpret_cast<T*>(dyn_smem.data());
}

// Runs kernel(args...) for every block of `grid` in turn, one thread per CUDA thread of `block`,
// with `smem_bytes` of dynamic shared memory.
template <class K, class... A>
void launch(dim3 grid, dim3 block, size_t smem_bytes, K kernel, A... args) {
  gDim = grid;
  bDim = block;
  dyn_smem.assign((smem_bytes + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t) + 1,
                  std::max_align_t{});
  dyn_smem_bytes = smem_bytes;
  const unsigned nthr = block.x * block.y * block.z, nwarps = (nthr + 31) / 32;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        block_bar = std::make_unique<std::barrier<>>(nthr);
        warp_bars.clear();
        for (unsigned w = 0; w < nwarps; ++w)
          warp_bars.push_back(std::make_unique<std::barrier<>>(std::min(32u, nthr - 32 * w)));
        warp_xchg.assign(nwarps * 32, 0);
        std::memset(dyn_smem.data(), 0xFF, dyn_smem_bytes);
        std::vector<std::jthread> ts;
        ts.reserve(nthr);
        for (unsigned t = 0; t < nthr; ++t)
          ts.emplace_back([=] {
            tIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            bIdx = dim3(bx, by, bz);
            kernel(args...);
            block_bar->arrive_and_drop();  // exited threads no longer block __syncthreads
            warp_bars[t / 32]->arrive_and_drop();
          });
      }
}
}  // namespace cuda_emu

#define threadIdx (cuda_emu::tIdx)
#define blockIdx (cuda_emu::bIdx)
#define blockDim (cuda_emu::bDim)
#define gridDim (cuda_emu::gDim)
#define warpSize 32

inline void __syncthreads() { cuda_emu::block_bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) {
  cuda_emu::warp_bars[cuda_emu::linear_tid() / 32]->arrive_and_wait();
}

// ---------------------------------------------------------------------------------------------
// Warp shuffles of any trivially copyable type up to 8 bytes. Width < 32 splits the warp into
// segments of `width` lanes, as on the GPU (CUDA Programming Guide, warp shuffle functions): xor
// may read earlier segments, but a source in a later segment returns the caller's own value; idx
// wraps inside the segment; up/down do not cross it.
// ---------------------------------------------------------------------------------------------
namespace cuda_emu {
template <class T>
T warp_exchange(T v, unsigned src_lane) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffle of a type > 8 bytes");
  const unsigned t = linear_tid(), w = t / 32, lane = t % 32;
  uint64_t slot = 0;
  std::memcpy(&slot, &v, sizeof(T));
  warp_xchg[w * 32 + lane] = slot;
  __syncwarp();
  const uint64_t got = warp_xchg[w * 32 + src_lane];
  __syncwarp();
  T r;
  std::memcpy(&r, &got, sizeof(T));
  return r;
}
}  // namespace cuda_emu

template <class T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask, int width = 32) {
  const unsigned lane = cuda_emu::lane_id();
  unsigned src = (lane ^ unsigned(lane_mask)) & 31u;
  if ((src & ~unsigned(width - 1)) > (lane & ~unsigned(width - 1))) src = lane;
  return cuda_emu::warp_exchange(v, src);
}
template <class T>
inline T __shfl_sync(unsigned, T v, int src_lane, int width = 32) {
  const unsigned lane = cuda_emu::lane_id();
  return cuda_emu::warp_exchange(
      v, (lane & ~unsigned(width - 1)) + unsigned(src_lane) % unsigned(width));
}
template <class T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
  const unsigned lane = cuda_emu::lane_id(), seg = lane & ~unsigned(width - 1);
  const unsigned src = (lane - seg) + delta < unsigned(width) ? lane + delta : lane;
  return cuda_emu::warp_exchange(v, src);
}
template <class T>
inline T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
  const unsigned lane = cuda_emu::lane_id(), seg = lane & ~unsigned(width - 1);
  const unsigned src = lane - seg >= delta ? lane - delta : lane;
  return cuda_emu::warp_exchange(v, src);
}

// ---------------------------------------------------------------------------------------------
// Vector types, math intrinsics, atomics, and CUDA's global integer / float min and max
// ---------------------------------------------------------------------------------------------
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(8) uint2 { unsigned x, y; };

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float exp2f(float x) { return std::exp2(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
template <class T>
inline T __ldg(const T* p) { return *p; }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  return std::atomic_ref<unsigned>(*p).fetch_add(v);
}

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }

// ---------------------------------------------------------------------------------------------
// 16-bit floats: IEEE round-to-nearest-even conversions (what cvt.rn does on the GPU), used by the
// emulated __float2bfloat16 / __float2half below and by mma_emu.h.
// ---------------------------------------------------------------------------------------------
namespace cuda_emu {
inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // qNaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float bf16_bits_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_half_bits(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);   // NaN
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
  const uint32_t e = a >> 23;
  if (e >= 113) {  // normal half (>= 2^-14)
    const uint32_t mant = a & 0x7fffffu;
    uint32_t h = ((e - 112) << 10) | (mant >> 13);
    const uint32_t rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is right
    return static_cast<uint16_t>(sign | h);
  }
  if (e < 102) return static_cast<uint16_t>(sign);  // below 2^-25: rounds to zero
  // Subnormal half: value = m * 2^(e-150), unit 2^-24, so h = m >> (126 - e), rounded to even.
  const uint32_t m = (a & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126 - e;
  uint32_t h = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
  if (rem > half || (rem == half && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0x1f) return bits_float(sign | 0x7f800000u | (m << 13));
  if (e == 0) {  // zero or subnormal: m * 2^-24
    const float v = static_cast<float>(m) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return bits_float(sign | ((e + 112) << 23) | (m << 13));
}
}  // namespace cuda_emu

// bf16 / fp16 storage types with the cuda_bf16.h / cuda_fp16.h conversion names.
struct __nv_bfloat16 { uint16_t bits; };
struct __half { uint16_t bits; };
inline float __bfloat162float(__nv_bfloat16 h) { return cuda_emu::bf16_bits_to_float(h.bits); }
inline __nv_bfloat16 __float2bfloat16(float f) { return {cuda_emu::float_to_bf16_bits(f)}; }
inline float __half2float(__half h) { return cuda_emu::half_bits_to_float(h.bits); }
inline __half __float2half(float f) { return {cuda_emu::float_to_half_bits(f)}; }
