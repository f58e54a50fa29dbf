// Emulation driver for tests/test_emu_g_attention.py: runs the real pldr::g_attention kernels of
// csrc/cuda/g_attention_kernel.cuh on the CPU.
//
// Inputs: q, k, v (raw buffers: fp32, or bf16/fp16 bits), G (fp32, optional), key_mask (uint8,
// optional); each a whole underlying buffer plus an element offset and strides, so strided views
// are exercised. Params: dtype (0 fp32, 1 bf16, 2 fp16), d, B, H, Sq, Sk, causal, scale_bits
// (fp32 bits), has_G, has_mask, <name>_len/_offset/_sb/_ss/_sh (and G_sr, mask_sk).
// Outputs: out [B, Sq, H, d] (contiguous, q's dtype) and lse [B, H, Sq] fp32.
#include <cmath>
#include <cstring>
#include <string>

#include "cuda/g_attention_kernel.cuh"
#include "driver_io.h"

using namespace pldr::cuda;

template <class Elem>
int run(const std::string& dir, const emu_io::Params& prm) {
  const int dtype = prm["dtype"], d = prm["d"], B = prm["B"], H = prm["H"], Sq = prm["Sq"],
            Sk = prm["Sk"];
  auto q = emu_io::read<Elem>(dir, "q", prm["q_len"]);
  auto k = emu_io::read<Elem>(dir, "k", prm["k_len"]);
  auto v = emu_io::read<Elem>(dir, "v", prm["v_len"]);
  std::vector<float> G;
  std::vector<uint8_t> mask;
  if (prm["has_G"]) G = emu_io::read<float>(dir, "G", prm["G_len"]);
  if (prm["has_mask"]) mask = emu_io::read<uint8_t>(dir, "key_mask", prm["mask_len"]);

  std::vector<Elem> out(static_cast<size_t>(B) * Sq * H * d);
  std::memset(out.data(), 0xFF, out.size() * sizeof(Elem));  // NaN: unwritten entries show
  std::vector<float> lse(static_cast<size_t>(B) * H * Sq, NAN);

  GAttentionParams p{};
  p.q = q.data() + prm["q_offset"];
  p.k = k.data() + prm["k_offset"];
  p.v = v.data() + prm["v_offset"];
  p.out = out.data();
  p.lse = lse.data();
  p.G = prm["has_G"] ? G.data() + prm["G_offset"] : nullptr;
  p.key_mask = prm["has_mask"] ? reinterpret_cast<const bool*>(mask.data()) + prm["mask_offset"]
                               : nullptr;
  p.q_batch_stride = prm["q_sb"], p.q_row_stride = prm["q_ss"], p.q_head_stride = prm["q_sh"];
  p.k_batch_stride = prm["k_sb"], p.k_row_stride = prm["k_ss"], p.k_head_stride = prm["k_sh"];
  p.v_batch_stride = prm["v_sb"], p.v_row_stride = prm["v_ss"], p.v_head_stride = prm["v_sh"];
  p.out_batch_stride = int64_t{Sq} * H * d, p.out_row_stride = int64_t{H} * d, p.out_head_stride = d;
  if (prm["has_G"]) {
    p.G_batch_stride = prm["G_sb"], p.G_head_stride = prm["G_sh"], p.G_row_stride = prm["G_sr"];
  }
  if (prm["has_mask"]) p.key_mask_batch_stride = prm["mask_sb"], p.key_mask_key_stride = prm["mask_sk"];
  p.B = B, p.H = H, p.Sq = Sq, p.Sk = Sk;
  const uint32_t scale_bits = static_cast<uint32_t>(prm["scale_bits"]);
  std::memcpy(&p.scale, &scale_bits, 4);
  p.causal = prm["causal"] != 0;

  if (dtype == 0) {
    auto kernel = d == 64 ? g_attention_fp32_kernel<64> : g_attention_fp32_kernel<128>;
    CUSIM_LAUNCH(kernel, Fp32Tiling::grid(p), dim3(Fp32Tiling::kThreads), p);
  } else {
    auto launch = [&](auto kernel, auto tiling) {
      using T = decltype(tiling);
      pldr_emu::set_dynamic_smem_bytes(T::kSmemBytes);
      CUSIM_LAUNCH(kernel, T::grid(p), dim3(T::kThreads), p);
    };
    if (d == 64 && dtype == 1) launch(g_attention_mma_kernel<64, Bf16>, MmaTiling<64>{});
    if (d == 64 && dtype == 2) launch(g_attention_mma_kernel<64, Fp16>, MmaTiling<64>{});
    if (d == 128 && dtype == 1) launch(g_attention_mma_kernel<128, Bf16>, MmaTiling<128>{});
    if (d == 128 && dtype == 2) launch(g_attention_mma_kernel<128, Fp16>, MmaTiling<128>{});
  }
  emu_io::write(dir, "out", out);
  emu_io::write(dir, "lse", lse);
  return 0;
}

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  const std::string dir = argv[1];
  const auto prm = emu_io::load_params(dir);
  return prm["dtype"] == 0 ? run<float>(dir, prm) : run<uint16_t>(dir, prm);
}
