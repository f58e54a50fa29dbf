// Emulation driver of g_attention_decode (tests/test_emu_decode.py): runs the real kernels and the
// real launch logic of csrc/cuda/g_attention_decode_kernel.cuh on the CPU. Inputs are contiguous
// raw arrays; activation dtype code: 0 fp32, 1 bf16, 2 fp16 (16-bit values travel as uint16).
#include "cuda/g_attention_decode_kernel.cuh"
#include "driver_io.h"

#include <string>
#include <vector>

template <class T, int D>
int run(const std::string& dir, const emu_io::Params& P) {
  const int B = int(P["B"]), Sn = int(P["Sn"]), Smax = int(P["Smax"]), H = int(P["H"]);
  const bool has_new = P["has_new"] != 0, has_start = P["has_start"] != 0;
  const int G_batch = int(P["G_batch"]);  // 0: no G, 1: shared, B: per batch row
  // pad_heads > 0: q, k_new, v_new and the caches carry Hp = H + pad_heads heads, of which the
  // kernel sees the first H (strided views, like a slice of a fused qkv or of a wider cache).
  const int Hp = H + int(P.get("pad_heads", 0));
  const size_t n_q = size_t(B) * Sn * Hp * D, n_cache = size_t(B) * Smax * Hp * D;
  const size_t n_out = size_t(B) * Sn * H * D;
  auto q = emu_io::read<T>(dir, "q", n_q);
  auto k_cache = emu_io::read<T>(dir, "k_cache", n_cache);
  auto v_cache = emu_io::read<T>(dir, "v_cache", n_cache);
  auto lens = emu_io::read<int32_t>(dir, "cache_seqlens", B);
  auto scale = emu_io::read<float>(dir, "scale", 1);
  std::vector<T> k_new, v_new, out(n_out);
  std::vector<int32_t> starts;
  std::vector<float> G;
  if (has_new) {
    k_new = emu_io::read<T>(dir, "k_new", n_q);
    v_new = emu_io::read<T>(dir, "v_new", n_q);
  }
  if (has_start) starts = emu_io::read<int32_t>(dir, "cache_start", B);
  if (G_batch > 0) G = emu_io::read<float>(dir, "G", size_t(G_batch) * H * D * D);

  pldr_cuda::DecodeParams p{};
  p.q = q.data();
  p.k_cache = k_cache.data();
  p.v_cache = v_cache.data();
  p.cache_seqlens = lens.data();
  p.k_new = has_new ? k_new.data() : nullptr;
  p.v_new = has_new ? v_new.data() : nullptr;
  p.cache_start = has_start ? starts.data() : nullptr;
  p.G = G_batch > 0 ? G.data() : nullptr;
  p.out = out.data();
  p.B = B; p.Sn = Sn; p.Smax = Smax; p.H = H; p.d = D;
  p.q_sb = int64_t(Sn) * Hp * D; p.q_ss = int64_t(Hp) * D; p.q_sh = D;
  p.kc_sb = p.vc_sb = int64_t(Smax) * Hp * D; p.kc_ss = p.vc_ss = int64_t(Hp) * D; p.kc_sh = p.vc_sh = D;
  p.kn_sb = p.vn_sb = p.q_sb; p.kn_ss = p.vn_ss = p.q_ss; p.kn_sh = p.vn_sh = D;
  p.out_sb = int64_t(Sn) * H * D; p.out_ss = int64_t(H) * D; p.out_sh = D;
  p.G_sb = G_batch > 1 ? int64_t(H) * D * D : 0; p.G_sh = int64_t(D) * D; p.G_sr = D;
  p.scale = scale[0];
  p.num_splits = pldr_cuda::choose_decode_splits(B, H, Sn, Smax, int(P["num_sms"]), P["num_splits"]);
  p.q_chunks = pldr_cuda::decode_query_chunks(Sn);
  p.vec_ok = P.get("force_scalar", 0) == 0;  // std::vector data is 16-byte aligned here
  std::vector<float> o_part, lse_part;
  if (p.num_splits > 1) {
    o_part.assign(size_t(B) * Sn * H * p.num_splits * D, 0.f);
    lse_part.assign(size_t(B) * Sn * H * p.num_splits, 0.f);
    p.o_partial = o_part.data();
    p.lse_partial = lse_part.data();
  }
  pldr_cuda::launch_g_attention_decode<T, D>(p, nullptr);
  emu_io::write(dir, "out", out);
  emu_io::write(dir, "k_cache", k_cache);
  emu_io::write(dir, "v_cache", v_cache);
  emu_io::write(dir, "num_splits_used", std::vector<int32_t>{p.num_splits});
  return 0;
}

template <class T>
int run_dtype(const std::string& dir, const emu_io::Params& P) {
  switch (P["d"]) {
    case 64: return run<T, 64>(dir, P);
    case 128: return run<T, 128>(dir, P);
  }
  std::fprintf(stderr, "unsupported d\n");
  return 2;
}

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  const std::string dir = argv[1];
  const auto P = emu_io::load_params(dir);
  switch (P["dtype"]) {
    case 0: return run_dtype<float>(dir, P);
    case 1: return run_dtype<__nv_bfloat16>(dir, P);
    case 2: return run_dtype<__half>(dir, P);
  }
  return 2;
}
