// Emulation driver of g_attention_decode (the "emu" backend of tests/backends.py, used by
// tests/test_g_attention_decode.py): runs the real kernels and the real launch of
// csrc/cuda/g_attention_decode_kernel.cuh on the CPU. Inputs are contiguous raw arrays (or head
// slices of them, pad_heads below); activation dtype code: 0 fp32, 1 bf16, 2 fp16 (16-bit values
// travel as uint16).
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
  // H_kv (default H): heads of the caches and of k_new / v_new (grouped-query attention), padded
  // by the same pad_heads.
  const int H_kv = int(P.get("H_kv", H));
  const int Hp = H + int(P.get("pad_heads", 0)), Hkvp = H_kv + int(P.get("pad_heads", 0));
  const size_t n_q = size_t(B) * Sn * Hp * D, n_cache = size_t(B) * Smax * Hkvp * D;
  const size_t n_kv_new = size_t(B) * Sn * Hkvp * D;
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
    k_new = emu_io::read<T>(dir, "k_new", n_kv_new);
    v_new = emu_io::read<T>(dir, "v_new", n_kv_new);
  }
  if (has_start) starts = emu_io::read<int32_t>(dir, "cache_start", B);
  if (G_batch > 0) G = emu_io::read<float>(dir, "G", size_t(G_batch) * H * D * D);

  using namespace pldr::cuda;
  DecodeParams p{};
  const int64_t q_sb = int64_t(Sn) * Hp * D, q_ss = int64_t(Hp) * D;
  const int64_t cache_sb = int64_t(Smax) * Hkvp * D, cache_ss = int64_t(Hkvp) * D;
  const int64_t new_sb = int64_t(Sn) * Hkvp * D, new_ss = int64_t(Hkvp) * D;
  p.q = StridedBSHD{q.data(), q_sb, q_ss, D};
  p.k_cache = StridedBSHD{k_cache.data(), cache_sb, cache_ss, D};
  p.v_cache = StridedBSHD{v_cache.data(), cache_sb, cache_ss, D};
  if (has_new) {  // laid out like q, with the caches' heads
    p.k_new = StridedBSHD{k_new.data(), new_sb, new_ss, D};
    p.v_new = StridedBSHD{v_new.data(), new_sb, new_ss, D};
  }
  p.out = StridedBSHD{out.data(), int64_t(Sn) * H * D, int64_t(H) * D, D};
  p.G = StridedG{G_batch > 0 ? G.data() : nullptr, G_batch > 1 ? int64_t(H) * D * D : 0,
                 int64_t(D) * D, D};
  p.cache_seqlens = lens.data();
  p.cache_seqlens_batch_stride = 1;
  p.cache_start = has_start ? starts.data() : nullptr;
  p.cache_start_batch_stride = 1;
  p.B = B; p.Sn = Sn; p.Smax = Smax; p.H = H;
  p.kv_group = H / H_kv;
  p.scale = scale[0];
  p.num_splits = choose_decode_splits(B, H, Sn, Smax, int(P["num_sms"]), P["num_splits"]);
  p.q_chunks = decode_query_chunks(Sn);
  p.vec_ok = P.get("force_scalar", 0) == 0;  // std::vector data is 16-byte aligned here
  std::vector<float> o_part, lse_part;
  if (p.num_splits > 1) {
    o_part.assign(size_t(B) * Sn * H * p.num_splits * D, 0.f);
    lse_part.assign(size_t(B) * Sn * H * p.num_splits, 0.f);
    p.o_partial = o_part.data();
    p.lse_partial = lse_part.data();
  }
  launch_g_attention_decode<T, D>(p, nullptr);
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
