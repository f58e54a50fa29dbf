// How the metric kernels read q (metric_tensors_cpu.cpp and its backward): the rows of one
// (b, h) as fp32, masked rows left out in order, or in place when nothing needs converting.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace pldr::cpu {
inline namespace PLDR_ISA_NAMESPACE {  // one copy per ISA (cpu/isa.h)

// q_mask [B, S] read through its strides; ptr = nullptr: every row is real.
struct QueryMask {
  const bool* ptr = nullptr;
  int64_t batch_stride = 0, row_stride = 0;
};

// q can be read in place (no gather) when it is fp32 with contiguous rows and no row is masked.
inline bool queries_in_place(const at::Tensor& q, const QueryMask& mask) {
  return q.scalar_type() == at::kFloat && q.stride(3) == 1 && mask.ptr == nullptr;
}

// q[b, :, h, :] → Qs [S_kept][d] fp32 (masked rows left out, order kept: a padded row's
// reduction is then identical to the unpadded one) and, when positions is given, the position s
// of each kept row. Returns S_kept.
template <typename T>
int64_t gather_queries(const at::Tensor& q, const QueryMask& mask, int64_t b, int64_t h, float* Qs,
                       int64_t* positions = nullptr) {
  const int64_t S = q.size(1), d = q.size(3);
  const T* base = q.data_ptr<T>() + b * q.stride(0) + h * q.stride(2);
  int64_t kept = 0;
  for (int64_t s = 0; s < S; ++s) {
    if (mask.ptr != nullptr && !mask.ptr[b * mask.batch_stride + s * mask.row_stride]) continue;
    const T* src = base + s * q.stride(1);
    float* dst = Qs + kept * d;
    for (int64_t j = 0; j < d; ++j) dst[j] = static_cast<float>(src[j]);
    if (positions != nullptr) positions[kept] = s;
    ++kept;
  }
  return kept;
}

}  // namespace PLDR_ISA_NAMESPACE
}  // namespace pldr::cpu
