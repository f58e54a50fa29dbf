// Emulation driver of metric_tensors (the "emu" backend of tests/backends.py, used by
// tests/test_metric_tensors.py): runs the real kernels and launch of
// csrc/cuda/metric_tensors_kernel.cuh on the CPU. q dtype code: 0 fp32, 1 bf16, 2 fp16 (16-bit
// values travel as uint16); weights fp32, contiguous.
#include "cuda/metric_tensors_kernel.cuh"
#include "driver_io.h"

#include <string>
#include <vector>

template <class T, int D>
int run(const std::string& dir, const emu_io::Params& P) {
  const int B = int(P["B"]), S = int(P["S"]), H = int(P["H"]), R = int(P["R"]), Gd = int(P["Gd"]),
            F = int(P["F"]);
  const bool has_mask = P["has_mask"] != 0;
  // pad_heads > 0: q carries Hp = H + pad_heads heads and the kernel reads the first H through
  // strides (a head-slice view, as of a fused qkv projection).
  const int Hp = H + int(P.get("pad_heads", 0));
  auto q = emu_io::read<T>(dir, "q", size_t(B) * S * Hp * D);
  std::vector<uint8_t> mask_bytes;
  if (has_mask) mask_bytes = emu_io::read<uint8_t>(dir, "q_mask", size_t(B) * S);
  auto rd = [&](const char* name, size_t n) { return emu_io::read<float>(dir, name, n); };
  const size_t hdd = size_t(H) * D * D, rg = size_t(R) * Gd;
  auto ln0_w = rd("ln0_w", D), ln0_b = rd("ln0_b", D);
  auto w1 = rd("w1", rg * F * D), b1 = rd("b1", rg * F), w2 = rd("w2", rg * F * D),
       b2 = rd("b2", rg * F), w3 = rd("w3", rg * D * F), b3 = rd("b3", rg * D);
  auto lnA_w = rd("lnA_w", size_t(R) * D), lnA_b = rd("lnA_b", size_t(R) * D);
  auto W = rd("W", hdd), bW = rd("b", hdd), pw = rd("pw", hdd), a = rd("a", hdd), ba = rd("ba", hdd);
  const size_t n_out = size_t(B) * hdd;
  std::vector<float> A(n_out), A_LM(n_out), G(n_out), A_P(n_out);
  using namespace pldr::cuda;
  const int n_chunks = metric_qtq_chunks(S);
  std::vector<float> partial(size_t(B) * H * n_chunks * D * D);
  static_assert(sizeof(bool) == 1, "q_mask travels as bytes");
  MetricParams p{};
  p.q = StridedBSHD{q.data(), int64_t(S) * Hp * D, int64_t(Hp) * D, D};
  p.q_mask = has_mask ? reinterpret_cast<const bool*>(mask_bytes.data()) : nullptr;
  p.q_mask_batch_stride = S, p.q_mask_row_stride = 1;
  p.ln0_w = ln0_w.data(); p.ln0_b = ln0_b.data();
  p.w1 = w1.data(); p.b1 = b1.data(); p.w2 = w2.data(); p.b2 = b2.data();
  p.w3 = w3.data(); p.b3 = b3.data(); p.lnA_w = lnA_w.data(); p.lnA_b = lnA_b.data();
  p.W = W.data(); p.b = bW.data(); p.pw = pw.data(); p.a = a.data(); p.ba = ba.data();
  p.A = A.data(); p.A_LM = A_LM.data(); p.G = G.data();
  p.qtq_partial = partial.data(); p.A_P = A_P.data();
  p.B = B; p.S = S; p.H = H; p.R = R; p.Gd = Gd; p.F = F;
  p.n_chunks = n_chunks;
  const auto eps = emu_io::read<float>(dir, "eps", 2);  // eps_ln, eps_adj as the API passes them
  p.eps_ln = eps[0];
  p.eps_adj = eps[1];
  launch_metric_tensors<T, D>(p, nullptr);
  emu_io::write(dir, "A", A);
  emu_io::write(dir, "A_LM", A_LM);
  emu_io::write(dir, "G", G);
  return 0;
}

template <class T>
int run_dtype(const std::string& dir, const emu_io::Params& P) {
  switch (P["d"]) {
    case 64: return run<T, 64>(dir, P);
    case 128: return run<T, 128>(dir, P);
  }
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
