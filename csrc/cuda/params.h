// Launch parameters of the three CUDA ops (docs/design.md §3): plain structs of pointers, sizes
// and strides, filled by the *_api.cu files from checked tensors and by the emulation drivers
// (tests/emu) from raw arrays. No torch or CUDA headers, so the emulator includes this as is.
//
// One stride scheme, in elements: a stride is named after the dimension it steps, batch, row (a
// token of a [B, S, ...] tensor, or a row of a matrix) or head.
//   * every [B, S, H, d] tensor (queries, keys, values, caches, outputs) is a StridedBSHD;
//   * G [B or 1, H, d, d] is a StridedG;
//   * a [B, S] mask or a [B] length vector carries <name>_batch_stride (and <name>_row_stride).
// The last dimension is always contiguous (common/checks.h refuses anything else). Optional inputs
// are null pointers when absent.
#pragma once

#include <cstdint>

namespace pldr::cuda {

// Element (b, s, h, e) at ptr + b·batch_stride + s·row_stride + h·head_stride + e.
struct StridedBSHD {
  void* ptr;
  int64_t batch_stride, row_stride, head_stride;
};

// Row r of G[b, h] at ptr + b·batch_stride + h·head_stride + r·row_stride; batch_stride = 0 when
// one G ([1, H, d, d]) is shared by the batch; ptr = nullptr: no G (the identity).
struct StridedG {
  const float* ptr;
  int64_t batch_stride, head_stride, row_stride;
};

// pldr::g_attention (g_attention_kernel.cuh).
struct GAttentionParams {
  StridedBSHD q;    // [B, Sq, H, d], fp32 / bf16 / fp16
  StridedBSHD k;    // [B, Sk, H_kv, d]: query head h reads kv head h / kv_group (GQA)
  StridedBSHD v;    // [B, Sk, H_kv, d]
  StridedBSHD out;  // [B, Sq, H, d], q's dtype
  float* lse;       // [B, H, Sq] fp32, contiguous
  StridedG G;
  const bool* key_mask;  // [B, Sk], True = attend; null = every key
  int64_t key_mask_batch_stride, key_mask_row_stride;
  int B, H, Sq, Sk;
  int kv_group;  // H / H_kv, query heads per key/value head (1: multi-head attention)
  float scale;  // softmax scale (default 1/sqrt(d))
  bool causal;  // bottom-right aligned: query i sees keys j <= i + Sk - Sq
};

// pldr::g_attention_decode (g_attention_decode_kernel.cuh).
struct DecodeParams {
  StridedBSHD q;        // [B, Sn, H, d]
  // [B, Smax, H_kv, d], written at rows cache_seqlens[b] .. + Sn when appending; query head h
  // reads kv head h / kv_group (GQA)
  StridedBSHD k_cache;
  StridedBSHD v_cache;
  StridedBSHD k_new;  // [B, Sn, H_kv, d]; ptr = null: no append
  StridedBSHD v_new;
  StridedBSHD out;  // [B, Sn, H, d]
  StridedG G;
  const int32_t* cache_seqlens;  // [B]
  int64_t cache_seqlens_batch_stride;
  const int32_t* cache_start;  // [B]; null: rows start at 0
  int64_t cache_start_batch_stride;
  float* o_partial;    // [B, Sn, H, num_splits, d] fp32 workspace, when num_splits > 1
  float* lse_partial;  // [B, Sn, H, num_splits] fp32 (base-2 log-sum-exp)
  int B, Sn, Smax, H;
  int kv_group;  // H / H_kv (1: multi-head attention)
  float scale;
  int num_splits;
  int q_chunks;
  bool vec_ok;  // every k_cache / v_cache / k_new / v_new row is 16-byte aligned
};

// pldr::metric_tensors (metric_tensors_kernel.cuh). Weights, outputs and workspaces are
// contiguous fp32 (the API makes the weights so).
struct MetricParams {
  StridedBSHD q;        // [B, S, H, d], activation dtype
  const bool* q_mask;   // [B, S], True = real token; null = every row
  int64_t q_mask_batch_stride, q_mask_row_stride;
  const float* ln0_w;   // [d]
  const float* ln0_b;   // [d]
  const float* w1;      // [R, Gd, F, d]
  const float* b1;      // [R, Gd, F]
  const float* w2;      // [R, Gd, F, d]
  const float* b2;      // [R, Gd, F]
  const float* w3;      // [R, Gd, d, F]
  const float* b3;      // [R, Gd, d]
  const float* lnA_w;   // [R, d]
  const float* lnA_b;   // [R, d]
  const float* W;       // [H, d, d]
  const float* b;       // [H, d, d]
  const float* pw;      // [H, d, d]
  const float* a;       // [H, d, d]
  const float* ba;      // [H, d, d]
  float* A;             // [B, H, d, d] outputs
  float* A_LM;
  float* G;
  float* qtq_partial;   // [B, H, n_chunks, d, d] workspace
  float* A_P;           // [B, H, d, d] workspace
  int B, S, H, R, Gd, F;
  int n_chunks;
  float eps_ln, eps_adj;
};

}  // namespace pldr::cuda
