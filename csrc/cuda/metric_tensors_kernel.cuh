// pldr::metric_tensors on CUDA (docs/design.md §3.1, docs/spec.md §2 steps 6-12), all in fp32
// (docs/spec.md §5). Device code and its launch (launch_metric_tensors, at the end); no torch
// headers, so the CPU emulator (tests/emu/metric_driver.cpp) runs exactly this code.
//
// Four launches per call, each spread so that B = 1 fills the GPU:
//   1. qtq_partial_kernel   grid (S chunks, H, B): QᵀQ of 64 query rows per block (masked rows
//                           excluded), written as fp32 partials (no atomics: deterministic).
//   2. metric_rows_kernel   grid (B·H·d / 8): 8 rows of one (b, h) per block, one warp per row for
//                           the LayerNorms. Sums the partials in a fixed order, LN0, then the R
//                           residual units of Gd SwiGLU MLPs + LN. The MLP weights are shared by
//                           every row and head, so each block streams them through shared memory
//                           in chunks and reuses each chunk for its 8 rows.
//   3. metric_rowtile_matmul_kernel<kPower>  grid (d/8, H, B): Z = W_h·A + b, A_LM = z·silu(z) +
//                           eps_adj, A_P = A_LM^pw (A_P to a workspace).
//   4. metric_rowtile_matmul_kernel<kAffine> grid (d/8, H, B): G = a_h·A_P + ba.
// Weights and outputs are contiguous (the host API makes them so); q and q_mask are read through
// their strides.
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/device.cuh"
#include "cuda/params.h"

namespace pldr::cuda {

constexpr int kMetricThreads = 256;
constexpr int kMetricRowsPerBlock = kMetricThreads / 32;  // one warp per row for the LayerNorms
constexpr int kQtqRowsPerChunk = 64;
constexpr int kHiddenPerPass = kMetricThreads;  // hidden units (F) per pass: one per thread
constexpr int kStageK = 16;                     // input columns staged per step (w1, w2)
constexpr int kStageF = 64;                     // hidden units staged per step (w3)

// ---- 1. QᵀQ partials ------------------------------------------------------------------------
template <class T, int D>
__global__ void __launch_bounds__(kMetricThreads) qtq_partial_kernel(const MetricParams p) {
  constexpr int kTile = D / 16;  // thread (ti, tj) owns A[ti + 16·ii][tj + 16·jj]
  __shared__ float q_s[kQtqRowsPerChunk][D];
  const int chunk = blockIdx.x, h = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
  const int s0 = chunk * kQtqRowsPerChunk;
  const T* q = head_rows<const T>(p.q, b, h);
  for (int idx = tid; idx < kQtqRowsPerChunk * D; idx += kMetricThreads) {
    const int r = idx / D, e = idx % D, s = s0 + r;
    const bool keep = s < p.S && (p.q_mask == nullptr ||
                                  p.q_mask[b * p.q_mask_batch_stride + s * p.q_mask_row_stride]);
    q_s[r][e] = keep ? to_float(q[s * p.q.row_stride + e]) : 0.f;
  }
  __syncthreads();
  const int ti = tid / 16, tj = tid % 16;
  float acc[kTile][kTile];
#pragma unroll
  for (int ii = 0; ii < kTile; ++ii)
#pragma unroll
    for (int jj = 0; jj < kTile; ++jj) acc[ii][jj] = 0.f;
  const int rows = min(kQtqRowsPerChunk, p.S - s0);
  for (int r = 0; r < rows; ++r) {
    float qi[kTile], qj[kTile];
#pragma unroll
    for (int t = 0; t < kTile; ++t) {
      qi[t] = q_s[r][ti + 16 * t];
      qj[t] = q_s[r][tj + 16 * t];
    }
#pragma unroll
    for (int ii = 0; ii < kTile; ++ii)
#pragma unroll
      for (int jj = 0; jj < kTile; ++jj) acc[ii][jj] = fmaf(qi[ii], qj[jj], acc[ii][jj]);
  }
  float* out = p.qtq_partial + ((int64_t(b) * p.H + h) * p.n_chunks + chunk) * D * D;
#pragma unroll
  for (int ii = 0; ii < kTile; ++ii)
#pragma unroll
    for (int jj = 0; jj < kTile; ++jj) out[(ti + 16 * ii) * D + tj + 16 * jj] = acc[ii][jj];
}

// ---- 2. The row-wise network ----------------------------------------------------------------
// Activations are kept transposed, x_s[k][row], so that one k gives the 8 rows as two float4-sized
// broadcasts in the hidden-layer loop.
template <int D>
struct MetricRowsSmem {
  float x[D][kMetricRowsPerBlock];
  float x_in[D][kMetricRowsPerBlock];  // input of the residual unit
};

// Bytes of dynamic shared memory of metric_rows_kernel: the staged weight chunk (w1ᵀ+w2ᵀ, or w3ᵀ
// padded to D+1 columns against bank conflicts) and the hidden activations u[F][rows].
__host__ __device__ inline size_t metric_rows_dynamic_smem(int D, int F) {
  const size_t stage_12 = size_t(2) * kStageK * kHiddenPerPass;
  const size_t stage_3 = size_t(kStageF) * (D + 1);
  return (stage_12 > stage_3 ? stage_12 : stage_3) * sizeof(float) +
         size_t(F) * kMetricRowsPerBlock * sizeof(float);
}

// LayerNorm over each of the 8 rows (warp w normalises row w): x = LN(x [+ x_in]) · w + b.
template <int D>
__device__ __forceinline__ void layer_norm_rows(MetricRowsSmem<D>& sm, bool add_residual,
                                                const float* w, const float* bias, float eps) {
  constexpr int kPerLane = D / 32;
  const int r = threadIdx.x / 32, lane = threadIdx.x % 32;
  float v[kPerLane];
  float sum = 0.f;
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) {
    const int k = lane + 32 * t;
    v[t] = sm.x[k][r] + (add_residual ? sm.x_in[k][r] : 0.f);
    sum += v[t];
  }
  const float mean = warp_sum(sum) / D;
  float sq = 0.f;
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) sq += (v[t] - mean) * (v[t] - mean);
  const float rstd = rsqrtf(warp_sum(sq) / D + eps);
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) {
    const int k = lane + 32 * t;
    sm.x[k][r] = (v[t] - mean) * rstd * w[k] + bias[k];
  }
}

// x ← (silu(x·W1ᵀ + b1) ⊙ (x·W2ᵀ + b2))·W3ᵀ + b3 for the block's 8 rows.
template <int D>
__device__ __forceinline__ void swiglu_rows(const MetricParams& p, MetricRowsSmem<D>& sm,
                                            float* stage, float* u, const float* w1,
                                            const float* b1, const float* w2, const float* b2,
                                            const float* w3, const float* b3) {
  constexpr int R8 = kMetricRowsPerBlock;
  const int tid = threadIdx.x, F = p.F;
  // Hidden layer: thread t owns hidden unit f_base + t for all 8 rows.
  for (int f_base = 0; f_base < F; f_base += kHiddenPerPass) {
    const int fc = min(kHiddenPerPass, F - f_base);
    float h1[R8], h2[R8];
#pragma unroll
    for (int r = 0; r < R8; ++r) h1[r] = h2[r] = 0.f;
    for (int k0 = 0; k0 < D; k0 += kStageK) {
      float* w1t = stage;                   // [kStageK][fc]
      float* w2t = stage + kStageK * fc;    // [kStageK][fc]
      for (int idx = tid; idx < kStageK * fc; idx += kMetricThreads) {
        const int f = idx / kStageK, kk = idx % kStageK;
        const int64_t g = int64_t(f_base + f) * D + k0 + kk;
        w1t[kk * fc + f] = w1[g];
        w2t[kk * fc + f] = w2[g];
      }
      __syncthreads();
      if (tid < fc) {
#pragma unroll 4
        for (int kk = 0; kk < kStageK; ++kk) {
          const float a1 = w1t[kk * fc + tid], a2 = w2t[kk * fc + tid];
#pragma unroll
          for (int r = 0; r < R8; ++r) {
            const float xv = sm.x[k0 + kk][r];
            h1[r] = fmaf(a1, xv, h1[r]);
            h2[r] = fmaf(a2, xv, h2[r]);
          }
        }
      }
      __syncthreads();
    }
    if (tid < fc) {
      const int f = f_base + tid;
#pragma unroll
      for (int r = 0; r < R8; ++r) u[f * R8 + r] = silu_f(h1[r] + b1[f]) * (h2[r] + b2[f]);
    }
  }
  __syncthreads();
  // Output layer: thread (j, row group) owns x[j][rows r0 .. r0 + kRowsPerThread).
  constexpr int kRowsPerThread = R8 * D / kMetricThreads;
  const int j = tid % D, r0 = (tid / D) * kRowsPerThread;
  float y[kRowsPerThread];
#pragma unroll
  for (int rr = 0; rr < kRowsPerThread; ++rr) y[rr] = 0.f;
  for (int f0 = 0; f0 < F; f0 += kStageF) {
    const int fc = min(kStageF, F - f0);
    for (int idx = tid; idx < D * fc; idx += kMetricThreads) {
      const int jj = idx / fc, ff = idx % fc;
      stage[ff * (D + 1) + jj] = w3[int64_t(jj) * F + f0 + ff];
    }
    __syncthreads();
    for (int ff = 0; ff < fc; ++ff) {
      const float w = stage[ff * (D + 1) + j];
#pragma unroll
      for (int rr = 0; rr < kRowsPerThread; ++rr)
        y[rr] = fmaf(u[(f0 + ff) * R8 + r0 + rr], w, y[rr]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int rr = 0; rr < kRowsPerThread; ++rr) sm.x[j][r0 + rr] = y[rr] + b3[j];
  __syncthreads();
}

template <int D>
__global__ void __launch_bounds__(kMetricThreads) metric_rows_kernel(const MetricParams p) {
  static_assert(D % kMetricRowsPerBlock == 0 && D % 32 == 0, "rows of a block share one head");
  constexpr int R8 = kMetricRowsPerBlock;
  __shared__ MetricRowsSmem<D> sm;
  PLDR_DYNAMIC_SMEM(smem);
  float* dyn = reinterpret_cast<float*>(smem);
  float* stage = dyn;
  float* u = dyn + (metric_rows_dynamic_smem(D, 0) / sizeof(float));
  const int tid = threadIdx.x;
  const int64_t row0 = int64_t(blockIdx.x) * R8;  // over B·H·D rows
  const int64_t bh = row0 / D;
  const int i0 = int(row0 % D);

  // A0 rows = Σ partials (fixed order), then LN0.
  const float* part = p.qtq_partial + bh * p.n_chunks * D * D;
  for (int idx = tid; idx < R8 * D; idx += kMetricThreads) {
    const int r = idx / D, k = idx % D;
    float s = 0.f;
    for (int c = 0; c < p.n_chunks; ++c) s += part[(int64_t(c) * D + i0 + r) * D + k];
    sm.x[k][r] = s;
  }
  __syncthreads();
  layer_norm_rows<D>(sm, false, p.ln0_w, p.ln0_b, p.eps_ln);
  __syncthreads();

  const int64_t F = p.F;
  for (int r = 0; r < p.R; ++r) {
    for (int idx = tid; idx < R8 * D; idx += kMetricThreads) {
      const int k = idx / R8, rr = idx % R8;
      sm.x_in[k][rr] = sm.x[k][rr];
    }
    __syncthreads();
    for (int g = 0; g < p.Gd; ++g) {
      const int64_t rg = int64_t(r) * p.Gd + g;
      swiglu_rows<D>(p, sm, stage, u, p.w1 + rg * F * D, p.b1 + rg * F, p.w2 + rg * F * D,
                     p.b2 + rg * F, p.w3 + rg * D * F, p.b3 + rg * D);
    }
    layer_norm_rows<D>(sm, true, p.lnA_w + int64_t(r) * D, p.lnA_b + int64_t(r) * D, p.eps_ln);
    __syncthreads();
  }

  float* A = p.A + (bh * D + i0) * D;
  for (int idx = tid; idx < R8 * D; idx += kMetricThreads) {
    const int r = idx / D, k = idx % D;
    A[int64_t(r) * D + k] = sm.x[k][r];
  }
}

// ---- 3./4. Per-head d×d products with the left matrix of head h ----------------------------
constexpr int kPowerEpilogue = 0;   // X = A:   A_LM = iSwiGLU(W·A + b) + eps_adj, A_P = A_LM^pw
constexpr int kAffineEpilogue = 1;  // X = A_P: G = a·A_P + ba
constexpr int kMatmulRowsPerBlock = 8;

template <int D, int kEpilogue>
__global__ void __launch_bounds__(kMetricThreads)
    metric_rowtile_matmul_kernel(const MetricParams p) {
  constexpr int RT = kMatmulRowsPerBlock;
  constexpr int kRowsPerThread = RT * D / kMetricThreads;
  __shared__ float left_s[RT][D];
  const int i0 = blockIdx.x * RT, h = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
  const int64_t head = int64_t(h) * D * D, bh = (int64_t(b) * p.H + h) * D * D;
  const float* left = (kEpilogue == kPowerEpilogue ? p.W : p.a) + head;
  const float* right = (kEpilogue == kPowerEpilogue ? p.A : p.A_P) + bh;
  for (int idx = tid; idx < RT * D; idx += kMetricThreads)
    left_s[idx / D][idx % D] = left[int64_t(i0 + idx / D) * D + idx % D];
  __syncthreads();
  const int j = tid % D, r0 = (tid / D) * kRowsPerThread;
  float acc[kRowsPerThread];
#pragma unroll
  for (int rr = 0; rr < kRowsPerThread; ++rr) acc[rr] = 0.f;
  for (int k = 0; k < D; ++k) {
    const float x = right[int64_t(k) * D + j];
#pragma unroll
    for (int rr = 0; rr < kRowsPerThread; ++rr) acc[rr] = fmaf(left_s[r0 + rr][k], x, acc[rr]);
  }
#pragma unroll
  for (int rr = 0; rr < kRowsPerThread; ++rr) {
    const int64_t o = int64_t(i0 + r0 + rr) * D + j;
    if (kEpilogue == kPowerEpilogue) {
      const float z = acc[rr] + p.b[head + o];
      const float a_lm = z * silu_f(z) + p.eps_adj;  // iSwiGLU, then eps (docs/spec.md §5.2-3)
      p.A_LM[bh + o] = a_lm;
      p.A_P[bh + o] = powf(a_lm, p.pw[head + o]);
    } else {
      p.G[bh + o] = acc[rr] + p.ba[head + o];
    }
  }
}

inline int metric_qtq_chunks(int S) {
  return S > 0 ? (S + kQtqRowsPerChunk - 1) / kQtqRowsPerChunk : 1;
}

// Shared memory of one metric_rows_kernel<D> block, static and dynamic: the API checks it against
// the GPU's limit before launching (a large F needs more than the default 48 KiB).
template <int D>
size_t metric_rows_smem_bytes(int F) {
  return sizeof(MetricRowsSmem<D>) + metric_rows_dynamic_smem(D, F);
}

// Launches the four kernels. p.n_chunks = metric_qtq_chunks(S) and the workspaces must be set.
template <class T, int D>
void launch_metric_tensors(const MetricParams& p, cudaStream_t stream) {
  auto qtq = &qtq_partial_kernel<T, D>;
  PLDR_LAUNCH_KERNEL(qtq, dim3(unsigned(p.n_chunks), unsigned(p.H), unsigned(p.B)),
                     dim3(kMetricThreads), 0, stream, p);
  auto rows = &metric_rows_kernel<D>;
  const size_t rows_dynamic_smem = metric_rows_dynamic_smem(D, p.F);
  allow_dynamic_smem(rows, rows_dynamic_smem, sizeof(MetricRowsSmem<D>));
  const unsigned row_blocks = unsigned(int64_t(p.B) * p.H * D / kMetricRowsPerBlock);
  PLDR_LAUNCH_KERNEL(rows, dim3(row_blocks), dim3(kMetricThreads), rows_dynamic_smem, stream, p);
  const dim3 tiles(unsigned(D / kMatmulRowsPerBlock), unsigned(p.H), unsigned(p.B));
  auto power = &metric_rowtile_matmul_kernel<D, kPowerEpilogue>;
  PLDR_LAUNCH_KERNEL(power, tiles, dim3(kMetricThreads), 0, stream, p);
  auto affine = &metric_rowtile_matmul_kernel<D, kAffineEpilogue>;
  PLDR_LAUNCH_KERNEL(affine, tiles, dim3(kMetricThreads), 0, stream, p);
}

}  // namespace pldr::cuda
