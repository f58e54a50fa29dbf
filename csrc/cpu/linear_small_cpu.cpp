// pldr::linear_small / pldr::swiglu_small on the CPU (docs/design.md §3.9): y = x·Wᵀ·scale + bias
// and silu(x·W1ᵀ + b1)·(x·W2ᵀ + b2) for a few rows of x, streaming the weight (fp32, bf16 or int8
// with per-row fp32 scales) once per 8 rows. Threads split the output features evenly; the kernel
// is the one for cpu/isa.h's selected_isa() (the same run-time choice as every other CPU op).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <vector>

#include "common/checks.h"
#include "cpu/isa.h"
#include "cpu/linear_small.h"

namespace pldr::cpu {
namespace {

using linear_small::Args;
using linear_small::FeaturesFn;
using linear_small::WeightKind;

// The kernel for cpu/isa.h's selected_isa(), the one choice every CPU op follows.
FeaturesFn selected_kernel() {
#if defined(PLDR_WITH_ISA_VARIANTS)
  return for_isa(&linear_small::features_generic, &linear_small::features_avx2,
                 &linear_small::features_avx512);
#else
  return &linear_small::features_generic;  // a portable-only build, like PLDR_CPU_KERNEL's
#endif
}

}  // namespace

// How far ahead a one-row-at-a-time stream (bf16, int8 weights) prefetches, decided once per
// process: PLDR_KERNELS_ROW_PREFETCH=<bytes> (0 turns it off), else 4096 on Intel CPUs and 0
// elsewhere. On an Intel Xeon (2 threads, the 110M decode linears from DRAM, interleaved A/B)
// 4 KiB ahead streamed bf16 at 1.37x and int8 at 1.5–1.7x the rate without it (2–16 KiB alike;
// an NTA hint as slow as none); on an AMD EPYC Zen 4 the plain stream was the fastest way measured
// (§3.9), a prefetched one is unmeasured there. The bits do not depend on it.
int64_t row_prefetch_bytes() {
  static const int64_t bytes = [] {
    const char* env = std::getenv("PLDR_KERNELS_ROW_PREFETCH");
    if (env != nullptr && *env != '\0') {
      char* end = nullptr;
      const long long v = std::strtoll(env, &end, 10);
      TORCH_CHECK(*end == '\0' && v >= 0 && v <= (1 << 20), "PLDR_KERNELS_ROW_PREFETCH=", env,
                  ": expected a number of bytes from 0 to 1048576 (or unset: 4096 on Intel "
                  "CPUs, 0 on others)");
      return static_cast<int64_t>(v);
    }
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (__builtin_cpu_is("intel")) return int64_t{4096};
#endif
    return int64_t{0};
  }();
  return bytes;
}

namespace {

WeightKind kind_of(at::ScalarType t) {
  if (t == at::kBFloat16) return WeightKind::kBFloat16;
  if (t == at::kChar) return WeightKind::kInt8;
  return WeightKind::kFloat32;
}

// The rows of a [rows, cols] fp32 or bf16 tensor (any strides) in fp32, cols apart, by a
// plain loop: a bf16 model's x and bias are converted at every call, and the two dispatched copies
// that `.to(kFloat)` makes cost more than the conversion (bf16 → fp32 is exact either way).
std::vector<float> float_rows(const at::Tensor& t) {
  const int64_t rows = t.size(0), cols = t.size(1);
  std::vector<float> out(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r) {
    float* dst = out.data() + r * cols;
    const int64_t step = t.stride(1);
    if (t.scalar_type() == at::kBFloat16) {
      const c10::BFloat16* src = t.data_ptr<c10::BFloat16>() + r * t.stride(0);
      for (int64_t c = 0; c < cols; ++c) dst[c] = static_cast<float>(src[c * step]);
    } else {
      const float* src = t.data_ptr<float>() + r * t.stride(0);
      for (int64_t c = 0; c < cols; ++c) dst[c] = src[c * step];
    }
  }
  return out;
}

at::Tensor run(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
               const c10::optional<at::Tensor>& scale, bool swiglu) {
  const LinearSmallDims dims = check_linear_small_inputs(x, weight, bias, scale, swiglu);
  // Once per process; an invalid PLDR_KERNELS_ISA throws here at each call until it is fixed.
  static const FeaturesFn kernel = selected_kernel();
  const int64_t prefetch = row_prefetch_bytes();  // throws here too, at each call, until fixed
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = dims.features;
  at::Tensor y = at::empty(out_shape, x.options());
  if (dims.M == 0 || dims.features == 0) return y;
  if (dims.K == 0) return bias.has_value() && !swiglu ? y.copy_(bias->expand_as(y)) : y.zero_();

  // x in fp32, [M, K] rows ldx apart: in place when it is fp32 with rows ≥ K apart, else
  // converted once (M·K values, ≤ 8 rows); the bias in fp32, contiguous.
  const at::Tensor x2 = x.reshape({dims.M, dims.K});
  std::vector<float> x_copy, bias_copy;
  const bool x_in_place =
      x2.scalar_type() == at::kFloat && (x2.size(0) == 1 || x2.stride(0) >= dims.K);
  if (!x_in_place) x_copy = float_rows(x2);
  if (bias.has_value() && (bias->scalar_type() != at::kFloat || bias->stride(0) != 1)) {
    bias_copy = float_rows(bias->view({1, -1}));
  }
  const at::Tensor scale32 = scale.has_value() ? scale->contiguous() : at::Tensor();
  const at::Tensor& w = weight;

  Args a{};
  a.x = x_in_place ? x2.data_ptr<float>() : x_copy.data();
  a.M = dims.M;
  a.K = dims.K;
  a.ldx = x_in_place && x2.size(0) > 1 ? x2.stride(0) : dims.K;
  a.weight = w.data_ptr();
  a.weight_kind = kind_of(w.scalar_type());
  a.scale = scale32.defined() ? scale32.data_ptr<float>() : nullptr;
  a.bias = !bias.has_value() ? nullptr
           : bias_copy.empty() ? bias->data_ptr<float>() : bias_copy.data();
  a.y = y.data_ptr();
  a.y_bf16 = y.scalar_type() == at::kBFloat16;
  a.ldy = dims.features;
  a.features = dims.features;
  a.swiglu = swiglu;
  a.row_prefetch_bytes = prefetch;

  // Blocks of 8 features; a thread's share (one contiguous run of weight rows) must stream ≥ 64
  // KiB of weights, so a small layer runs on one thread instead of paying a fork for little work.
  constexpr int64_t kBlock = 8;
  const int64_t blocks = (dims.features + kBlock - 1) / kBlock;
  const int64_t block_bytes =
      kBlock * (swiglu ? 2 : 1) * dims.K * static_cast<int64_t>(w.element_size());
  const int64_t grain = std::max<int64_t>(1, (int64_t{64} << 10) / std::max<int64_t>(block_bytes, 1));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    kernel(a, b0 * kBlock, std::min(b1 * kBlock, dims.features));
  });
  return y;
}

at::Tensor linear_small_cpu(const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias,
                            const c10::optional<at::Tensor>& scale) {
  return run(x, weight, bias, scale, /*swiglu=*/false);
}

at::Tensor swiglu_small_cpu(const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias,
                            const c10::optional<at::Tensor>& scale) {
  return run(x, weight, bias, scale, /*swiglu=*/true);
}

}  // namespace
}  // namespace pldr::cpu

// What `python -m pldr_kernels` and pldr-bench print as the decode rows' prefetch distance
// (ctypes, like pldr_kernels_cpu_isa): row_prefetch_bytes(), or -1 when PLDR_KERNELS_ROW_PREFETCH
// is invalid.
extern "C" __attribute__((visibility("default"))) int64_t pldr_kernels_row_prefetch_bytes() {
  try {
    return pldr::cpu::row_prefetch_bytes();
  } catch (const c10::Error&) {
    return -1;
  }
}

TORCH_LIBRARY_IMPL(pldr, CPU, m) {
  m.impl("linear_small", &pldr::cpu::linear_small_cpu);
  m.impl("swiglu_small", &pldr::cpu::swiglu_small_cpu);
}
