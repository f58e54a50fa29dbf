// CPU emulation of CUDA SIMT device code (DESIGN.md §5): one std::thread per CUDA thread,
// __syncthreads as a std::barrier, warp shuffles through a per-warp exchange buffer. Blocks run one
// at a time (__shared__ becomes static), so keep emulated grids tiny. Compile kernels with
//   g++ -std=c++20 -O1 -g -pthread [-fsanitize=thread|address] -include cuda_cpu_shim.h ...
// Tensor-core instructions (mma.sync, ldmatrix, cp.async) are emulated in their own header.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
#define __launch_bounds__(...)
struct dim3 { unsigned x = 1, y = 1, z = 1; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
namespace cusim {
inline thread_local dim3 tIdx, bIdx;
inline dim3 bDim, gDim;
inline std::unique_ptr<std::barrier<>> block_bar;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
inline std::vector<float> warp_xchg;  // 32 slots per warp
inline unsigned linear_tid() { return tIdx.x + bDim.x * (tIdx.y + bDim.y * tIdx.z); }
template <class K, class... A>
void launch(dim3 grid, dim3 block, K kernel, A... args) {
  gDim = grid; bDim = block;
  const unsigned nthr = block.x * block.y * block.z, nwarps = (nthr + 31) / 32;
  for (unsigned bz = 0; bz < grid.z; ++bz) for (unsigned by = 0; by < grid.y; ++by) for (unsigned bx = 0; bx < grid.x; ++bx) {
    block_bar = std::make_unique<std::barrier<>>(nthr);
    warp_bars.clear();
    for (unsigned w = 0; w < nwarps; ++w) warp_bars.push_back(std::make_unique<std::barrier<>>(std::min(32u, nthr - 32 * w)));
    warp_xchg.assign(nwarps * 32, 0.f);
    std::vector<std::jthread> ts; ts.reserve(nthr);
    for (unsigned t = 0; t < nthr; ++t)
      ts.emplace_back([=] {
        tIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
        bIdx = dim3(bx, by, bz);
        kernel(args...);
        block_bar->arrive_and_drop();               // exited threads no longer block __syncthreads
        warp_bars[t / 32]->arrive_and_drop();
      });
  }
}
}  // namespace cusim
#define threadIdx (cusim::tIdx)
#define blockIdx (cusim::bIdx)
#define blockDim (cusim::bDim)
#define gridDim (cusim::gDim)
#define warpSize 32
inline void __syncthreads() { cusim::block_bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { cusim::warp_bars[cusim::linear_tid() / 32]->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int lane_mask, int = 32) {
  unsigned t = cusim::linear_tid(), w = t / 32, lane = t % 32;
  cusim::warp_xchg[w * 32 + lane] = v; __syncwarp();
  float r = cusim::warp_xchg[w * 32 + (lane ^ lane_mask)]; __syncwarp();
  return r;
}
inline float __expf(float x) { return std::exp(x); }
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
#define CUSIM_LAUNCH(kernel, grid, block, ...) cusim::launch(grid, block, kernel, __VA_ARGS__)
