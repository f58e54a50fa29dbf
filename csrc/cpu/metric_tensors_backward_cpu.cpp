// Fused CPU backward of pldr::metric_tensors (docs/design.md §3.4; docs/spec.md §2 steps 6–12):
// the gradients of q and of every weight from those of A, A_LM and G, recomputing the forward
// from the inputs (autograd saves nothing else).
//
// The forward's row-block structure carries over: after QᵀQ every row of A runs through the
// residual network on its own, so the recompute and the backward of the network work on
// transposed blocks of 64 rows (metric_backward_blocks.h) that stay in L1/L2; only the power
// stage (per (b, h)) and the weight gradients (sums over all rows) mix rows. Phases, each a
// parallel loop over work items taken from a shared counter, for one group of whole heads at a
// time (≥ 1024 rows, so the workspace is bounded: ~39 MB for the 110M learner, one lease of the
// kept CPU workspace, cpu/workspace.h), the sums over rows carried from group to group:
//   1. per block: QᵀQ (q read in place or gathered), the residual network, keeping the input of
//      every SwiGLU and LayerNorm (the checkpoints, (1 + R·(Gd + 1))·d floats per row), every
//      SwiGLU's hidden pre-activations (2·R·Gd·F floats per row) and A;
//   2. per head h (the batch in order inside): steps 9–12 reversed in fp64 → the gradient
//      reaching A, and those of W, b, pw, a, ba;
//   3. per residual unit r, last first, one loop over (a) the blocks: the LayerNorm's and the Gd
//      SwiGLUs' backward from the kept pre-activations, keeping what the weight gradients need;
//      and (b) the tiles of unit r + 1's weight gradients: sums over all blocks of the products
//      kept by its (a) (two copies of those buffers, by parity);
//   4. the same loop once more, with unit 0's weight-gradient tiles: per (b, h), the first
//      LayerNorm's backward → the gradient gA0 of QᵀQ, and grad_q = q·(gA0 + gA0ᵀ) for the
//      kept rows (pad rows get exactly 0).
// Determinism: blocks have a fixed size (64 rows), every weight gradient element is summed by one
// work item in a fixed order, and the per-block LayerNorm partial sums are added in block order,
// so the gradients are bitwise the same run after run and at any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <numeric>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"
#include "cpu/isa.h"
#include "cpu/metric_queries.h"
#include "cpu/metric_backward_blocks.h"
#include "cpu/workspace.h"

namespace pldr::cpu {
namespace {

// Carves typed, 64-byte-aligned arrays out of a lease in two passes: with base == nullptr it
// only counts the bytes (bytes()), with the lease's data it hands out the pointers.
class WorkspaceCarver {
 public:
  explicit WorkspaceCarver(char* base) : base_(base) {}
  template <typename T>
  T* take(int64_t count) {
    used_ = (used_ + 63) / 64 * 64;
    T* p = base_ != nullptr ? reinterpret_cast<T*>(base_ + used_) : nullptr;
    used_ += (count > 0 ? count : 0) * static_cast<int64_t>(sizeof(T));
    return p;
  }
  int64_t bytes() const { return used_; }

 private:
  char* base_;
  int64_t used_ = 0;
};

// Runs fn(item, slot) for every item in [0, n) on the intra-op threads, which take the next
// item from a shared counter (a descheduled thread delays the call by one item, not by its share);
// slot < threads names the scratch of the thread running it (no two run on one slot at once).
// Which thread runs an item never changes a result bit.
template <class Fn>
void for_each_item(int64_t n, int64_t threads, Fn&& fn) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, n), 1, [&](int64_t slot, int64_t) {
    for (int64_t item = next++; item < n; item = next++) fn(item, slot);
  });
}

// A thread's scratch: q's rows of a head (and their positions), a block's hidden layer, A and
// gX tiles, a head's gA0 + gA0ᵀ, and the power stage's fp32 and fp64 [d][d] arrays.
struct ThreadScratch {
  float *Qs, *Ut, *A_block, *gX, *M, *power_f32;
  double* power_f64;
  int64_t* positions;
  int64_t gathered_bh, S_kept;  // whose rows Q_rows are (phase 1)
  const float* Q_rows;          // a head's fp32 rows of q: Qs, or q itself
  int64_t q_rs;                 // floats between two of them
};

struct Weights {
  const float *ln0_w, *ln0_b, *w1, *b1, *w2, *b2, *w3, *b3, *lnA_w, *lnA_b;
  const float *W, *b, *pw, *a, *ba;
};

// Where each block's data lives. Each array is a sequence of blocks, so a block's data is
// contiguous and the weight gradients walk the blocks in order; [features][64] is the transposed
// block layout, [64][features] the row layout.
struct Workspace {
  int64_t d, F, R, Gd, nblocks;
  int64_t ckpt_stride, unit_stride, tile;  // floats per block; tile = d·64
  float *ckpt, *unit, *grad_state, *hidden;

  // Checkpoints of the forward: QᵀQ (the first LayerNorm's input), and per unit r the input of
  // each SwiGLU g (g = 0: the unit's input) and the input of its LayerNorm, [d][64] each.
  float* qtq(int64_t blk) const { return ckpt + blk * ckpt_stride; }
  float* glu_input(int64_t blk, int64_t r, int64_t g) const {
    return ckpt + blk * ckpt_stride + (1 + r * (Gd + 1) + g) * tile;
  }
  float* ln_input(int64_t blk, int64_t r) const { return glu_input(blk, r, Gd); }
  // The hidden pre-activations H1, H2 [F][64] of SwiGLU g of unit r, kept by the forward's
  // recompute for the SwiGLU's backward (recomputing them again there cost 2/3 of a forward).
  float* hidden1(int64_t blk, int64_t r, int64_t g) const {
    return hidden + ((blk * R + r) * Gd + g) * 2 * F * kBwdBlockRows;
  }
  float* hidden2(int64_t blk, int64_t r, int64_t g) const {
    return hidden1(blk, r, g) + F * kBwdBlockRows;
  }
  // What the weight gradients of unit r need, per SwiGLU g, in two copies by the parity of r
  // (unit r's sums run while unit r − 1's blocks are reversed): the gradient of its output gY
  // [d][64], U, gH1, gH2 [F][64] (the hidden layer and the gradients of its pre-activations), and
  // its input and gY in row layout, [64][d] each.
  float* glu(int64_t blk, int64_t r, int64_t g) const {
    return unit + ((r & 1) * nblocks + blk) * unit_stride + g * (3 * d + 3 * F) * kBwdBlockRows;
  }
  float* glu_grad_out(int64_t blk, int64_t r, int64_t g) const { return glu(blk, r, g); }
  float* glu_U(int64_t blk, int64_t r, int64_t g) const { return glu(blk, r, g) + tile; }
  float* glu_gH1(int64_t blk, int64_t r, int64_t g) const {
    return glu_U(blk, r, g) + F * kBwdBlockRows;
  }
  float* glu_gH2(int64_t blk, int64_t r, int64_t g) const {
    return glu_gH1(blk, r, g) + F * kBwdBlockRows;
  }
  float* glu_input_rows(int64_t blk, int64_t r, int64_t g) const {
    return glu_gH2(blk, r, g) + F * kBwdBlockRows;
  }
  float* glu_grad_out_rows(int64_t blk, int64_t r, int64_t g) const {
    return glu_input_rows(blk, r, g) + tile;
  }
  // The gradient flowing back through the network, one [d][64] tile per block.
  float* grad(int64_t blk) const { return grad_state + blk * tile; }
};

// A work item of phases 3-5: the backward of unit r on one block (r = -1: of the first
// LayerNorm and QᵀQ on one head), or one tile of a weight gradient of unit r, SwiGLU g: rows
// [row0, row1) of dW1 or dW2 [F][d], or of dW3ᵀ [F][d], and the matching bias gradient.
struct UnitItem {
  enum Kind { kBlock, kW1, kW2, kW3 } kind;
  int64_t r, g_or_block, row0, row1;
};

// Rows of a weight gradient per work item. Each item reads every block's Q operand again, so
// fewer, larger items read less (Zen 4, 2 threads, S = 1024: 96 rows 5% faster a call than 24).
constexpr int64_t kWeightGradRows = 96;

// The blocks of unit r (r = -1: the heads, for the first LayerNorm and grad_q), then the
// weight-gradient tiles of unit r_sums (r_sums < R): one work list, since the two touch
// different buffers.
std::vector<UnitItem> unit_items(int64_t r, int64_t nblocks, int64_t nheads, int64_t r_sums,
                                 int64_t R, int64_t F, int64_t Gd) {
  std::vector<UnitItem> items;
  for (int64_t i = 0; i < (r >= 0 ? nblocks : nheads); ++i)
    items.push_back({UnitItem::kBlock, r, i, 0, 0});
  if (r_sums < R)
    for (int64_t g = 0; g < Gd; ++g)
      for (auto kind : {UnitItem::kW3, UnitItem::kW1, UnitItem::kW2})
        for (int64_t row = 0; row < F; row += kWeightGradRows)
          items.push_back({kind, r_sums, g, row, std::min(F, row + kWeightGradRows)});
  return items;
}

using GradTuple =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
               at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
               at::Tensor, at::Tensor>;

GradTuple metric_tensors_backward_cpu(
    const c10::optional<at::Tensor>& grad_A, const c10::optional<at::Tensor>& grad_A_LM,
    const c10::optional<at::Tensor>& grad_G, const at::Tensor& q,
    const c10::optional<at::Tensor>& q_mask, const at::Tensor& ln0_w, const at::Tensor& ln0_b,
    const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
    const at::Tensor& w3, const at::Tensor& b3, const at::Tensor& lnA_w, const at::Tensor& lnA_b,
    const at::Tensor& W, const at::Tensor& b, const at::Tensor& pw, const at::Tensor& a,
    const at::Tensor& ba, double eps_ln, double eps_adj) {
  const MetricDims dims = check_metric_tensors_backward_inputs(
      grad_A, grad_A_LM, grad_G, q, q_mask, ln0_w, ln0_b, w1, b1, w2, b2, w3, b3, lnA_w, lnA_b, W,
      b, pw, a, ba, eps_ln, eps_adj);
  const int64_t B = dims.B, S = dims.S, H = dims.H, d = dims.d, F = dims.F, R = dims.R,
                Gd = dims.Gd;
  const at::Tensor weights[] = {ln0_w.contiguous(), ln0_b.contiguous(), w1.contiguous(),
                                b1.contiguous(),    w2.contiguous(),    b2.contiguous(),
                                w3.contiguous(),    b3.contiguous(),    lnA_w.contiguous(),
                                lnA_b.contiguous(), W.contiguous(),     b.contiguous(),
                                pw.contiguous(),    a.contiguous(),     ba.contiguous()};
  // Every output is written in full below (grad_q's pad rows too), but for the LayerNorm
  // gradients, sums of per-block partials; an empty call returns zeros.
  const bool empty = q.size(0) == 0 || q.size(2) == 0;
  auto make = [&](at::IntArrayRef sizes, const at::TensorOptions& options, bool summed) {
    return empty || summed ? at::zeros(sizes, options) : at::empty(sizes, options);
  };
  at::Tensor grad_q = make(q.sizes(), q.options(), false);
  at::Tensor grads[15];
  for (int i = 0; i < 15; ++i)  // 0, 1: ln0_w, ln0_b; 8, 9: lnA_w, lnA_b
    grads[i] = make(weights[i].sizes(), weights[i].options(), i < 2 || i == 8 || i == 9);
  auto result = [&] {
    return GradTuple{grad_q,    grads[0],  grads[1],  grads[2],  grads[3], grads[4],
                     grads[5],  grads[6],  grads[7],  grads[8],  grads[9], grads[10],
                     grads[11], grads[12], grads[13], grads[14]};
  };
  if (empty) return result();

  const Weights w{weights[0].data_ptr<float>(),  weights[1].data_ptr<float>(),
                  weights[2].data_ptr<float>(),  weights[3].data_ptr<float>(),
                  weights[4].data_ptr<float>(),  weights[5].data_ptr<float>(),
                  weights[6].data_ptr<float>(),  weights[7].data_ptr<float>(),
                  weights[8].data_ptr<float>(),  weights[9].data_ptr<float>(),
                  weights[10].data_ptr<float>(), weights[11].data_ptr<float>(),
                  weights[12].data_ptr<float>(), weights[13].data_ptr<float>(),
                  weights[14].data_ptr<float>()};
  float* g_ln0_w = grads[0].data_ptr<float>();
  float* g_ln0_b = grads[1].data_ptr<float>();
  float* g_w1 = grads[2].data_ptr<float>();
  float* g_b1 = grads[3].data_ptr<float>();
  float* g_w2 = grads[4].data_ptr<float>();
  float* g_b2 = grads[5].data_ptr<float>();
  float* g_w3 = grads[6].data_ptr<float>();
  float* g_b3 = grads[7].data_ptr<float>();
  float* g_lnA_w = grads[8].data_ptr<float>();
  float* g_lnA_b = grads[9].data_ptr<float>();
  float* const g_head[5] = {grads[10].data_ptr<float>(), grads[11].data_ptr<float>(),
                            grads[12].data_ptr<float>(), grads[13].data_ptr<float>(),
                            grads[14].data_ptr<float>()};  // W, b, pw, a, ba
  // Output gradients read as dense [B, H, d, d] (nullptr = zero).
  at::Tensor given[3];
  const float* given_ptr[3] = {nullptr, nullptr, nullptr};
  const c10::optional<at::Tensor>* given_in[3] = {&grad_A, &grad_A_LM, &grad_G};
  for (int i = 0; i < 3; ++i) {
    if (given_in[i]->has_value()) {
      given[i] = (*given_in[i])->contiguous();
      given_ptr[i] = given[i].data_ptr<float>();
    }
  }
  QueryMask mask;
  if (q_mask.has_value()) {
    mask = QueryMask{q_mask->data_ptr<bool>(), q_mask->stride(0), q_mask->stride(1)};
  }
  const bool in_place = queries_in_place(q, mask);
  const float eps_ln_f = static_cast<float>(eps_ln);
  const float eps_adj_f = static_cast<float>(eps_adj);

  // The rows are processed in groups of whole heads, so the workspace is bounded whatever B
  // (~18 MB for a group of 1024 rows of the 110M learner, which a B = 1 call of it is; a larger
  // one would also cost page faults on every call). Grouping changes no result bit: every sum
  // below runs over the blocks (or the batch) in the same order either way.
  const int64_t tile = d * kBwdBlockRows, blocks_per_head = d / kBwdBlockRows, dd = d * d;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t group_rows = std::max<int64_t>(1024, 2 * kBwdBlockRows * threads);
  const int64_t heads_per_group = std::min(B * H, (group_rows + d - 1) / d);
  const int64_t group_blocks = heads_per_group * blocks_per_head;
  Workspace ws{d, F, R, Gd, group_blocks, (1 + R * (Gd + 1)) * tile,
               Gd * (3 * d + 3 * F) * kBwdBlockRows, tile, nullptr, nullptr, nullptr, nullptr};
  // A and the gradient reaching it, of the group's heads, row layout [heads][d][d]; sums across
  // groups: the LayerNorm partials of every block, [block][slot][weight, bias][d] (slot 0 = ln0,
  // slot r + 1 = lnA[r]); the bias gradients' lanes; dW3ᵀ [R·Gd][F][d]; the per-head gradients of
  // W, b, pw, a, ba in fp64, [H][5][d][d]; then each thread's scratch. All of it in one lease of
  // the kept workspace (cpu/workspace.h): fresh pages would cost a fault each on every call.
  float *A_ptr, *gA_ptr, *partial_ptr, *bias_lanes_ptr, *w3_t_ptr;
  double* head_acc_ptr;
  std::vector<ThreadScratch> scratch(threads);
  auto layout = [&](WorkspaceCarver& c) {
    ws.ckpt = c.take<float>(group_blocks * ws.ckpt_stride);
    ws.unit = c.take<float>(2 * group_blocks * ws.unit_stride);
    ws.grad_state = c.take<float>(group_blocks * tile);
    ws.hidden = c.take<float>(group_blocks * R * Gd * 2 * F * kBwdBlockRows);
    A_ptr = c.take<float>(heads_per_group * dd);
    gA_ptr = c.take<float>(heads_per_group * dd);
    partial_ptr = c.take<float>(B * H * blocks_per_head * (R + 1) * 2 * d);
    bias_lanes_ptr = c.take<float>(R * Gd * (2 * F + d) * kLanes);
    w3_t_ptr = c.take<float>(R * Gd * F * d);
    head_acc_ptr = c.take<double>(H * 5 * dd);
    for (ThreadScratch& t : scratch) {
      t.Qs = c.take<float>(S * d);
      t.Ut = c.take<float>(std::max(d, F) * kBwdBlockRows);
      t.A_block = c.take<float>(tile);
      t.gX = c.take<float>(tile);
      t.M = c.take<float>(dd);
      t.power_f32 = c.take<float>(4 * dd);
      t.power_f64 = c.take<double>(4 * dd);
      t.positions = c.take<int64_t>(S);
    }
  };
  WorkspaceCarver sizing(nullptr);
  layout(sizing);
  const WorkspaceLease lease(sizing.bytes());
  WorkspaceCarver carver(lease.data());
  layout(carver);
  auto ln_partial = [&](int64_t global_blk, int64_t slot) {
    return partial_ptr + (global_blk * (R + 1) + slot) * 2 * d;
  };
  // Lanes of db1, db2 [R·Gd][F] and db3 [R·Gd][d].
  auto lanes_b1 = [&](int64_t rg) { return bias_lanes_ptr + rg * F * kLanes; };
  auto lanes_b2 = [&](int64_t rg) { return lanes_b1(R * Gd) + rg * F * kLanes; };
  auto lanes_b3 = [&](int64_t rg) { return lanes_b2(R * Gd) + rg * d * kLanes; };

  for (int64_t bh0 = 0; bh0 < B * H; bh0 += heads_per_group) {
    const int64_t bh1 = std::min(B * H, bh0 + heads_per_group);
    const int64_t nblocks = (bh1 - bh0) * blocks_per_head, blk0 = bh0 * blocks_per_head;
    const bool first_group = bh0 == 0, last_group = bh1 == B * H;

    // 1. The forward, per block, keeping the checkpoints (bitwise the forward kernel's values).
    for (ThreadScratch& t : scratch) t.gathered_bh = -1;
    for_each_item(nblocks, threads, [&](int64_t blk, int64_t slot) {
          ThreadScratch& sc = scratch[slot];
          const int64_t row0 = blk * kBwdBlockRows;  // in the group
          const int64_t bh = bh0 + row0 / d, i0 = row0 % d;
          if (bh != sc.gathered_bh) {
            if (in_place) {
              sc.Q_rows = q.data_ptr<float>() + (bh / H) * q.stride(0) + (bh % H) * q.stride(2);
              sc.q_rs = q.stride(1);
              sc.S_kept = S;
            } else {
              sc.S_kept = PLDR_DTYPE_SWITCH(q.scalar_type(), Elements, T, [&] {
                return gather_queries<T>(q, mask, bh / H, bh % H, sc.Qs, nullptr);
              });
              sc.Q_rows = sc.Qs;
              sc.q_rs = d;
            }
            sc.gathered_bh = bh;
          }
          qtq_columns(sc.Q_rows, sc.q_rs, sc.S_kept, d, i0, kBwdVecs, ws.qtq(blk), kBwdBlockRows);
          layer_norm_columns(ws.qtq(blk), ws.glu_input(blk, 0, 0), d, kBwdVecs, kBwdBlockRows,
                             w.ln0_w, w.ln0_b, eps_ln_f);
          for (int64_t r = 0; r < R; ++r) {
            for (int64_t g = 0; g < Gd; ++g) {
              const int64_t rg = r * Gd + g;
              swiglu_block(ws.glu_input(blk, r, g), sc.Ut, ws.glu_input(blk, r, g + 1), d,
                           F, kBwdVecs, w.w1 + rg * F * d, w.b1 + rg * F, w.w2 + rg * F * d,
                           w.b2 + rg * F, w.w3 + rg * d * F, w.b3 + rg * d,
                           ws.hidden1(blk, r, g), ws.hidden2(blk, r, g));
            }
            float* T = ws.ln_input(blk, r);
            const float* unit_in = ws.glu_input(blk, r, 0);
            for (int64_t i = 0; i < tile; ++i) T[i] += unit_in[i];  // residual
            float* out = r + 1 < R ? ws.glu_input(blk, r + 1, 0) : sc.A_block;
            layer_norm_columns(T, out, d, kBwdVecs, kBwdBlockRows, w.lnA_w + r * d,
                               w.lnA_b + r * d, eps_ln_f);
          }
          block_to_rows(sc.A_block, d, A_ptr + row0 * d);
        });

    // 2. Steps 9-12 reversed, per head h of the group, its batch rows in order (so every head's
    // sums over the batch run in batch order).
    const int64_t group_heads = std::min(H, bh1 - bh0);
    for_each_item(group_heads, threads, [&](int64_t item, int64_t slot) {
          float* f = scratch[slot].power_f32;
          double* x = scratch[slot].power_f64;
          PowerStageScratch views{f, f + dd, f + 2 * dd, f + 3 * dd,
                                  x, x + dd, x + 2 * dd, x + 3 * dd};
          const int64_t h = (bh0 + item) % H, head = h * dd;
          double* acc = head_acc_ptr + h * 5 * dd;  // W, b, pw, a, ba
          if (bh0 + item < H) std::fill(acc, acc + 5 * dd, 0.0);  // batch row 0: h's first
          int64_t last_bh = -1;
          for (int64_t bh = bh0 + item; bh < bh1; bh += H) {
            last_bh = bh;
            const int64_t off = bh * dd, local = (bh - bh0) * dd;
            auto given_at = [&](int i) { return given_ptr[i] ? given_ptr[i] + off : nullptr; };
            power_stage_backward(A_ptr + local, d, w.W + head, w.b + head, w.pw + head,
                                 w.a + head, eps_adj_f, given_at(0), given_at(1), given_at(2),
                                 views, acc, acc + dd, acc + 2 * dd, acc + 3 * dd,
                                 acc + 4 * dd, gA_ptr + local);
          }
          if (last_bh == (B - 1) * H + h)  // its last batch row is in: the sums into the outputs
            for (int k = 0; k < 5; ++k)
              for (int64_t i = 0; i < dd; ++i)
                g_head[k][head + i] = static_cast<float>(acc[k * dd + i]);
        });

    // 3. The residual units, last first: the blocks of unit r together with the weight-gradient
    // sums of unit r + 1; then the heads (4-5) together with the sums of unit 0.
    auto reverse_unit_block = [&](int64_t r, int64_t blk, ThreadScratch& sc) {
      float* g_out = ws.grad(blk);  // the gradient of this unit's output
      if (r == R - 1)               // the gradient reaching A, from row layout
        transpose_tile(gA_ptr + blk * kBwdBlockRows * d, kBwdBlockRows, d, d, g_out,
                       kBwdBlockRows);
      // LayerNorm(T), T = SwiGLUs(X) + X: gT reaches both the last SwiGLU and the residual.
      float* gT = ws.glu_grad_out(blk, r, Gd - 1);
      float* part = ln_partial(blk0 + blk, r + 1);
      layer_norm_backward_columns(ws.ln_input(blk, r), g_out, gT, d, w.lnA_w + r * d, eps_ln_f,
                                  part, part + d);
      for (int64_t g = Gd - 1; g >= 0; --g) {
        const int64_t rg = r * Gd + g;
        float* g_in = g > 0 ? ws.glu_grad_out(blk, r, g - 1) : sc.gX;
        swiglu_backward_block(ws.glu_grad_out(blk, r, g), d, F, w.w1 + rg * F * d,
                              w.w2 + rg * F * d, w.w3 + rg * d * F, ws.hidden1(blk, r, g),
                              ws.hidden2(blk, r, g),
                              ws.glu_U(blk, r, g), ws.glu_gH1(blk, r, g), ws.glu_gH2(blk, r, g),
                              g_in);
        block_to_rows(ws.glu_input(blk, r, g), d, ws.glu_input_rows(blk, r, g));
        block_to_rows(ws.glu_grad_out(blk, r, g), d, ws.glu_grad_out_rows(blk, r, g));
      }
      const float* gX = sc.gX;
      for (int64_t i = 0; i < tile; ++i) g_out[i] = gX[i] + gT[i];
    };
    auto weight_grad_tile = [&](const UnitItem& it) {
      const int64_t r = it.r, g = it.g_or_block, rg = r * Gd + g, bs = ws.unit_stride;
      const bool accumulate = !first_group;
      if (it.kind == UnitItem::kW3) {  // dW3ᵀ[f][j] = Σ U[f]·gY[j], db3[j] = Σ gY[j]
        block_sum_products(it.row0, it.row1, d, nblocks, ws.glu_U(0, r, g), bs,
                           ws.glu_grad_out_rows(0, r, g), bs,
                           w3_t_ptr + rg * F * d + it.row0 * d, accumulate);
        // db3 has d entries, not F: the items of dW3ᵀ's rows sum the same rows of it, the last
        // item also any rows past F.
        const int64_t j1 = it.row1 == F ? d : std::min(d, it.row1);
        if (it.row0 < j1)
          block_sum_rows(it.row0, j1, nblocks, ws.glu_grad_out(0, r, g), bs, lanes_b3(rg),
                         accumulate);
        if (last_group) {  // every block is in: this item's rows into the outputs
          const float* Ct = w3_t_ptr + rg * F * d;
          float* C = g_w3 + rg * d * F;
          for (int64_t f = it.row0; f < it.row1; ++f)
            for (int64_t j = 0; j < d; ++j) C[j * F + f] = Ct[f * d + j];
          if (it.row0 < j1)
            reduce_lanes(lanes_b3(rg) + it.row0 * kLanes, j1 - it.row0, g_b3 + rg * d + it.row0);
        }
        return;
      }
      // dW1[f][k] = Σ gH1[f]·X[k], db1[f] = Σ gH1[f]; the same for W2.
      const bool first = it.kind == UnitItem::kW1;
      const float* gH = first ? ws.glu_gH1(0, r, g) : ws.glu_gH2(0, r, g);
      block_sum_products(it.row0, it.row1, d, nblocks, gH, bs, ws.glu_input_rows(0, r, g), bs,
                         (first ? g_w1 : g_w2) + rg * F * d + it.row0 * d, accumulate);
      float* lanes = first ? lanes_b1(rg) : lanes_b2(rg);
      block_sum_rows(it.row0, it.row1, nblocks, gH, bs, lanes, accumulate);
      if (last_group)
        reduce_lanes(lanes + it.row0 * kLanes, it.row1 - it.row0,
                     (first ? g_b1 : g_b2) + rg * F + it.row0);
    };
    // 4-5. Per head: the first LayerNorm's backward (the gradient of QᵀQ, written over the
    // checkpoint of the first SwiGLU's input, no longer needed), then grad_q = q·(gA0 + gA0ᵀ)
    // for the kept rows and exactly 0 for the others.
    auto reverse_qtq_head = [&](int64_t item, ThreadScratch& sc) {
      const int64_t bh = bh0 + item, bi = bh / H, hi = bh % H;
      for (int64_t k = 0; k < blocks_per_head; ++k) {
        const int64_t blk = item * blocks_per_head + k;
        float* part = ln_partial(blk0 + blk, 0);
        layer_norm_backward_columns(ws.qtq(blk), ws.grad(blk), ws.glu_input(blk, 0, 0), d,
                                    w.ln0_w, eps_ln_f, part, part + d);
      }
      // gA0[i][j] is column i % 64 of row j of the gradient tile of the head's block i / 64.
      auto gA0 = [&](int64_t i, int64_t j) {
        const int64_t blk = item * blocks_per_head + i / kBwdBlockRows;
        return ws.glu_input(blk, 0, 0)[j * kBwdBlockRows + i % kBwdBlockRows];
      };
      float* M = sc.M;
      for (int64_t i = 0; i < d; ++i)
        for (int64_t j = 0; j < d; ++j) M[i * d + j] = gA0(i, j) + gA0(j, i);
      PLDR_DTYPE_SWITCH(q.scalar_type(), Elements, T, [&] {
        T* out = grad_q.data_ptr<T>() + bi * S * H * d + hi * d;
        const float* Qs = sc.Qs;
        int64_t kept = S, q_rs = d;
        if (in_place) {  // every row kept, read in place
          Qs = q.data_ptr<float>() + bi * q.stride(0) + hi * q.stride(2);
          q_rs = q.stride(1);
          std::iota(sc.positions, sc.positions + S, int64_t{0});
        } else {
          kept = gather_queries<T>(q, mask, bi, hi, sc.Qs, sc.positions);
          for (int64_t s = 0, k = 0; s < S; ++s) {  // the rows left out get exactly 0
            if (k < kept && sc.positions[k] == s) {
              ++k;
            } else {
              std::fill(out + s * H * d, out + s * H * d + d, T(0));
            }
          }
        }
        for_row_tiles<kTileRows>(static_cast<int>(kept), [&](int s0, auto rows) {
          constexpr int Rt = decltype(rows)::value;
          for (int64_t n0 = 0; n0 < d; n0 += kTileVecs * kLanes) {
            f32x16 acc[Rt][kTileVecs];
            tile_product<Rt, kTileVecs>(d, Qs + s0 * q_rs, q_rs, 1, M + n0, d, acc);
            PLDR_UNROLL
            for (int r = 0; r < Rt; ++r) {
              T* row = out + sc.positions[s0 + r] * H * d + n0;
              PLDR_UNROLL
              for (int v = 0; v < kTileVecs; ++v) {
                if constexpr (std::is_same_v<T, float>) {
                  simd::store(row + v * kLanes, acc[r][v]);
                } else {
                  alignas(64) float lanes[kLanes];
                  simd::store(lanes, acc[r][v]);
                  for (int e = 0; e < kLanes; ++e) row[v * kLanes + e] = static_cast<T>(lanes[e]);
                }
              }
            }
          }
        });
      });
    };
    for (int64_t r = R - 1; r >= -1; --r) {
      const std::vector<UnitItem> items = unit_items(r, nblocks, bh1 - bh0, r + 1, R, F, Gd);
      for_each_item(static_cast<int64_t>(items.size()), threads, [&](int64_t i, int64_t slot) {
            ThreadScratch& sc = scratch[slot];
            const UnitItem& it = items[i];
            if (it.kind != UnitItem::kBlock) {
              weight_grad_tile(it);
            } else if (r >= 0) {
              reverse_unit_block(r, it.g_or_block, sc);
            } else {
              reverse_qtq_head(it.g_or_block, sc);
            }
          });
    }
  }

  // The LayerNorm gradients: the per-block partial sums, in block order.
  const int64_t all_blocks = B * H * blocks_per_head;
  for (int64_t slot = 0; slot <= R; ++slot) {
    float* gw = slot == 0 ? g_ln0_w : g_lnA_w + (slot - 1) * d;
    float* gb = slot == 0 ? g_ln0_b : g_lnA_b + (slot - 1) * d;
    for (int64_t blk = 0; blk < all_blocks; ++blk) {
      const float* part = ln_partial(blk, slot);
      for (int64_t j = 0; j < d; ++j) {
        gw[j] += part[j];
        gb[j] += part[d + j];
      }
    }
  }
  return result();
}

}  // namespace
}  // namespace pldr::cpu

PLDR_CPU_KERNEL(metric_tensors_backward, pldr::cpu::metric_tensors_backward_cpu)  // registered for the ISA chosen at run time
