// Input validation shared by the CPU and CUDA backends, so that the same bad input gives the same
// error on every device (docs/design.md §3.5). Each message names the argument, what was expected, what
// was given and, where useful, how to fix it. Host-only code: include from .cpp / *_api.cu files.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "common/numerics.h"

namespace pldr {

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

inline bool head_dim_supported(int64_t d) { return d == 64 || d == 128; }

// `t` must live on `device` (the device of q, the op's anchor argument).
inline void check_device(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.device() == device, name, " must be on the same device as q (", device,
              "), got ", t.device(), ". Move it with .to(q.device).");
}

inline void check_dtype(const at::Tensor& t, const char* name, at::ScalarType expected,
                        const char* hint = "") {
  TORCH_CHECK(t.scalar_type() == expected, name, " must have dtype ", expected, ", got ",
              t.scalar_type(), ". ", hint);
}

inline void check_rank(const at::Tensor& t, const char* name, int64_t rank, const char* layout) {
  TORCH_CHECK(t.dim() == rank, name, " must be a ", rank, "-D tensor ", layout, ", got ", t.dim(),
              "-D tensor of shape ", shape_str(t), ".");
}

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim, int64_t expected,
                      const char* what) {
  TORCH_CHECK(t.size(dim) == expected, name, ".shape[", dim, "] (", what, ") must be ", expected,
              ", got ", t.size(dim), " (shape ", shape_str(t), ").");
}

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, name, " must have shape ", expected, ", got ", shape_str(t),
              ".");
}

inline void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, name,
              " must be contiguous in its last dimension (stride 1), got strides ", t.strides(),
              ". Call .contiguous() on it.");
}

inline void check_activation_dtype(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, name,
              " must be float32, bfloat16 or float16, got ", st, ".");
}

inline void check_head_dim(int64_t d, const char* name) {
  TORCH_CHECK(head_dim_supported(d), name, ".shape[-1] (head dim d) must be 64 or 128, got ", d,
              ". pldr-kernels is instantiated for d = 64 (every published PLDR-LLM) and d = 128.");
}

// Whether the double x rounds to a finite fp32 (below FLT_MAX + half an ulp; the midpoint rounds
// to even, i.e. to inf). Compared in double: converting an out-of-range double is undefined.
inline bool fits_fp32(double x) { return std::abs(x) < 0x1.ffffffp127; }

// The kernels fold scale·log2(e) into fp32: the CPU ones round the double product, the CUDA ones
// multiply float(scale) by kLog2e in fp32. Both must be finite (a scale finite as a double can
// overflow there and silently give out = 0, lse = −inf).
inline void check_scale(const c10::optional<double>& scale) {
  if (!scale.has_value()) return;
  const double s = *scale;
  TORCH_CHECK(std::isfinite(s), "scale must be a finite float or None, got ", s, ".");
  const bool folds = fits_fp32(s) && fits_fp32(s * kLog2e) &&
                     fits_fp32(static_cast<double>(static_cast<float>(s)) * kLog2e);
  TORCH_CHECK(folds, "scale = ", s, " overflows fp32, where the kernels use it: |scale| · log2(e) "
              "must be finite in fp32 (|scale| <= ",
              static_cast<double>(std::numeric_limits<float>::max()) / kLog2e, ").");
}

// G: optional fp32 [B or 1, H, d, d].
inline void check_G(const c10::optional<at::Tensor>& G, const at::Device& device, int64_t B,
                    int64_t H, int64_t d) {
  if (!G.has_value()) return;
  const auto& g = *G;
  check_device(g, "G", device);
  check_dtype(g, "G", at::kFloat, "The G path is fp32 (docs/spec.md §5.1): pass G.float().");
  check_rank(g, "G", 4, "[B or 1, H, d, d]");
  TORCH_CHECK(g.size(0) == B || g.size(0) == 1, "G.shape[0] (batch) must be ", B,
              " or 1 (shared by the batch), got ", g.size(0), " (shape ", shape_str(g), ").");
  check_dim(g, "G", 1, H, "heads");
  check_dim(g, "G", 2, d, "head dim");
  check_dim(g, "G", 3, d, "head dim");
  check_last_dim_contiguous(g, "G");
}

// Grouped-query / multi-query attention (docs/design.md §3.2): k and v (the decode's caches and
// new tokens) carry H_kv heads, H_kv dividing q's H; query head h reads kv head h / (H / H_kv),
// transformers' repeat_kv order. H_kv = H is plain multi-head attention.
inline void check_kv_heads(const at::Tensor& t, const char* name, int64_t H) {
  const int64_t H_kv = t.size(2);
  TORCH_CHECK(H_kv == H || (H_kv >= 1 && H % H_kv == 0), name,
              ".shape[2] (key/value heads H_kv) must divide the query heads H = ", H,
              " (grouped-query attention: query head h uses kv head h // (H / H_kv)), got ", H_kv,
              " (shape ", shape_str(t), ").");
}

struct AttentionDims {
  int64_t B, Sq, Sk, H, d;
  int64_t H_kv;  // key/value heads, dividing H
};

inline AttentionDims check_g_attention_inputs(const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& v,
                                              const c10::optional<at::Tensor>& G,
                                              const c10::optional<at::Tensor>& key_mask,
                                              const c10::optional<double>& scale) {
  check_rank(q, "q", 4, "[B, Sq, H, d]");
  check_rank(k, "k", 4, "[B, Sk, H, d]");
  check_rank(v, "v", 4, "[B, Sk, H, d]");
  check_activation_dtype(q, "q");
  const auto device = q.device();
  check_device(k, "k", device);
  check_device(v, "v", device);
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q, k and v must have the same dtype, got q ", q.scalar_type(), ", k ",
              k.scalar_type(), ", v ", v.scalar_type(), ".");
  AttentionDims dims{q.size(0), q.size(1), k.size(1), q.size(2), q.size(3), k.size(2)};
  check_head_dim(dims.d, "q");
  check_dim(k, "k", 0, dims.B, "batch");
  check_kv_heads(k, "k", dims.H);
  check_dim(k, "k", 3, dims.d, "head dim");
  check_shape(v, "v", k.sizes());
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k, "k");
  check_last_dim_contiguous(v, "v");
  check_G(G, device, dims.B, dims.H, dims.d);
  if (key_mask.has_value()) {
    const auto& km = *key_mask;
    check_device(km, "key_mask", device);
    check_dtype(km, "key_mask", at::kBool, "True = attend; pass mask.bool().");
    check_rank(km, "key_mask", 2, "[B, Sk]");
    check_dim(km, "key_mask", 0, dims.B, "batch");
    check_dim(km, "key_mask", 1, dims.Sk, "keys");
  }
  check_scale(scale);
  return dims;
}

// ---- memory overlap (docs/design.md §3.5) ----------------------------------------------------
// The bytes of a tensor, relative to its storage, are offset + Σ c_i·x_i + p with c_i = stride_i ·
// itemsize, 0 <= x_i < size_i and 0 <= p < itemsize. Whether two tensors share a byte (or one
// tensor holds a byte at two different indices) is whether a sum Σ c·x over integer "digits" x,
// each within bounds, can land in a small interval. `sum_can_reach` decides that exactly, the
// largest coefficient first, trying only the digit values that leave the smaller digits able to
// reach the interval: for strides that nest (every view of a dense tensor) that is at most two
// values per digit, so a check costs a few dozen steps. A search longer than
// kOverlapSearchBudget steps (only as_strided can make such layouts) reports kTooIrregular, which
// the checks refuse like an overlap. pldr_kernels/_checks.py runs the same search step for step.
enum class Overlap { kNo, kYes, kTooIrregular };

struct OverlapDigit {
  int64_t coeff;   // bytes, > 0
  int64_t lo, hi;  // bounds of the digit
};

constexpr int64_t kOverlapSearchBudget = 4096;

inline int64_t floor_div(int64_t a, int64_t b) {  // b > 0
  const int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return -floor_div(-a, b); }

// Whether Σ_{u >= t} digits[u].coeff · x_u can land in [lo, hi]. rest_lo[t] / rest_hi[t]: the
// least / greatest value of that sum. Each call spends one step of `budget`.
inline bool sum_can_reach(const std::vector<OverlapDigit>& digits, size_t t,
                          const std::vector<int64_t>& rest_lo, const std::vector<int64_t>& rest_hi,
                          int64_t lo, int64_t hi, int64_t& budget) {
  if (--budget < 0) return false;
  if (t == digits.size()) return lo <= 0 && 0 <= hi;
  const OverlapDigit& g = digits[t];
  const int64_t first = std::max(g.lo, ceil_div(lo - rest_hi[t + 1], g.coeff));
  const int64_t last = std::min(g.hi, floor_div(hi - rest_lo[t + 1], g.coeff));
  for (int64_t x = first; x <= last; ++x) {
    if (sum_can_reach(digits, t + 1, rest_lo, rest_hi, lo - g.coeff * x, hi - g.coeff * x,
                      budget)) {
      return true;
    }
    if (budget < 0) return false;
  }
  return false;
}

// Whether Σ coeff·x over `digits` (coefficients distinct) can land in [lo, hi].
inline Overlap search_overlap(std::vector<OverlapDigit> digits, int64_t lo, int64_t hi) {
  std::sort(digits.begin(), digits.end(),
            [](const OverlapDigit& a, const OverlapDigit& b) { return a.coeff > b.coeff; });
  const size_t n = digits.size();
  std::vector<int64_t> rest_lo(n + 1, 0), rest_hi(n + 1, 0);
  for (size_t t = n; t-- > 0;) {
    rest_lo[t] = rest_lo[t + 1] + digits[t].coeff * digits[t].lo;
    rest_hi[t] = rest_hi[t + 1] + digits[t].coeff * digits[t].hi;
  }
  int64_t budget = kOverlapSearchBudget;
  if (sum_can_reach(digits, 0, rest_lo, rest_hi, lo, hi, budget)) return Overlap::kYes;
  return budget < 0 ? Overlap::kTooIrregular : Overlap::kNo;
}

// Whether two different elements of `t` share a byte (at::has_internal_overlap answers only the
// stride-0 case; this one decides every layout that nests).
inline Overlap self_overlap(const at::Tensor& t) {
  if (t.numel() <= 1 || t.is_contiguous()) return Overlap::kNo;
  const int64_t item = t.element_size();
  std::vector<OverlapDigit> dims;  // the dimensions of size > 1, by stride ascending
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (t.size(i) > 1) dims.push_back({t.stride(i) * item, -(t.size(i) - 1), t.size(i) - 1});
  }
  std::stable_sort(dims.begin(), dims.end(),
                   [](const OverlapDigit& a, const OverlapDigit& b) { return a.coeff < b.coeff; });
  for (size_t i = 0; i < dims.size(); ++i) {
    if (dims[i].coeff == 0 || (i > 0 && dims[i].coeff == dims[i - 1].coeff)) return Overlap::kYes;
  }
  // Indices x != x' meet iff k = x − x' != 0 has Σ c·k in [−(item − 1), item − 1]. Let m be the
  // dimension of largest stride with k_m != 0; k and −k are alike, so k_m > 0.
  for (size_t m = 0; m < dims.size(); ++m) {
    std::vector<OverlapDigit> digits(dims.begin(), dims.begin() + m + 1);
    digits[m].lo = 1;
    const Overlap found = search_overlap(std::move(digits), -(item - 1), item - 1);
    if (found != Overlap::kNo) return found;
  }
  return Overlap::kNo;
}

// Whether `a` and `b` share a byte (views of one storage; at::get_overlap_status answers only for
// dense tensors).
inline Overlap overlap_between(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.is_alias_of(b)) return Overlap::kNo;
  const int64_t item_a = a.element_size(), item_b = b.element_size();
  const int64_t begin_a = a.storage_offset() * item_a, begin_b = b.storage_offset() * item_b;
  int64_t end_a = begin_a + item_a, end_b = begin_b + item_b;
  std::vector<OverlapDigit> digits;  // a's digits count up, b's down
  for (int64_t i = 0; i < a.dim(); ++i) {
    end_a += (a.size(i) - 1) * a.stride(i) * item_a;
    if (a.size(i) > 1 && a.stride(i) != 0) {
      digits.push_back({a.stride(i) * item_a, 0, a.size(i) - 1});
    }
  }
  for (int64_t i = 0; i < b.dim(); ++i) {
    end_b += (b.size(i) - 1) * b.stride(i) * item_b;
    if (b.size(i) > 1 && b.stride(i) != 0) {
      digits.push_back({b.stride(i) * item_b, -(b.size(i) - 1), 0});
    }
  }
  if (end_a <= begin_b || end_b <= begin_a) return Overlap::kNo;
  std::sort(digits.begin(), digits.end(),
            [](const OverlapDigit& x, const OverlapDigit& y) { return x.coeff > y.coeff; });
  std::vector<OverlapDigit> merged;  // one digit per coefficient: equal strides add their bounds
  for (const auto& g : digits) {
    if (!merged.empty() && merged.back().coeff == g.coeff) {
      merged.back().lo += g.lo;
      merged.back().hi += g.hi;
    } else {
      merged.push_back(g);
    }
  }
  // a's byte begin_a + Σ c·x + p meets b's begin_b + Σ c·y + r iff
  // Σ c·x − Σ c·y = (begin_b − begin_a) + r − p.
  const int64_t delta = begin_b - begin_a;
  return search_overlap(std::move(merged), delta - (item_a - 1), delta + (item_b - 1));
}

// The decode caches are written in place, so each must hold every element in its own memory.
inline void check_no_self_overlap(const at::Tensor& cache, const char* name) {
  const Overlap found = self_overlap(cache);
  TORCH_CHECK(found == Overlap::kNo, name,
              " must not overlap itself in memory (g_attention_decode writes into it in place), "
              "got shape ", shape_str(cache), " with strides ", cache.strides(),
              found == Overlap::kYes
                  ? ", where different elements share memory"
                  : ", too irregular to prove that no two elements share memory",
              ". Allocate the cache with its full shape (e.g. torch.zeros(B, Smax, H, d)), not as "
              "an expanded or overlapping view.");
}

// `t` (read by the step, or the other cache) must not share memory with `cache` (written).
inline void check_no_overlap(const at::Tensor& t, const char* name, const at::Tensor& cache,
                             const char* cache_name, bool both_written) {
  const Overlap found = overlap_between(t, cache);
  const char* got = found == Overlap::kYes
                        ? "got views that share memory"
                        : "got views too irregular to prove that they do not share memory";
  if (both_written) {
    TORCH_CHECK(found == Overlap::kNo, name, " and ", cache_name,
                " must not overlap in memory (g_attention_decode writes into both in place), ",
                got, ". Pass two separate caches.");
  } else {
    TORCH_CHECK(found == Overlap::kNo, name, " must not overlap ", cache_name,
                " in memory (g_attention_decode writes into ", cache_name,
                " in place while it reads ", name, "), ", got, ". Pass a separate tensor, e.g. ",
                name, ".clone().");
  }
}

// The caches are the op's mutable arguments (the schema's Tensor(a!) / Tensor(b!)): no grad, no
// overlap with themselves, each other or any other argument.
inline void check_decode_caches_writable(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& cache_seqlens, const c10::optional<at::Tensor>& k_new,
    const c10::optional<at::Tensor>& v_new, const c10::optional<at::Tensor>& cache_start,
    const c10::optional<at::Tensor>& G) {
  const std::pair<const at::Tensor&, const char*> caches[] = {{k_cache, "k_cache"},
                                                              {v_cache, "v_cache"}};
  for (const auto& [cache, name] : caches) {
    TORCH_CHECK(!cache.requires_grad(), name,
                " must not require grad: g_attention_decode writes into it in place and has no "
                "backward (docs/design.md §3.5). Allocate the cache with requires_grad=False.");
  }
  for (const auto& [cache, name] : caches) check_no_self_overlap(cache, name);
  check_no_overlap(k_cache, "k_cache", v_cache, "v_cache", /*both_written=*/true);
  const auto given = [](const c10::optional<at::Tensor>& t) { return t ? &*t : nullptr; };
  const std::pair<const at::Tensor*, const char*> reads[] = {
      {&q, "q"},
      {given(k_new), "k_new"},
      {given(v_new), "v_new"},
      {&cache_seqlens, "cache_seqlens"},
      {given(cache_start), "cache_start"},
      {given(G), "G"}};
  for (const auto& [t, name] : reads) {
    if (t == nullptr) continue;
    for (const auto& [cache, cache_name] : caches) {
      check_no_overlap(*t, name, cache, cache_name, /*both_written=*/false);
    }
  }
}

struct DecodeDims {
  int64_t B, Sn, Smax, H, d;
  int64_t H_kv;  // heads of the caches and of k_new / v_new, dividing H
};

// Shape/dtype checks of g_attention_decode. The value check cache_seqlens + Sn <= Smax needs the
// lengths on the host; each backend does it where it can (the CPU backend up front, before any write).
inline DecodeDims check_g_attention_decode_inputs(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& cache_seqlens, const c10::optional<at::Tensor>& k_new,
    const c10::optional<at::Tensor>& v_new, const c10::optional<at::Tensor>& cache_start,
    const c10::optional<at::Tensor>& G, const c10::optional<double>& scale, int64_t num_splits) {
  check_rank(q, "q", 4, "[B, Sn, H, d]");
  check_rank(k_cache, "k_cache", 4, "[B, Smax, H, d]");
  check_rank(v_cache, "v_cache", 4, "[B, Smax, H, d]");
  check_activation_dtype(q, "q");
  const auto device = q.device();
  check_device(k_cache, "k_cache", device);
  check_device(v_cache, "v_cache", device);
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "q, k_cache and v_cache must have the same dtype, got q ", q.scalar_type(),
              ", k_cache ", k_cache.scalar_type(), ", v_cache ", v_cache.scalar_type(), ".");
  DecodeDims dims{q.size(0), q.size(1), k_cache.size(1), q.size(2), q.size(3), k_cache.size(2)};
  check_head_dim(dims.d, "q");
  TORCH_CHECK(dims.Sn >= 1, "q.shape[1] (new tokens Sn) must be at least 1, got ", dims.Sn, ".");
  check_dim(k_cache, "k_cache", 0, dims.B, "batch");
  check_kv_heads(k_cache, "k_cache", dims.H);
  check_dim(k_cache, "k_cache", 3, dims.d, "head dim");
  check_shape(v_cache, "v_cache", k_cache.sizes());
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k_cache, "k_cache");
  check_last_dim_contiguous(v_cache, "v_cache");
  check_device(cache_seqlens, "cache_seqlens", device);
  check_dtype(cache_seqlens, "cache_seqlens", at::kInt, "Pass cache_seqlens.int().");
  check_rank(cache_seqlens, "cache_seqlens", 1, "[B]");
  check_dim(cache_seqlens, "cache_seqlens", 0, dims.B, "batch");
  TORCH_CHECK(k_new.has_value() == v_new.has_value(),
              "k_new and v_new must be given together (both or neither), got k_new ",
              k_new.has_value() ? "given" : "None", " and v_new ", v_new.has_value() ? "given" : "None",
              ".");
  if (k_new.has_value()) {
    for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{*k_new, "k_new"},
                                  std::pair<const at::Tensor&, const char*>{*v_new, "v_new"}}) {
      check_device(t, name, device);
      check_dtype(t, name, q.scalar_type(), "It must match q and the cache.");
      check_rank(t, name, 4, "[B, Sn, H_kv, d]");
      check_shape(t, name, {dims.B, dims.Sn, dims.H_kv, dims.d});
      check_last_dim_contiguous(t, name);
    }
    TORCH_CHECK(dims.Sn <= dims.Smax, "q.shape[1] (new tokens Sn = ", dims.Sn,
                ") exceeds the cache length Smax = ", dims.Smax, ".");
  }
  if (cache_start.has_value()) {
    const auto& cs = *cache_start;
    check_device(cs, "cache_start", device);
    check_dtype(cs, "cache_start", at::kInt, "Pass cache_start.int().");
    check_rank(cs, "cache_start", 1, "[B]");
    check_dim(cs, "cache_start", 0, dims.B, "batch");
  }
  check_G(G, device, dims.B, dims.H, dims.d);
  check_scale(scale);
  TORCH_CHECK(num_splits >= 0, "num_splits must be >= 0 (0 = choose automatically), got ",
              num_splits, ".");
  check_decode_caches_writable(q, k_cache, v_cache, cache_seqlens, k_new, v_new, cache_start, G);
  return dims;
}

// Host-side value check of the cache bounds (CPU backend, before any write).
inline void check_cache_bounds_host(const at::Tensor& cache_seqlens,
                                    const c10::optional<at::Tensor>& cache_start, int64_t Sn,
                                    int64_t Smax, bool appending) {
  const int32_t* lens = cache_seqlens.data_ptr<int32_t>();  // read through their strides
  const int32_t* starts = cache_start.has_value() ? cache_start->data_ptr<int32_t>() : nullptr;
  const int64_t added = appending ? Sn : 0;
  for (int64_t b = 0; b < cache_seqlens.size(0); ++b) {
    const int32_t L = lens[b * cache_seqlens.stride(0)];
    TORCH_CHECK(L >= 0, "cache_seqlens[", b, "] must be >= 0, got ", L, ".");
    TORCH_CHECK(L + added <= Smax, "cache_seqlens[", b, "] + Sn = ", L, " + ", added, " = ",
                L + added, " exceeds the cache length Smax = ", Smax,
                ": appending would write past the end of k_cache/v_cache. Allocate a longer cache"
                " or stop generating; the cache was left untouched.");
    if (!appending) {
      TORCH_CHECK(L >= Sn, "cache_seqlens[", b, "] = ", L, " must be >= Sn = ", Sn,
                  " when k_new/v_new are not given (the new tokens must already be in the cache).");
    }
    if (starts != nullptr) {
      const int32_t S0 = starts[b * cache_start->stride(0)];
      const int64_t last_start = L + added - Sn;  // row of the first new token
      TORCH_CHECK(S0 >= 0 && S0 <= last_start, "cache_start[", b, "] = ", S0,
                  " must lie in [0, ", last_start, "]: the first valid row cannot come after the"
                  " first new token.");
    }
  }
}

// The kernels use both epsilons in fp32. eps_ln <= 0 (or NaN) makes LayerNorm of a constant row
// 0/0; eps_adj < 0 can make A_LM negative and its power NaN; a positive eps_adj that rounds to 0
// in fp32 silently drops the floor that keeps A_LM^pw finite for negative pw (docs/spec.md §5.2).
// eps_adj = 0 asks for no floor: allowed, with the reference's inf / NaN where A_LM is 0.
inline void check_metric_eps(double eps_ln, double eps_adj) {
  TORCH_CHECK(fits_fp32(eps_ln) && eps_ln > 0 && static_cast<float>(eps_ln) > 0,
              "eps_ln must be > 0 and finite in fp32, where the kernels use it (the LayerNorm "
              "epsilon), got ", eps_ln, ".");
  TORCH_CHECK(fits_fp32(eps_adj) && eps_adj >= 0 &&
                  (eps_adj == 0 || static_cast<float>(eps_adj) > 0),
              "eps_adj must be >= 0 and finite in fp32, where the kernels use it, and not so small "
              "that it rounds to 0 there (the floor added to A_LM before the power, docs/spec.md "
              "§5.2; 0 = no floor), got ", eps_adj, ".");
}

struct MetricDims {
  int64_t B, S, H, d, R, Gd, F;
};

inline MetricDims check_metric_tensors_inputs(
    const at::Tensor& q, const c10::optional<at::Tensor>& q_mask, const at::Tensor& ln0_w,
    const at::Tensor& ln0_b, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
    const at::Tensor& b2, const at::Tensor& w3, const at::Tensor& b3, const at::Tensor& lnA_w,
    const at::Tensor& lnA_b, const at::Tensor& W, const at::Tensor& b, const at::Tensor& pw,
    const at::Tensor& a, const at::Tensor& ba, double eps_ln, double eps_adj) {
  check_rank(q, "q", 4, "[B, S, H, d]");
  check_activation_dtype(q, "q");
  check_last_dim_contiguous(q, "q");
  const auto device = q.device();
  MetricDims dims{q.size(0), q.size(1), q.size(2), q.size(3), 0, 0, 0};
  check_head_dim(dims.d, "q");
  if (q_mask.has_value()) {
    const auto& m = *q_mask;
    check_device(m, "q_mask", device);
    check_dtype(m, "q_mask", at::kBool, "True = real token; pass mask.bool().");
    check_rank(m, "q_mask", 2, "[B, S]");
    check_dim(m, "q_mask", 0, dims.B, "batch");
    check_dim(m, "q_mask", 1, dims.S, "sequence");
  }
  check_rank(w1, "w1", 4, "[R, Gd, F, d]");
  dims.R = w1.size(0);
  dims.Gd = w1.size(1);
  dims.F = w1.size(2);
  TORCH_CHECK(dims.R >= 1 && dims.Gd >= 1 && dims.F >= 1,
              "w1 [R, Gd, F, d] must have R, Gd, F >= 1, got shape ", shape_str(w1), ".");
  const int64_t R = dims.R, Gd = dims.Gd, F = dims.F, d = dims.d, H = dims.H;
  struct Expect {
    const at::Tensor& t;
    const char* name;
    std::vector<int64_t> shape;
  };
  const Expect expects[] = {
      {ln0_w, "ln0_w", {d}},         {ln0_b, "ln0_b", {d}},         {w1, "w1", {R, Gd, F, d}},
      {b1, "b1", {R, Gd, F}},        {w2, "w2", {R, Gd, F, d}},     {b2, "b2", {R, Gd, F}},
      {w3, "w3", {R, Gd, d, F}},     {b3, "b3", {R, Gd, d}},        {lnA_w, "lnA_w", {R, d}},
      {lnA_b, "lnA_b", {R, d}},      {W, "W", {H, d, d}},           {b, "b", {H, d, d}},
      {pw, "pw", {H, d, d}},         {a, "a", {H, d, d}},           {ba, "ba", {H, d, d}},
  };
  for (const auto& e : expects) {
    check_device(e.t, e.name, device);
    check_dtype(e.t, e.name, at::kFloat, "Metric-learner weights are fp32 (docs/spec.md §5.1).");
    check_shape(e.t, e.name, e.shape);
  }
  check_metric_eps(eps_ln, eps_adj);
  return dims;
}

// ------------------------------------------------------------------------------------------------
// g_attention_backward (docs/design.md §3.4): the forward's inputs as g_attention checks them, then
// the forward's outputs (out, lse) and the incoming gradient dout.
// ------------------------------------------------------------------------------------------------
inline AttentionDims check_g_attention_backward_inputs(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& G, const at::Tensor& out, const at::Tensor& lse,
    const c10::optional<at::Tensor>& key_mask, const c10::optional<double>& scale) {
  const auto dims = check_g_attention_inputs(q, k, v, G, key_mask, scale);
  const auto device = q.device();
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{out, "out"},
                                std::pair<const at::Tensor&, const char*>{dout, "dout"}}) {
    check_device(t, name, device);
    check_dtype(t, name, q.scalar_type(), "out is g_attention's first output and dout its "
                "gradient, both in q's dtype.");
    check_rank(t, name, 4, "[B, Sq, H, d]");
    check_shape(t, name, q.sizes());
    check_last_dim_contiguous(t, name);
  }
  check_device(lse, "lse", device);
  check_dtype(lse, "lse", at::kFloat, "lse is g_attention's second output (fp32).");
  check_rank(lse, "lse", 3, "[B, H, Sq]");
  check_shape(lse, "lse", {dims.B, dims.H, dims.Sq});
  return dims;
}

// ---- metric_tensors_backward (docs/design.md §3.4) ------------------------------------------
// The forward's checks, then each given output gradient: fp32 [B, H, d, d] on q's device (None
// means zero; any strides).
inline MetricDims check_metric_tensors_backward_inputs(
    const c10::optional<at::Tensor>& grad_A, const c10::optional<at::Tensor>& grad_A_LM,
    const c10::optional<at::Tensor>& grad_G, const at::Tensor& q,
    const c10::optional<at::Tensor>& q_mask, const at::Tensor& ln0_w, const at::Tensor& ln0_b,
    const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
    const at::Tensor& w3, const at::Tensor& b3, const at::Tensor& lnA_w, const at::Tensor& lnA_b,
    const at::Tensor& W, const at::Tensor& b, const at::Tensor& pw, const at::Tensor& a,
    const at::Tensor& ba, double eps_ln, double eps_adj) {
  const MetricDims dims = check_metric_tensors_inputs(q, q_mask, ln0_w, ln0_b, w1, b1, w2, b2, w3,
                                                      b3, lnA_w, lnA_b, W, b, pw, a, ba, eps_ln,
                                                      eps_adj);
  const std::pair<const c10::optional<at::Tensor>&, const char*> grads[] = {
      {grad_A, "grad_A"}, {grad_A_LM, "grad_A_LM"}, {grad_G, "grad_G"}};
  for (const auto& [grad, name] : grads) {
    if (!grad.has_value()) continue;
    check_device(*grad, name, q.device());
    check_dtype(*grad, name, at::kFloat,
                "The gradients of metric_tensors' outputs are fp32, like the outputs.");
    check_shape(*grad, name, {dims.B, dims.H, dims.d, dims.d});
  }
  return dims;
}

// ---- linear_small / swiglu_small (docs/design.md §3.9) ----------------------------------------
struct LinearSmallDims {
  int64_t M, K, rows, features;
};

// The names the messages give a linear's weight, bias and scale: linear_small's own, or the
// argument names of an op that takes several linears (decode_layer's qkv_weight, ffn_s12, ...).
struct LinearArgNames {
  const char* weight = "weight";
  const char* bias = "bias";
  const char* scale = "scale";
};

// A weight-streaming linear's parameters, on x's device: weight [rows, in_features] fp32, bf16 or
// int8 and contiguous; bias [rows] fp32 or bf16 or None; scale [rows] fp32 exactly when the
// weight is int8 (one scale per output channel).
inline void check_small_linear_weights(const at::Tensor& weight,
                                       const c10::optional<at::Tensor>& bias,
                                       const c10::optional<at::Tensor>& scale,
                                       c10::Device device, const char* layout,
                                       const LinearArgNames& names) {
  const auto wt = weight.scalar_type();
  TORCH_CHECK(wt == at::kFloat || wt == at::kBFloat16 || wt == at::kChar, names.weight,
              " must be float32, bfloat16 or int8, got ", wt, ".");
  check_rank(weight, names.weight, 2, layout);
  TORCH_CHECK(weight.device() == device, names.weight, " must be on the same device as x (",
              device, "), got ", weight.device(), ".");
  TORCH_CHECK(weight.is_contiguous(), names.weight, " must be contiguous, got strides ",
              weight.strides(), ". Call .contiguous() on it.");
  const int64_t rows = weight.size(0);
  if (bias.has_value()) {
    const auto& b = *bias;
    TORCH_CHECK(b.device() == device, names.bias, " must be on the same device as x (", device,
                "), got ", b.device(), ".");
    const auto bt = b.scalar_type();
    TORCH_CHECK(bt == at::kFloat || bt == at::kBFloat16, names.bias,
                " must be float32 or bfloat16, got ", bt, ".");
    check_shape(b, names.bias, {rows});
  }
  if (wt == at::kChar) {
    TORCH_CHECK(scale.has_value(), names.scale, " is required with an int8 ", names.weight,
                ": the fp32 scale of each output channel (", names.weight, " row), shape [", rows,
                "].");
  } else {
    TORCH_CHECK(!scale.has_value(), names.scale, " is only for an int8 ", names.weight, ", got ",
                names.weight, " of dtype ", wt, ".");
  }
  if (scale.has_value()) {
    const auto& s = *scale;
    TORCH_CHECK(s.device() == device, names.scale, " must be on the same device as x (", device,
                "), got ", s.device(), ".");
    check_dtype(s, names.scale, at::kFloat);
    check_shape(s, names.scale, {rows});
  }
}

inline LinearSmallDims check_linear_small_inputs(const at::Tensor& x, const at::Tensor& weight,
                                                 const c10::optional<at::Tensor>& bias,
                                                 const c10::optional<at::Tensor>& scale,
                                                 bool swiglu) {
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kBFloat16, "x must be float32 or bfloat16, got ", xt,
              ".");
  TORCH_CHECK(x.dim() >= 1, "x must have at least 1 dimension [..., in_features], got a 0-D "
              "tensor.");
  check_small_linear_weights(weight, bias, scale, x.device(),
                             swiglu ? "[2 * hidden, in_features] (gate rows, then up rows)"
                                    : "[out_features, in_features]",
                             LinearArgNames{});
  LinearSmallDims dims{x.numel() / std::max<int64_t>(x.size(-1), 1), weight.size(1),
                       weight.size(0), weight.size(0)};
  TORCH_CHECK(x.size(-1) == dims.K, "x.shape[-1] (in_features) must be weight.shape[1] = ",
              dims.K, ", got ", x.size(-1), " (shape ", shape_str(x), ").");
  check_last_dim_contiguous(x, "x");
  if (swiglu) {
    TORCH_CHECK(dims.rows % 2 == 0, "weight.shape[0] (gate and up rows) must be even, got ",
                dims.rows, ".");
    dims.features = dims.rows / 2;
  }
  return dims;
}

// ---- cross_entropy_forward / cross_entropy_backward (docs/design.md §3.10) --------------------
// The values of targets (a column of logits or ignore_index) are checked by the kernels.
inline void check_cross_entropy_inputs(const at::Tensor& logits, const at::Tensor& targets) {
  check_dtype(logits, "logits", at::kFloat);
  check_rank(logits, "logits", 2, "[rows, vocabulary]");
  check_last_dim_contiguous(logits, "logits");
  check_dtype(targets, "targets", at::kLong);
  check_shape(targets, "targets", {logits.size(0)});
  TORCH_CHECK(targets.device() == logits.device(), "targets must be on the same device as logits (",
              logits.device(), "), got ", targets.device(), ".");
}

inline void check_cross_entropy_backward_inputs(const at::Tensor& logits, const at::Tensor& lse,
                                                const at::Tensor& targets,
                                                const at::Tensor& grad_nll, int64_t start,
                                                int64_t end,
                                                const c10::optional<at::Tensor>& grad_logits) {
  check_cross_entropy_inputs(logits, targets);
  const int64_t N = logits.size(0), V = logits.size(1);
  const std::pair<const at::Tensor*, const char*> rows[] = {{&lse, "lse"},
                                                            {&grad_nll, "grad_nll"}};
  for (const auto& [t, name] : rows) {
    check_dtype(*t, name, at::kFloat);
    check_shape(*t, name, {N});
    TORCH_CHECK(t->device() == logits.device(), name, " must be on the same device as logits (",
                logits.device(), "), got ", t->device(), ".");
  }
  TORCH_CHECK(0 <= start && start <= end && end <= V, "start and end must give columns of logits, "
              "0 <= start <= end <= ", V, " = logits.shape[1], got start = ", start, ", end = ",
              end, ".");
  if (grad_logits.has_value()) {
    const auto& g = *grad_logits;
    check_dtype(g, "grad_logits", at::kFloat);
    check_shape(g, "grad_logits", {N, V});
    check_last_dim_contiguous(g, "grad_logits");
    TORCH_CHECK(g.device() == logits.device(), "grad_logits must be on the same device as logits (",
                logits.device(), "), got ", g.device(), ".");
  }
}

// ---- transpose_2d (docs/design.md §3.11) ------------------------------------------------------
inline void check_transpose_2d_input(const at::Tensor& x) {
  check_dtype(x, "x", at::kFloat);
  check_rank(x, "x", 2, "[rows, columns]");
  check_last_dim_contiguous(x, "x");
}

// ---- decode_layer (docs/design.md §3.12) ------------------------------------------------------
// x [B, 1, D] fp32 or bf16 with D = heads x head dim of k_cache; the layer's four linears as
// linear_small takes them (qkv [3D, D], dense [D, D], the FFN's [gate; up] pack [2I, D] and its
// output [D, I]); the LayerNorms' weight and bias [D] in x's dtype or fp32; the step's RoPE
// tables fp32 [B, 1, 1, d/2] (interleaved pairs) or [B, 1, 1, d] (rotate_half); eps finite and
// >= 0. The caches, cache_seqlens, cache_start and G are g_attention_decode's arguments, under the
// same names, and it checks them (values included) before it writes anything.
struct DecodeLayerLinear {
  const at::Tensor& weight;
  const c10::optional<at::Tensor>& bias;
  const c10::optional<at::Tensor>& scale;
  LinearArgNames names;
};

inline void check_decode_layer_linear(const DecodeLayerLinear& linear, c10::Device device,
                                      int64_t rows, int64_t cols, const char* layout) {
  check_small_linear_weights(linear.weight, linear.bias, linear.scale, device, layout,
                             linear.names);
  check_shape(linear.weight, linear.names.weight, {rows, cols});
}

inline void check_decode_layer_norm(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), name, " must be on the same device as x (", x.device(),
              "), got ", t.device(), ".");
  TORCH_CHECK(t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat, name,
              " must have x's dtype (", x.scalar_type(), ") or float32, got ", t.scalar_type(),
              ".");
  check_shape(t, name, {x.size(2)});
}

inline void check_decode_layer_inputs(const at::Tensor& x, const DecodeLayerLinear& qkv,
                                      const DecodeLayerLinear& dense,
                                      const at::Tensor& ln1_weight, const at::Tensor& ln1_bias,
                                      const DecodeLayerLinear& ffn12,
                                      const DecodeLayerLinear& ffn3,
                                      const at::Tensor& ln2_weight, const at::Tensor& ln2_bias,
                                      const at::Tensor& k_cache, const at::Tensor& rope_cos,
                                      const at::Tensor& rope_sin, bool interleaved_rope,
                                      double eps) {
  check_rank(x, "x", 3, "[B, 1, D] (one new token per row)");
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kBFloat16, "x must be float32 or bfloat16, got ", xt,
              ".");
  TORCH_CHECK(x.size(1) == 1, "x.shape[1] (new tokens) must be 1: decode_layer appends one token "
              "per row, got ", x.size(1), " (shape ", shape_str(x), ").");
  check_last_dim_contiguous(x, "x");
  check_rank(k_cache, "k_cache", 4, "[B, Smax, H, d]");
  const int64_t B = x.size(0), D = x.size(2), H = k_cache.size(2), d = k_cache.size(3);
  TORCH_CHECK(H * d == D, "x.shape[2] (hidden size D) must be k_cache's heads x head dim = ", H,
              " x ", d, " = ", H * d, ", got ", D, ".");
  const auto device = x.device();
  check_decode_layer_linear(qkv, device, 3 * D, D, "[3 * D, D] (q, k, v rows)");
  check_decode_layer_linear(dense, device, D, D, "[D, D]");
  constexpr const char* kGateUp = "[2 * intermediate, D] (gate rows, then up rows)";
  check_rank(ffn12.weight, ffn12.names.weight, 2, kGateUp);
  const int64_t rows12 = ffn12.weight.size(0);
  TORCH_CHECK(rows12 % 2 == 0, ffn12.names.weight, ".shape[0] (gate and up rows) must be even, "
              "got ", rows12, ".");
  check_decode_layer_linear(ffn12, device, rows12, D, kGateUp);
  check_decode_layer_linear(ffn3, device, D, rows12 / 2, "[D, intermediate]");
  check_decode_layer_norm(ln1_weight, "ln1_weight", x);
  check_decode_layer_norm(ln1_bias, "ln1_bias", x);
  check_decode_layer_norm(ln2_weight, "ln2_weight", x);
  check_decode_layer_norm(ln2_bias, "ln2_bias", x);
  const int64_t table = interleaved_rope ? d / 2 : d;
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{rope_cos, "rope_cos"},
                                std::pair<const at::Tensor&, const char*>{rope_sin, "rope_sin"}}) {
    TORCH_CHECK(t.device() == device, name, " must be on the same device as x (", device,
                "), got ", t.device(), ".");
    check_dtype(t, name, at::kFloat, "The RoPE tables are fp32.");
    TORCH_CHECK(t.sizes() == at::IntArrayRef({B, 1, 1, table}), name, " must have shape [", B,
                ", 1, 1, ", table, "] (",
                interleaved_rope ? "one angle per pair: interleaved_rope" : "d angles: rotate_half",
                "), got ", shape_str(t), ".");
  }
  TORCH_CHECK(std::isfinite(eps) && eps >= 0,
              "eps (the LayerNorms') must be finite and >= 0, got ", eps, ".");
}

}  // namespace pldr
