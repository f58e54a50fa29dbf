// pldr::g_attention on CUDA (docs/design.md §3.2): input checks, device guard, params, dispatch on
// dtype and head dim, launch on the current stream. Device code and launch:
// g_attention_kernel.cuh.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "common/checks.h"
#include "common/dispatch.h"
#include "cuda/api.h"
#include "cuda/g_attention_kernel.cuh"

namespace pldr::cuda {
namespace {

// Strided views are used in place; only a layout the tensor-core path cannot read directly
// (rows not 16-byte aligned) is copied once into a fresh contiguous tensor.
at::Tensor readable_by_cp_async(const at::Tensor& t) {
  return rows_16B_aligned(t) ? t : t.clone(at::MemoryFormat::Contiguous);
}

std::tuple<at::Tensor, at::Tensor> g_attention_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const c10::optional<at::Tensor>& G, const c10::optional<at::Tensor>& key_mask, bool causal,
    c10::optional<double> scale) {
  const auto dims = check_g_attention_inputs(q_in, k_in, v_in, G, key_mask, scale);
  check_is_cuda(q_in, "g_attention");
  constexpr int64_t kMaxInt = std::numeric_limits<int>::max();
  TORCH_CHECK(dims.B <= kMaxGridDim && dims.H <= kMaxGridDim,
              "g_attention (CUDA) supports B and H up to ", kMaxGridDim, ", got B = ", dims.B,
              ", H = ", dims.H, ".");
  TORCH_CHECK(dims.Sq < kMaxInt && dims.Sk < kMaxInt, "g_attention (CUDA): sequence lengths must",
              " be below 2^31, got Sq = ", dims.Sq, ", Sk = ", dims.Sk, ".");
  c10::cuda::CUDAGuard guard(q_in.device());

  auto out = at::empty({dims.B, dims.Sq, dims.H, dims.d}, q_in.options());
  auto lse = at::empty({dims.B, dims.H, dims.Sq}, q_in.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};

  const bool tensor_cores = q_in.scalar_type() != at::kFloat;
  const at::Tensor q = tensor_cores ? readable_by_cp_async(q_in) : q_in;
  const at::Tensor k = tensor_cores ? readable_by_cp_async(k_in) : k_in;
  const at::Tensor v = tensor_cores ? readable_by_cp_async(v_in) : v_in;

  GAttentionParams p{};
  p.q = strided_bshd(q);
  p.k = strided_bshd(k);
  p.v = strided_bshd(v);
  p.out = strided_bshd(out);
  p.lse = lse.data_ptr<float>();
  p.G = strided_g(G);
  if (key_mask.has_value()) {
    p.key_mask = key_mask->data_ptr<bool>();
    p.key_mask_batch_stride = key_mask->stride(0);
    p.key_mask_row_stride = key_mask->stride(1);
  }
  p.B = static_cast<int>(dims.B), p.H = static_cast<int>(dims.H);
  p.Sq = static_cast<int>(dims.Sq), p.Sk = static_cast<int>(dims.Sk);
  p.kv_group = static_cast<int>(dims.H / dims.H_kv);
  p.scale = static_cast<float>(scale.has_value() ? *scale : 1.0 / std::sqrt(double(dims.d)));
  p.causal = causal;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  PLDR_DTYPE_SWITCH(q.scalar_type(), Elements, T, [&] {
    PLDR_HEAD_DIM_SWITCH(dims.d, D, [&] { launch_g_attention<T, D>(p, stream); });
  });
  return {out, lse};
}

}  // namespace
}  // namespace pldr::cuda

TORCH_LIBRARY_IMPL(pldr, CUDA, m) { m.impl("g_attention", &pldr::cuda::g_attention_cuda); }
