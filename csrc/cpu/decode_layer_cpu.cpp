// pldr::decode_layer on the CPU (docs/design.md §3.12): one post-LN PLDR decoder layer of a
// decode step — fused q/k/v projection, RoPE, append to the KV-cache and attention with the cached
// G, the output projection, residual + LayerNorm, the SwiGLU FFN, residual + LayerNorm — in one
// call.
//
// Why: the layer's work is ~10 small calls, and from Python each costs a module call, argument
// parsing and a dispatch (Intel Xeon, 2 threads, 110M int8: 2.8 ms of a 9.8 ms token). Here the
// same calls are made from C++, in the same order and on the same kernels (pldr::linear_small,
// pldr::swiglu_small, pldr::g_attention_decode, ATen's RoPE arithmetic, add and layer_norm), so
// the layer gives the bits of the Python layer loop (tests/test_decode_layer.py checks that).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "common/checks.h"

namespace pldr::cpu {
namespace {

using OptionalTensor = c10::optional<at::Tensor>;
using LinearSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                                   const OptionalTensor&);
using DecodeSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
                                   const OptionalTensor&, const OptionalTensor&,
                                   c10::optional<double>, int64_t);

template <class Signature>
c10::TypedOperatorHandle<Signature> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// RoPE of qk [B, 1, n, d] by the step's tables, as RotaryEmbedding.forward computes it
// (pldr_kernels/nn.py): interleaved pairs as a complex product in fp32, cast back; rotate_half in
// the activation dtype. The same ATen ops in the same order, so the same bits.
at::Tensor rotate(const at::Tensor& qk, const at::Tensor& cos, const at::Tensor& sin,
                  bool interleaved) {
  if (interleaved) {
    const at::Tensor x32 = qk.scalar_type() == at::kFloat ? qk : qk.to(at::kFloat);
    const at::Tensor xc = at::view_as_complex(x32.unflatten(-1, {-1, 2}));
    const at::Tensor out = at::view_as_real(xc * at::complex(cos, sin)).flatten(-2);
    return out.scalar_type() == qk.scalar_type() ? out : out.to(qk.scalar_type());
  }
  const int64_t half = qk.size(-1) / 2;
  const at::Tensor rotated = at::cat({-qk.narrow(-1, half, half), qk.narrow(-1, 0, half)}, -1);
  return qk * cos.to(qk.scalar_type()) + rotated * sin.to(qk.scalar_type());
}

at::Tensor decode_layer_cpu(
    const at::Tensor& x, const at::Tensor& qkv_weight, const OptionalTensor& qkv_bias,
    const OptionalTensor& qkv_scale, const at::Tensor& dense_weight,
    const OptionalTensor& dense_bias, const OptionalTensor& dense_scale,
    const at::Tensor& ln1_weight, const at::Tensor& ln1_bias, const at::Tensor& ffn_w12,
    const OptionalTensor& ffn_b12, const OptionalTensor& ffn_s12, const at::Tensor& ffn_w3,
    const OptionalTensor& ffn_b3, const OptionalTensor& ffn_s3, const at::Tensor& ln2_weight,
    const at::Tensor& ln2_bias, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& cache_seqlens, const OptionalTensor& cache_start, const OptionalTensor& G,
    const at::Tensor& rope_cos, const at::Tensor& rope_sin, bool interleaved_rope, double eps) {
  check_decode_layer_inputs(
      x, {qkv_weight, qkv_bias, qkv_scale, {"qkv_weight", "qkv_bias", "qkv_scale"}},
      {dense_weight, dense_bias, dense_scale, {"dense_weight", "dense_bias", "dense_scale"}},
      ln1_weight, ln1_bias, {ffn_w12, ffn_b12, ffn_s12, {"ffn_w12", "ffn_b12", "ffn_s12"}},
      {ffn_w3, ffn_b3, ffn_s3, {"ffn_w3", "ffn_b3", "ffn_s3"}}, ln2_weight, ln2_bias, k_cache,
      rope_cos, rope_sin, interleaved_rope, eps);
  static const auto linear_small = typed_op<LinearSignature>("pldr::linear_small");
  static const auto swiglu_small = typed_op<LinearSignature>("pldr::swiglu_small");
  static const auto attend = typed_op<DecodeSignature>("pldr::g_attention_decode");
  const int64_t B = x.size(0), D = x.size(2), H = k_cache.size(2), d = k_cache.size(3);

  // GCachedAttention.project: the fused projection, split into q|k and v, RoPE on q|k.
  const at::Tensor qkv =
      linear_small.call(x, qkv_weight, qkv_bias, qkv_scale).view({B, 1, 3, H, d});
  const auto qk_v = qkv.split({2, 1}, 2);
  const at::Tensor qk = qk_v[0].reshape({B, 1, 2 * H, d});
  const at::Tensor v = qk_v[1].view({B, 1, H, d});
  const auto q_k = rotate(qk, rope_cos, rope_sin, interleaved_rope).split(H, 2);
  // The append and the attention: every value check of g_attention_decode (the cache bounds
  // included) runs before its first write, and nothing above wrote anything.
  const at::Tensor o = attend.call(q_k[0], k_cache, v_cache, cache_seqlens, q_k[1], v,
                                   cache_start, G, c10::nullopt, 0);
  const at::Tensor attn = linear_small.call(o.reshape({B, 1, D}), dense_weight, dense_bias,
                                            dense_scale);
  // PLDRDecoderLayer.forward: LN2(FFN(out1) + out1), out1 = LN1(attn + x).
  const at::Tensor out1 = at::layer_norm(attn + x, {D}, ln1_weight, ln1_bias, eps);
  const at::Tensor h = swiglu_small.call(out1, ffn_w12, ffn_b12, ffn_s12);
  const at::Tensor f = linear_small.call(h, ffn_w3, ffn_b3, ffn_s3);
  return at::layer_norm(f + out1, {D}, ln2_weight, ln2_bias, eps);
}

}  // namespace
}  // namespace pldr::cpu

TORCH_LIBRARY_IMPL(pldr, CPU, m) { m.impl("decode_layer", &pldr::cpu::decode_layer_cpu); }
