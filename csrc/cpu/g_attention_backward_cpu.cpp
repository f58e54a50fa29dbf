// CPU kernel of pldr::g_attention_backward (docs/design.md §3.4): the FlashAttention-2 backward on
// q̃ = q·G, followed by dq = dq̃·Gᵀ and dG[b, h] = Σ_s q[b, s, h]ᵀ·dq̃[b, s, h].
//
// A work item is a contiguous run of key tiles ("chunk") of one (batch, head); the number of chunks
// per (b, h) follows from the shapes only (kMinWorkItems), so the partition, and with it every bit
// of the result, is the same at any thread count. An item first recomputes, for the query tiles its
// keys are visible to, what the backward needs of the forward: q̃ scaled into log2 units (as the
// forward forms it), dO in fp32, D and lse in log2 units. D = Σ_j P_ij·dP_ij; for fp32 inputs it is
// FlashAttention's rowsum(dO∘O); for bf16 / fp16 it is summed from P and dP in fp32 by a first pass
// over the query tiles, because out rounded to 8 or 11 bits makes rowsum(dO∘O) err by as much as
// the whole same-dtype PyTorch gradient does (docs/design.md §3.4). Then, per key tile, it walks
// the visible query tiles with every product in the transposed frame (keys down, queries across),
// so no tile is transposed inside the loop and a masked key is a whole row:
//   Sᵀ = K·q̃ᵀ,  Pᵀ = 2^(Sᵀ − lse),  dPᵀ = V·dOᵀ,  dSᵀ = Pᵀ∘(dPᵀ − D),
//   dV += Pᵀ·dO,  dK += dSᵀ·q̃,  dq̃ᵀ += Kᵀ·dSᵀ.
// dK and dV of the chunk's keys are finished inside the item. dq̃ᵀ of a (b, h) is summed over its
// chunks in chunk order (a partial per chunk, no atomics), then dq = dq̃·Gᵀ and dG follow per
// (b, h), query tile by query tile; a G shared by the batch sums dG over the batch in batch order.
// The Sq×Sk matrices exist one 64×64 tile at a time.
//
// Grouped-query attention (k, v with H_kv < H heads): an item of query head h reads kv head
// h / (H / H_kv) and writes the dK, dV of its own query head in fp32 to a [B, Sk, H, d] workspace;
// a last pass sums each kv head's group of query heads in head order and rounds once (no atomics,
// the same bits at any thread count).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"
#include "cpu/isa.h"
#include "common/numerics.h"
#include "cpu/attention_core.h"

namespace pldr::cpu {
namespace {

constexpr int64_t kBwdQueryTile = 64;  // query rows per tile (columns of the transposed frame)
constexpr int64_t kBwdKeyTile = 64;    // key rows per tile
// A (b, h) is split into chunks of key tiles until there are at least this many work items, so a
// small B·H still spreads over the cores; more chunks cost one dq̃ partial [Sq, d] each.
constexpr int64_t kMinWorkItems = 8;
static_assert(kBwdQueryTile <= kQueryTile, "q̃ is formed in the forward's tile scratch");

// Everything an item reads, and where it writes.
template <typename T>
struct Problem {
  const at::Tensor &dout, &q, &k, &v, &out, &lse;
  const bool* mask = nullptr;  // key j of batch row b at mask[b·mask_batch + j·mask_key]
  int64_t mask_batch = 0, mask_key = 0;
  GView g;
  int64_t B, Sq, Sk, H, q_tiles, k_tiles;
  int64_t kv_group;  // query heads per kv head (1: multi-head attention)
  int64_t n_chunks;  // key chunks per (b, h)
  bool causal;
  int64_t diag;   // with causal, query i sees key j iff j <= i + diag (bottom-right aligned)
  float factor;   // scale·log2 e: q̃ in log2 units, as the forward forms it
  float scale;
  T *dq, *dk, *dv;
  // GQA: dK, dV per query head, fp32 [B, Sk, H, d], summed over each group afterwards; null for
  // multi-head attention, whose items write dk, dv directly.
  float *dk_per_head = nullptr, *dv_per_head = nullptr;

  Problem(const at::Tensor& dout_, const at::Tensor& q_, const at::Tensor& k_,
          const at::Tensor& v_, const c10::optional<at::Tensor>& G,
          const at::Tensor& out_, const at::Tensor& lse_,
          const c10::optional<at::Tensor>& key_mask, bool causal_, double scale_value,
          const AttentionDims& dims, at::Tensor& dq_, at::Tensor& dk_, at::Tensor& dv_)
      : dout(dout_), q(q_), k(k_), v(v_), out(out_), lse(lse_), g(G, dims.d), B(dims.B),
        Sq(dims.Sq), Sk(dims.Sk), H(dims.H), q_tiles(ceil_div(dims.Sq, kBwdQueryTile)),
        k_tiles(ceil_div(dims.Sk, kBwdKeyTile)), kv_group(dims.H / dims.H_kv),
        n_chunks(std::clamp<int64_t>(ceil_div(kMinWorkItems, dims.B * dims.H), 1,
                                     std::max<int64_t>(k_tiles, 1))),
        causal(causal_), diag(dims.Sk - dims.Sq),
        factor(static_cast<float>(scale_value * kLog2e)),  // the forward's q̃ factor
        scale(static_cast<float>(scale_value)), dq(dq_.data_ptr<T>()), dk(dk_.data_ptr<T>()),
        dv(dv_.data_ptr<T>()) {
    if (key_mask.has_value()) {
      mask = key_mask->data_ptr<bool>();
      mask_batch = key_mask->stride(0);
      mask_key = key_mask->stride(1);
    }
  }

  bool key_visible(int64_t b, int64_t j) const {
    return mask == nullptr || mask[b * mask_batch + j * mask_key];
  }
  // The first query tile that any key >= j0 is visible to; q_tiles when there is none.
  int64_t first_query_tile(int64_t j0) const {
    if (!causal) return 0;
    const int64_t i_min = std::max<int64_t>(0, j0 - diag);
    return i_min >= Sq ? q_tiles : i_min / kBwdQueryTile;
  }
  int64_t chunk_begin(int64_t chunk) const { return chunk * k_tiles / n_chunks; }
  int64_t chunk_end(int64_t chunk) const { return (chunk + 1) * k_tiles / n_chunks; }
};

// An item's fp32 copies of the query side, over all query tiles of its (b, h) (only the visible
// ones are filled). Carved from the call's workspace, one slot per thread.
template <int D>
struct QuerySide {
  float* qs_rows;  // [q_tiles·TQ, D]   q̃·scale·log2 e
  float* qs_cols;  // [q_tiles, D, TQ]  the same, transposed per tile
  float* do_rows;  // [q_tiles·TQ, D]   dO
  float* do_cols;  // [q_tiles, D, TQ]
  float* delta;    // [q_tiles·TQ]      D = rowsum(dO∘O)
  float* lse2;     // [q_tiles·TQ]      lse·log2 e (+inf for a row without a visible key)
  float* dqt;      // [q_tiles, D, TQ]  dq̃ᵀ (unscaled) of an item that owns its whole (b, h)

  static int64_t floats(int64_t q_tiles) {
    const int64_t rows = q_tiles * kBwdQueryTile;
    return 5 * rows * D + 2 * rows;
  }
  QuerySide(float* base, int64_t q_tiles) {
    const int64_t block = q_tiles * kBwdQueryTile * D;
    qs_rows = base;
    qs_cols = qs_rows + block;
    do_rows = qs_cols + block;
    do_cols = do_rows + block;
    dqt = do_cols + block;
    delta = dqt + block;
    lse2 = delta + q_tiles * kBwdQueryTile;
  }
};

// Per-thread buffers of one key tile and of the dq / dG epilogue (fixed size).
template <int D>
struct KeyTileScratch {
  std::vector<float> k_rows, v_rows, k_cols, st, dpt, dk, dv, dqt_sum, dq_cols, q_rows, dgt;
  std::vector<char> touched;  // per query tile: has this item's dq̃ᵀ block been written yet
  KeyTileScratch()
      : k_rows(kBwdKeyTile * D), v_rows(kBwdKeyTile * D), k_cols(D * kBwdKeyTile),
        st(kBwdKeyTile * kBwdQueryTile), dpt(kBwdKeyTile * kBwdQueryTile), dk(kBwdKeyTile * D),
        dv(kBwdKeyTile * D), dqt_sum(D * kBwdQueryTile), dq_cols(D * kBwdQueryTile),
        q_rows(kBwdQueryTile * D), dgt(D * D) {}
};

// The first query column of a tile (rows i0 .. i0 + M − 1) that sees key j; M when none does.
template <typename T>
inline int64_t first_visible_column(const Problem<T>& p, int64_t b, int64_t j, int64_t i0,
                                    int64_t M) {
  if (!p.key_visible(b, j)) return M;
  return p.causal ? std::clamp<int64_t>(j - p.diag - i0, 0, M) : 0;  // sees j iff i >= j − diag
}

// lse in log2 units, as the scores; a row without a visible key (lse −inf) gets +inf, so that its
// P = 2^(s − inf) is 0.
inline float lse_log2(float lse) {
  return lse == kNegInf ? std::numeric_limits<float>::infinity()
                        : static_cast<float>(static_cast<double>(lse) * kLog2e);
}

// fp32 rows [j0, j0 + n) of K and V of one (b, h); a masked key's rows are zeros, so its values
// never reach a product.
template <typename T, int D>
void load_key_tile(const Problem<T>& p, int64_t b, const Rows<T>& k, const Rows<T>& v, int64_t j0,
                   int64_t n, float* k_rows, float* v_rows) {
  for (int64_t r = 0; r < n; ++r) {
    if (p.key_visible(b, j0 + r)) {
      load_row_as_float(k.row(j0 + r), k_rows + r * D, D);
      load_row_as_float(v.row(j0 + r), v_rows + r * D, D);
    } else {
      std::fill_n(k_rows + r * D, D, 0.0f);
      std::fill_n(v_rows + r * D, D, 0.0f);
    }
  }
}

// st = Sᵀ [n, M] (row stride TQ) becomes Pᵀ = 2^(Sᵀ − lse) in place; hidden pairs (causal diagonal,
// masked key) are exactly 0. Returns nothing; first_visible[r] is left for the caller.
template <typename T>
void probabilities_tile(const Problem<T>& p, int64_t b, int64_t j0, int64_t n, int64_t i0,
                        int64_t M, const float* lse2, float* st) {
  for (int64_t r = 0; r < n; ++r) {
    float* s = st + r * kBwdQueryTile;
    const int64_t first_visible = first_visible_column(p, b, j0 + r, i0, M);
    for (int64_t c = first_visible - first_visible % kLanes; c < M; c += kLanes) {
      const int64_t count = M - c;
      simd::store_partial(s + c, simd::exp2(simd::sub(simd::load_partial(s + c, count),
                                                      simd::load_partial(lse2 + c, count))),
                          count);
    }
    std::fill(s, s + first_visible, 0.0f);
  }
}

template <typename T, int D>
inline float dot_row(const float* a, const T* b) {
  f32x16 acc = simd::mul(simd::load(a), simd::load_as_f32(b));
  PLDR_UNROLL
  for (int c = kLanes; c < D; c += kLanes) {
    acc = simd::fma(simd::load(a + c), simd::load_as_f32(b + c), acc);
  }
  return simd::reduce_add(acc);
}

template <typename T>
inline void zero_row(T* dst, int64_t n) {
  std::fill(dst, dst + n, static_cast<T>(0.0f));
}

// Fills the query side for query tiles [it_begin, q_tiles) of (b, h). exact_delta: D of this
// (b, h) from exact_delta_tile, or nullptr for rowsum(dO∘O).
template <typename T, int D>
void prepare_query_tiles(const Problem<T>& p, int64_t b, int64_t h, int64_t it_begin,
                         const float* exact_delta, QuerySide<D>& qs, TileScratch<D>& fwd) {
  const Rows<T> q = rows_of<T>(p.q, b, h), dout = rows_of<T>(p.dout, b, h),
                out = rows_of<T>(p.out, b, h);
  const float* lse = p.lse.template data_ptr<float>() + b * p.lse.stride(0) + h * p.lse.stride(1);
  const int64_t lse_stride = p.lse.stride(2);
  for (int64_t it = it_begin; it < p.q_tiles; ++it) {
    const int64_t i0 = it * kBwdQueryTile, M = std::min(kBwdQueryTile, p.Sq - i0);
    form_q_tilde<T, D>(q, i0, M, p.g.at(b, h), p.g.ld, p.factor, fwd);
    float* qs_rows = qs.qs_rows + i0 * D;
    std::copy(fwd.q_tilde.data(), fwd.q_tilde.data() + M * D, qs_rows);
    pack_transposed<float, D>([&](int64_t r) { return qs_rows + r * D; }, M,
                              qs.qs_cols + it * D * kBwdQueryTile, kBwdQueryTile);
    float* do_rows = qs.do_rows + i0 * D;
    for (int64_t r = 0; r < M; ++r) {
      load_row_as_float(dout.row(i0 + r), do_rows + r * D, D);
      qs.delta[i0 + r] = exact_delta != nullptr ? exact_delta[i0 + r]
                                                : dot_row<T, D>(do_rows + r * D, out.row(i0 + r));
      qs.lse2[i0 + r] = lse_log2(lse[(i0 + r) * lse_stride]);
    }
    pack_transposed<float, D>([&](int64_t r) { return do_rows + r * D; }, M,
                              qs.do_cols + it * D * kBwdQueryTile, kBwdQueryTile);
  }
}

// One (key tile, query tile) pair in the transposed frame, in place: st = Sᵀ becomes Pᵀ and
// dpt = dPᵀ becomes dSᵀ = Pᵀ∘(dPᵀ − D). Hidden pairs (causal diagonal, masked key) are exactly 0 in
// both.
template <typename T>
void softmax_backward_tile(const Problem<T>& p, int64_t b, int64_t j0, int64_t n, int64_t i0,
                           int64_t M, const float* lse2, const float* delta, float* st,
                           float* dpt) {
  probabilities_tile(p, b, j0, n, i0, M, lse2, st);
  for (int64_t r = 0; r < n; ++r) {
    const float* prob = st + r * kBwdQueryTile;
    float* dp = dpt + r * kBwdQueryTile;
    const int64_t first_visible = first_visible_column(p, b, j0 + r, i0, M);
    for (int64_t c = first_visible - first_visible % kLanes; c < M; c += kLanes) {
      const int64_t count = M - c;
      simd::store_partial(dp + c,
                          simd::mul(simd::load_partial(prob + c, count),
                                    simd::sub(simd::load_partial(dp + c, count),
                                              simd::load_partial(delta + c, count))),
                          count);
    }
    std::fill(dp, dp + first_visible, 0.0f);
  }
}

// D = Σ_j P_ij·dP_ij of the query tile [i0, i0 + M) of one (b, h), summed in fp32 over its visible
// key tiles in key order (the bf16 / fp16 path; see the top of the file).
template <typename T, int D>
void exact_delta_tile(const Problem<T>& p, int64_t b, int64_t h, int64_t it, float* delta,
                      KeyTileScratch<D>& w, TileScratch<D>& fwd) {
  constexpr int64_t TQ = kBwdQueryTile, TK = kBwdKeyTile;
  const int64_t i0 = it * TQ, M = std::min(TQ, p.Sq - i0);
  form_q_tilde<T, D>(rows_of<T>(p.q, b, h), i0, M, p.g.at(b, h), p.g.ld, p.factor, fwd);
  const float* qs_rows = fwd.q_tilde.data();
  pack_transposed<float, D>([&](int64_t r) { return qs_rows + r * D; }, M, w.dq_cols.data(), TQ);
  const Rows<T> dout = rows_of<T>(p.dout, b, h), k = rows_of<T>(p.k, b, h / p.kv_group),
                v = rows_of<T>(p.v, b, h / p.kv_group);
  for (int64_t r = 0; r < M; ++r) load_row_as_float(dout.row(i0 + r), w.q_rows.data() + r * D, D);
  pack_transposed<float, D>([&](int64_t r) { return w.q_rows.data() + r * D; }, M,
                            w.dqt_sum.data(), TQ);
  const float* lse = p.lse.template data_ptr<float>() + b * p.lse.stride(0) + h * p.lse.stride(1);
  float lse2[TQ];
  float acc[TQ] = {};
  for (int64_t c = 0; c < M; ++c) lse2[c] = lse_log2(lse[(i0 + c) * p.lse.stride(2)]);
  // The last row sees keys <= i0 + M − 1 + diag.
  const int64_t key_end = p.causal ? std::clamp<int64_t>(i0 + M + p.diag, 0, p.Sk) : p.Sk;
  for (int64_t j0 = 0; j0 < key_end; j0 += TK) {
    const int64_t n = std::min(TK, key_end - j0);
    bool any_visible = p.mask == nullptr;
    for (int64_t r = 0; r < n && !any_visible; ++r) any_visible = p.key_visible(b, j0 + r);
    if (!any_visible) continue;
    load_key_tile<T, D>(p, b, k, v, j0, n, w.k_rows.data(), w.v_rows.data());
    at::native::cpublas::brgemm(n, M, D, D, TQ, TQ, false, w.k_rows.data(), w.dq_cols.data(),
                                w.st.data(), false);
    at::native::cpublas::brgemm(n, M, D, D, TQ, TQ, false, w.v_rows.data(), w.dqt_sum.data(),
                                w.dpt.data(), false);
    probabilities_tile(p, b, j0, n, i0, M, lse2, w.st.data());
    for (int64_t r = 0; r < n; ++r) {
      const float* prob = w.st.data() + r * TQ;
      float* dp = w.dpt.data() + r * TQ;
      // A hidden pair adds nothing, even where dP is not finite (a NaN in a V row i cannot see).
      std::fill(dp, dp + first_visible_column(p, b, j0 + r, i0, M), 0.0f);
      for (int64_t c = 0; c < M; c += kLanes) {
        const int64_t count = M - c;
        simd::store_partial(acc + c,
                            simd::fma(simd::load_partial(prob + c, count),
                                      simd::load_partial(dp + c, count),
                                      simd::load_partial(acc + c, count)),
                            count);
      }
    }
  }
  std::copy(acc, acc + M, delta + i0);
}

// dK, dV of the chunk's key tiles, and its dq̃ᵀ (unscaled, [q_tiles, D, TQ]) into dqt.
template <typename T, int D>
void backward_chunk(const Problem<T>& p, int64_t bh, int64_t chunk, const float* exact_delta,
                    QuerySide<D>& qs, float* dqt, KeyTileScratch<D>& w, TileScratch<D>& fwd) {
  const int64_t b = bh / p.H, h = bh % p.H;
  const int64_t kt_begin = p.chunk_begin(chunk), kt_end = p.chunk_end(chunk);
  w.touched.assign(p.q_tiles, 0);
  const int64_t it_begin = p.first_query_tile(kt_begin * kBwdKeyTile);
  if (it_begin < p.q_tiles && kt_begin < kt_end) {
    prepare_query_tiles<T, D>(p, b, h, it_begin, exact_delta, qs, fwd);
  }
  const Rows<T> k = rows_of<T>(p.k, b, h / p.kv_group), v = rows_of<T>(p.v, b, h / p.kv_group);
  // Multi-head: this head's rows of dk, dv. GQA: its rows of the fp32 per-query-head workspace.
  const int64_t H_kv = p.H / p.kv_group;
  auto dk_row = [&](int64_t j) { return p.dk + ((b * p.Sk + j) * H_kv + h) * D; };
  auto dv_row = [&](int64_t j) { return p.dv + ((b * p.Sk + j) * H_kv + h) * D; };
  auto dk_head_row = [&](int64_t j) { return p.dk_per_head + ((b * p.Sk + j) * p.H + h) * D; };
  auto dv_head_row = [&](int64_t j) { return p.dv_per_head + ((b * p.Sk + j) * p.H + h) * D; };
  const bool per_head = p.dk_per_head != nullptr;
  auto zero_key_rows = [&](int64_t j) {
    if (per_head) {
      zero_row(dk_head_row(j), D);
      zero_row(dv_head_row(j), D);
    } else {
      zero_row(dk_row(j), D);
      zero_row(dv_row(j), D);
    }
  };
  constexpr int64_t TQ = kBwdQueryTile, TK = kBwdKeyTile;
  for (int64_t jt = kt_begin; jt < kt_end; ++jt) {
    const int64_t j0 = jt * TK, n = std::min(TK, p.Sk - j0);
    const int64_t it_first = p.first_query_tile(j0);
    bool any_visible = it_first < p.q_tiles;
    if (any_visible && p.mask != nullptr) {
      any_visible = false;
      for (int64_t r = 0; r < n && !any_visible; ++r) any_visible = p.key_visible(b, j0 + r);
    }
    if (!any_visible) {  // no query sees these keys: zero gradients, nothing to add to dq̃
      for (int64_t r = 0; r < n; ++r) zero_key_rows(j0 + r);
      continue;
    }
    load_key_tile<T, D>(p, b, k, v, j0, n, w.k_rows.data(), w.v_rows.data());
    pack_transposed<float, D>([&](int64_t r) { return w.k_rows.data() + r * D; }, n,
                              w.k_cols.data(), TK);
    for (int64_t it = it_first; it < p.q_tiles; ++it) {
      const int64_t i0 = it * TQ, M = std::min(TQ, p.Sq - i0);
      const bool first = it == it_first;
      at::native::cpublas::brgemm(n, M, D, D, TQ, TQ, false, w.k_rows.data(),
                                  qs.qs_cols + it * D * TQ, w.st.data(), false);
      at::native::cpublas::brgemm(n, M, D, D, TQ, TQ, false, w.v_rows.data(),
                                  qs.do_cols + it * D * TQ, w.dpt.data(), false);
      softmax_backward_tile(p, b, j0, n, i0, M, qs.lse2 + i0, qs.delta + i0, w.st.data(),
                            w.dpt.data());
      at::native::cpublas::brgemm(n, D, M, TQ, D, D, !first, w.st.data(), qs.do_rows + i0 * D,
                                  w.dv.data(), false);
      at::native::cpublas::brgemm(n, D, M, TQ, D, D, !first, w.dpt.data(), qs.qs_rows + i0 * D,
                                  w.dk.data(), false);
      at::native::cpublas::brgemm(D, M, n, TK, TQ, TQ, w.touched[it] != 0, w.k_cols.data(),
                                  w.dpt.data(), dqt + it * D * TQ, false);
      w.touched[it] = 1;
    }
    // dK = scale·dSᵀ·q̃ = ln 2 · dSᵀ·(q̃·scale·log2 e).
    const float to_natural = static_cast<float>(kLn2);
    for (int64_t r = 0; r < n; ++r) {
      if (!p.key_visible(b, j0 + r)) {
        zero_key_rows(j0 + r);
      } else if (per_head) {
        store_row_from_float(w.dk.data() + r * D, dk_head_row(j0 + r), D, to_natural);
        store_row_from_float(w.dv.data() + r * D, dv_head_row(j0 + r), D, 1.0f);
      } else {
        store_row_from_float(w.dk.data() + r * D, dk_row(j0 + r), D, to_natural);
        store_row_from_float(w.dv.data() + r * D, dv_row(j0 + r), D, 1.0f);
      }
    }
  }
  for (int64_t it = 0; it < p.q_tiles; ++it) {
    if (!w.touched[it]) std::fill_n(dqt + it * D * kBwdQueryTile, D * kBwdQueryTile, 0.0f);
  }
}

// dq = scale·dq̃·Gᵀ and dG[b, h] = scale·Σ_s qᵀ·dq̃ for one (b, h), from its chunks' dq̃ᵀ partials
// (chunk c's at dqt + c·chunk_stride), summed in chunk order. dG_out: [D, D] row-major, or nullptr
// without G.
template <typename T, int D>
void finish_queries(const Problem<T>& p, int64_t bh, const float* dqt, int64_t chunk_stride,
                    float* dG_out, KeyTileScratch<D>& w) {
  constexpr int64_t TQ = kBwdQueryTile;
  const int64_t b = bh / p.H, h = bh % p.H;
  const float* g = p.g.at(b, h);
  const Rows<T> q = rows_of<T>(p.q, b, h);
  for (int64_t it = 0; it < p.q_tiles; ++it) {
    const int64_t i0 = it * TQ, M = std::min(TQ, p.Sq - i0);
    const float* block = dqt + it * D * TQ;
    if (p.n_chunks > 1) {
      float* sum = w.dqt_sum.data();
      std::copy(block, block + D * TQ, sum);
      for (int64_t c = 1; c < p.n_chunks; ++c) {
        const float* part = block + c * chunk_stride;
        for (int64_t e = 0; e < D * TQ; e += kLanes) {
          simd::store(sum + e, simd::add(simd::load(sum + e), simd::load(part + e)));
        }
      }
      block = sum;
    }
    const float* dq_cols = block;  // dqᵀ = G·dq̃ᵀ, [D, M]
    if (g != nullptr) {
      at::native::cpublas::brgemm(D, M, D, p.g.ld, TQ, TQ, false, g, block, w.dq_cols.data(),
                                  false);
      dq_cols = w.dq_cols.data();
    }
    for (int64_t c = 0; c < M; ++c) {
      T* dst = p.dq + ((b * p.Sq + i0 + c) * p.H + h) * D;
      for (int64_t e = 0; e < D; ++e) dst[e] = static_cast<T>(dq_cols[e * TQ + c] * p.scale);
    }
    if (g != nullptr) {  // dGᵀ += dq̃ᵀ·q
      const float* a;
      int64_t lda;
      if (std::is_same_v<T, float> && q.stride >= D) {
        a = reinterpret_cast<const float*>(q.row(i0));
        lda = q.stride;
      } else {
        for (int64_t r = 0; r < M; ++r) load_row_as_float(q.row(i0 + r), w.q_rows.data() + r * D, D);
        a = w.q_rows.data();
        lda = D;
      }
      at::native::cpublas::brgemm(D, D, M, TQ, lda, D, it > 0, block, a, w.dgt.data(), false);
    }
  }
  if (dG_out != nullptr) {
    if (p.q_tiles == 0) {
      std::fill_n(dG_out, D * D, 0.0f);
      return;
    }
    for (int64_t r = 0; r < D; ++r) {
      for (int64_t c = 0; c < D; ++c) dG_out[r * D + c] = w.dgt[c * D + r] * p.scale;
    }
  }
}

template <typename T, int D>
void g_attention_backward_kernel(const Problem<T>& p, at::Tensor* dG) {
  constexpr int64_t TQ = kBwdQueryTile;
  const int64_t BH = p.B * p.H;
  // Scratch slots are indexed by the thread running an item; their contents never outlive it, so
  // which thread runs what does not change a bit. A call from inside a parallel region runs
  // inline, on slot 0.
  const bool nested = at::in_parallel_region();
  const int64_t slots = nested ? 1 : std::max<int64_t>(at::get_num_threads(), 1);
  const int64_t slot_floats = QuerySide<D>::floats(p.q_tiles);
  at::Tensor workspace = at::empty({slots, slot_floats}, p.q.options().dtype(at::kFloat));
  float* workspace_ptr = workspace.data_ptr<float>();
  const int64_t block_floats = p.q_tiles * D * TQ;  // one dq̃ᵀ of a (b, h)
  at::Tensor partials;
  if (p.n_chunks > 1) partials = at::empty({p.n_chunks, BH, block_floats}, workspace.options());
  // dG of each (b, h): straight into the output unless a shared G sums it over the batch.
  const bool shared_g = dG != nullptr && dG->size(0) == 1 && p.B > 1;
  at::Tensor dG_per_bh;
  float* dG_ptr = nullptr;
  if (dG != nullptr) {
    dG_per_bh = shared_g ? at::empty({p.B, p.H, D, D}, workspace.options()) : *dG;
    dG_ptr = dG_per_bh.data_ptr<float>();
  }
  auto slot_of = [&] {
    const int64_t slot = nested ? 0 : at::get_thread_num();
    TORCH_INTERNAL_ASSERT(slot >= 0 && slot < slots, "g_attention_backward: thread slot ", slot,
                          " outside [0, ", slots, ")");
    return slot;
  };
  // bf16 / fp16: D from P and dP (exact_delta_tile), one item per query tile.
  at::Tensor exact_delta;
  const int64_t rows_per_bh = p.q_tiles * TQ;
  if constexpr (!std::is_same_v<T, float>) {
    exact_delta = at::empty({BH, rows_per_bh}, workspace.options());
    float* delta_ptr = exact_delta.data_ptr<float>();
    parallel_balanced(
        BH * p.q_tiles,
        [&](int64_t item) {
          const int64_t i_last = std::min((item % p.q_tiles + 1) * TQ, p.Sq) - 1;
          const int64_t key_end = p.causal ? std::clamp<int64_t>(i_last + 1 + p.diag, 0, p.Sk) : p.Sk;
          return ceil_div(key_end, kBwdKeyTile) + 1;
        },
        [&](int64_t item) {
          static thread_local KeyTileScratch<D> w;
          static thread_local TileScratch<D> fwd;
          const int64_t bh = item / p.q_tiles;
          exact_delta_tile<T, D>(p, bh / p.H, bh % p.H, item % p.q_tiles,
                                 delta_ptr + bh * rows_per_bh, w, fwd);
        });
  }
  auto chunk_cost = [&](int64_t chunk) {
    int64_t cost = 1;
    for (int64_t jt = p.chunk_begin(chunk); jt < p.chunk_end(chunk); ++jt) {
      cost += p.q_tiles - p.first_query_tile(jt * kBwdKeyTile);
    }
    return cost;
  };
  parallel_balanced(
      BH * p.n_chunks, [&](int64_t item) { return chunk_cost(item % p.n_chunks); },
      [&](int64_t item) {
        static thread_local KeyTileScratch<D> w;
        static thread_local TileScratch<D> fwd;
        const int64_t bh = item / p.n_chunks, chunk = item % p.n_chunks;
        QuerySide<D> qs(workspace_ptr + slot_of() * slot_floats, p.q_tiles);
        float* dqt = p.n_chunks == 1 ? qs.dqt
                                     : partials.data_ptr<float>() + (chunk * BH + bh) * block_floats;
        const float* delta =
            exact_delta.defined() ? exact_delta.data_ptr<float>() + bh * rows_per_bh : nullptr;
        backward_chunk<T, D>(p, bh, chunk, delta, qs, dqt, w, fwd);
        if (p.n_chunks == 1) {
          finish_queries<T, D>(p, bh, dqt, 0, dG_ptr ? dG_ptr + bh * D * D : nullptr, w);
        }
      });
  if (p.n_chunks > 1) {
    parallel_balanced(
        BH, [&](int64_t) { return int64_t{1}; },
        [&](int64_t bh) {
          static thread_local KeyTileScratch<D> w;
          finish_queries<T, D>(p, bh, partials.data_ptr<float>() + bh * block_floats,
                               BH * block_floats, dG_ptr ? dG_ptr + bh * D * D : nullptr, w);
        });
  }
  if (p.dk_per_head != nullptr) {  // GQA: dk, dv of kv head g = Σ over its query heads, in order
    const int64_t H_kv = p.H / p.kv_group;
    at::parallel_for(0, p.B * p.Sk * H_kv, 64, [&](int64_t begin, int64_t end) {
      float acc_k[D], acc_v[D];
      for (int64_t row = begin; row < end; ++row) {  // row = (b·Sk + j)·H_kv + g
        const int64_t bj = row / H_kv, first_head = (row % H_kv) * p.kv_group;
        const float* k_src = p.dk_per_head + (bj * p.H + first_head) * D;
        const float* v_src = p.dv_per_head + (bj * p.H + first_head) * D;
        std::copy(k_src, k_src + D, acc_k);
        std::copy(v_src, v_src + D, acc_v);
        for (int64_t m = 1; m < p.kv_group; ++m) {
          for (int64_t e = 0; e < D; ++e) {
            acc_k[e] += k_src[m * D + e];
            acc_v[e] += v_src[m * D + e];
          }
        }
        store_row_from_float(acc_k, p.dk + row * D, D, 1.0f);
        store_row_from_float(acc_v, p.dv + row * D, D, 1.0f);
      }
    });
  }
  if (shared_g) {  // dG[0, h] = Σ_b dG[b, h], in batch order
    float* dst = dG->data_ptr<float>();
    at::parallel_for(0, p.H, 1, [&](int64_t h_begin, int64_t h_end) {
      for (int64_t h = h_begin; h < h_end; ++h) {
        float* acc = dst + h * D * D;
        std::copy(dG_ptr + h * D * D, dG_ptr + (h + 1) * D * D, acc);
        for (int64_t b = 1; b < p.B; ++b) {
          const float* part = dG_ptr + (b * p.H + h) * D * D;
          for (int64_t e = 0; e < D * D; ++e) acc[e] += part[e];
        }
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, c10::optional<at::Tensor>> g_attention_backward_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& G, const at::Tensor& out, const at::Tensor& lse,
    const c10::optional<at::Tensor>& key_mask, bool causal, c10::optional<double> scale) {
  const auto dims =
      check_g_attention_backward_inputs(dout, q, k, v, G, out, lse, key_mask, scale);
  auto dq = at::empty({dims.B, dims.Sq, dims.H, dims.d}, q.options());
  auto dk = at::empty({dims.B, dims.Sk, dims.H_kv, dims.d}, q.options());
  auto dv = at::empty({dims.B, dims.Sk, dims.H_kv, dims.d}, q.options());
  c10::optional<at::Tensor> dG;
  if (G.has_value()) dG = at::empty(G->sizes(), G->options().memory_format(at::MemoryFormat::Contiguous));
  if (dq.numel() == 0 || dk.numel() == 0) {  // no query or no key: every gradient is 0
    dq.zero_();
    dk.zero_();
    dv.zero_();
    if (dG.has_value()) dG->zero_();
    return {dq, dk, dv, dG};
  }
  const double scale_value = scale.value_or(1.0 / std::sqrt(static_cast<double>(dims.d)));
  PLDR_DTYPE_SWITCH(q.scalar_type(), Elements, T, [&] {
    PLDR_HEAD_DIM_SWITCH(dims.d, D, [&] {
      Problem<T> p(dout, q, k, v, G, out, lse, key_mask, causal, scale_value, dims, dq, dk, dv);
      at::Tensor dk_per_head, dv_per_head;  // GQA workspaces (see the top of the file)
      if (p.kv_group > 1) {
        dk_per_head = at::empty({dims.B, dims.Sk, dims.H, dims.d}, q.options().dtype(at::kFloat));
        dv_per_head = at::empty_like(dk_per_head);
        p.dk_per_head = dk_per_head.data_ptr<float>();
        p.dv_per_head = dv_per_head.data_ptr<float>();
      }
      g_attention_backward_kernel<T, D>(p, dG.has_value() ? &*dG : nullptr);
    });
  });
  return {dq, dk, dv, dG};
}

}  // namespace
}  // namespace pldr::cpu

PLDR_CPU_KERNEL(g_attention_backward, pldr::cpu::g_attention_backward_cpu)  // registered for the ISA chosen at run time
