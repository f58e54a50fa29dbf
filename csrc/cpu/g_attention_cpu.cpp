// CPU kernel of pldr::g_attention (docs/design.md §3.2): one work item per query tile of one
// (batch, head), spread over the threads by its visible key tiles (causal work is triangular).
// The tile loop itself is shared with decode: cpu/attention_core.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "common/checks.h"
#include "common/dispatch.h"
#include "cpu/isa.h"
#include "cpu/attention_core.h"

namespace pldr::cpu {
namespace {

// Natural-log LSE of a finished row (m in log2 units); −inf when no key was visible, NaN for a
// row with a NaN or +inf score (l is NaN then).
inline float natural_lse(float m, float l) {
  return l == 0.0f ? kNegInf
                   : static_cast<float>((static_cast<double>(m) + std::log2(static_cast<double>(l))) * kLn2);
}

template <typename T, int D>
void g_attention_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const c10::optional<at::Tensor>& G, const c10::optional<at::Tensor>& key_mask,
                        bool causal, float factor, at::Tensor& out, at::Tensor& lse) {
  const int64_t B = q.size(0), Sq = q.size(1), H = q.size(2), Sk = k.size(1);
  const int64_t kv_group = H / k.size(2);  // query heads per kv head (GQA, docs/design.md §3.2)
  const int64_t q_tiles = ceil_div(Sq, kQueryTile);
  const int64_t n_items = B * H * q_tiles;
  const bool* mask_ptr = key_mask.has_value() ? key_mask->data_ptr<bool>() : nullptr;
  const int64_t mask_batch_stride = key_mask.has_value() ? key_mask->stride(0) : 0;
  const int64_t mask_key_stride = key_mask.has_value() ? key_mask->stride(1) : 0;
  const GView g_view(G, D);
  T* out_ptr = out.data_ptr<T>();
  float* lse_ptr = lse.data_ptr<float>();

  auto tile_of = [&](int64_t item) { return item % q_tiles; };
  auto visible_key_tiles = [&](int64_t t) {
    const int64_t q0 = t * kQueryTile, M = std::min(kQueryTile, Sq - q0);
    const int64_t end = causal ? std::clamp<int64_t>(q0 + M + Sk - Sq, 0, Sk) : Sk;
    return ceil_div(end, kKeyTile) + 1;  // +1: the fixed cost of forming q̃ and writing out
  };

  // Kᵀ packed once per (batch, kv head) when several query tiles read it (fp32, K's size).
  const int64_t Hk = k.size(2), key_tiles = ceil_div(Sk, kKeyTile);
  const bool pre_pack = q_tiles * kv_group > 1;
  at::Tensor k_tiles;
  if (pre_pack) {
    k_tiles = at::empty({B * Hk, key_tiles * D * kKeyTile}, q.options().dtype(at::kFloat));
    float* base = k_tiles.data_ptr<float>();
    at::parallel_for(0, B * Hk, 1, [&](int64_t first, int64_t last) {
      for (int64_t bh = first; bh < last; ++bh) {
        pack_key_tiles<T, D>(rows_of<T>(k, bh / Hk, bh % Hk), Sk,
                             base + bh * key_tiles * D * kKeyTile);
      }
    });
  }
  const float* k_tiles_ptr = pre_pack ? k_tiles.data_ptr<float>() : nullptr;

  parallel_balanced(
      n_items, [&](int64_t item) { return visible_key_tiles(tile_of(item)); },
      [&](int64_t item) {
        static thread_local TileScratch<D> s;
        const int64_t t = tile_of(item), bh = item / q_tiles, b = bh / H, h = bh % H;
        const int64_t q0 = t * kQueryTile, M = std::min(kQueryTile, Sq - q0);
        form_q_tilde<T, D>(rows_of<T>(q, b, h), q0, M, g_view.at(b, h), g_view.ld, factor, s);
        reset_accumulators<D>(M, s);
        KeyRange<T> kr{rows_of<T>(k, b, h / kv_group),
                       rows_of<T>(v, b, h / kv_group),
                       mask_ptr ? mask_ptr + b * mask_batch_stride : nullptr,
                       mask_key_stride,
                       0,
                       Sk,
                       causal,
                       q0 + Sk - Sq};
        if (k_tiles_ptr != nullptr) {
          kr.k_tiles = k_tiles_ptr + (b * Hk + h / kv_group) * key_tiles * D * kKeyTile;
        }
        attend_key_range<T, D>(M, kr, /*allow_row_path=*/false, s);
        for (int64_t r = 0; r < M; ++r) {
          const float l = s.l[r];
          store_row_from_float(s.out.data() + r * D, out_ptr + ((b * Sq + q0 + r) * H + h) * D, D,
                               inverse_sum(l));
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
  PLDR_DTYPE_SWITCH(q.scalar_type(), Elements, T, [&] {
    PLDR_HEAD_DIM_SWITCH(dims.d, D, [&] {
      g_attention_kernel<T, D>(q, k, v, G, key_mask, causal, factor, out, lse);
    });
  });
  return {out, lse};
}

}  // namespace
}  // namespace pldr::cpu

PLDR_CPU_KERNEL(g_attention, pldr::cpu::g_attention_cpu)  // registered for the ISA chosen at run time
