// pldr::g_attention_decode on CUDA (DESIGN.md §3.3): input checks, device guard, params, split
// choice, workspace, dispatch on dtype and head dim, launch on the current stream. Device code and
// launch logic: g_attention_decode_kernel.cuh.
//
// No host synchronisation: cache_seqlens / cache_start stay on the device. The bound
// cache_seqlens + Sn <= Smax is therefore enforced by the kernel, not here: a row that would be
// written past the end of the cache is not written at all and its outputs are NaN (the CPU
// backend raises instead; see the kernel header).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>

#include "common/checks.h"
#include "cuda/g_attention_decode_kernel.cuh"

namespace pldr::cuda_decode {
namespace {

// SM count of `device`, queried once per device (cudaDeviceGetAttribute does not synchronise).
int multiprocessor_count(int device) {
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

// 16-byte loads need every row of the tensor to start on a 16-byte boundary.
bool rows_16B_aligned(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t dim = 0; dim + 1 < t.dim(); ++dim) {
    if (t.size(dim) > 1 && (t.stride(dim) * t.element_size()) % 16 != 0) return false;
  }
  return true;
}

template <class T>
void dispatch_head_dim(const pldr_cuda::DecodeParams& p, cudaStream_t stream) {
  if (p.d == 64) {
    pldr_cuda::launch_g_attention_decode<T, 64>(p, stream);
  } else {
    pldr_cuda::launch_g_attention_decode<T, 128>(p, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor g_attention_decode_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                                   const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                   const c10::optional<at::Tensor>& k_new,
                                   const c10::optional<at::Tensor>& v_new,
                                   const c10::optional<at::Tensor>& cache_start,
                                   const c10::optional<at::Tensor>& G,
                                   c10::optional<double> scale, int64_t num_splits) {
  const auto dims = pldr::check_g_attention_decode_inputs(q, k_cache, v_cache, cache_seqlens,
                                                          k_new, v_new, cache_start, G, scale,
                                                          num_splits);
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor for the CUDA kernel of g_attention_decode, got ",
              q.device(), ".");
  constexpr int64_t kMaxGrid = 65535;
  TORCH_CHECK(dims.B <= kMaxGrid && dims.H * pldr_cuda::decode_query_chunks(int(std::min<int64_t>(
                                        dims.Sn, kMaxGrid))) <= kMaxGrid && dims.Sn <= kMaxGrid,
              "g_attention_decode (CUDA) supports B, Sn and H·(query chunks of 4) up to ", kMaxGrid,
              ", got B = ", dims.B, ", Sn = ", dims.Sn, ", H = ", dims.H, ".");
  TORCH_CHECK(dims.Smax < std::numeric_limits<int>::max() - dims.Sn,
              "g_attention_decode (CUDA): the cache length Smax must be below 2^31 - Sn, got ",
              dims.Smax, ".");
  c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty({dims.B, dims.Sn, dims.H, dims.d}, q.options());
  if (out.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  pldr_cuda::DecodeParams p{};
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  const at::Tensor lens = cache_seqlens.contiguous();
  const at::Tensor starts = cache_start.has_value() ? cache_start->contiguous() : at::Tensor();
  p.cache_seqlens = lens.data_ptr<int32_t>();
  p.cache_start = cache_start.has_value() ? starts.data_ptr<int32_t>() : nullptr;
  p.k_new = k_new.has_value() ? k_new->data_ptr() : nullptr;
  p.v_new = v_new.has_value() ? v_new->data_ptr() : nullptr;
  p.G = G.has_value() ? G->data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  p.B = int(dims.B);
  p.Sn = int(dims.Sn);
  p.Smax = int(dims.Smax);
  p.H = int(dims.H);
  p.d = int(dims.d);
  p.q_sb = q.stride(0), p.q_ss = q.stride(1), p.q_sh = q.stride(2);
  p.kc_sb = k_cache.stride(0), p.kc_ss = k_cache.stride(1), p.kc_sh = k_cache.stride(2);
  p.vc_sb = v_cache.stride(0), p.vc_ss = v_cache.stride(1), p.vc_sh = v_cache.stride(2);
  if (k_new.has_value()) {
    p.kn_sb = k_new->stride(0), p.kn_ss = k_new->stride(1), p.kn_sh = k_new->stride(2);
    p.vn_sb = v_new->stride(0), p.vn_ss = v_new->stride(1), p.vn_sh = v_new->stride(2);
  }
  p.out_sb = out.stride(0), p.out_ss = out.stride(1), p.out_sh = out.stride(2);
  if (G.has_value()) {
    p.G_sb = G->size(0) == 1 ? 0 : G->stride(0);
    p.G_sh = G->stride(1);
    p.G_sr = G->stride(2);
  }
  p.scale = float(scale.value_or(1.0 / std::sqrt(double(dims.d))));
  p.vec_ok = rows_16B_aligned(k_cache) && rows_16B_aligned(v_cache) &&
             (!k_new.has_value() || (rows_16B_aligned(*k_new) && rows_16B_aligned(*v_new)));
  p.num_splits = pldr_cuda::choose_decode_splits(p.B, p.H, p.Sn, p.Smax,
                                                 multiprocessor_count(q.get_device()), num_splits);
  p.q_chunks = pldr_cuda::decode_query_chunks(p.Sn);
  at::Tensor o_partial, lse_partial;
  if (p.num_splits > 1) {  // caching allocator on the current stream: fine under CUDA graphs
    const auto f32 = q.options().dtype(at::kFloat);
    o_partial = at::empty({dims.B, dims.Sn, dims.H, p.num_splits, dims.d}, f32);
    lse_partial = at::empty({dims.B, dims.Sn, dims.H, p.num_splits}, f32);
    p.o_partial = o_partial.data_ptr<float>();
    p.lse_partial = lse_partial.data_ptr<float>();
  }

  switch (q.scalar_type()) {
    case at::kFloat: dispatch_head_dim<float>(p, stream); break;
    case at::kBFloat16: dispatch_head_dim<__nv_bfloat16>(p, stream); break;
    case at::kHalf: dispatch_head_dim<__half>(p, stream); break;
    default: TORCH_CHECK(false, "unreachable: dtype checked above");
  }
  return out;
}

}  // namespace
}  // namespace pldr::cuda_decode

TORCH_LIBRARY_IMPL(pldr, CUDA, m) {
  m.impl("g_attention_decode", &pldr::cuda_decode::g_attention_decode_cuda);
}
