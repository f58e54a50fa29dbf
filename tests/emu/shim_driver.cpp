// Emulation driver that checks the shim itself (tests/test_emu_shim.py): block barrier, early
// exit, dynamic shared memory, warp shuffles of several types and widths, bf16/fp16 conversions.
#include "driver_io.h"

#include <string>
#include <vector>

constexpr int kThreads = 96;  // three warps

__global__ void shuffles(int* xor5, int* xor9_w8, float* idx_w16, double* down3_w8, int* up2,
                         long long* bcast) {
  const int t = threadIdx.x, lane = t % 32;
  xor5[t] = __shfl_xor_sync(0xffffffffu, t * 10, 5);
  xor9_w8[t] = __shfl_xor_sync(0xffffffffu, t, 9, 8);
  idx_w16[t] = __shfl_sync(0xffffffffu, float(t) + 0.5f, 19, 16);
  down3_w8[t] = __shfl_down_sync(0xffffffffu, double(t) * 1.25, 3, 8);
  up2[t] = __shfl_up_sync(0xffffffffu, t, 2);
  bcast[t] = __shfl_sync(0xffffffffu, (long long)(t) << 33, 7);
  (void)lane;
}

// Two rounds through shared memory; a missing barrier would read stale or racing values.
__global__ void barrier_rounds(int* out) {
  __shared__ int s[kThreads];
  const int t = threadIdx.x;
  s[t] = t;
  __syncthreads();
  const int a = s[(t + 37) % kThreads];
  __syncthreads();
  s[t] = 1000 + a;
  __syncthreads();
  out[t] = s[(t + 5) % kThreads];
}

// Threads >= 40 leave early; the rest keep using __syncthreads (exited threads must not block).
__global__ void early_exit(int* out) {
  __shared__ int s[kThreads];
  const int t = threadIdx.x;
  if (t >= 40) return;
  s[t] = t * t;
  __syncthreads();
  int sum = 0;
  for (int i = 0; i < 40; ++i) sum += s[i];
  __syncthreads();
  out[t] = sum;
}

__global__ void dynamic_shared(int* out) {
  int* s = cuda_emu::dynamic_smem<int>();
  const int t = threadIdx.x;
  s[t] = 3 * t + blockIdx.x;
  __syncthreads();
  out[blockIdx.x * kThreads + t] = s[kThreads - 1 - t];
}

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  const std::string dir = argv[1];
  const auto P = emu_io::load_params(dir);
  std::vector<int> xor5(kThreads), xor9(kThreads), up2(kThreads), rounds(kThreads),
      early(kThreads, -1), dyn(2 * kThreads);
  std::vector<float> idx(kThreads);
  std::vector<double> down(kThreads);
  std::vector<long long> bcast(kThreads);
  cuda_emu::launch(dim3(1), dim3(kThreads), 0, shuffles, xor5.data(), xor9.data(), idx.data(),
                   down.data(), up2.data(), bcast.data());
  cuda_emu::launch(dim3(1), dim3(kThreads), 0, barrier_rounds, rounds.data());
  cuda_emu::launch(dim3(1), dim3(kThreads), 0, early_exit, early.data());
  cuda_emu::launch(dim3(2), dim3(kThreads), kThreads * sizeof(int), dynamic_shared, dyn.data());
  emu_io::write(dir, "xor5", xor5);
  emu_io::write(dir, "xor9_w8", xor9);
  emu_io::write(dir, "idx_w16", idx);
  emu_io::write(dir, "down3_w8", down);
  emu_io::write(dir, "up2", up2);
  emu_io::write(dir, "bcast", bcast);
  emu_io::write(dir, "rounds", rounds);
  emu_io::write(dir, "early", early);
  emu_io::write(dir, "dyn", dyn);
  // Conversions of the values in "floats" to bf16 / fp16 bits and back.
  const size_t n = size_t(P["n"]);
  auto floats = emu_io::read<float>(dir, "floats", n);
  std::vector<uint16_t> bf16_bits(n), fp16_bits(n);
  std::vector<float> bf16_back(n), fp16_back(n);
  for (size_t i = 0; i < n; ++i) {
    const __nv_bfloat16 b = __float2bfloat16(floats[i]);
    const __half h = __float2half(floats[i]);
    bf16_bits[i] = b.bits;
    fp16_bits[i] = h.bits;
    bf16_back[i] = __bfloat162float(b);
    fp16_back[i] = __half2float(h);
  }
  emu_io::write(dir, "bf16_bits", bf16_bits);
  emu_io::write(dir, "fp16_bits", fp16_bits);
  emu_io::write(dir, "bf16_back", bf16_back);
  emu_io::write(dir, "fp16_back", fp16_back);
  return 0;
}
