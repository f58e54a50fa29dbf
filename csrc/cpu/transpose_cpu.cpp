// CPU kernel of pldr::transpose_2d (docs/design.md §3.11): x.t().contiguous() of a 2-D fp32
// tensor, for the training step's weight gradients (layers._weight_grad: oneDNN's matmul reads its
// first operand contiguous, so dW = gradᵀ·x needs one operand transposed into a copy). torch's
// transposed copy of a 2-D tensor is one blocked loop on one thread (16 MB in ~4 ms on a Zen 5
// core); this one spreads 64 × 64 tiles over the intra-op threads and moves each 8 × 8 block
// through registers (AVX2 / AVX-512 copies; the portable copy moves scalars). A copy: the values
// are x's, bit for bit, on every path.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "common/checks.h"
#include "cpu/isa.h"
#include "cpu/simd_f32x16.h"  // PLDR_SIMD_AVX512 / PLDR_SIMD_AVX2: this copy's ISA

namespace pldr::cpu {
namespace {

constexpr int64_t kTile = 64;  // a tile of x and its transpose: 16 KB each, in L1

// dst[j * ldd + i] = src[i * lds + j] for i < rows, j < cols.
void transpose_scalar(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t rows,
                      int64_t cols) {
  for (int64_t j = 0; j < cols; ++j)
    for (int64_t i = 0; i < rows; ++i) dst[j * ldd + i] = src[i * lds + j];
}

#if defined(PLDR_SIMD_AVX512) || defined(PLDR_SIMD_AVX2)
// An 8 × 8 block through eight ymm registers: pairs of rows interleaved, then pairs of pairs,
// then the 128-bit halves exchanged.
inline void transpose_8x8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
  }
}
#endif

void transpose_block(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t rows,
                    int64_t cols) {
#if defined(PLDR_SIMD_AVX512) || defined(PLDR_SIMD_AVX2)
  const int64_t rows8 = rows / 8 * 8, cols8 = cols / 8 * 8;
  for (int64_t j = 0; j < cols8; j += 8)
    for (int64_t i = 0; i < rows8; i += 8)
      transpose_8x8(src + i * lds + j, lds, dst + j * ldd + i, ldd);
  // The edges: the last rows % 8 rows of x, then its last cols % 8 columns.
  transpose_scalar(src + rows8 * lds, lds, dst + rows8, ldd, rows - rows8, cols8);
  transpose_scalar(src + cols8, lds, dst + cols8 * ldd, ldd, rows, cols - cols8);
#else
  transpose_scalar(src, lds, dst, ldd, rows, cols);
#endif
}

at::Tensor transpose_2d_cpu(const at::Tensor& x) {
  check_transpose_2d_input(x);
  const int64_t R = x.size(0), C = x.size(1), lds = x.stride(0);
  at::Tensor out = at::empty({C, R}, x.options());
  if (R == 0 || C == 0) return out;
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t row_tiles = (R + kTile - 1) / kTile, col_tiles = (C + kTile - 1) / kTile;
  // Tiles in x's row-major order, so each thread reads a band of whole rows of x.
  at::parallel_for(0, row_tiles * col_tiles, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i0 = t / col_tiles * kTile, j0 = t % col_tiles * kTile;
      transpose_block(src + i0 * lds + j0, lds, dst + j0 * R + i0, R, std::min(kTile, R - i0),
                     std::min(kTile, C - j0));
    }
  });
  return out;
}

}  // namespace
}  // namespace pldr::cpu

PLDR_CPU_KERNEL(transpose_2d, pldr::cpu::transpose_2d_cpu)
