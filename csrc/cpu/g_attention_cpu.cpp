// CPU kernels of pldr::g_attention and pldr::g_attention_decode (DESIGN.md §3.2, §3.3).
//
// Flash-style: each work item takes a tile of query rows of one (batch, head), forms q̃ = q·G in
// fp32 (pre-scaled by scale·log2 e), and walks the visible key tiles with an online softmax, so the
// Sq×Sk score matrix is never materialised. Tile products go through oneDNN's brgemm (exported by
// torch as at::native::cpublas::brgemm); tiles with very few query rows (decode) use row-wise dot
// products instead, which need no transposed copy of K. Decode splits long key ranges across
// threads and combines the partial results by their log-sum-exp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/checks.h"
#include "cpu/attention_tile.h"

namespace pldr::cpu {
namespace {

constexpr int64_t kQueryTile = 64;
constexpr int64_t kKeyTile = 64;
// Decode tiles with up to this many query rows do scores and P·V row by row (no GEMM, no Kᵀ
// copy). Prefill always uses the GEMM path, so a row's result does not depend on how many query
// rows share its tile (batch invariance: a padded row equals the row run alone).
constexpr int64_t kRowPathMaxQueries = 4;
// Decode never splits a row's keys into pieces shorter than this many tiles.
constexpr int64_t kMinTilesPerSplit = 4;

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
  const bool* key_mask;  // nullptr = all keys visible
  int64_t begin, end;
  bool causal;
  int64_t diag;
};

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
      if (!kr.key_mask[j0 + jj]) {
        for (int64_t r = 0; r < M; ++r) scores[r * kKeyTile + jj] = kNegInf;
      }
    }
  }
}

// Runs the online softmax of the M rows of q̃ (in s.q_tilde) over the key range, accumulating the
// unnormalised output in s.out and the running max / sum in s.m / s.l (initialised by the caller).
template <typename T, int D>
void attend_key_range(int64_t M, const KeyRange<T>& kr, bool allow_row_path, TileScratch<D>& s) {
  int64_t end = kr.end;
  if (kr.causal) end = std::min(end, kr.diag + M);  // the last row sees keys <= diag + M − 1
  const bool row_path = allow_row_path && M <= kRowPathMaxQueries;
  float* scores = s.scores.data();
  const float* qt = s.q_tilde.data();
  float* out = s.out.data();
  for (int64_t j0 = kr.begin; j0 < end; j0 += kKeyTile) {
    const int64_t n = std::min(kKeyTile, end - j0);
    if (kr.key_mask != nullptr &&
        std::none_of(kr.key_mask + j0, kr.key_mask + j0 + n, [](bool b) { return b; })) {
      continue;  // a fully padded tile contributes nothing
    }
    if (row_path) {
      for (int64_t jj = 0; jj < n; ++jj) {
        prefetch_row<T, D>(kr.v.row(j0 + jj));  // V of this tile is read right after the scores
        dot_query_rows<D>(qt, M, kr.k.row(j0 + jj), scores + jj, kKeyTile);
      }
    } else {
      pack_transposed<T, D>([&](int64_t jj) { return kr.k.row(j0 + jj); }, n,
                            s.k_transposed.data(), kKeyTile);
      at::native::cpublas::brgemm(M, n, D, D, kKeyTile, kKeyTile, false, qt,
                                  s.k_transposed.data(), scores, false);
    }
    mask_scores(scores, M, j0, n, kr);
    online_softmax_update<D>(scores, kKeyTile, M, n, s.m.data(), s.l.data(), out);
    if (row_path) {
      auto v_row = [&](int64_t jj) { return kr.v.row(j0 + jj); };
      // The first row's pass also fetches K of the next tile; later rows find V already in L1.
      const int64_t next_k_rows = std::min(n, end - (j0 + n));
      const T* next_k = next_k_rows > 0 ? kr.k.row(j0 + n) : nullptr;
      accumulate_weighted_rows<D, T>(scores, n, v_row, out, [&](int64_t jj) {
        if (jj < next_k_rows) prefetch_row<T, D>(next_k + jj * kr.k.stride);
      });
      for (int64_t r = 1; r < M; ++r) {
        accumulate_weighted_rows<D, T>(scores + r * kKeyTile, n, v_row, out + r * D,
                                       [](int64_t) {});
      }
    } else {
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

// Natural-log LSE of a finished row (m in log2 units); −inf when no key was visible.
inline float natural_lse(float m, float l) {
  return l > 0.0f ? static_cast<float>((static_cast<double>(m) + std::log2(static_cast<double>(l))) * kLn2)
                  : kNegInf;
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

// Calls fn(TypeTag<T>{}, std::integral_constant<int, D>{}) for the activation dtype and head dim
// (both validated by checks.h before this point).
template <typename T>
struct TypeTag {
  using type = T;
};

template <typename Fn>
void dispatch_dtype_and_head_dim(at::ScalarType dtype, int64_t d, const Fn& fn) {
  auto with_dim = [&](auto type_tag) {
    if (d == 64) {
      fn(type_tag, std::integral_constant<int, 64>{});
    } else {
      fn(type_tag, std::integral_constant<int, 128>{});
    }
  };
  switch (dtype) {
    case at::kFloat: with_dim(TypeTag<float>{}); break;
    case at::kBFloat16: with_dim(TypeTag<c10::BFloat16>{}); break;
    case at::kHalf: with_dim(TypeTag<c10::Half>{}); break;
    default: TORCH_CHECK(false, "pldr g_attention (CPU): unsupported dtype ", dtype);
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------------------------------------
// pldr::g_attention
// ------------------------------------------------------------------------------------------------
template <typename T, int D>
void g_attention_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const c10::optional<at::Tensor>& G, const c10::optional<at::Tensor>& key_mask,
                        bool causal, float factor, at::Tensor& out, at::Tensor& lse) {
  const int64_t B = q.size(0), Sq = q.size(1), H = q.size(2), Sk = k.size(1);
  const int64_t q_tiles = ceil_div(Sq, kQueryTile);
  const int64_t n_items = B * H * q_tiles;
  at::Tensor mask;
  if (key_mask.has_value()) mask = key_mask->contiguous();
  const bool* mask_ptr = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  const GView g_view(G, D);
  T* out_ptr = out.data_ptr<T>();
  float* lse_ptr = lse.data_ptr<float>();

  auto tile_of = [&](int64_t item) { return item % q_tiles; };
  auto visible_key_tiles = [&](int64_t t) {
    const int64_t q0 = t * kQueryTile, M = std::min(kQueryTile, Sq - q0);
    const int64_t end = causal ? std::clamp<int64_t>(q0 + M + Sk - Sq, 0, Sk) : Sk;
    return ceil_div(end, kKeyTile) + 1;  // +1: the fixed cost of forming q̃ and writing out
  };

  parallel_balanced(
      n_items, [&](int64_t item) { return visible_key_tiles(tile_of(item)); },
      [&](int64_t item) {
        static thread_local TileScratch<D> s;
        const int64_t t = tile_of(item), bh = item / q_tiles, b = bh / H, h = bh % H;
        const int64_t q0 = t * kQueryTile, M = std::min(kQueryTile, Sq - q0);
        form_q_tilde<T, D>(rows_of<T>(q, b, h), q0, M, g_view.at(b, h), g_view.ld, factor, s);
        reset_accumulators<D>(M, s);
        const KeyRange<T> kr{rows_of<T>(k, b, h), rows_of<T>(v, b, h),
                             mask_ptr ? mask_ptr + b * Sk : nullptr, 0, Sk, causal,
                             q0 + Sk - Sq};
        attend_key_range<T, D>(M, kr, /*allow_row_path=*/false, s);
        for (int64_t r = 0; r < M; ++r) {
          const float l = s.l[r];
          store_row_from_float(s.out.data() + r * D, out_ptr + ((b * Sq + q0 + r) * H + h) * D, D,
                               l > 0.0f ? 1.0f / l : 0.0f);
          lse_ptr[(b * H + h) * Sq + q0 + r] = natural_lse(s.m[r], l);
        }
      });
}

std::tuple<at::Tensor, at::Tensor> g_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                   const at::Tensor& v,
                                                   const c10::optional<at::Tensor>& G,
                                                   const c10::optional<at::Tensor>& key_mask,
                                                   bool causal, c10::optional<double> scale) {
  const auto dims = check_g_attention_inputs(q, k, v, G, key_mask, scale);
  auto out = at::empty({dims.B, dims.Sq, dims.H, dims.d}, q.options());
  auto lse = at::empty({dims.B, dims.H, dims.Sq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const float factor =
      static_cast<float>(scale.value_or(1.0 / std::sqrt(static_cast<double>(dims.d))) * kLog2e);
  dispatch_dtype_and_head_dim(q.scalar_type(), dims.d, [&](auto type_tag, auto head_dim) {
    using T = typename decltype(type_tag)::type;
    g_attention_kernel<T, decltype(head_dim)::value>(q, k, v, G, key_mask, causal, factor, out, lse);
  });
  return {out, lse};
}


// ------------------------------------------------------------------------------------------------
// pldr::g_attention_decode
// ------------------------------------------------------------------------------------------------
// Number of key splits per (row, head, query tile). Auto: enough work items for ~4 per thread, but
// no split shorter than kMinTilesPerSplit key tiles.
int64_t choose_num_splits(int64_t requested, int64_t base_items, int64_t max_key_tiles) {
  const int64_t most = std::max<int64_t>(1, max_key_tiles);
  if (requested > 0) return std::min(requested, most);
  const int64_t wanted = ceil_div(4 * static_cast<int64_t>(at::get_num_threads()), base_items);
  return std::clamp<int64_t>(std::min(wanted, ceil_div(max_key_tiles, kMinTilesPerSplit)), 1, most);
}

// Writes k_new/v_new into the caches at rows cache_seqlens[b] ... (bounds already checked).
template <typename T>
void append_to_cache(const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& k_cache,
                     const at::Tensor& v_cache, const std::vector<int64_t>& lens) {
  const int64_t B = k_new.size(0), Sn = k_new.size(1), H = k_new.size(2), d = k_new.size(3);
  at::parallel_for(0, B * Sn, 16, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / Sn, i = idx % Sn, row = lens[b] + i;
      for (int64_t h = 0; h < H; ++h) {
        std::memcpy(k_cache.data_ptr<T>() + b * k_cache.stride(0) + row * k_cache.stride(1) +
                        h * k_cache.stride(2),
                    k_new.data_ptr<T>() + b * k_new.stride(0) + i * k_new.stride(1) + h * k_new.stride(2),
                    d * sizeof(T));
        std::memcpy(v_cache.data_ptr<T>() + b * v_cache.stride(0) + row * v_cache.stride(1) +
                        h * v_cache.stride(2),
                    v_new.data_ptr<T>() + b * v_new.stride(0) + i * v_new.stride(1) + h * v_new.stride(2),
                    d * sizeof(T));
      }
    }
  });
}

template <typename T, int D>
void g_attention_decode_kernel(const at::Tensor& q, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const std::vector<int64_t>& key_begin,
                               const std::vector<int64_t>& key_end,
                               const c10::optional<at::Tensor>& G, float factor,
                               int64_t num_splits, at::Tensor& out) {
  const int64_t B = q.size(0), Sn = q.size(1), H = q.size(2);
  const int64_t q_tiles = ceil_div(Sn, kQueryTile);
  int64_t max_key_tiles = 0;
  for (int64_t b = 0; b < B; ++b) {
    max_key_tiles = std::max(max_key_tiles, ceil_div(key_end[b] - key_begin[b], kKeyTile));
  }
  const int64_t splits = choose_num_splits(num_splits, B * H * q_tiles, max_key_tiles);
  const int64_t n_items = B * H * q_tiles * splits;
  const GView g_view(G, D);
  T* out_ptr = out.data_ptr<T>();
  // With several splits each writes its normalised partial output and LSE (log2 units) here.
  std::vector<float> part_out(splits > 1 ? B * H * splits * Sn * D : 0);
  std::vector<float> part_lse(splits > 1 ? B * H * splits * Sn : 0);

  struct Item {
    int64_t b, h, tile, split;
  };
  auto item_of = [&](int64_t i) {
    const int64_t split = i % splits, tile = (i / splits) % q_tiles, bh = i / (splits * q_tiles);
    return Item{bh / H, bh % H, tile, split};
  };
  auto split_range = [&](int64_t b, int64_t split) {
    const int64_t tiles = ceil_div(key_end[b] - key_begin[b], kKeyTile);
    const int64_t per_split = ceil_div(tiles, splits);
    const int64_t first = std::min(key_end[b], key_begin[b] + split * per_split * kKeyTile);
    const int64_t last = std::min(key_end[b], first + per_split * kKeyTile);
    return std::pair<int64_t, int64_t>{first, last};
  };

  parallel_balanced(
      n_items,
      [&](int64_t i) {
        const Item it = item_of(i);
        const auto [first, last] = split_range(it.b, it.split);
        return ceil_div(last - first, kKeyTile) + 1;
      },
      [&](int64_t i) {
        static thread_local TileScratch<D> s;
        const Item it = item_of(i);
        const int64_t q0 = it.tile * kQueryTile, M = std::min(kQueryTile, Sn - q0);
        form_q_tilde<T, D>(rows_of<T>(q, it.b, it.h), q0, M, g_view.at(it.b, it.h), g_view.ld,
                           factor, s);
        reset_accumulators<D>(M, s);
        const auto [first, last] = split_range(it.b, it.split);
        // Query i of the new block sees cache rows up to key_end − Sn + i (bottom-right causal).
        const KeyRange<T> kr{rows_of<T>(k_cache, it.b, it.h), rows_of<T>(v_cache, it.b, it.h),
                             nullptr, first, last, true, key_end[it.b] - Sn + q0};
        attend_key_range<T, D>(M, kr, /*allow_row_path=*/true, s);
        for (int64_t r = 0; r < M; ++r) {
          const float l = s.l[r];
          const float inv_l = l > 0.0f ? 1.0f / l : 0.0f;
          if (splits == 1) {
            store_row_from_float(s.out.data() + r * D,
                                 out_ptr + it.b * out.stride(0) + (q0 + r) * out.stride(1) +
                                     it.h * out.stride(2),
                                 D, inv_l);
          } else {
            const int64_t p = ((it.b * H + it.h) * splits + it.split) * Sn + q0 + r;
            store_row_from_float(s.out.data() + r * D, part_out.data() + p * D, D, inv_l);
            part_lse[p] = l > 0.0f ? s.m[r] + std::log2(l) : kNegInf;
          }
        }
      });
  if (splits == 1) return;

  // Combine the splits of each (b, h, query) by their LSE, in split order (deterministic).
  at::parallel_for(0, B * H * Sn, 16, [&](int64_t begin, int64_t end) {
    float acc[D];
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t i = idx % Sn, bh = idx / Sn, b = bh / H, h = bh % H;
      auto part = [&](int64_t split) { return (bh * splits + split) * Sn + i; };
      float lse_max = kNegInf;
      for (int64_t sp = 0; sp < splits; ++sp) lse_max = std::max(lse_max, part_lse[part(sp)]);
      std::fill(acc, acc + D, 0.0f);
      float weight_sum = 0.0f;
      if (lse_max != kNegInf) {
        for (int64_t sp = 0; sp < splits; ++sp) {
          const float w = std::exp2(part_lse[part(sp)] - lse_max);
          if (w == 0.0f) continue;
          weight_sum += w;
          axpy<D>(w, part_out.data() + part(sp) * D, acc);
        }
      }
      store_row_from_float(acc, out_ptr + b * out.stride(0) + i * out.stride(1) + h * out.stride(2),
                           D, weight_sum > 0.0f ? 1.0f / weight_sum : 0.0f);
    }
  });
}

std::vector<int64_t> host_values(const c10::optional<at::Tensor>& t, int64_t n, int64_t fill) {
  std::vector<int64_t> values(n, fill);
  if (t.has_value()) {
    const auto c = t->contiguous();
    const int32_t* p = c.data_ptr<int32_t>();
    for (int64_t i = 0; i < n; ++i) values[i] = p[i];
  }
  return values;
}

at::Tensor g_attention_decode_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                  const c10::optional<at::Tensor>& k_new,
                                  const c10::optional<at::Tensor>& v_new,
                                  const c10::optional<at::Tensor>& cache_start,
                                  const c10::optional<at::Tensor>& G,
                                  c10::optional<double> scale, int64_t num_splits) {
  const auto dims = check_g_attention_decode_inputs(q, k_cache, v_cache, cache_seqlens, k_new,
                                                    v_new, cache_start, G, scale, num_splits);
  const bool appending = k_new.has_value();
  // Every value check happens before the first write: a failing call leaves the caches untouched.
  check_cache_bounds_host(cache_seqlens, cache_start, dims.Sn, dims.Smax, appending);
  const std::vector<int64_t> lens = host_values(cache_seqlens, dims.B, 0);
  const std::vector<int64_t> key_begin = host_values(cache_start, dims.B, 0);
  std::vector<int64_t> key_end(lens);
  if (appending) {
    for (auto& e : key_end) e += dims.Sn;
  }
  auto out = at::empty({dims.B, dims.Sn, dims.H, dims.d}, q.options());
  if (out.numel() == 0) return out;
  const float factor =
      static_cast<float>(scale.value_or(1.0 / std::sqrt(static_cast<double>(dims.d))) * kLog2e);
  dispatch_dtype_and_head_dim(q.scalar_type(), dims.d, [&](auto type_tag, auto head_dim) {
    using T = typename decltype(type_tag)::type;
    if (appending) append_to_cache<T>(*k_new, *v_new, k_cache, v_cache, lens);
    g_attention_decode_kernel<T, decltype(head_dim)::value>(q, k_cache, v_cache, key_begin, key_end,
                                                            G, factor, num_splits, out);
  });
  return out;
}

}  // namespace
}  // namespace pldr::cpu

TORCH_LIBRARY_IMPL(pldr, CPU, m) {
  m.impl("g_attention", &pldr::cpu::g_attention_cpu);
  m.impl("g_attention_decode", &pldr::cpu::g_attention_decode_cpu);
}
