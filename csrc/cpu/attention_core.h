// The flash-style core shared by the CPU prefill and decode kernels (g_attention_cpu.cpp,
// g_attention_decode_cpu.cpp): a query tile's scratch, q̃ = q·G, and the online-softmax walk over a
// key range.
//
// Each work item takes a tile of query rows of one (batch, head), forms q̃ = q·G in fp32
// (pre-scaled by scale·log2 e), and walks the visible key tiles with an online softmax, so the
// Sq×Sk score matrix is never materialised. Tile products go through oneDNN's brgemm (exported by
// torch as at::native::cpublas::brgemm); tiles with very few query rows (decode) use row-wise dot
// products instead, which need no transposed copy of K.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/numerics.h"
#include "cpu/attention_tile.h"

namespace pldr::cpu {
// Internal linkage on purpose: each kernel file (one per op) gets its own copy, which lets GCC
// inline the called-once core into the kernel's work loop, as it did when both kernels shared one
// file. With external linkage it does not, and the decode row loop over long caches (which must
// stream K and V from memory) ran 1.5x slower on an AMD EPYC.
namespace {

constexpr int64_t kQueryTile = 64;
constexpr int64_t kKeyTile = 64;
// Decode tiles with up to this many query rows do scores and P·V row by row (no GEMM, no Kᵀ
// copy). Prefill always uses the GEMM path, so a row's result does not depend on how many query
// rows share its tile (batch invariance: a padded row equals the row run alone).
constexpr int64_t kRowPathMaxQueries = 4;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows of one (batch, head) slice of a [B, S, H, d] tensor: row s starts at ptr + s·stride.
template <typename T>
struct Rows {
  const T* ptr;
  int64_t stride;
  const T* row(int64_t s) const { return ptr + s * stride; }
};

template <typename T>
Rows<T> rows_of(const at::Tensor& t, int64_t b, int64_t h) {
  return {t.data_ptr<T>() + b * t.stride(0) + h * t.stride(2), t.stride(1)};
}

// Per-thread buffers of one query tile.
template <int D>
struct TileScratch {
  std::vector<float> q_rows, q_tilde, scores, k_transposed, v_rows, out, m, l;
  TileScratch()
      : q_rows(kQueryTile * D), q_tilde(kQueryTile * D), scores(kQueryTile * kKeyTile),
        k_transposed(D * kKeyTile), v_rows(kKeyTile * D), out(kQueryTile * D),
        m(kQueryTile), l(kQueryTile) {}
};

// What one query tile attends to: keys/values of its (batch, head), an optional key mask, and
// the causal diagonal: with `causal`, query row r of the tile sees key j iff j <= diag + r.
template <typename T>
struct KeyRange {
  Rows<T> k, v;
  const bool* key_mask;  // key j at key_mask[j·key_mask_stride]; nullptr = all keys visible
  int64_t key_mask_stride;
  int64_t begin, end;
  bool causal;
  int64_t diag;
  // Row path: K rows up to here may be fetched ahead past `end` (decode: the next split's first
  // rows, which the same thread usually takes next).
  int64_t prefetch_end = 0;
  // GEMM path: Kᵀ of key tile t already packed at k_tiles + t·D·kKeyTile (pack_key_tiles), or
  // nullptr: each tile packs its own copy. Needs `begin` to be a multiple of kKeyTile.
  const float* k_tiles = nullptr;
};

// Kᵀ of every key tile of `rows` (n_keys rows) as pack_transposed writes it for one tile
// ([D, kKeyTile], the first min(kKeyTile, n_keys − j0) columns of tile j0/kKeyTile), tile after
// tile at out. A prefill packs each (batch, kv head) once instead of once per query tile: with
// causal S = 1024 that is 16 packs of a head's K instead of 136 tile packs (Intel Xeon, 1 thread:
// the packs were ~10% of the kernel's time).
template <typename T, int D>
void pack_key_tiles(const Rows<T>& rows, int64_t n_keys, float* out) {
  for (int64_t j0 = 0; j0 < n_keys; j0 += kKeyTile) {
    pack_transposed<T, D>([&](int64_t jj) { return rows.row(j0 + jj); },
                          std::min(kKeyTile, n_keys - j0), out + (j0 / kKeyTile) * D * kKeyTile,
                          kKeyTile);
  }
}

// q̃ = (q rows [q0, q0+M) of one (b, h)) · G · (scale·log2 e), fp32 [M, D].
template <typename T, int D>
void form_q_tilde(const Rows<T>& q, int64_t q0, int64_t M, const float* g, int64_t g_ld,
                  float factor, TileScratch<D>& s) {
  const float* a;
  int64_t lda;
  if constexpr (std::is_same_v<T, float>) {
    if (q.stride >= D) {  // read in place (a stride below D is a broadcast view: copy instead)
      a = q.row(q0);
      lda = q.stride;
    } else {
      for (int64_t r = 0; r < M; ++r) load_row_as_float(q.row(q0 + r), s.q_rows.data() + r * D, D);
      a = s.q_rows.data();
      lda = D;
    }
  } else {
    for (int64_t r = 0; r < M; ++r) load_row_as_float(q.row(q0 + r), s.q_rows.data() + r * D, D);
    a = s.q_rows.data();
    lda = D;
  }
  float* qt = s.q_tilde.data();
  if (g != nullptr) {
    at::native::cpublas::brgemm(M, D, D, lda, g_ld, D, false, a, g, qt, false);
    scale_in_place(qt, M * D, factor);
  } else {
    for (int64_t r = 0; r < M; ++r) store_row_from_float(a + r * lda, qt + r * D, D, factor);
  }
}

// Decode streams K and V rows from a cache much larger than the caches of the CPU; the rows are
// H·d apart, so fetching the next ones ahead of use keeps the loads from stalling.
template <typename T, int D>
inline void prefetch_row(const T* row) {
  for (int64_t byte = 0; byte < static_cast<int64_t>(D * sizeof(T)); byte += 64) {
    __builtin_prefetch(reinterpret_cast<const char*>(row) + byte);
  }
}

// Whether key_mask lets any of the keys [j0, j0 + n) through.
template <typename T>
bool any_key_visible(const KeyRange<T>& kr, int64_t j0, int64_t n) {
  for (int64_t jj = 0; jj < n; ++jj) {
    if (kr.key_mask[(j0 + jj) * kr.key_mask_stride]) return true;
  }
  return false;
}

// Masks invisible keys of a score tile with −inf (causal diagonal, key_mask).
template <typename T>
void mask_scores(float* scores, int64_t M, int64_t j0, int64_t n, const KeyRange<T>& kr) {
  if (kr.causal && j0 + n - 1 > kr.diag) {
    for (int64_t r = 0; r < M; ++r) {
      const int64_t first_hidden = std::max<int64_t>(kr.diag + r + 1 - j0, 0);
      for (int64_t jj = first_hidden; jj < n; ++jj) scores[r * kKeyTile + jj] = kNegInf;
    }
  }
  if (kr.key_mask != nullptr) {
    for (int64_t jj = 0; jj < n; ++jj) {
      if (!kr.key_mask[(j0 + jj) * kr.key_mask_stride]) {
        for (int64_t r = 0; r < M; ++r) scores[r * kKeyTile + jj] = kNegInf;
      }
    }
  }
}

// Whether key jj of the tile at j0 is visible to query row r of the tile.
template <typename T>
bool row_sees_key(const KeyRange<T>& kr, int64_t r, int64_t j0, int64_t jj) {
  return !(kr.causal && j0 + jj > kr.diag + r) &&
         (kr.key_mask == nullptr || kr.key_mask[(j0 + jj) * kr.key_mask_stride]);
}

// Whether key jj of the tile is hidden from some of its rows (mask_scores put −inf there).
template <typename T>
bool key_hidden_from_a_row(const KeyRange<T>& kr, int64_t j0, int64_t jj) {
  return !row_sees_key(kr, 0, j0, jj);  // row 0 sees the fewest keys
}

// Whether a key hidden from some row of the tile has a NaN or Inf in its V row.
template <typename T, int D>
bool hidden_v_not_finite(const KeyRange<T>& kr, int64_t j0, int64_t n) {
  f32x16 acc = simd::zero();
  for (int64_t jj = 0; jj < n; ++jj) {
    if (key_hidden_from_a_row(kr, j0, jj)) acc = accumulate_nonfinite<D>(kr.v.row(j0 + jj), acc);
  }
  return std::isnan(simd::reduce_add(acc));
}

// out += P·V for a GEMM tile where the V row of a hidden key holds a NaN or Inf (rare). In the
// GEMM its weight 0 would still give 0·NaN = NaN in rows that must not see it (docs/design.md
// §3.5), so: the GEMM on V with those entries zeroed — bitwise what any finite value there would
// give, since their weight is exactly 0 — then each such entry's P·v added to the rows that do
// see its key.
template <typename T, int D>
void accumulate_pv_hiding_nonfinite(const float* p, int64_t M, int64_t j0, int64_t n,
                                    const KeyRange<T>& kr, TileScratch<D>& s) {
  float* v_rows = s.v_rows.data();
  for (int64_t jj = 0; jj < n; ++jj) {
    float* row = v_rows + jj * D;
    load_row_as_float(kr.v.row(j0 + jj), row, D);
    if (!key_hidden_from_a_row(kr, j0, jj)) continue;
    for (int64_t e = 0; e < D; ++e) {
      if (!std::isfinite(row[e])) row[e] = 0.0f;
    }
  }
  float* out = s.out.data();
  at::native::cpublas::brgemm(M, D, n, kKeyTile, D, D, true, p, v_rows, out, false);
  for (int64_t jj = 0; jj < n; ++jj) {
    if (!key_hidden_from_a_row(kr, j0, jj)) continue;
    const T* v = kr.v.row(j0 + jj);
    for (int64_t e = 0; e < D; ++e) {
      const float x = static_cast<float>(v[e]);
      if (std::isfinite(x)) continue;
      for (int64_t r = 0; r < M; ++r) {
        if (row_sees_key(kr, r, j0, jj)) out[r * D + e] += p[r * kKeyTile + jj] * x;
      }
    }
  }
}

// Runs the online softmax of the M rows of q̃ (in s.q_tilde) over the key range, accumulating the
// unnormalised output in s.out and the running max / sum in s.m / s.l (initialised by the caller).
// Keys a row does not see never contribute to it, whatever their K and V rows hold (−inf scores,
// and P·V restricted to the visible keys).
template <typename T, int D>
void attend_key_range(int64_t M, const KeyRange<T>& kr, bool allow_row_path, TileScratch<D>& s) {
  int64_t end = kr.end;
  if (kr.causal) end = std::min(end, kr.diag + M);  // the last row sees keys <= diag + M − 1
  // (key_mask is a prefill argument; decode, the row path's user, has none)
  const bool row_path = allow_row_path && M <= kRowPathMaxQueries && kr.key_mask == nullptr;
  float* scores = s.scores.data();
  const float* qt = s.q_tilde.data();
  float* out = s.out.data();
  for (int64_t j0 = kr.begin; j0 < end; j0 += kKeyTile) {
    const int64_t n = std::min(kKeyTile, end - j0);
    if (kr.key_mask != nullptr && !any_key_visible(kr, j0, n)) {
      continue;  // a fully padded tile contributes nothing
    }
    if (row_path) {
      for (int64_t jj = 0; jj < n; ++jj) {
        prefetch_row<T, D>(kr.v.row(j0 + jj));  // V of this tile is read right after the scores
        dot_query_rows<D>(qt, M, kr.k.row(j0 + jj), scores + jj, kKeyTile);
      }
    } else {
      const float* k_tile = s.k_transposed.data();
      if (kr.k_tiles != nullptr) {
        k_tile = kr.k_tiles + (j0 / kKeyTile) * D * kKeyTile;
      } else {
        pack_transposed<T, D>([&](int64_t jj) { return kr.k.row(j0 + jj); }, n,
                              s.k_transposed.data(), kKeyTile);
      }
      at::native::cpublas::brgemm(M, n, D, D, kKeyTile, kKeyTile, false, qt, k_tile, scores,
                                  false);
    }
    mask_scores(scores, M, j0, n, kr);
    online_softmax_update<D>(scores, kKeyTile, M, n, s.m.data(), s.l.data(), out);
    if (row_path) {
      auto v_row = [&](int64_t jj) { return kr.v.row(j0 + jj); };
      // Row r sums over the keys it sees only, the first keys_seen(r) of the tile (skipping a
      // zero weight leaves a finite sum bitwise as it is, and keeps a hidden NaN out).
      auto keys_seen = [&](int64_t r) {
        return kr.causal ? std::clamp<int64_t>(kr.diag + r + 1 - j0, 0, n) : n;
      };
      // The first row's pass also fetches K of the next tile; later rows find V already in L1.
      const int64_t next_k_rows = std::min(n, std::max(end, kr.prefetch_end) - (j0 + n));
      const T* next_k = next_k_rows > 0 ? kr.k.row(j0 + n) : nullptr;
      accumulate_weighted_rows<D, T>(scores, keys_seen(0), v_row, out, [&](int64_t jj) {
        if (jj < next_k_rows) prefetch_row<T, D>(next_k + jj * kr.k.stride);
      });
      for (int64_t r = 1; r < M; ++r) {
        accumulate_weighted_rows<D, T>(scores + r * kKeyTile, keys_seen(r), v_row, out + r * D,
                                       [](int64_t) {});
      }
    } else {
      const bool some_key_hidden =
          kr.key_mask != nullptr || (kr.causal && j0 + n - 1 > kr.diag);
      if (some_key_hidden && hidden_v_not_finite<T, D>(kr, j0, n)) {
        accumulate_pv_hiding_nonfinite<T, D>(scores, M, j0, n, kr, s);
        continue;
      }
      const float* vtile;
      int64_t ldv;
      if (std::is_same_v<T, float> && kr.v.stride >= D) {  // fp32 rows are used in place
        vtile = reinterpret_cast<const float*>(kr.v.row(j0));
        ldv = kr.v.stride;
      } else {
        for (int64_t jj = 0; jj < n; ++jj) {
          load_row_as_float(kr.v.row(j0 + jj), s.v_rows.data() + jj * D, D);
        }
        vtile = s.v_rows.data();
        ldv = D;
      }
      at::native::cpublas::brgemm(M, D, n, kKeyTile, ldv, D, true, scores, vtile, out, false);
    }
  }
}

// G as the kernels read it: G[b, h] is a [D, D] fp32 matrix at ptr + b·batch + h·head with row
// stride ld (>= D). A shared G ([1, H, d, d]) has batch stride 0.
struct GView {
  at::Tensor holder;  // keeps a contiguous copy alive when G's row stride is unusable
  const float* ptr = nullptr;
  int64_t batch = 0, head = 0, ld = 0;

  GView(const c10::optional<at::Tensor>& G, int64_t d) {
    if (!G.has_value()) return;
    holder = G->stride(2) >= d ? *G : G->contiguous();
    ptr = holder.data_ptr<float>();
    batch = holder.size(0) > 1 ? holder.stride(0) : 0;
    head = holder.stride(1);
    ld = holder.stride(2);
  }
  const float* at(int64_t b, int64_t h) const {
    return ptr != nullptr ? ptr + b * batch + h * head : nullptr;
  }
};

template <int D>
void reset_accumulators(int64_t M, TileScratch<D>& s) {
  std::fill(s.out.begin(), s.out.begin() + M * D, 0.0f);
  std::fill(s.m.begin(), s.m.begin() + M, kNegInf);
  std::fill(s.l.begin(), s.l.begin() + M, 0.0f);
}

// Runs fn(item) for items [0, n) with cost(item) spread evenly over the threads: each thread takes
// a contiguous run of items whose summed cost is ~1/threads of the total. Work is triangular under
// a causal mask, so equal item counts would not balance.
template <typename CostFn, typename WorkFn>
void parallel_balanced(int64_t n, const CostFn& cost, const WorkFn& work) {
  if (n == 0) return;
  std::vector<int64_t> prefix(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) prefix[i + 1] = prefix[i] + cost(i);
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  const int64_t total = prefix[n];
  at::parallel_for(0, threads, 1, [&](int64_t t_begin, int64_t t_end) {
    for (int64_t t = t_begin; t < t_end; ++t) {
      const auto first = std::lower_bound(prefix.begin(), prefix.end(), total * t / threads);
      const auto last = std::lower_bound(prefix.begin(), prefix.end(), total * (t + 1) / threads);
      int64_t i = first - prefix.begin();
      const int64_t i_end = t + 1 == threads ? n : last - prefix.begin();
      for (; i < i_end; ++i) work(i);
    }
    at::native::cpublas::brgemm_release(false);
  });
}

}  // namespace
}  // namespace pldr::cpu
