// Emulation driver of g_attention (the "emu" backend of tests/backends.py, used by
// tests/test_g_attention.py): runs the real pldr::g_attention kernels and launch of
// csrc/cuda/g_attention_kernel.cuh on the CPU.
//
// Inputs: q, k, v (raw buffers: fp32, or bf16/fp16 bits), G (fp32, optional), key_mask (uint8,
// optional); each a whole underlying buffer plus an element offset and strides, so strided views
// are exercised. Params: dtype (0 fp32, 1 bf16, 2 fp16), d, B, H, Sq, Sk, causal, scale_bits
// (fp32 bits), has_G, has_mask, <name>_len/_offset/_sb/_ss/_sh (and G_sr, mask_sk), H_kv (k / v
// heads, dividing H; default H).
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
  p.q = StridedBSHD{q.data() + prm["q_offset"], prm["q_sb"], prm["q_ss"], prm["q_sh"]};
  p.k = StridedBSHD{k.data() + prm["k_offset"], prm["k_sb"], prm["k_ss"], prm["k_sh"]};
  p.v = StridedBSHD{v.data() + prm["v_offset"], prm["v_sb"], prm["v_ss"], prm["v_sh"]};
  p.out = StridedBSHD{out.data(), int64_t{Sq} * H * d, int64_t{H} * d, d};
  p.lse = lse.data();
  if (prm["has_G"]) {
    p.G = StridedG{G.data() + prm["G_offset"], prm["G_sb"], prm["G_sh"], prm["G_sr"]};
  }
  if (prm["has_mask"]) {
    p.key_mask = reinterpret_cast<const bool*>(mask.data()) + prm["mask_offset"];
    p.key_mask_batch_stride = prm["mask_sb"], p.key_mask_row_stride = prm["mask_sk"];
  }
  p.B = B, p.H = H, p.Sq = Sq, p.Sk = Sk;
  p.kv_group = H / int(prm.get("H_kv", H));
  const uint32_t scale_bits = static_cast<uint32_t>(prm["scale_bits"]);
  std::memcpy(&p.scale, &scale_bits, 4);
  p.causal = prm["causal"] != 0;

  if (dtype == 0) {
    d == 64 ? launch_g_attention<float, 64>(p, nullptr)
            : launch_g_attention<float, 128>(p, nullptr);
  } else if (dtype == 1) {
    d == 64 ? launch_g_attention<__nv_bfloat16, 64>(p, nullptr)
            : launch_g_attention<__nv_bfloat16, 128>(p, nullptr);
  } else {
    d == 64 ? launch_g_attention<__half, 64>(p, nullptr)
            : launch_g_attention<__half, 128>(p, nullptr);
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
