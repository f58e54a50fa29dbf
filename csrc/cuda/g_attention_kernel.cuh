// pldr::g_attention on CUDA (docs/design.md §3.2): softmax((q·G)·kᵀ·scale + mask)·v. Device code
// and its launch (launch_g_attention, at the end); included by g_attention_api.cu (nvcc) and by
// the emulation driver tests/emu/g_attention_driver.cpp (g++ with tools/cuda_emu), so it uses only
// the wrappers of device.cuh / ptx.cuh and the shim-provided built-ins.
//
// Two kernels:
// * g_attention_mma_kernel<T, D> (bf16/fp16, d = 64/128): FlashAttention-2 style. A block owns
//   64 query rows of one (batch, head); each of its 4 warps owns 16 rows and keeps q̃, the output
//   accumulator and the softmax state in registers. Key/value tiles (64 rows at d = 64, 32 at
//   d = 128) stream through shared memory with cp.async, double-buffered (tile n+1 loads while
//   tile n is computed);
//   q̃·kᵀ and p·v run on mma.sync m16n8k16 with fp32 accumulation, operands come from ldmatrix
//   on an XOR-swizzled layout (conflict-free). The online softmax runs in fp32 in log2 units.
// * g_attention_fp32_kernel<D> (fp32 inputs): a simple, exact SIMT path, one warp per query row.
//
// Numerics of q·G (tensor-core path): G (fp32) is split into two terms of the MMA dtype,
// G_hi = rn(G) and G_lo = rn(G − G_hi), staged in shared memory, and q·G_hi + q·G_lo is
// accumulated in fp32 on the tensor cores (the products are exact). G_hi + G_lo represents each
// entry of G to a relative 2^-16 (bf16) / 2^-22 (fp16; 2^-25 absolute where G_lo is subnormal),
// far below the single rounding of the fp32 result q̃ to the MMA dtype (relative 2^-8 / 2^-11),
// which therefore dominates: q̃ carries the same error as q.float() @ G rounded once to q's dtype
// (what a user feeding SDPA would do), and the tests hold the kernel to the docs/design.md §4 rule
// against exactly that PyTorch peer. fp16 caveat: G entries beyond the fp16 range (|G| > 65504)
// overflow (fp16 is not a supported G dtype, docs/spec.md §5.2).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cuda/params.h"
#include "cuda/ptx.cuh"

namespace pldr::cuda {

// Keys [0, end) that query rows up to `last_row` may see (causal limit, clamped to [0, Sk]).
__device__ __forceinline__ int visible_key_end(const GAttentionParams& p, int last_row) {
  if (!p.causal) return p.Sk;
  const int end = last_row + 1 + p.Sk - p.Sq;
  return end < 0 ? 0 : (end > p.Sk ? p.Sk : end);
}

// ============================================================================================
// Tensor-core kernel (bf16 / fp16). It moves 16-byte chunks: q, k, v and out rows must start on
// 16-byte boundaries (the API copies a q, k or v view that does not; out is allocated contiguous).
// ============================================================================================
template <int D>
struct MmaTiling {
  static_assert(D == 64 || D == 128, "head dim must be 64 or 128");
  static constexpr int kBlockM = 64;  // query rows per block (16 per warp)
  // Keys per tile: 32 at d = 128 keeps the per-thread state (q̃, O, S, P fragments) in 255
  // registers without spills.
  static constexpr int kBlockN = D == 64 ? 64 : 32;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  // Blocks per SM the register budget must allow (__launch_bounds__): 2, i.e. <= 255 registers.
  // (3 at d = 64 caps it at 168 registers, which spills on sm_80.)
  static constexpr int kMinBlocksPerSM = 2;
  static constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static constexpr int kQElems = kBlockM * D;
  static constexpr int kKVElems = kBlockN * D;  // one stage of K or V
  // Layout (16-bit elements): Q | K stage 0, 1 | V stage 0, 1 | key-visibility bytes stage 0, 1.
  // G_hi, G_lo alias the K/V stages (they are used up before the first K/V load), staged in
  // chunks of kGRows rows of G when all of it does not fit.
  static constexpr int kSmemBytes = 2 * (kQElems + 4 * kKVElems) + 2 * kBlockN;
  static constexpr int kGRows = 2 * kBlockN < D ? 2 * kBlockN : D;
  static_assert(2 * kGRows * D <= 4 * kKVElems && D % kGRows == 0 && kGRows % 16 == 0,
                "G chunks must fit in the K/V stages");

  static dim3 grid(const GAttentionParams& p) {
    return dim3((p.Sq + kBlockM - 1) / kBlockM, p.H, p.B);
  }
};

// Offset of element (row, col) in a [rows][D] tile of 16-bit values stored with 16-byte chunks
// XOR-swizzled by row: the 8 rows an ldmatrix phase reads hit 8 different bank groups.
template <int D>
__device__ __forceinline__ int swizzle(int row, int col) {
  return row * D + (((col >> 3) ^ (row & 7)) << 3) + (col & 7);
}

// cp.async a [kRows][D] tile whose row r starts at src + r*row_stride; rows >= rows_valid are
// zero-filled (never read from global memory).
template <int D, int kRows>
__device__ __forceinline__ void load_tile_async(uint16_t* tile, const uint16_t* src,
                                                int64_t row_stride, int rows_valid, int tid) {
  using Tiling = MmaTiling<D>;
  static_assert(kRows * Tiling::kChunks % Tiling::kThreads == 0,
                "tile must split evenly over the threads");
#pragma unroll
  for (int i = 0; i < kRows * Tiling::kChunks / Tiling::kThreads; ++i) {
    const int c = tid + i * Tiling::kThreads;
    const int row = c / Tiling::kChunks, col = (c % Tiling::kChunks) * 8;
    const bool valid = row < rows_valid;
    cp_async_16(tile + swizzle<D>(row, col), valid ? src + row * row_stride + col : src, valid);
  }
}

// Stage kGRows rows of G (fp32, row r at G + r*row_stride) as G_hi = rn(G), G_lo = rn(G − G_hi)
// in the MMA dtype, swizzled [k][n] tiles read with ldmatrix.trans. G − G_hi is exact in fp32.
template <class T, int D>
__device__ __forceinline__ void stage_g_split(uint16_t* s_hi, uint16_t* s_lo, const float* G,
                                              int64_t row_stride, int tid) {
  using Tiling = MmaTiling<D>;
#pragma unroll 2
  for (int c = tid; c < Tiling::kGRows * Tiling::kChunks; c += Tiling::kThreads) {
    const int row = c / Tiling::kChunks, col = (c % Tiling::kChunks) * 8;
    const float* src = G + row * row_stride + col;
    uint32_t hi[4], lo[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float x0 = src[2 * j], x1 = src[2 * j + 1];
      const float h0 = round_to<T>(x0), h1 = round_to<T>(x1);
      hi[j] = pack2<T>(h0, h1);
      // An Inf entry is all in G_hi (inf − inf would make G_lo NaN); NaN stays NaN.
      lo[j] = pack2<T>(h0 == x0 ? 0.f : x0 - h0, h1 == x1 ? 0.f : x1 - h1);
    }
    *reinterpret_cast<Vec16*>(s_hi + swizzle<D>(row, col)) = Vec16{hi[0], hi[1], hi[2], hi[3]};
    *reinterpret_cast<Vec16*>(s_lo + swizzle<D>(row, col)) = Vec16{lo[0], lo[1], lo[2], lo[3]};
  }
}

// Two fp32 accumulator tiles (16x8 each, C layout) of columns 16ks..16ks+15 → one A fragment:
// the C layout of two adjacent n-tiles is exactly the A layout, so values stay in registers.
template <class T>
__device__ __forceinline__ void accumulators_to_a_fragment(uint32_t (&a)[4],
                                                           const float (&c0)[4],
                                                           const float (&c1)[4]) {
  a[0] = pack2<T>(c0[0], c0[1]);
  a[1] = pack2<T>(c0[2], c0[3]);
  a[2] = pack2<T>(c1[0], c1[1]);
  a[3] = pack2<T>(c1[2], c1[3]);
}

// Whether a bf16 / fp16 value (as its bits) is NaN or ±Inf: all its exponent bits are set.
template <class T>
__device__ __forceinline__ bool not_finite_bits(uint32_t x) {
  constexpr uint32_t kExponent = std::is_same_v<T, __half> ? 0x7c00u : 0x7f80u;
  return (x & kExponent) == kExponent;
}

// The bf16 / fp16 value at `bits` as fp32.
template <class T>
__device__ __forceinline__ float bits_to_float(const uint16_t* bits) {
  return to_float(*reinterpret_cast<const T*>(bits));
}

// Sets to 0 the NaN / ±Inf entries of the rows of a [kRows][D] swizzled tile for which
// hidden(row) holds; returns whether this thread found one.
template <class T, int D, int kRows, class HiddenFn>
__device__ __forceinline__ bool zero_nonfinite_rows(uint16_t* tile, const HiddenFn& hidden,
                                                    int tid) {
  using Tiling = MmaTiling<D>;
  bool found = false;
#pragma unroll
  for (int i = 0; i < kRows * Tiling::kChunks / Tiling::kThreads; ++i) {
    const int c = tid + i * Tiling::kThreads;
    const int row = c / Tiling::kChunks, col = (c % Tiling::kChunks) * 8;
    if (!hidden(row)) continue;
    uint16_t* chunk = tile + swizzle<D>(row, col);
    const Vec16 x = *reinterpret_cast<const Vec16*>(chunk);
    bool any = false;
    for (const uint32_t w : {x.x, x.y, x.z, x.w}) any |= not_finite_bits<T>(w) || not_finite_bits<T>(w >> 16);
    if (!any) continue;
    found = true;
    for (int e = 0; e < 8; ++e) {
      if (not_finite_bits<T>(chunk[e])) chunk[e] = 0;
    }
  }
  return found;
}

template <class T, int D>
__global__ void __launch_bounds__(MmaTiling<D>::kThreads, MmaTiling<D>::kMinBlocksPerSM)
    g_attention_mma_kernel(const GAttentionParams p) {
  using Tiling = MmaTiling<D>;
  constexpr int kBlockM = Tiling::kBlockM, kBlockN = Tiling::kBlockN;

  PLDR_DYNAMIC_SMEM(smem);
  uint16_t* s_q = reinterpret_cast<uint16_t*>(smem);
  uint16_t* s_k = s_q + Tiling::kQElems;       // 2 stages
  uint16_t* s_v = s_k + 2 * Tiling::kKVElems;  // 2 stages
  auto* s_visible = reinterpret_cast<unsigned char*>(s_v + 2 * Tiling::kKVElems);  // 2 stages
  uint16_t* s_g_hi = s_k;
  uint16_t* s_g_lo = s_k + Tiling::kGRows * D;
  __shared__ int s_hidden_v_not_finite;  // see "Hidden keys" in the loop

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int group = lane >> 2, tig = lane & 3;
  // Causal blocks with the most work are scheduled first.
  const int m_block = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int m0 = m_block * kBlockM;
  const int q_rows = (p.Sq - m0 < kBlockM) ? p.Sq - m0 : kBlockM;

  const uint16_t* q = head_rows<const uint16_t>(p.q, b, h) + m0 * p.q.row_stride;
  // grouped-query attention (docs/design.md §3.2); unsigned: the signed division cost registers
  const int kv_h = int(unsigned(h) / unsigned(p.kv_group));
  const uint16_t* k = head_rows<const uint16_t>(p.k, b, kv_h);
  const uint16_t* v = head_rows<const uint16_t>(p.v, b, kv_h);
  const bool* key_mask = p.key_mask ? p.key_mask + b * p.key_mask_batch_stride : nullptr;

  const int key_end = visible_key_end(p, m0 + q_rows - 1);
  const int n_tiles = (key_end + kBlockN - 1) / kBlockN;

  // ---- Q tile (and G) into shared memory ------------------------------------------------------
  load_tile_async<D, kBlockM>(s_q, q, p.q.row_stride, q_rows, tid);
  cp_async_commit();
  const bool has_g = p.G.ptr != nullptr;
  const float* G = head_matrix(p.G, b, h);
  if (has_g) stage_g_split<T, D>(s_g_hi, s_g_lo, G, p.G.row_stride, tid);  // first chunk
  cp_async_wait<0>();
  __syncthreads();

  // A fragments of this warp's 16 query rows (ldmatrix x4: rows +0/+8, columns +0/+8).
  uint32_t q_frag[D / 16][4];
  {
    const int row = warp * 16 + (lane & 7) + 8 * ((lane >> 3) & 1);
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks)
      ldmatrix_x4(q_frag[ks], s_q + swizzle<D>(row, ks * 16 + 8 * (lane >> 4)));
  }

  if (has_g) {  // q̃ = q·G_hi + q·G_lo in fp32, rounded once to the MMA dtype (see top).
    float acc[D / 8][4];
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[nt][i] = 0.f;
    const int g_row = (lane & 7) + 8 * ((lane >> 3) & 1), g_col = 8 * (lane >> 4);
#pragma unroll
    for (int chunk = 0; chunk < D / Tiling::kGRows; ++chunk) {
      if (chunk > 0) {  // every warp is done with the previous chunk; stage the next one
        __syncthreads();
        stage_g_split<T, D>(s_g_hi, s_g_lo, G + chunk * Tiling::kGRows * p.G.row_stride,
                              p.G.row_stride, tid);
        __syncthreads();
      }
#pragma unroll
      for (int ks = 0; ks < Tiling::kGRows / 16; ++ks) {
#pragma unroll
        for (int np = 0; np < D / 16; ++np) {
          const int offset = swizzle<D>(ks * 16 + g_row, np * 16 + g_col);
          const uint32_t(&a)[4] = q_frag[chunk * Tiling::kGRows / 16 + ks];
          uint32_t hi[4], lo[4];
          ldmatrix_x4_trans(hi, s_g_hi + offset);
          ldmatrix_x4_trans(lo, s_g_lo + offset);
          mma_m16n8k16<T>(acc[2 * np], a, {hi[0], hi[1]});
          mma_m16n8k16<T>(acc[2 * np + 1], a, {hi[2], hi[3]});
          mma_m16n8k16<T>(acc[2 * np], a, {lo[0], lo[1]});
          mma_m16n8k16<T>(acc[2 * np + 1], a, {lo[2], lo[3]});
        }
      }
    }
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks)
      accumulators_to_a_fragment<T>(q_frag[ks], acc[2 * ks], acc[2 * ks + 1]);
    __syncthreads();  // every warp is done with G_hi/G_lo before K/V overwrite them
  }

  // ---- K/V pipeline ---------------------------------------------------------------------------
  auto issue_k = [&](int tile, int stage) {
    const int key0 = tile * kBlockN;
    load_tile_async<D, kBlockN>(s_k + stage * Tiling::kKVElems, k + key0 * p.k.row_stride,
                                p.k.row_stride, p.Sk - key0, tid);
  };
  // Whether key tile*kBlockN + tid is inside Sk and allowed by key_mask (threads < kBlockN).
  // Loaded when the tile is issued, stored to s_visible only later, so that the global load's
  // latency hides behind the current tile's MMAs.
  auto key_visible = [&](int tile) {
    const int key = tile * kBlockN + tid;
    return tid < kBlockN && key < p.Sk &&
           (key_mask == nullptr || key_mask[key * p.key_mask_row_stride]);
  };
  auto issue_v = [&](int tile, int stage) {
    const int key0 = tile * kBlockN;
    load_tile_async<D, kBlockN>(s_v + stage * Tiling::kKVElems, v + key0 * p.v.row_stride,
                                p.v.row_stride, p.Sk - key0, tid);
  };

  float o_acc[D / 8][4];
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) o_acc[nt][i] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // log2 units (score · scale · log2 e)
  float row_sum[2] = {0.f, 0.f};  // this thread's share; summed over the quad at the end
  const float scale_log2 = p.scale * kLog2e;
  const int row0 = m0 + warp * 16 + group;  // rows row0 and row0 + 8 of this thread
  const int causal_shift = p.Sk - p.Sq;

  if (n_tiles > 0) {
    issue_k(0, 0);
    cp_async_commit();
    issue_v(0, 0);
    cp_async_commit();
    if (tid < kBlockN) s_visible[tid] = key_visible(0);
  }
  for (int n = 0; n < n_tiles; ++n) {
    const int stage = n & 1;
    // Groups in flight: K(n), V(n). Wait for K(n); the barrier also retires tile n-1's readers.
    cp_async_wait<1>();
    __syncthreads();
    if (n + 1 < n_tiles) issue_k(n + 1, stage ^ 1);
    cp_async_commit();  // possibly empty: keeps the group counting uniform
    if (n + 1 < n_tiles) issue_v(n + 1, stage ^ 1);
    cp_async_commit();
    const bool next_visible = n + 1 < n_tiles && key_visible(n + 1);

    // S = q̃·kᵀ (16 x kBlockN per warp)
    float s[kBlockN / 8][4];
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) s[nt][i] = 0.f;
    {
      const uint16_t* s_k_stage = s_k + stage * Tiling::kKVElems;
      const int k_row = (lane & 7) + 8 * (lane >> 4), k_col = 8 * ((lane >> 3) & 1);
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
#pragma unroll
        for (int np = 0; np < kBlockN / 16; ++np) {
          uint32_t kb[4];
          ldmatrix_x4(kb, s_k_stage + swizzle<D>(np * 16 + k_row, ks * 16 + k_col));
          mma_m16n8k16<T>(s[2 * np], q_frag[ks], {kb[0], kb[1]});
          mma_m16n8k16<T>(s[2 * np + 1], q_frag[ks], {kb[2], kb[3]});
        }
      }
    }

    // Scale to log2 units and mask: partial tiles, the causal diagonal, key_mask.
    const int key0 = n * kBlockN;
    const bool needs_mask = key0 + kBlockN > p.Sk || key_mask != nullptr ||
                            (p.causal && key0 + kBlockN - 1 > m0 + causal_shift);
    const unsigned char* visible = s_visible + stage * kBlockN;
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float x = s[nt][i] * scale_log2;
        if (needs_mask) {
          const int col = nt * 8 + 2 * tig + (i & 1);
          const int row = row0 + 8 * (i >> 1);
          const bool ok = visible[col] && (!p.causal || key0 + col <= row + causal_shift);
          if (!ok) x = -INFINITY;
        }
        s[nt][i] = x;
      }
    }

    // Online softmax (rows row0, row0 + 8; each row is spread over the 4 lanes of a quad).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = row_max[r];
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt)
        mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // While a row has seen no visible key its max is -inf: use 0 so exp2 gives 0, not NaN.
      const float m_use = mx == -INFINITY ? 0.f : mx;
      const float correction = exp2f(row_max[r] - m_use);
      row_max[r] = mx;
      row_sum[r] *= correction;
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt) {
        o_acc[nt][2 * r] *= correction;
        o_acc[nt][2 * r + 1] *= correction;
      }
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt) {
        const float p0 = exp2f(s[nt][2 * r] - m_use), p1 = exp2f(s[nt][2 * r + 1] - m_use);
        row_sum[r] += p0 + p1;
        s[nt][2 * r] = p0;
        s[nt][2 * r + 1] = p1;
      }
    }

    // O += P·V with P rounded to the MMA dtype (row sums use the fp32 values).
    uint32_t p_frag[kBlockN / 16][4];
#pragma unroll
    for (int ks = 0; ks < kBlockN / 16; ++ks)
      accumulators_to_a_fragment<T>(p_frag[ks], s[2 * ks], s[2 * ks + 1]);

    // Stage n+1's visibility bytes: their previous readers (tile n-1) passed the barrier above.
    if (tid < kBlockN) s_visible[(stage ^ 1) * kBlockN + tid] = next_visible;
    // Hidden keys (docs/design.md §3.5): a key hidden from some rows of the block has weight 0
    // there, but 0·NaN = NaN, so a NaN or Inf in its V row would reach those rows through the MMA.
    // Such entries are set to 0 in shared memory — bitwise what any finite value gives the rows
    // that do not see the key — and added back below to the rows that do.
    const bool some_key_hidden =
        key_mask != nullptr || (p.causal && key0 + kBlockN - 1 > m0 + causal_shift);
    auto hidden_from_a_row = [&](int col) {  // row m0 sees the fewest keys
      return !visible[col] || (p.causal && key0 + col > m0 + causal_shift);
    };
    // Its last readers (tile n-1) passed this tile's first barrier; its writers come after the next.
    if (some_key_hidden && tid == 0) s_hidden_v_not_finite = 0;
    cp_async_wait<2>();  // in flight: V(n), K(n+1), V(n+1) → V(n) has landed
    __syncthreads();
    bool add_hidden_back = false;
    if (some_key_hidden) {
      if (zero_nonfinite_rows<T, D, kBlockN>(s_v + stage * Tiling::kKVElems, hidden_from_a_row,
                                             tid)) {
        atomicAdd(&s_hidden_v_not_finite, 1);  // rare; several threads may find one
      }
      __syncthreads();
      add_hidden_back = s_hidden_v_not_finite != 0;
    }
    {
      const uint16_t* s_v_stage = s_v + stage * Tiling::kKVElems;
      const int v_row = (lane & 7) + 8 * ((lane >> 3) & 1), v_col = 8 * (lane >> 4);
#pragma unroll
      for (int ks = 0; ks < kBlockN / 16; ++ks) {
#pragma unroll
        for (int np = 0; np < D / 16; ++np) {
          uint32_t vb[4];
          ldmatrix_x4_trans(vb, s_v_stage + swizzle<D>(ks * 16 + v_row, np * 16 + v_col));
          mma_m16n8k16<T>(o_acc[2 * np], p_frag[ks], {vb[0], vb[1]});
          mma_m16n8k16<T>(o_acc[2 * np + 1], p_frag[ks], {vb[2], vb[3]});
        }
      }
    }
    if (add_hidden_back) {  // rare: o += p·v for the zeroed entries, in the rows that see them
      // This warp's P (as the MMA used it) into its own rows of the Q tile, unused until the end.
      uint16_t* s_p = s_q + warp * 16 * D;
#pragma unroll
      for (int ks = 0; ks < kBlockN / 16; ++ks) {
        const int col = ks * 16 + 2 * tig;
        *reinterpret_cast<uint32_t*>(s_p + group * kBlockN + col) = p_frag[ks][0];
        *reinterpret_cast<uint32_t*>(s_p + (group + 8) * kBlockN + col) = p_frag[ks][1];
        *reinterpret_cast<uint32_t*>(s_p + group * kBlockN + col + 8) = p_frag[ks][2];
        *reinterpret_cast<uint32_t*>(s_p + (group + 8) * kBlockN + col + 8) = p_frag[ks][3];
      }
      __syncwarp();
      const int keys = p.Sk - key0 < kBlockN ? p.Sk - key0 : kBlockN;
      for (int c = 0; c < keys; ++c) {
        if (!hidden_from_a_row(c)) continue;
        const uint16_t* v_row = v + (key0 + c) * p.v.row_stride;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          if (!visible[c] || (p.causal && key0 + c > row0 + 8 * r + causal_shift)) continue;
          const float w = bits_to_float<T>(s_p + (group + 8 * r) * kBlockN + c);
#pragma unroll
          for (int nt = 0; nt < D / 8; ++nt) {
#pragma unroll
            for (int i = 0; i < 2; ++i) {
              const uint16_t* x = v_row + nt * 8 + 2 * tig + i;
              if (not_finite_bits<T>(*x)) o_acc[nt][2 * r + i] += w * bits_to_float<T>(x);
            }
          }
        }
      }
      __syncwarp();
    }
  }

  // ---- Epilogue: normalise, write out (through shared memory, 16-byte stores) and lse ---------
  float inv_sum[2], lse[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float total = row_sum[r];
    total += __shfl_xor_sync(0xffffffffu, total, 1);
    total += __shfl_xor_sync(0xffffffffu, total, 2);
    // No visible key: out = 0 and lse = -inf, as in reference.py; a NaN total (a NaN or +inf
    // score) stays NaN in both.
    inv_sum[r] = total == 0.f ? 0.f : 1.f / total;
    lse[r] = total == 0.f ? -INFINITY : (row_max[r] + log2f(total)) * float(kLn2);
  }
  // Each warp reuses its own 16 rows of the Q tile (it read them itself, into q_frag).
  __syncwarp();
  uint16_t* s_o = s_q;
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp * 16 + group + 8 * r, col = nt * 8 + 2 * tig;
      *reinterpret_cast<uint32_t*>(s_o + swizzle<D>(row, col)) =
          pack2<T>(o_acc[nt][2 * r] * inv_sum[r], o_acc[nt][2 * r + 1] * inv_sum[r]);
    }
  }
  __syncwarp();
  uint16_t* out = head_rows<uint16_t>(p.out, b, h);
#pragma unroll
  for (int i = 0; i < 16 * Tiling::kChunks / 32; ++i) {
    const int c = lane + 32 * i;
    const int row = c / Tiling::kChunks, col = (c % Tiling::kChunks) * 8;
    const int qi = m0 + warp * 16 + row;
    if (qi < p.Sq) {
      *reinterpret_cast<Vec16*>(out + qi * p.out.row_stride + col) =
          *reinterpret_cast<const Vec16*>(s_o + swizzle<D>(warp * 16 + row, col));
    }
  }
  if (tig == 0) {
    float* lse_row = p.lse + (static_cast<int64_t>(b) * p.H + h) * p.Sq;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int qi = row0 + 8 * r;
      if (qi < p.Sq) lse_row[qi] = lse[r];
    }
  }
}

// ============================================================================================
// fp32 SIMT kernel: one warp per query row, lane l owns columns l, l+32, ...; keys in chunks of
// 32 (one per lane) with an online softmax per chunk. Exact fp32 math, nothing clever.
// ============================================================================================
struct Fp32Tiling {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static dim3 grid(const GAttentionParams& p) {
    return dim3((p.Sq + kWarps - 1) / kWarps, p.H, p.B);
  }
};

template <int D>
__global__ void __launch_bounds__(Fp32Tiling::kThreads)
    g_attention_fp32_kernel(const GAttentionParams p) {
  constexpr int kCols = D / 32;
  __shared__ float s_qg[Fp32Tiling::kWarps][D];
  __shared__ float s_p[Fp32Tiling::kWarps][32];
  __shared__ bool s_seen[Fp32Tiling::kWarps][32];  // key j0 + lane is visible (with key_mask)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int i = blockIdx.x * Fp32Tiling::kWarps + warp, h = blockIdx.y, b = blockIdx.z;
  if (i >= p.Sq) return;  // whole warp; only warp-level synchronisation below

  const float* q = head_rows<const float>(p.q, b, h) + i * p.q.row_stride;
  // k and v spelled out: through head_rows, nvcc 13 keeps this kernel at 48 registers, not 40.
  // grouped-query attention (docs/design.md §3.2); unsigned: the signed division cost registers
  const int kv_h = int(unsigned(h) / unsigned(p.kv_group));
  const float* k =
      static_cast<const float*>(p.k.ptr) + b * p.k.batch_stride + kv_h * p.k.head_stride;
  const float* v =
      static_cast<const float*>(p.v.ptr) + b * p.v.batch_stride + kv_h * p.v.head_stride;
  const bool* key_mask = p.key_mask ? p.key_mask + b * p.key_mask_batch_stride : nullptr;

  // q̃ = q·G in fp32 (G row r at G + r*G_row_stride)
  const float* G = head_matrix(p.G, b, h);
#pragma unroll
  for (int j = 0; j < kCols; ++j) {
    const int c = lane + 32 * j;
    float acc = q[c];
    if (G != nullptr) {
      acc = 0.f;
      for (int r = 0; r < D; ++r) acc = fmaf(q[r], G[r * p.G.row_stride + c], acc);
    }
    s_qg[warp][c] = acc;
  }
  __syncwarp();

  const int key_end = visible_key_end(p, i);
  float m = -INFINITY, l = 0.f, o[kCols];
#pragma unroll
  for (int j = 0; j < kCols; ++j) o[j] = 0.f;
  for (int j0 = 0; j0 < key_end; j0 += 32) {
    const int key = j0 + lane;
    float s = -INFINITY;
    const bool seen =
        key < key_end && (key_mask == nullptr || key_mask[key * p.key_mask_row_stride]);
    if (seen) {
      const float* k_row = k + key * p.k.row_stride;
      float dot = 0.f;
      for (int c = 0; c < D; ++c) dot = fmaf(s_qg[warp][c], k_row[c], dot);
      s = dot * p.scale;
    }
    const float m_new = fmaxf(m, warp_max(s));
    const float m_use = m_new == -INFINITY ? 0.f : m_new;  // no visible key yet: keep exp at 0
    const float correction = expf(m - m_use);
    const float pk = expf(s - m_use);
    l = l * correction + warp_sum(pk);
    m = m_new;
    s_p[warp][lane] = pk;
    s_seen[warp][lane] = seen;
    __syncwarp();
    const int chunk = key_end - j0 < 32 ? key_end - j0 : 32;
#pragma unroll
    for (int j = 0; j < kCols; ++j) o[j] *= correction;
    for (int kk = 0; kk < chunk; ++kk) {
      // A masked key never contributes: its weight is 0, but 0·NaN = NaN (docs/design.md §3.5).
      if (key_mask != nullptr && !s_seen[warp][kk]) continue;
      const float w = s_p[warp][kk];
      const float* v_row = v + (j0 + kk) * p.v.row_stride;
#pragma unroll
      for (int j = 0; j < kCols; ++j) o[j] = fmaf(w, v_row[lane + 32 * j], o[j]);
    }
    __syncwarp();
  }

  float* out = head_rows<float>(p.out, b, h) + i * p.out.row_stride;
  const float inv = l == 0.f ? 0.f : 1.f / l;  // no visible key: out = 0, lse = -inf; NaN stays
#pragma unroll
  for (int j = 0; j < kCols; ++j) out[lane + 32 * j] = o[j] * inv;
  if (lane == 0)
    p.lse[(static_cast<int64_t>(b) * p.H + h) * p.Sq + i] = l == 0.f ? -INFINITY : m + logf(l);
}

// ============================================================================================
// Launch: the tensor-core kernel for bf16 / fp16, the SIMT kernel for fp32.
// ============================================================================================
template <class T, int D>
void launch_g_attention(const GAttentionParams& p, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    auto kernel = &g_attention_fp32_kernel<D>;
    PLDR_LAUNCH_KERNEL(kernel, Fp32Tiling::grid(p), dim3(Fp32Tiling::kThreads), 0, stream, p);
  } else {
    using Tiling = MmaTiling<D>;
    auto kernel = &g_attention_mma_kernel<T, D>;
    allow_dynamic_smem(kernel, Tiling::kSmemBytes);
    PLDR_LAUNCH_KERNEL(kernel, Tiling::grid(p), dim3(Tiling::kThreads), Tiling::kSmemBytes, stream,
                       p);
  }
}

}  // namespace pldr::cuda
