// Compile-time dispatch on the activation dtype and the head dim, used by every backend (the
// pattern of FlashAttention-2's static_switch.h). checks.h has already refused any other dtype or
// head dim; the switches check again so that a missed check fails loudly, not silently.
//
//   PLDR_DTYPE_SWITCH(q.scalar_type(), Elements, T, [&] {
//     PLDR_HEAD_DIM_SWITCH(d, D, [&] { run_kernel<T, D>(...); });
//   });
//
// `Elements` names the backend's element types (a struct with members fp32, bf16, fp16):
// cpu::Elements (cpu/simd_f32x16.h: float, c10::BFloat16, c10::Half) and cuda::Elements
// (cuda/device.cuh: float, __nv_bfloat16, __half). The body is a lambda; the switch returns what
// it returns.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>

#define PLDR_DTYPE_SWITCH(DTYPE, ELEMENTS, T, ...)                                      \
  [&] {                                                                                 \
    const at::ScalarType pldr_dtype_ = (DTYPE);                                         \
    if (pldr_dtype_ == at::kFloat) {                                                    \
      using T = typename ELEMENTS::fp32;                                                \
      return __VA_ARGS__();                                                             \
    }                                                                                   \
    if (pldr_dtype_ == at::kBFloat16) {                                                 \
      using T = typename ELEMENTS::bf16;                                                \
      return __VA_ARGS__();                                                             \
    }                                                                                   \
    TORCH_CHECK(pldr_dtype_ == at::kHalf, "pldr: unsupported activation dtype ",         \
                pldr_dtype_, " (float32, bfloat16 and float16 are instantiated).");     \
    using T = typename ELEMENTS::fp16;                                                  \
    return __VA_ARGS__();                                                               \
  }()

#define PLDR_HEAD_DIM_SWITCH(HEAD_DIM, D, ...)                                          \
  [&] {                                                                                 \
    const int64_t pldr_head_dim_ = (HEAD_DIM);                                          \
    if (pldr_head_dim_ == 64) {                                                         \
      static constexpr int D = 64;                                                      \
      return __VA_ARGS__();                                                             \
    }                                                                                   \
    TORCH_CHECK(pldr_head_dim_ == 128, "pldr: unsupported head dim ", pldr_head_dim_,   \
                " (64 and 128 are instantiated).");                                     \
    static constexpr int D = 128;                                                       \
    return __VA_ARGS__();                                                               \
  }()
