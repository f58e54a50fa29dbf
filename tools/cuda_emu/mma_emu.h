// CPU emulation of the warp-level tensor-core instructions our CUDA kernels use
// (docs/design.md §5.2): mma.sync.aligned.m16n8k16.row.col (bf16/f16 inputs, f32 accumulators),
// ldmatrix .x4 (.trans) and cp.async (16 bytes, zero-fill, commit/wait groups). Include after
// cuda_cpu_shim.h (the harness force-includes the shim, which also has the 16-bit conversions and
// dynamic shared memory); device code reaches these only through csrc/cuda/ptx.cuh.
//
// Fragment layouts follow the PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating point
// type", "ldmatrix"; docs/design.md §5.2.1); tests/test_emu_mma.py (through
// tests/emu/mma_layout_driver.cpp) checks them against a plain matmul and against the documented
// register contents, and the "emu" backend of the op tests runs the real kernels on them.
// Warp-collective instructions exchange registers through a per-warp slot table and the shim's
// per-warp barrier: each lane publishes, one __syncwarp, each lane reads.
// The tables are double-buffered (alternating per instruction), so one barrier per instruction is
// enough: a lane can only overwrite a table after every lane has passed the next barrier, i.e.
// finished reading it.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <vector>

namespace cuda_emu {

template <bool kBf16>
inline float to_float16_bits_value(uint16_t h) {
  return kBf16 ? bf16_bits_to_float(h) : half_bits_to_float(h);
}
template <bool kBf16>
inline uint16_t to_16bit(float f) {
  return kBf16 ? float_to_bf16_bits(f) : float_to_half_bits(f);
}

// ---------------------------------------------------------------------------------------------
// Warp register exchange
// ---------------------------------------------------------------------------------------------
constexpr unsigned kMaxWarps = 32;  // 1024 threads per block
struct LaneSlot {
  uint32_t reg[6];
  const void* addr;
};
inline LaneSlot warp_slots[kMaxWarps][2][32];
inline thread_local unsigned slot_phase = 0;

// Publish this lane's slot, wait for the warp, then let `consume` read every lane's slot.
template <class Publish, class Consume>
inline void exchange_lane_slots(Publish publish, Consume consume) {
  const unsigned warp = linear_tid() / 32;
  if (warp >= kMaxWarps) {
    std::fprintf(stderr, "mma_emu: more than %u warps per block\n", kMaxWarps);
    std::abort();
  }
  LaneSlot* slots = warp_slots[warp][slot_phase];
  publish(slots[lane_id()]);
  __syncwarp();
  consume(static_cast<const LaneSlot*>(slots));
  slot_phase ^= 1u;
}

// ---------------------------------------------------------------------------------------------
// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32  d = a·b + c
// groupID = lane >> 2, tig = lane % 4 (PTX ISA fragment layouts):
//   A 16x16: a[r] holds two halves (low = even column); rows groupID (+8 for r = 1, 3),
//            columns tig*2 + {0,1} (+8 for r = 2, 3).
//   B 16x8:  b[r] holds k = tig*2 + {0,1} (+8 for r = 1), n = groupID.
//   C/D:     c[i]: row groupID (+8 for i >= 2), column tig*2 + (i & 1).
// Products of 16-bit floats are exact in fp64; the emulation sums them in fp64 and rounds the
// result once to fp32, i.e. it is at least as accurate as the hardware's fp32 accumulation.
// ---------------------------------------------------------------------------------------------
template <bool kBf16>
inline void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
  float result[4];
  exchange_lane_slots(
      [&](LaneSlot& s) {
        for (int r = 0; r < 4; ++r) s.reg[r] = a[r];
        s.reg[4] = b[0];
        s.reg[5] = b[1];
      },
      [&](const LaneSlot* slots) {
        const unsigned lane = lane_id(), group = lane >> 2, tig = lane & 3;
        auto half_of = [](uint32_t reg, unsigned k) {
          return to_float16_bits_value<kBf16>(static_cast<uint16_t>(reg >> (16 * (k & 1))));
        };
        auto A = [&](unsigned row, unsigned k) {
          const LaneSlot& s = slots[(row % 8) * 4 + (k % 8) / 2];
          return half_of(s.reg[(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k);
        };
        auto B = [&](unsigned k, unsigned n) {
          const LaneSlot& s = slots[n * 4 + (k % 8) / 2];
          return half_of(s.reg[4 + (k >= 8 ? 1 : 0)], k);
        };
        for (unsigned i = 0; i < 4; ++i) {
          const unsigned row = group + (i >= 2 ? 8 : 0), col = tig * 2 + (i & 1);
          double acc = c[i];
          for (unsigned k = 0; k < 16; ++k) acc += static_cast<double>(A(row, k)) * B(k, col);
          result[i] = static_cast<float>(acc);
        }
      });
  for (int i = 0; i < 4; ++i) d[i] = result[i];  // d may alias c
}

// ---------------------------------------------------------------------------------------------
// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8j..8j+7 give the 8 row addresses
// (16 bytes each) of matrix j; r[j] of lane l holds row l>>2, columns (l%4)*2 .. +1 of matrix j,
// or with .trans the elements (row (l%4)*2 + {0,1}, column l>>2).
// ---------------------------------------------------------------------------------------------
inline void ldmatrix_x4(uint32_t r[4], const void* row_addr, bool trans) {
  exchange_lane_slots([&](LaneSlot& s) { s.addr = row_addr; },
                [&](const LaneSlot* slots) {
                  const unsigned lane = lane_id();
                  for (unsigned j = 0; j < 4; ++j) {
                    uint16_t e[2];
                    for (unsigned i = 0; i < 2; ++i) {
                      const uint16_t* row;
                      unsigned col;
                      if (!trans) {
                        row = static_cast<const uint16_t*>(slots[8 * j + (lane >> 2)].addr);
                        col = (lane % 4) * 2 + i;
                      } else {
                        row = static_cast<const uint16_t*>(slots[8 * j + (lane % 4) * 2 + i].addr);
                        col = lane >> 2;
                      }
                      e[i] = row[col];
                    }
                    r[j] = static_cast<uint32_t>(e[0]) | (static_cast<uint32_t>(e[1]) << 16);
                  }
                });
}

// ---------------------------------------------------------------------------------------------
// cp.async.cg.shared.global 16 bytes with src-size (0 = zero-fill), commit_group, wait_group N.
// Copies are deferred until a wait_group retires their group, so a kernel that reads shared
// memory before waiting sees stale data (and ThreadSanitizer sees the race), as on the GPU.
// ---------------------------------------------------------------------------------------------
struct PendingCopy {
  void* dst;
  const void* src;
  unsigned src_bytes;
};
struct CpAsyncState {
  std::vector<PendingCopy> uncommitted;
  std::deque<std::vector<PendingCopy>> groups;
  ~CpAsyncState() {
    bool pending = !uncommitted.empty();
    for (const auto& g : groups) pending = pending || !g.empty();
    if (pending) {
      std::fprintf(stderr, "mma_emu: a thread exited with cp.async copies never waited for\n");
      std::abort();
    }
  }
};
inline thread_local CpAsyncState cp_async_state;

inline void cp_async_16(void* smem_dst, const void* gmem_src, unsigned src_bytes) {
  cp_async_state.uncommitted.push_back({smem_dst, gmem_src, src_bytes});
}
inline void cp_async_commit() {
  cp_async_state.groups.push_back(std::move(cp_async_state.uncommitted));
  cp_async_state.uncommitted.clear();
}
inline void cp_async_wait(unsigned allowed_pending) {
  auto& groups = cp_async_state.groups;
  while (groups.size() > allowed_pending) {
    for (const PendingCopy& c : groups.front()) {
      if (c.src_bytes > 0) std::memcpy(c.dst, c.src, c.src_bytes);
      std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, 16 - c.src_bytes);
    }
    groups.pop_front();
  }
}

}  // namespace cuda_emu
