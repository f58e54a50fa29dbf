// Input validation shared by the CPU and CUDA backends, so that the same bad input gives the same
// error on every device (docs/design.md §3.5). Each message names the argument, what was expected, what
// was given and, where useful, how to fix it. Host-only code: include from .cpp / *_api.cu files.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <sstream>
#include <string>

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

inline void check_scale(const c10::optional<double>& scale) {
  if (scale.has_value()) {
    TORCH_CHECK(std::isfinite(*scale), "scale must be a finite float or None, got ", *scale, ".");
  }
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

struct AttentionDims {
  int64_t B, Sq, Sk, H, d;
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
  AttentionDims dims{q.size(0), q.size(1), k.size(1), q.size(2), q.size(3)};
  check_head_dim(dims.d, "q");
  check_dim(k, "k", 0, dims.B, "batch");
  check_dim(k, "k", 2, dims.H, "heads");
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

struct DecodeDims {
  int64_t B, Sn, Smax, H, d;
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
  DecodeDims dims{q.size(0), q.size(1), k_cache.size(1), q.size(2), q.size(3)};
  check_head_dim(dims.d, "q");
  TORCH_CHECK(dims.Sn >= 1, "q.shape[1] (new tokens Sn) must be at least 1, got ", dims.Sn, ".");
  check_dim(k_cache, "k_cache", 0, dims.B, "batch");
  check_dim(k_cache, "k_cache", 2, dims.H, "heads");
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
      check_rank(t, name, 4, "[B, Sn, H, d]");
      check_shape(t, name, q.sizes());
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

struct MetricDims {
  int64_t B, S, H, d, R, Gd, F;
};

inline MetricDims check_metric_tensors_inputs(
    const at::Tensor& q, const c10::optional<at::Tensor>& q_mask, const at::Tensor& ln0_w,
    const at::Tensor& ln0_b, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
    const at::Tensor& b2, const at::Tensor& w3, const at::Tensor& b3, const at::Tensor& lnA_w,
    const at::Tensor& lnA_b, const at::Tensor& W, const at::Tensor& b, const at::Tensor& pw,
    const at::Tensor& a, const at::Tensor& ba) {
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
    const at::Tensor& ba) {
  const MetricDims dims = check_metric_tensors_inputs(q, q_mask, ln0_w, ln0_b, w1, b1, w2, b2, w3,
                                                      b3, lnA_w, lnA_b, W, b, pw, a, ba);
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

}  // namespace pldr
