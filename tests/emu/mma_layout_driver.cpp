// Emulation driver for tests/test_emu_mma.py: checks the tensor-core wrappers of csrc/cuda/ptx.cuh
// (mma.sync m16n8k16, ldmatrix .x4 / .trans) and the 16-bit conversions of tools/cuda_emu.
//
// mode 0 (conversions, no launch): x [n] fp32 → bf16/f16 bits and back.
// mode 1 (one warp): A [16][16], B [16][16] (k x n), C [16][16] fp32, already representable in the
//   16-bit dtype; D = A·B + C three ways — fragments built from the documented layouts, via
//   ldmatrix (B from a [n][k] copy), via ldmatrix.trans (B from the [k][n] copy) — plus the raw
//   registers ldmatrix_x4 / ldmatrix_x4_trans return for A.
// mode 2: cp.async commit/wait groups and zero-fill (see cp_async_kernel).
#include <cstdio>
#include <string>
#include <type_traits>

#include "cuda/ptx.cuh"
#include "driver_io.h"

using namespace pldr::cuda;

template <class T>
__global__ void mma_layout_kernel(const float* A, const float* B, const float* C, float* d_explicit,
                                  float* d_ldmatrix, float* d_trans, uint32_t* raw_a,
                                  uint32_t* raw_a_trans) {
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  alignas(16) __shared__ uint16_t s_a[16 * 16];
  alignas(16) __shared__ uint16_t s_b[16 * 16];   // [k][n]
  alignas(16) __shared__ uint16_t s_bt[16 * 16];  // [n][k]
  const int lane = threadIdx.x, group = lane >> 2, tig = lane & 3;
  for (int i = lane; i < 256; i += 32) {
    s_a[i] = cuda_emu::to_16bit<kBf16>(A[i]);
    s_b[i] = cuda_emu::to_16bit<kBf16>(B[i]);
    s_bt[(i % 16) * 16 + i / 16] = cuda_emu::to_16bit<kBf16>(B[i]);
  }
  __syncthreads();
  auto pair = [](const uint16_t* m, int row, int col, int ld, int step) {
    return uint32_t{m[row * ld + col]} | (uint32_t{m[row * ld + col + step]} << 16);
  };
  auto store_d = [&](float* out, const float (&d)[4], int n0) {
    for (int i = 0; i < 4; ++i) out[(group + 8 * (i >> 1)) * 16 + n0 + 2 * tig + (i & 1)] = d[i];
  };
  auto load_c = [&](float (&c)[4], int n0) {
    for (int i = 0; i < 4; ++i) c[i] = C[(group + 8 * (i >> 1)) * 16 + n0 + 2 * tig + (i & 1)];
  };
  auto mma = [](float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
    mma_m16n8k16<T>(d, a, b, c);
  };

  // 1. Fragments from the PTX ISA layouts (docs/design.md §5.2.1), independent of ldmatrix.
  {
    uint32_t a[4];
    for (int r = 0; r < 4; ++r) a[r] = pair(s_a, group + 8 * (r & 1), tig * 2 + 8 * (r >> 1), 16, 1);
    for (int nt = 0; nt < 2; ++nt) {
      uint32_t b[2];
      for (int r = 0; r < 2; ++r) b[r] = pair(s_b, tig * 2 + 8 * r, nt * 8 + group, 16, 16);
      float c[4], d[4];
      load_c(c, nt * 8);
      mma(d, a, b, c);
      store_d(d_explicit, d, nt * 8);
    }
  }
  // 2. A via ldmatrix_x4, B via ldmatrix_x4 on the [n][k] copy (the K operand of attention).
  uint32_t a[4];
  ldmatrix_x4(a, s_a + ((lane & 7) + 8 * ((lane >> 3) & 1)) * 16 + 8 * (lane >> 4));
  {
    uint32_t b[4];
    ldmatrix_x4(b, s_bt + ((lane & 7) + 8 * (lane >> 4)) * 16 + 8 * ((lane >> 3) & 1));
    for (int nt = 0; nt < 2; ++nt) {
      float c[4], d[4];
      load_c(c, nt * 8);
      mma(d, a, {b[2 * nt], b[2 * nt + 1]}, c);
      store_d(d_ldmatrix, d, nt * 8);
    }
  }
  // 3. B via ldmatrix_x4_trans on the [k][n] copy (the V operand of attention).
  {
    uint32_t b[4];
    ldmatrix_x4_trans(b, s_b + ((lane & 7) + 8 * ((lane >> 3) & 1)) * 16 + 8 * (lane >> 4));
    for (int nt = 0; nt < 2; ++nt) {
      float c[4], d[4];
      load_c(c, nt * 8);
      mma(d, a, {b[2 * nt], b[2 * nt + 1]}, c);
      store_d(d_trans, d, nt * 8);
    }
  }
  // 4. Raw registers: lane supplies row (lane&7) + 8*((lane>>3)&1), column 8*(lane>>4) of A.
  uint32_t t[4];
  ldmatrix_x4_trans(t, s_a + ((lane & 7) + 8 * ((lane >> 3) & 1)) * 16 + 8 * (lane >> 4));
  for (int j = 0; j < 4; ++j) {
    raw_a[lane * 4 + j] = a[j];
    raw_a_trans[lane * 4 + j] = t[j];
  }
}

// mode 2: cp.async groups. One thread copies src[0:8] (valid) in group 1 and src[8:16] with
// valid = false in group 2; snapshots of dst after wait<1> and after wait<0>.
__global__ void cp_async_kernel(const uint16_t* src, uint16_t* after_wait1, uint16_t* after_wait0) {
  alignas(16) __shared__ uint16_t dst[16];
  for (int i = 0; i < 16; ++i) dst[i] = 0xBEEF;
  cp_async_16(dst, src, true);
  cp_async_commit();
  cp_async_16(dst + 8, src + 8, false);
  cp_async_commit();
  cp_async_wait<1>();
  for (int i = 0; i < 16; ++i) after_wait1[i] = dst[i];
  cp_async_wait<0>();
  for (int i = 0; i < 16; ++i) after_wait0[i] = dst[i];
}

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  const std::string dir = argv[1];
  const auto prm = emu_io::load_params(dir);
  if (prm["mode"] == 0) {
    const size_t n = prm["n"];
    auto x = emu_io::read<float>(dir, "x", n);
    std::vector<uint16_t> bf(n), hf(n);
    std::vector<float> bf_back(n), hf_back(n);
    for (size_t i = 0; i < n; ++i) {
      bf[i] = cuda_emu::float_to_bf16_bits(x[i]);
      hf[i] = cuda_emu::float_to_half_bits(x[i]);
      bf_back[i] = cuda_emu::bf16_bits_to_float(bf[i]);
      hf_back[i] = cuda_emu::half_bits_to_float(hf[i]);
    }
    emu_io::write(dir, "bf16", bf);
    emu_io::write(dir, "f16", hf);
    emu_io::write(dir, "bf16_back", bf_back);
    emu_io::write(dir, "f16_back", hf_back);
    return 0;
  }
  if (prm["mode"] == 2) {
    auto src = emu_io::read<uint16_t>(dir, "src", 16);
    std::vector<uint16_t> after_wait1(16), after_wait0(16);
    cuda_emu::launch(dim3(1), dim3(1), 0, cp_async_kernel, src.data(), after_wait1.data(),
                     after_wait0.data());
    emu_io::write(dir, "after_wait1", after_wait1);
    emu_io::write(dir, "after_wait0", after_wait0);
    return 0;
  }
  auto A = emu_io::read<float>(dir, "A", 256), B = emu_io::read<float>(dir, "B", 256),
       C = emu_io::read<float>(dir, "C", 256);
  std::vector<float> d_explicit(256, NAN), d_ldmatrix(256, NAN), d_trans(256, NAN);
  std::vector<uint32_t> raw_a(128), raw_a_trans(128);
  auto kernel = prm["bf16"] ? mma_layout_kernel<__nv_bfloat16> : mma_layout_kernel<__half>;
  cuda_emu::launch(dim3(1), dim3(32), 0, kernel, A.data(), B.data(), C.data(), d_explicit.data(),
                   d_ldmatrix.data(), d_trans.data(), raw_a.data(), raw_a_trans.data());
  emu_io::write(dir, "d_explicit", d_explicit);
  emu_io::write(dir, "d_ldmatrix", d_ldmatrix);
  emu_io::write(dir, "d_trans", d_trans);
  emu_io::write(dir, "raw_a", raw_a);
  emu_io::write(dir, "raw_a_trans", raw_a_trans);
  return 0;
}
