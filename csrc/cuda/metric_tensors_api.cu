// pldr::metric_tensors on CUDA (docs/design.md §3.1): input checks, device guard, params,
// workspaces, dispatch on q's dtype and the head dim, launch on the current stream. Device code and
// launch: metric_tensors_kernel.cuh. Everything after reading q is fp32 (docs/spec.md §5).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include "common/checks.h"
#include "common/dispatch.h"
#include "cuda/api.h"
#include "cuda/metric_tensors_kernel.cuh"

namespace pldr::cuda {
namespace {

// Static + dynamic shared memory of the row kernel above the default 48 KiB needs an opt-in, which
// the launch makes; F = 170 needs ~42 / ~47 KiB (d = 64 / 128), so only larger hidden sizes come
// this far, and a GPU whose limit is lower still gets an error that says what fits.
template <int D>
void check_row_kernel_smem_fits(int F) {
  const size_t needed = metric_rows_smem_bytes<D>(F);
  if (needed <= 48 * 1024) return;
  int device = 0, limit = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const size_t per_hidden = kMetricRowsPerBlock * sizeof(float);
  const size_t base = metric_rows_smem_bytes<D>(0);
  TORCH_CHECK(needed <= size_t(limit), "metric_tensors (CUDA): the hidden size F = ", F,
              " (w1.shape[2]) needs ", needed, " bytes of shared memory per block, more than the ",
              limit, " this GPU offers; F up to ",
              (size_t(limit) - std::min(base, size_t(limit))) / per_hidden,
              " is supported at d = ", D, ".");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> metric_tensors_cuda(
    const at::Tensor& q, const c10::optional<at::Tensor>& q_mask, const at::Tensor& ln0_w,
    const at::Tensor& ln0_b, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
    const at::Tensor& b2, const at::Tensor& w3, const at::Tensor& b3, const at::Tensor& lnA_w,
    const at::Tensor& lnA_b, const at::Tensor& W, const at::Tensor& b, const at::Tensor& pw,
    const at::Tensor& a, const at::Tensor& ba, double eps_ln, double eps_adj) {
  const auto dims = check_metric_tensors_inputs(q, q_mask, ln0_w, ln0_b, w1, b1, w2, b2, w3, b3,
                                                lnA_w, lnA_b, W, b, pw, a, ba, eps_ln, eps_adj);
  check_is_cuda(q, "metric_tensors");
  constexpr int64_t kMaxInt = std::numeric_limits<int>::max();
  TORCH_CHECK(dims.B <= kMaxGridDim && dims.H <= kMaxGridDim,
              "metric_tensors (CUDA) supports B and H up to ", kMaxGridDim, ", got B = ", dims.B,
              ", H = ", dims.H, ".");
  TORCH_CHECK(dims.S < kMaxInt && dims.F < kMaxInt && dims.R < kMaxInt && dims.Gd < kMaxInt &&
                  dims.B * dims.H * dims.d / kMetricRowsPerBlock < kMaxInt,
              "metric_tensors (CUDA): sizes must be below 2^31, got S = ", dims.S, ", F = ",
              dims.F, ", R = ", dims.R, ", Gd = ", dims.Gd, ".");
  c10::cuda::CUDAGuard guard(q.device());
  const auto f32 = q.options().dtype(at::kFloat);
  auto A = at::empty({dims.B, dims.H, dims.d, dims.d}, f32);
  auto A_LM = at::empty_like(A);
  auto G = at::empty_like(A);
  if (A.numel() == 0) return {A, A_LM, G};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  // Weights: contiguous views (no copy when they already are, as nn.Parameters are).
  const at::Tensor c_ln0_w = ln0_w.contiguous(), c_ln0_b = ln0_b.contiguous(),
                   c_w1 = w1.contiguous(), c_b1 = b1.contiguous(), c_w2 = w2.contiguous(),
                   c_b2 = b2.contiguous(), c_w3 = w3.contiguous(), c_b3 = b3.contiguous(),
                   c_lnA_w = lnA_w.contiguous(), c_lnA_b = lnA_b.contiguous(),
                   c_W = W.contiguous(), c_b = b.contiguous(), c_pw = pw.contiguous(),
                   c_a = a.contiguous(), c_ba = ba.contiguous();
  const int n_chunks = metric_qtq_chunks(int(dims.S));
  auto qtq_partial = at::empty({dims.B, dims.H, n_chunks, dims.d, dims.d}, f32);
  auto A_P = at::empty_like(A);

  MetricParams p{};
  p.q = strided_bshd(q);
  if (q_mask.has_value()) {
    p.q_mask = q_mask->data_ptr<bool>();
    p.q_mask_batch_stride = q_mask->stride(0);
    p.q_mask_row_stride = q_mask->stride(1);
  }
  p.ln0_w = c_ln0_w.data_ptr<float>();
  p.ln0_b = c_ln0_b.data_ptr<float>();
  p.w1 = c_w1.data_ptr<float>();
  p.b1 = c_b1.data_ptr<float>();
  p.w2 = c_w2.data_ptr<float>();
  p.b2 = c_b2.data_ptr<float>();
  p.w3 = c_w3.data_ptr<float>();
  p.b3 = c_b3.data_ptr<float>();
  p.lnA_w = c_lnA_w.data_ptr<float>();
  p.lnA_b = c_lnA_b.data_ptr<float>();
  p.W = c_W.data_ptr<float>();
  p.b = c_b.data_ptr<float>();
  p.pw = c_pw.data_ptr<float>();
  p.a = c_a.data_ptr<float>();
  p.ba = c_ba.data_ptr<float>();
  p.A = A.data_ptr<float>();
  p.A_LM = A_LM.data_ptr<float>();
  p.G = G.data_ptr<float>();
  p.qtq_partial = qtq_partial.data_ptr<float>();
  p.A_P = A_P.data_ptr<float>();
  p.B = int(dims.B), p.S = int(dims.S), p.H = int(dims.H);
  p.R = int(dims.R), p.Gd = int(dims.Gd), p.F = int(dims.F);
  p.n_chunks = n_chunks;
  p.eps_ln = float(eps_ln);
  p.eps_adj = float(eps_adj);

  PLDR_DTYPE_SWITCH(q.scalar_type(), Elements, T, [&] {
    PLDR_HEAD_DIM_SWITCH(dims.d, D, [&] {
      check_row_kernel_smem_fits<D>(p.F);
      launch_metric_tensors<T, D>(p, stream);
    });
  });
  return {A, A_LM, G};
}

}  // namespace
}  // namespace pldr::cuda

TORCH_LIBRARY_IMPL(pldr, CUDA, m) {
  m.impl("metric_tensors", &pldr::cuda::metric_tensors_cuda);
}
