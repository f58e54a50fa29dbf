// pldr::g_attention on CUDA (DESIGN.md §3.2): input checks, device guard, params, dispatch on
// dtype and head dim, launch on the current stream. Device code: g_attention_kernel.cuh.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "common/checks.h"
#include "cuda/g_attention_kernel.cuh"

namespace pldr::cuda {
namespace {

// cp.async moves 16-byte chunks: the rows of a 16-bit tensor must start on 16-byte boundaries.
bool rows_16B_aligned(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t dim = 0; dim + 1 < t.dim(); ++dim) {
    if (t.size(dim) > 1 && (t.stride(dim) * t.element_size()) % 16 != 0) return false;
  }
  return true;
}

// Strided views are used in place; only a layout the tensor-core path cannot read directly
// (rows not 16-byte aligned) is copied once into a fresh contiguous tensor.
at::Tensor readable_by_cp_async(const at::Tensor& t) {
  return rows_16B_aligned(t) ? t : t.clone(at::MemoryFormat::Contiguous);
}

template <int D, class Tag>
void launch_mma(const GAttentionParams& p, cudaStream_t stream) {
  using T = MmaTiling<D>;
  auto kernel = g_attention_mma_kernel<D, Tag>;
  if (T::kSmemBytes > 48 * 1024) {  // opt in to more than the default 48 KiB (per device)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        T::kSmemBytes));
  }
  kernel<<<T::grid(p), T::kThreads, T::kSmemBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int D>
void launch_fp32(const GAttentionParams& p, cudaStream_t stream) {
  g_attention_fp32_kernel<D><<<Fp32Tiling::grid(p), Fp32Tiling::kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> g_attention_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const c10::optional<at::Tensor>& G, const c10::optional<at::Tensor>& key_mask, bool causal,
    c10::optional<double> scale) {
  const auto dims = pldr::check_g_attention_inputs(q_in, k_in, v_in, G, key_mask, scale);
  TORCH_CHECK(q_in.is_cuda(), "q must be a CUDA tensor for the CUDA kernel of g_attention, got ",
              q_in.device(), ".");
  constexpr int64_t kMaxGrid = 65535, kMaxInt = std::numeric_limits<int>::max();
  TORCH_CHECK(dims.B <= kMaxGrid && dims.H <= kMaxGrid, "g_attention (CUDA) supports B and H up to ",
              kMaxGrid, ", got B = ", dims.B, ", H = ", dims.H, ".");
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
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.q_batch_stride = q.stride(0), p.q_row_stride = q.stride(1), p.q_head_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_row_stride = k.stride(1), p.k_head_stride = k.stride(2);
  p.v_batch_stride = v.stride(0), p.v_row_stride = v.stride(1), p.v_head_stride = v.stride(2);
  p.out_batch_stride = out.stride(0), p.out_row_stride = out.stride(1);
  p.out_head_stride = out.stride(2);
  if (G.has_value()) {
    p.G = G->data_ptr<float>();
    p.G_batch_stride = G->size(0) == 1 ? 0 : G->stride(0);
    p.G_head_stride = G->stride(1);
    p.G_row_stride = G->stride(2);
  }
  if (key_mask.has_value()) {
    p.key_mask = key_mask->data_ptr<bool>();
    p.key_mask_batch_stride = key_mask->stride(0);
    p.key_mask_key_stride = key_mask->stride(1);
  }
  p.B = static_cast<int>(dims.B), p.H = static_cast<int>(dims.H);
  p.Sq = static_cast<int>(dims.Sq), p.Sk = static_cast<int>(dims.Sk);
  p.scale = static_cast<float>(scale.has_value() ? *scale : 1.0 / std::sqrt(double(dims.d)));
  p.causal = causal;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool d64 = dims.d == 64;  // checks.h allows only 64 and 128
  switch (q.scalar_type()) {
    case at::kBFloat16:
      d64 ? launch_mma<64, Bf16>(p, stream) : launch_mma<128, Bf16>(p, stream);
      break;
    case at::kHalf:
      d64 ? launch_mma<64, Fp16>(p, stream) : launch_mma<128, Fp16>(p, stream);
      break;
    default:  // kFloat (checks.h allows nothing else)
      d64 ? launch_fp32<64>(p, stream) : launch_fp32<128>(p, stream);
      break;
  }
  return {out, lse};
}

}  // namespace
}  // namespace pldr::cuda

TORCH_LIBRARY_IMPL(pldr, CUDA, m) { m.impl("g_attention", &pldr::cuda::g_attention_cuda); }
