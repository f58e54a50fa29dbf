// pldr::g_attention_decode on CUDA (docs/design.md §3.3): one generation step over a KV-cache with
// G applied to the query, split-KV so that batch 1 fills the GPU. Device code and its launch
// (choose_decode_splits, launch_g_attention_decode, at the end); no torch headers, so the CPU
// emulator (tools/cuda_emu, tests/emu/decode_driver.cpp) runs exactly this code.
//
// Work split. Grid (num_splits, H * q_chunks, B), 128 threads. A block owns one (b, h), up to
// kQueriesPerBlock of the Sn new queries, and 1/num_splits of the row's visible keys (the split
// of [cache_start, total) is computed on the device from cache_seqlens, so the grid depends only on
// (B, Sn, Smax, H, d, num_splits) and the step can be captured in a CUDA graph). Inside a block,
// each key is read by a group of lanes, 16 bytes per lane, so a warp reads whole 128/256-byte rows;
// each lane group keeps its own online-softmax state (base-2 exponent, fp32) and the states are
// merged through shuffles and shared memory. With num_splits > 1 every block writes a normalised
// partial (o, lse) to a workspace and decode_combine_kernel merges them by LSE.
//
// Append. New keys/values are copied into the cache by the split-0 block of each (b, h); every
// block reads keys at rows >= cache_seqlens[b] straight from k_new/v_new, so no block ever waits
// for another block's write.
//
// Bounds (differs from the CPU backend, which raises before writing): the lengths live on the
// device and reading them on the host would synchronise, so a row whose lengths are invalid
// (cache_seqlens[b] + Sn > Smax when appending, cache_seqlens[b] < Sn without k_new,
// cache_seqlens[b] < 0, cache_start[b] outside [0, total - Sn]) is not written at all — the cache
// stays untouched for that row — and its outputs are NaN, so the failure is never silent.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cuda/device.cuh"
#include "cuda/params.h"

namespace pldr::cuda {

constexpr int kDecodeThreads = 128;
constexpr int kDecodeWarps = kDecodeThreads / 32;
// Queries per block: Sn = 1 (plain decode) has its own instantiation with one query's registers;
// otherwise up to 4 (small speculative steps) per block, and a larger Sn takes several chunks
// (grid.y), each re-reading the row's keys (from L2 when they fit).
constexpr int kQueriesPerBlock = 4;
constexpr int kDecodeKeyUnroll = 2;  // keys in flight per lane group per iteration
constexpr int kMaxDecodeSplits = 128;
constexpr int kMinKeysPerSplit = 64;

// The visible key range of row b, checked on the device (see "Bounds" above).
struct DecodeRow {
  int begin;  // first visible key (cache_start)
  int end;    // one past the last key (cache_seqlens + Sn when appending)
  int len;    // cache_seqlens[b]
  bool valid;
};

__device__ __forceinline__ DecodeRow decode_row(const DecodeParams& p, int b) {
  DecodeRow r;
  r.len = p.cache_seqlens[b * p.cache_seqlens_batch_stride];
  const int64_t total = int64_t(r.len) + (p.k_new.ptr != nullptr ? p.Sn : 0);
  const int64_t start =
      p.cache_start != nullptr ? p.cache_start[b * p.cache_start_batch_stride] : 0;
  r.valid = r.len >= 0 && total <= p.Smax && total >= p.Sn && start >= 0 && start <= total - p.Sn;
  r.begin = r.valid ? int(start) : 0;
  r.end = r.valid ? int(total) : 0;
  return r;
}

template <class T, int D, int kQueries>
__global__ void __launch_bounds__(kDecodeThreads) g_attention_decode_kernel(const DecodeParams p) {
  constexpr int kElemsPerLane = 16 / int(sizeof(T));
  constexpr int kLanesPerKey = D / kElemsPerLane;
  static_assert(kLanesPerKey <= 32 && 32 % kLanesPerKey == 0, "a key must fit in one warp");
  constexpr int kKeysPerWarp = 32 / kLanesPerKey;
  constexpr int kKeysPerStep = kKeysPerWarp * kDecodeWarps;

  __shared__ float q_s[kQueries][D];
  __shared__ float qg_s[kQueries][D];  // (q·G)·scale·log2(e)
  __shared__ float m_s[kDecodeWarps][kQueries];
  __shared__ float l_s[kDecodeWarps][kQueries];
  __shared__ float acc_s[kDecodeWarps][kQueries][D];

  const int split = blockIdx.x;
  const int h = blockIdx.y % p.H;
  const int q0 = (blockIdx.y / p.H) * kQueries;
  const int b = blockIdx.z;
  const int nq = min(kQueries, p.Sn - q0);
  const int tid = threadIdx.x;
  const DecodeRow row = decode_row(p, b);

  const T* q = head_rows<const T>(p.q, b, h);
  T* out = head_rows<T>(p.out, b, h);
  if (!row.valid) {  // uniform over the block: nothing written to the cache, NaN out
    if (p.num_splits == 1) {
      for (int idx = tid; idx < nq * D; idx += kDecodeThreads)
        out[(q0 + idx / D) * p.out.row_stride + idx % D] = from_float<T>(NAN);
    }
    return;  // with splits, decode_combine_kernel writes the NaN
  }

  // Grouped-query attention: the kv head of query head h; the first query head of each group
  // appends its new keys (the others read them from k_new, like every block, so none waits).
  const int kv_h = int(unsigned(h) / unsigned(p.kv_group));  // unsigned: fewer registers
  T* k_cache = head_rows<T>(p.k_cache, b, kv_h);
  T* v_cache = head_rows<T>(p.v_cache, b, kv_h);
  const bool appending = p.k_new.ptr != nullptr;
  const T* k_new = appending ? head_rows<const T>(p.k_new, b, kv_h) : nullptr;
  const T* v_new = appending ? head_rows<const T>(p.v_new, b, kv_h) : nullptr;

  if (appending && split == 0 && blockIdx.y < unsigned(p.H) && h % p.kv_group == 0) {
    for (int idx = tid; idx < p.Sn * D; idx += kDecodeThreads) {
      const int s = idx / D, e = idx % D;
      k_cache[int64_t(row.len + s) * p.k_cache.row_stride + e] = k_new[s * p.k_new.row_stride + e];
      v_cache[int64_t(row.len + s) * p.v_cache.row_stride + e] = v_new[s * p.v_new.row_stride + e];
    }
  }

  // q̃ = q·G in fp32, with the softmax scale and log2(e) folded in (scores in the base-2 domain).
  for (int idx = tid; idx < nq * D; idx += kDecodeThreads)
    q_s[idx / D][idx % D] = to_float(q[(q0 + idx / D) * p.q.row_stride + idx % D]);
  __syncthreads();
  const float qscale = p.scale * kLog2e;
  const float* G = head_matrix(p.G, b, h);
  for (int idx = tid; idx < nq * D; idx += kDecodeThreads) {
    const int i = idx / D, j = idx % D;
    float v;
    if (G != nullptr) {
      v = 0.f;
      for (int k = 0; k < D; ++k) v = fmaf(q_s[i][k], G[k * p.G.row_stride + j], v);
    } else {
      v = q_s[i][j];
    }
    qg_s[i][j] = v * qscale;
  }
  __syncthreads();

  // This block's keys: an even share of [begin, end), decided on the device.
  const int n_keys = row.end - row.begin;
  const int per_split = (n_keys + p.num_splits - 1) / p.num_splits;
  const int kb = row.begin + split * per_split;
  const int ke = min(row.end, kb + per_split);
  const int last_cached = appending ? row.len : row.end;  // keys at rows >= this come from k_new

  const int warp = tid / 32, lane = tid % 32;
  const int group = lane / kLanesPerKey, sub = lane % kLanesPerKey;
  float qreg[kQueries][kElemsPerLane];
#pragma unroll
  for (int i = 0; i < kQueries; ++i)
#pragma unroll
    for (int e = 0; e < kElemsPerLane; ++e) qreg[i][e] = qg_s[i][sub * kElemsPerLane + e];
  float m[kQueries], l[kQueries], acc[kQueries][kElemsPerLane];
#pragma unroll
  for (int i = 0; i < kQueries; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.f;
#pragma unroll
    for (int e = 0; e < kElemsPerLane; ++e) acc[i][e] = 0.f;
  }

  // Warp-uniform loop (the shuffles need the whole warp); keys past ke are masked per lane group.
  for (int jw = kb + warp * kKeysPerWarp; jw < ke; jw += kKeysPerStep * kDecodeKeyUnroll) {
    float kf[kDecodeKeyUnroll][kElemsPerLane], vf[kDecodeKeyUnroll][kElemsPerLane];
    int key[kDecodeKeyUnroll];
#pragma unroll
    for (int u = 0; u < kDecodeKeyUnroll; ++u) {
      key[u] = jw + u * kKeysPerStep + group;
      if (key[u] < ke) {
        const T* kp = key[u] < last_cached ? k_cache + int64_t(key[u]) * p.k_cache.row_stride
                                           : k_new + (key[u] - last_cached) * p.k_new.row_stride;
        const T* vp = key[u] < last_cached ? v_cache + int64_t(key[u]) * p.v_cache.row_stride
                                           : v_new + (key[u] - last_cached) * p.v_new.row_stride;
        load_as_float(kp + sub * kElemsPerLane, p.vec_ok, kf[u]);
        load_as_float(vp + sub * kElemsPerLane, p.vec_ok, vf[u]);
      } else {
#pragma unroll
        for (int e = 0; e < kElemsPerLane; ++e) kf[u][e] = vf[u][e] = 0.f;
      }
    }
#pragma unroll
    for (int i = 0; i < kQueries; ++i) {
      if (i >= nq) break;  // block-uniform
      const int last_visible = row.end - p.Sn + q0 + i;  // causal inside the new block
      float s[kDecodeKeyUnroll];
      bool seen[kDecodeKeyUnroll];
      bool any_score = false;  // any score other than −inf (NaN included, docs/design.md §3.5)
      float mx = m[i];
#pragma unroll
      for (int u = 0; u < kDecodeKeyUnroll; ++u) {
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < kElemsPerLane; ++e) dot = fmaf(qreg[i][e], kf[u][e], dot);
#pragma unroll
        for (int offset = kLanesPerKey / 2; offset > 0; offset >>= 1)
          dot += __shfl_xor_sync(0xffffffffu, dot, offset);
        seen[u] = key[u] < ke && key[u] <= last_visible;
        s[u] = seen[u] ? dot : -INFINITY;
        mx = fmaxf(mx, s[u]);  // fmaxf drops a NaN score; its weight below is NaN all the same
        any_score |= s[u] != -INFINITY;
      }
      if (mx == -INFINITY && !any_score) continue;  // nothing visible to this lane group yet
      const float correction = exp2f(m[i] - mx);
      float psum = 0.f, pexp[kDecodeKeyUnroll];
#pragma unroll
      for (int u = 0; u < kDecodeKeyUnroll; ++u) {
        pexp[u] = exp2f(s[u] - mx);
        psum += pexp[u];
      }
      l[i] = l[i] * correction + psum;
#pragma unroll
      for (int e = 0; e < kElemsPerLane; ++e) {
        float a = acc[i][e] * correction;
#pragma unroll
        for (int u = 0; u < kDecodeKeyUnroll; ++u) {
          // A key hidden from this query (later in the new block) never contributes: its weight
          // is 0, but 0·NaN = NaN. With one query every loaded key is seen (or its vf is 0).
          if (kQueries == 1 || seen[u]) a = fmaf(pexp[u], vf[u][e], a);
        }
        acc[i][e] = a;
      }
      m[i] = mx;
    }
  }

  // Merge the lane groups of the warp, then the warps through shared memory.
#pragma unroll
  for (int i = 0; i < kQueries; ++i) {
#pragma unroll
    for (int offset = kLanesPerKey; offset < 32; offset <<= 1) {
      const float m_o = __shfl_xor_sync(0xffffffffu, m[i], offset);
      const float l_o = __shfl_xor_sync(0xffffffffu, l[i], offset);
      const float mx = fmaxf(m[i], m_o);
      const float c_self = mx == -INFINITY ? 0.f : exp2f(m[i] - mx);
      const float c_other = mx == -INFINITY ? 0.f : exp2f(m_o - mx);
#pragma unroll
      for (int e = 0; e < kElemsPerLane; ++e) {
        const float a_o = __shfl_xor_sync(0xffffffffu, acc[i][e], offset);
        acc[i][e] = acc[i][e] * c_self + a_o * c_other;
      }
      l[i] = l[i] * c_self + l_o * c_other;
      m[i] = mx;
    }
    if (group == 0) {
      if (sub == 0) {
        m_s[warp][i] = m[i];
        l_s[warp][i] = l[i];
      }
#pragma unroll
      for (int e = 0; e < kElemsPerLane; ++e) acc_s[warp][i][sub * kElemsPerLane + e] = acc[i][e];
    }
  }
  __syncthreads();

  for (int idx = tid; idx < nq * D; idx += kDecodeThreads) {
    const int i = idx / D, e = idx % D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) mx = fmaxf(mx, m_s[w][i]);
    float lsum = 0.f, o = 0.f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) {
      // A warp that saw nothing has weight 0 (its l and acc are 0, or NaN after a NaN score,
      // which then stays: NaN·0 = NaN).
      const float c = m_s[w][i] == -INFINITY ? 0.f : exp2f(m_s[w][i] - mx);
      lsum = fmaf(l_s[w][i], c, lsum);
      o = fmaf(acc_s[w][i][e], c, o);
    }
    const float o_norm = lsum == 0.f ? 0.f : o / lsum;
    if (p.num_splits == 1) {
      out[(q0 + i) * p.out.row_stride + e] = from_float<T>(o_norm);
    } else {
      const int64_t slot = ((int64_t(b) * p.Sn + q0 + i) * p.H + h) * p.num_splits + split;
      p.o_partial[slot * D + e] = o_norm;
      if (e == 0) p.lse_partial[slot] = lsum == 0.f ? -INFINITY : mx + log2f(lsum);
    }
  }
}

// Merges the num_splits partial (o, lse) of each (b, query, h) by LSE, in a fixed order
// (deterministic). Grid (H, Sn, B), D threads: one output element per thread.
template <class T, int D>
__global__ void __launch_bounds__(D) decode_combine_kernel(const DecodeParams p) {
  const int h = blockIdx.x, s = blockIdx.y, b = blockIdx.z, e = threadIdx.x;
  T* out = head_rows<T>(p.out, b, h) + s * p.out.row_stride;
  if (!decode_row(p, b).valid) {
    out[e] = from_float<T>(NAN);
    return;
  }
  const int64_t slot0 = ((int64_t(b) * p.Sn + s) * p.H + h) * p.num_splits;
  const float* lse = p.lse_partial + slot0;
  float mx = -INFINITY;
  for (int k = 0; k < p.num_splits; ++k) mx = fmaxf(mx, lse[k]);
  float wsum = 0.f, o = 0.f;
  for (int k = 0; k < p.num_splits; ++k) {
    // An empty split has weight 0; a NaN one (fmaxf dropped it from mx) makes the sum NaN.
    const float w = lse[k] == -INFINITY ? 0.f : exp2f(lse[k] - mx);
    wsum += w;
    o = fmaf(w, p.o_partial[(slot0 + k) * D + e], o);
  }
  out[e] = from_float<T>(wsum == 0.f ? 0.f : o / wsum);
}

// ============================================================================================
// Launch (host)
// ============================================================================================
// Queries per block (see kQueriesPerBlock) and the blocks along grid.y that cover Sn.
inline int decode_queries_per_block(int Sn) { return Sn == 1 ? 1 : kQueriesPerBlock; }
inline int decode_query_chunks(int Sn) {
  const int per_block = decode_queries_per_block(Sn);
  return (Sn + per_block - 1) / per_block;
}

// Splits of the key range: 1 when B·H·q_chunks blocks already fill the GPU, otherwise enough to
// give ~4 blocks per SM (what the register budget of the 16-bit kernels allows; more resident
// blocks = more loads in flight on long caches), keeping at least kMinKeysPerSplit keys of Smax
// per split. Depends only on shapes (never on cache_seqlens), so a captured graph stays valid.
inline int choose_decode_splits(int B, int H, int Sn, int Smax, int num_sms, int64_t requested) {
  const int q_chunks = decode_query_chunks(Sn);
  if (requested > 0) return int(std::min<int64_t>(requested, kMaxDecodeSplits));
  const int64_t blocks = int64_t(B) * H * q_chunks;
  const int64_t target_blocks = 4 * int64_t(std::max(num_sms, 1));
  if (blocks * 5 >= int64_t(num_sms) * 4) return 1;
  const int64_t by_occupancy = (target_blocks + blocks - 1) / blocks;
  const int64_t by_length = std::max<int64_t>(1, Smax / kMinKeysPerSplit);
  return int(std::max<int64_t>(1, std::min({by_occupancy, by_length, int64_t(kMaxDecodeSplits)})));
}

// Launches the step; p.num_splits, p.q_chunks and (when num_splits > 1) the workspace pointers
// must be set.
template <class T, int D>
void launch_g_attention_decode(const DecodeParams& p, cudaStream_t stream) {
  auto attend = decode_queries_per_block(p.Sn) == 1
                    ? &g_attention_decode_kernel<T, D, 1>
                    : &g_attention_decode_kernel<T, D, kQueriesPerBlock>;
  const dim3 grid(unsigned(p.num_splits), unsigned(p.H * p.q_chunks), unsigned(p.B));
  PLDR_LAUNCH_KERNEL(attend, grid, dim3(kDecodeThreads), 0, stream, p);
  if (p.num_splits > 1) {
    auto combine = &decode_combine_kernel<T, D>;
    PLDR_LAUNCH_KERNEL(combine, dim3(unsigned(p.H), unsigned(p.Sn), unsigned(p.B)), dim3(D), 0,
                       stream, p);
  }
}

}  // namespace pldr::cuda
