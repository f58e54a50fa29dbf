// Fused CPU kernel of pldr::metric_tensors (docs/design.md §3.1; docs/spec.md §2 steps 6–12, §5).
//
// Layout idea. After A0 = QᵀQ, the LayerNorms and all SwiGLU MLPs act on each row of A
// independently with weights shared by every head, so a block of rows (of one or several heads)
// runs through the whole residual network while it stays in L1/L2. It is held *transposed*,
// Xt[j][m] = A[m0 + m][j] (features j down, rows m across the 16-float lanes), which makes
//   * every weight usable as stored: a product X·Wᵀ becomes Wt-free  Ht = W·Xt, where W's
//     entries are broadcast and Xt's rows are vector loads (no per-call weight transposes);
//   * QᵀQ land in that layout directly (A0 is symmetric: Xt[j][m] = Σ_s q[s][j]·q[s][m]);
//   * LayerNorm over j a sum of vectors (no horizontal reductions).
// Every output element is computed by the same sequence of fp32 operations whatever the block
// size, thread count or batch padding, so results are bitwise reproducible and batch invariant.
//
// Phase 1 (parallel over blocks of rows of A, possibly spanning heads): gather q → QᵀQ → LN →
// R × (Gd SwiGLU, LN(· + in)) → A.
// Phase 2 (parallel over (b, h)): Z = W·A + b, A_LM = Z·silu(Z) + eps_adj, A_P = A_LM^pw,
// G = a·A_P + ba — these mix rows, so they wait for every row block of their (b, h). The two
// small products sum in fp64 (see product_f64 for why).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <tuple>
#include <type_traits>

#include "common/checks.h"
#include "common/dispatch.h"
#include "cpu/isa.h"
#include "cpu/metric_queries.h"
#include "cpu/metric_row_blocks.h"

namespace pldr::cpu {
namespace {

struct AlignedFree {
  void operator()(float* p) const { std::free(p); }
};
using FloatBuffer = std::unique_ptr<float[], AlignedFree>;

FloatBuffer make_buffer(int64_t count) {
  const size_t floats = static_cast<size_t>(std::max<int64_t>(count, 1));
  const size_t bytes = (floats * sizeof(float) + 63) / 64 * 64;  // aligned_alloc wants a multiple
  auto* p = static_cast<float*>(std::aligned_alloc(64, bytes));
  TORCH_CHECK(p != nullptr, "pldr::metric_tensors: out of memory allocating ", bytes, " bytes");
  return FloatBuffer(p);
}

struct MetricWeights {
  const float *ln0_w, *ln0_b, *w1, *b1, *w2, *b2, *w3, *b3, *lnA_w, *lnA_b;
  const float *W, *b, *pw, *a, *ba;
};

// Rows of A per phase-1 block (at most): each weight panel, fetched from L3 once per block, serves
// that many rows (64 runs as fast as 256 here), and the block's activations stay in L1/L2.
constexpr int64_t kMaxBlockRows = 64;

// Phase-1 scratch of one thread, and the q rows of the head gathered last.
struct RowBlockScratch {
  FloatBuffer Qs, Xt, Tt, Ut;
  int64_t gathered_bh = -1, S_kept = 0;
  const float* Q_rows = nullptr;  // the head's fp32 rows: Qs, or q itself
  int64_t q_rs = 0;               // floats between two of them
};


// Phase 1 for the global rows [row0, row0 + nrows) of A viewed as [B·H·d, d] (row g = bh·d + i);
// nrows is a multiple of 16 and ≤ kMaxBlockRows. Writes those rows of A.
void metric_rows_block(const at::Tensor& q, const QueryMask& mask, int64_t row0, int64_t nrows,
                       const MetricDims& dims, const MetricWeights& w, float eps_ln,
                       RowBlockScratch& sc, float* A_out) {
  const int64_t d = dims.d, F = dims.F, H = dims.H;
  const int nvec = static_cast<int>(nrows / kLanes);
  const int64_t ld = nrows;
  float *Xt = sc.Xt.get(), *Tt = sc.Tt.get(), *Ut = sc.Ut.get();
  // QᵀQ, head segment by head segment.
  for (int64_t g = row0; g < row0 + nrows;) {
    const int64_t bh = g / d, i0 = g % d;
    const int64_t seg = std::min(d - i0, row0 + nrows - g);
    if (bh != sc.gathered_bh) {
      const int64_t bi = bh / H, hi = bh % H;
      if (queries_in_place(q, mask)) {
        sc.Q_rows = q.data_ptr<float>() + bi * q.stride(0) + hi * q.stride(2);
        sc.q_rs = q.stride(1);
        sc.S_kept = q.size(1);
      } else {
        sc.S_kept = PLDR_DTYPE_SWITCH(q.scalar_type(), Elements, T, [&] {
          return gather_queries<T>(q, mask, bi, hi, sc.Qs.get());
        });
        sc.Q_rows = sc.Qs.get();
        sc.q_rs = d;
      }
      sc.gathered_bh = bh;
    }
    qtq_columns(sc.Q_rows, sc.q_rs, sc.S_kept, d, i0, static_cast<int>(seg / kLanes),
                Tt + (g - row0), ld);
    g += seg;
  }
  layer_norm_columns(Tt, Xt, d, nvec, ld, w.ln0_w, w.ln0_b, eps_ln);
  for (int64_t r = 0; r < dims.R; ++r) {
    for (int64_t gi = 0; gi < dims.Gd; ++gi) {
      const int64_t rg = r * dims.Gd + gi;
      swiglu_block(gi == 0 ? Xt : Tt, Ut, Tt, d, F, nvec, w.w1 + rg * F * d, w.b1 + rg * F,
                   w.w2 + rg * F * d, w.b2 + rg * F, w.w3 + rg * d * F, w.b3 + rg * d);
    }
    for (int64_t i = 0; i < d * ld; ++i) Tt[i] += Xt[i];  // residual
    layer_norm_columns(Tt, Xt, d, nvec, ld, w.lnA_w + r * d, w.lnA_b + r * d, eps_ln);
  }
  for (int64_t m = 0; m < nrows; ++m)  // A[row0 + m][j] = Xt[j][m]
    for (int64_t j = 0; j < d; ++j) A_out[(row0 + m) * d + j] = Xt[j * ld + m];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> metric_tensors_cpu(
    const at::Tensor& q, const c10::optional<at::Tensor>& q_mask, const at::Tensor& ln0_w,
    const at::Tensor& ln0_b, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
    const at::Tensor& b2, const at::Tensor& w3, const at::Tensor& b3, const at::Tensor& lnA_w,
    const at::Tensor& lnA_b, const at::Tensor& W, const at::Tensor& b, const at::Tensor& pw,
    const at::Tensor& a, const at::Tensor& ba, double eps_ln, double eps_adj) {
  const MetricDims dims = check_metric_tensors_inputs(q, q_mask, ln0_w, ln0_b, w1, b1, w2, b2, w3,
                                                      b3, lnA_w, lnA_b, W, b, pw, a, ba,
                                                      eps_ln, eps_adj);
  const int64_t B = dims.B, S = dims.S, H = dims.H, d = dims.d, F = dims.F;
  auto out_opts = q.options().dtype(at::kFloat);
  at::Tensor A = at::empty({B, H, d, d}, out_opts);
  at::Tensor A_LM = at::empty({B, H, d, d}, out_opts);
  at::Tensor G = at::empty({B, H, d, d}, out_opts);
  if (B == 0 || H == 0) return {A, A_LM, G};

  // Weights are read as dense row-major arrays (no-ops for the usual contiguous tensors).
  const at::Tensor weights[] = {ln0_w.contiguous(), ln0_b.contiguous(), w1.contiguous(),
                                b1.contiguous(),    w2.contiguous(),    b2.contiguous(),
                                w3.contiguous(),    b3.contiguous(),    lnA_w.contiguous(),
                                lnA_b.contiguous(), W.contiguous(),     b.contiguous(),
                                pw.contiguous(),    a.contiguous(),     ba.contiguous()};
  const MetricWeights w{
      weights[0].data_ptr<float>(),  weights[1].data_ptr<float>(),  weights[2].data_ptr<float>(),
      weights[3].data_ptr<float>(),  weights[4].data_ptr<float>(),  weights[5].data_ptr<float>(),
      weights[6].data_ptr<float>(),  weights[7].data_ptr<float>(),  weights[8].data_ptr<float>(),
      weights[9].data_ptr<float>(),  weights[10].data_ptr<float>(), weights[11].data_ptr<float>(),
      weights[12].data_ptr<float>(), weights[13].data_ptr<float>(), weights[14].data_ptr<float>()};
  QueryMask mask;
  if (q_mask.has_value()) {
    mask = QueryMask{q_mask->data_ptr<bool>(), q_mask->stride(0), q_mask->stride(1)};
  }
  const float eps_ln_f = static_cast<float>(eps_ln);
  const float eps_adj_f = static_cast<float>(eps_adj);
  float* A_ptr = A.data_ptr<float>();
  float* A_LM_ptr = A_LM.data_ptr<float>();
  float* G_ptr = G.data_ptr<float>();

  // Phase 1: the B·H·d rows of A in blocks of block_rows; Phase 2: one (b, h) per item. Threads
  // take the next item from a shared counter rather than a fixed half each, so a thread that the
  // OS descheduled (a shared machine) delays the call by one item, not by its whole share. Item
  // boundaries never change an output bit (see the top of this file).
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t total_rows = B * H * d;
  // Enough items for every thread to get ≥ 2 when the problem is small; never below 16 rows.
  const int64_t block_rows = std::clamp<int64_t>(
      total_rows / (2 * threads) / kLanes * kLanes, kLanes, kMaxBlockRows);
  const int64_t n_blocks = (total_rows + block_rows - 1) / block_rows;
  const int64_t max_feat = std::max(d, F);
  std::atomic<int64_t> next_block{0};
  at::parallel_for(0, std::min(threads, n_blocks), 1, [&](int64_t, int64_t) {
    RowBlockScratch sc{make_buffer(S * d), make_buffer(d * block_rows),
                       make_buffer(d * block_rows), make_buffer(max_feat * block_rows)};
    for (int64_t blk = next_block++; blk < n_blocks; blk = next_block++) {
      const int64_t row = blk * block_rows;
      metric_rows_block(q, mask, row, std::min(block_rows, total_rows - row), dims, w,
                        eps_ln_f, sc, A_ptr);
    }
  });

  std::atomic<int64_t> next_head{0};
  at::parallel_for(0, std::min(threads, B * H), 1, [&](int64_t, int64_t) {
    FloatBuffer A_P = make_buffer(d * d);
    std::unique_ptr<double[]> Md(new double[d * d]);
    for (int64_t bh = next_head++; bh < B * H; bh = next_head++) {
      const int64_t hi = bh % H;
      const int64_t head = hi * d * d, off = bh * d * d;
      metric_head_outputs(A_ptr + off, d, w.W + head, w.b + head, w.pw + head, w.a + head,
                          w.ba + head, eps_adj_f, A_LM_ptr + off, A_P.get(), Md.get(),
                          G_ptr + off);
    }
  });
  return {A, A_LM, G};
}

}  // namespace
}  // namespace pldr::cpu

PLDR_CPU_KERNEL(metric_tensors, pldr::cpu::metric_tensors_cpu)  // registered for the ISA chosen at run time
