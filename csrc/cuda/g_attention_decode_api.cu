// pldr::g_attention_decode on CUDA (docs/design.md §3.3): input checks, device guard, params, split
// choice, workspace, dispatch on dtype and head dim, launch on the current stream. Device code and
// launch: g_attention_decode_kernel.cuh.
//
// No host synchronisation: cache_seqlens / cache_start stay on the device. The bound
// cache_seqlens + Sn <= Smax is therefore enforced by the kernel, not here: a row that would be
// written past the end of the cache is not written at all and its outputs are NaN (the CPU
// backend raises instead; see the kernel header).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "common/checks.h"
#include "common/dispatch.h"
#include "cuda/api.h"
#include "cuda/g_attention_decode_kernel.cuh"

namespace pldr::cuda {
namespace {

at::Tensor g_attention_decode_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                                   const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                   const c10::optional<at::Tensor>& k_new,
                                   const c10::optional<at::Tensor>& v_new,
                                   const c10::optional<at::Tensor>& cache_start,
                                   const c10::optional<at::Tensor>& G,
                                   c10::optional<double> scale, int64_t num_splits) {
  const auto dims = check_g_attention_decode_inputs(q, k_cache, v_cache, cache_seqlens, k_new,
                                                    v_new, cache_start, G, scale, num_splits);
  check_is_cuda(q, "g_attention_decode");
  const int64_t query_chunks = decode_query_chunks(int(std::min<int64_t>(dims.Sn, kMaxGridDim)));
  TORCH_CHECK(dims.B <= kMaxGridDim && dims.H * query_chunks <= kMaxGridDim &&
                  dims.Sn <= kMaxGridDim,
              "g_attention_decode (CUDA) supports B, Sn and H·(query chunks of 4) up to ",
              kMaxGridDim, ", got B = ", dims.B, ", Sn = ", dims.Sn, ", H = ", dims.H, ".");
  TORCH_CHECK(dims.Smax < std::numeric_limits<int>::max() - dims.Sn,
              "g_attention_decode (CUDA): the cache length Smax must be below 2^31 - Sn, got ",
              dims.Smax, ".");
  c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty({dims.B, dims.Sn, dims.H, dims.d}, q.options());
  if (out.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  DecodeParams p{};
  p.q = strided_bshd(q);
  p.k_cache = strided_bshd(k_cache);
  p.v_cache = strided_bshd(v_cache);
  if (k_new.has_value()) {
    p.k_new = strided_bshd(*k_new);
    p.v_new = strided_bshd(*v_new);
  }
  p.out = strided_bshd(out);
  p.G = strided_g(G);
  p.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  p.cache_seqlens_batch_stride = cache_seqlens.stride(0);
  if (cache_start.has_value()) {
    p.cache_start = cache_start->data_ptr<int32_t>();
    p.cache_start_batch_stride = cache_start->stride(0);
  }
  p.B = int(dims.B);
  p.Sn = int(dims.Sn);
  p.Smax = int(dims.Smax);
  p.H = int(dims.H);
  p.kv_group = int(dims.H / dims.H_kv);
  p.scale = float(scale.value_or(1.0 / std::sqrt(double(dims.d))));
  p.vec_ok = rows_16B_aligned(k_cache) && rows_16B_aligned(v_cache) &&
             (!k_new.has_value() || (rows_16B_aligned(*k_new) && rows_16B_aligned(*v_new)));
  p.num_splits = choose_decode_splits(p.B, p.H, p.Sn, p.Smax,
                                      multiprocessor_count(q.get_device()), num_splits);
  p.q_chunks = decode_query_chunks(p.Sn);
  at::Tensor o_partial, lse_partial;
  if (p.num_splits > 1) {  // caching allocator on the current stream: fine under CUDA graphs
    const auto f32 = q.options().dtype(at::kFloat);
    o_partial = at::empty({dims.B, dims.Sn, dims.H, p.num_splits, dims.d}, f32);
    lse_partial = at::empty({dims.B, dims.Sn, dims.H, p.num_splits}, f32);
    p.o_partial = o_partial.data_ptr<float>();
    p.lse_partial = lse_partial.data_ptr<float>();
  }

  PLDR_DTYPE_SWITCH(q.scalar_type(), Elements, T, [&] {
    PLDR_HEAD_DIM_SWITCH(dims.d, D, [&] { launch_g_attention_decode<T, D>(p, stream); });
  });
  return out;
}

}  // namespace
}  // namespace pldr::cuda

TORCH_LIBRARY_IMPL(pldr, CUDA, m) {
  m.impl("g_attention_decode", &pldr::cuda::g_attention_decode_cuda);
}
