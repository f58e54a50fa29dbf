// Host-side helpers of the CUDA *_api.cu files (torch, c10/cuda; never included by device code or
// the emulator): the device checks every CUDA op makes after common/checks.h, the views that fill
// the params of cuda/params.h, the 16-byte-row test, and the SM count.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Optional.h>
#include <cuda_runtime.h>

#include <array>
#include <atomic>
#include <cstdint>

#include "cuda/params.h"

namespace pldr::cuda {

constexpr int64_t kMaxGridDim = 65535;  // grid.y and grid.z

inline void check_is_cuda(const at::Tensor& q, const char* op) {
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor for the CUDA kernel of ", op, ", got ",
              q.device(), ".");
}

// A [B, S, H, d] tensor as the kernels read it (strides in elements).
inline StridedBSHD strided_bshd(const at::Tensor& t) {
  return StridedBSHD{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

// An optional G [B or 1, H, d, d]; a G shared by the batch gets batch stride 0.
inline StridedG strided_g(const c10::optional<at::Tensor>& G) {
  if (!G.has_value()) return StridedG{nullptr, 0, 0, 0};
  return StridedG{G->data_ptr<float>(), G->size(0) == 1 ? 0 : G->stride(0), G->stride(1),
                  G->stride(2)};
}

// Whether every row of `t` starts on a 16-byte boundary (the data pointer and every stride but the
// last), as cp.async and 16-byte vector loads need.
inline bool rows_16B_aligned(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t dim = 0; dim + 1 < t.dim(); ++dim) {
    if (t.size(dim) > 1 && (t.stride(dim) * t.element_size()) % 16 != 0) return false;
  }
  return true;
}

// SM count of `device`, queried once per device (cudaDeviceGetAttribute does not synchronise).
inline int multiprocessor_count(int device) {
  static std::array<std::atomic<int>, 64> cached{};
  if (device >= 0 && device < int(cached.size())) {
    const int known = cached[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < int(cached.size())) cached[device].store(count);
  return count;
}

}  // namespace pldr::cuda
