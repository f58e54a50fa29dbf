// CPU kernel of pldr::g_attention_decode (docs/design.md §3.3): appends k_new/v_new to the
// caches, then attends the Sn new queries over the cache with the core of cpu/attention_core.h.
// Long key ranges are split across threads and the partial results combined by their
// log-sum-exp, in split order (deterministic).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"
#include "cpu/isa.h"
#include "cpu/attention_core.h"

namespace pldr::cpu {
namespace {

// Decode never splits a row's keys into pieces shorter than this many tiles.
constexpr int64_t kMinTilesPerSplit = 4;
// The work items the automatic split count aims at: ~4 per thread up to 16 threads. A constant,
// not the thread count, so that a step gives the same bits at any thread count (docs/design.md
// §3.5); a split costs little (its first keys are fetched by the previous split's last tile).
constexpr int64_t kAutoSplitItems = 64;

// Number of key splits per (row, head, query tile). Auto: enough work items for kAutoSplitItems,
// but no split shorter than kMinTilesPerSplit key tiles. Depends on the shapes and the lengths
// only.
int64_t choose_num_splits(int64_t requested, int64_t base_items, int64_t max_key_tiles) {
  const int64_t most = std::max<int64_t>(1, max_key_tiles);
  if (requested > 0) return std::min(requested, most);
  const int64_t wanted = ceil_div(kAutoSplitItems, base_items);
  return std::clamp<int64_t>(std::min(wanted, ceil_div(max_key_tiles, kMinTilesPerSplit)), 1, most);
}

// Writes k_new/v_new (H_kv heads, like the caches) into the caches at rows cache_seqlens[b] ...
// (bounds already checked).
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
  const int64_t kv_group = H / k_cache.size(2);  // query heads per kv head (GQA, §3.3)
  const int64_t q_tiles = ceil_div(Sn, kQueryTile);
  int64_t max_key_tiles = 0;
  for (int64_t b = 0; b < B; ++b) {
    max_key_tiles = std::max(max_key_tiles, ceil_div(key_end[b] - key_begin[b], kKeyTile));
  }
  const int64_t splits = choose_num_splits(num_splits, B * H * q_tiles, max_key_tiles);
  const int64_t n_items = B * H * q_tiles * splits;
  static std::atomic<int64_t> calls{0};  // tells this call's q̃ from an earlier call's
  const int64_t call = calls.fetch_add(1, std::memory_order_relaxed);
  const GView g_view(G, D);
  T* out_ptr = out.data_ptr<T>();
  // With several splits each writes its normalised partial output and LSE (log2 units) here.
  // Every entry is written by its item before the combine reads it: no zero fill.
  const std::unique_ptr<float[]> part_out(splits > 1 ? new float[B * H * splits * Sn * D] : nullptr);
  const std::unique_ptr<float[]> part_lse(splits > 1 ? new float[B * H * splits * Sn] : nullptr);

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
        // Which query tile's q̃ s.q_tilde holds: a thread takes a run of consecutive items, the
        // splits of one query tile among them, and forms its q̃ once for them all (the same
        // bits as forming it again).
        static thread_local std::pair<int64_t, int64_t> formed{-1, -1};  // (call, query tile)
        const Item it = item_of(i);
        const int64_t q0 = it.tile * kQueryTile, M = std::min(kQueryTile, Sn - q0);
        const std::pair<int64_t, int64_t> query_tile{call, i / splits};
        if (formed != query_tile) {
          form_q_tilde<T, D>(rows_of<T>(q, it.b, it.h), q0, M, g_view.at(it.b, it.h), g_view.ld,
                             factor, s);
          formed = query_tile;
        }
        reset_accumulators<D>(M, s);
        const auto [first, last] = split_range(it.b, it.split);
        // Query i of the new block sees cache rows up to key_end − Sn + i (bottom-right causal).
        const int64_t kv_h = it.h / kv_group;
        const KeyRange<T> kr{rows_of<T>(k_cache, it.b, kv_h), rows_of<T>(v_cache, it.b, kv_h),
                             nullptr, 0, first, last, true, key_end[it.b] - Sn + q0,
                             key_end[it.b]};
        attend_key_range<T, D>(M, kr, /*allow_row_path=*/true, s);
        for (int64_t r = 0; r < M; ++r) {
          const float l = s.l[r];
          const float inv_l = inverse_sum(l);
          if (splits == 1) {
            store_row_from_float(s.out.data() + r * D,
                                 out_ptr + it.b * out.stride(0) + (q0 + r) * out.stride(1) +
                                     it.h * out.stride(2),
                                 D, inv_l);
          } else {
            const int64_t p = ((it.b * H + it.h) * splits + it.split) * Sn + q0 + r;
            store_row_from_float(s.out.data() + r * D, part_out.get() + p * D, D, inv_l);
            part_lse[p] = l == 0.0f ? kNegInf : s.m[r] + std::log2(l);  // NaN stays NaN
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
      // A NaN split (docs/design.md §3.5) makes lse_max NaN, and with it every weight.
      float lse_max = kNegInf;
      for (int64_t sp = 0; sp < splits; ++sp) {
        const float x = part_lse[part(sp)];
        if (std::isnan(x) || x > lse_max) lse_max = x;  // once NaN, x > lse_max is false
      }
      std::fill(acc, acc + D, 0.0f);
      float weight_sum = 0.0f;
      if (lse_max != kNegInf) {
        for (int64_t sp = 0; sp < splits; ++sp) {
          const float w = std::exp2(part_lse[part(sp)] - lse_max);
          if (w == 0.0f) continue;
          weight_sum += w;
          axpy<D>(w, part_out.get() + part(sp) * D, acc);
        }
      }
      store_row_from_float(acc, out_ptr + b * out.stride(0) + i * out.stride(1) + h * out.stride(2),
                           D, inverse_sum(weight_sum));
    }
  });
}

// The n int32 values of a [n] tensor (read through its stride), or n × fill when absent.
std::vector<int64_t> host_values(const c10::optional<at::Tensor>& t, int64_t n, int64_t fill) {
  std::vector<int64_t> values(n, fill);
  if (t.has_value()) {
    const int32_t* p = t->data_ptr<int32_t>();
    for (int64_t i = 0; i < n; ++i) values[i] = p[i * t->stride(0)];
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
  PLDR_DTYPE_SWITCH(q.scalar_type(), Elements, T, [&] {
    if (appending) append_to_cache<T>(*k_new, *v_new, k_cache, v_cache, lens);
    PLDR_HEAD_DIM_SWITCH(dims.d, D, [&] {
      g_attention_decode_kernel<T, D>(q, k_cache, v_cache, key_begin, key_end, G, factor,
                                      num_splits, out);
    });
  });
  return out;
}

}  // namespace
}  // namespace pldr::cpu

PLDR_CPU_KERNEL(g_attention_decode, pldr::cpu::g_attention_decode_cpu)  // registered for the ISA chosen at run time
