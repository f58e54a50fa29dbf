// The weight-streaming kernel of pldr::linear_small / pldr::swiglu_small (docs/design.md §3.9),
// written once with GCC/Clang vector extensions and compiled once per ISA: each of
// isa/linear_small_{avx512,avx2}.cpp and linear_small_generic.cpp sets its `#pragma GCC target`
// (generic: none), then defines, before including this file
// (inside an anonymous namespace, after every other include):
//   kVec         floats per vector (16 AVX-512, 8 AVX2 and generic)
//   Vf           the vector of kVec floats (GCC/Clang vector extension)
//   fmadd(a, b, c) = a·b + c (an FMA instruction where the ISA has one)
//   load_bf16(p), load_int8(p): kVec weights as fp32 (intrinsics: GCC 12 scalarises a
//                __builtin_convertvector that widens)
//   lane_sum(v)  the sum of v's lanes in a fixed order (a shuffle tree where the ISA has one:
//                every weight row ends in one)
//   kInt8Groups  whether int8 rows are read in groups of 4·kVec weights by
//   load_int8_group(p, out): out[j][i] = p[4i + j] (j < 4) as fp32 — one load and in-lane
//                shifts, no cross-lane widening; x is then permuted to match (row_by_row)
// and includes <cstdlib>, <new> and <type_traits> before its namespace.
//
// and calls, for the call's weight dtype and rows of x, one of two ways to stream the weights:
//   side_by_side::features<W, NB, MB>: NB weight rows read together (NB·MB accumulators),
//       each block prefetching the next block's rows — fp32 weights;
//   row_by_row::features<W, C, MB>: one weight row at a time, front to back, C accumulator
//       chains per row of x — bf16 and int8 weights.
// Both take MB rows of x per register block and keep ≥ 4–8 independent FMA chains at one row.
// Why two: a bf16 or int8 row is a short stream (K = 896: 28 or 14 cache lines), and 8 of them
// side by side ran far below the bandwidth a thread gets from one contiguous stream, software
// prefetch or not; one row at a time, a thread's share of the weight is read in address order,
// which the hardware prefetchers follow. fp32 rows are 4× longer, and there the prefetched
// blocks measured faster. (AMD EPYC Zen 4, 2 threads, 110M decode step, one process, the two
// ways interleaved: bf16 1.25–1.42× and int8 1.12–1.17× faster one row at a time, fp32 4–8%
// slower.)
//
// Each vector of weights is converted to fp32 once (bf16: a 16-bit shift; int8: a
// sign-extending convert) and multiplied into every row of x in registers; x (≤ 8 rows, fp32)
// stays in L1. A row's sums get the per-row scale and bias (and, for SwiGLU, silu(gate)·up of its
// gate and up rows) and are stored once, in fp32 or bf16. The order of every sum depends on the
// shapes only, never on the thread count (threads split whole rows).

typedef float VfUnaligned __attribute__((vector_size(kVec * 4), aligned(4)));

constexpr int64_t kMaxRowsOfX = 8;  // rows of x per pass over the weights

inline Vf load_w(const float* p) { return *reinterpret_cast<const VfUnaligned*>(p); }
inline Vf load_w(const uint16_t* p) { return load_bf16(p); }  // exact: the bits shifted up
inline Vf load_w(const int8_t* p) { return load_int8(p); }
inline float scalar_w(float w) { return w; }
inline float scalar_w(uint16_t w) {
  const uint32_t bits = uint32_t(w) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}
inline float scalar_w(int8_t w) { return float(w); }

inline uint16_t round_to_bf16(float f) {  // round to nearest even, NaN kept quiet (as c10)
  uint32_t bits;
  __builtin_memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t(bits >> 16);
}

inline void store(const Args& a, int64_t m, int64_t f, float v) {
  if (a.y_bf16) {
    static_cast<uint16_t*>(a.y)[m * a.ldy + f] = round_to_bf16(v);
  } else {
    static_cast<float*>(a.y)[m * a.ldy + f] = v;
  }
}

inline float affine(const Args& a, int64_t row, float dot) {
  if (a.scale != nullptr) dot *= a.scale[row];
  return a.bias != nullptr ? dot + a.bias[row] : dot;
}


namespace side_by_side {

// Software prefetch of the next block's weights: a block streams NB rows of K weights, and at one
// row of x a bf16 row is 28 cache lines, an int8 row 14 (K = 896) — streams too short for the
// hardware prefetchers to ramp up before they end (measured on Zen 5 before this: fp32 decode at
// 82% of the copy bandwidth, bf16 57%, int8 41%). So while a block reads w[n] + k, it prefetches
// w[n] + k + ahead — the same position of the next block's rows (ahead = the distance between
// the two blocks' rows) — one prefetch per cache line. Past the end of a thread's features (or
// of the weight) this only asks for lines nobody reads: a prefetch never faults.
constexpr int64_t kLineBytes = 64;

// out[n * ldo + m] = Σ_k w[n][k] · x[m·ldx + k] for NB weight rows and MB rows of x; prefetches
// w[n] + ahead + k (see above).
template <class W, int NB, int MB>
inline void dot_block(const float* x, int64_t ldx, const W* const* w, int64_t K, float* out,
                      int64_t ldo, int64_t ahead) {
  constexpr int64_t kLineWeights = kLineBytes / int64_t(sizeof(W));
  const uintptr_t ahead_bytes = static_cast<uintptr_t>(ahead) * sizeof(W);
  Vf acc[NB][MB];
#pragma GCC unroll 8
  for (int n = 0; n < NB; ++n)
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) acc[n][m] = Vf{};
  int64_t k = 0;
  for (; k + kVec <= K; k += kVec) {
    Vf xv[MB];
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) xv[m] = *reinterpret_cast<const VfUnaligned*>(x + m * ldx + k);
    if (k % kLineWeights == 0) {
#pragma GCC unroll 8
      for (int n = 0; n < NB; ++n) {
        // In integer arithmetic: past the weight's end the address is no pointer into it.
        const uintptr_t next = reinterpret_cast<uintptr_t>(w[n] + k) + ahead_bytes;
        __builtin_prefetch(reinterpret_cast<const void*>(next), 0, 3);
      }
    }
#pragma GCC unroll 8
    for (int n = 0; n < NB; ++n) {
      const Vf wv = load_w(w[n] + k);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) acc[n][m] = fmadd(wv, xv[m], acc[n][m]);
    }
  }
  for (int n = 0; n < NB; ++n)
    for (int m = 0; m < MB; ++m) {
      float s = lane_sum(acc[n][m]);
      for (int64_t t = k; t < K; ++t) s += scalar_w(w[n][t]) * x[m * ldx + t];
      out[n * ldo + m] = s;
    }
}

// The last M mod kRowsOfX rows (R = kRowsOfX-1 … 1).
template <class W, int NB, int R>
inline void dot_rest(int64_t rest, const float* x, int64_t ldx, const W* const* w, int64_t K,
                     float* out, int64_t ldo, int64_t ahead) {
  if (rest == R) {
    dot_block<W, NB, R>(x, ldx, w, K, out, ldo, ahead);
  } else if constexpr (R > 1) {
    dot_rest<W, NB, R - 1>(rest, x, ldx, w, K, out, ldo, ahead);
  }
}

// out[n * M + m] for NB weight rows and all M (≤ kMaxRowsOfX) rows of x. The rows of w are read
// once per MB rows of x: only the first pass prefetches the next block (the later ones find this
// block's rows in cache and would fetch the next block again).
template <class W, int NB, int MB>
inline void dot_rows(const float* x, int64_t M, int64_t ldx, const W* const* w, int64_t K,
                     float* out, int64_t ahead) {
  int64_t m = 0;
  for (; m + MB <= M; m += MB)
    dot_block<W, NB, MB>(x + m * ldx, ldx, w, K, out + m, M, m == 0 ? ahead : 0);
  if constexpr (MB > 1) {
    if (m < M)
      dot_rest<W, NB, MB - 1>(M - m, x + m * ldx, ldx, w, K, out + m, M, m == 0 ? ahead : 0);
  }
}

// Features [f, f + NB) of a linear: one weight row each.
template <class W, int NB, int MB>
inline void linear_block(const Args& a, const W* weight, int64_t f, int64_t m0, int64_t M) {
  const W* rows[NB];
  float out[NB * kMaxRowsOfX];
  for (int n = 0; n < NB; ++n) rows[n] = weight + (f + n) * a.K;
  dot_rows<W, NB, MB>(a.x + m0 * a.ldx, M, a.ldx, rows, a.K, out, NB * a.K);
  for (int n = 0; n < NB; ++n)
    for (int64_t m = 0; m < M; ++m) store(a, m0 + m, f + n, affine(a, f + n, out[n * M + m]));
}

// Features [f, f + NB/2) of a SwiGLU: their gate rows and their up rows, in one pass.
template <class W, int NB, int MB>
inline void swiglu_block(const Args& a, const W* weight, int64_t f, int64_t m0, int64_t M) {
  static_assert(NB % 2 == 0, "a SwiGLU block holds gate and up rows in pairs");
  constexpr int half = NB / 2;
  const int64_t H = a.features;
  const W* rows[NB];
  float out[NB * kMaxRowsOfX];
  for (int j = 0; j < half; ++j) {
    rows[j] = weight + (f + j) * a.K;
    rows[half + j] = weight + (H + f + j) * a.K;
  }
  dot_rows<W, NB, MB>(a.x + m0 * a.ldx, M, a.ldx, rows, a.K, out, half * a.K);
  for (int j = 0; j < half; ++j)
    for (int64_t m = 0; m < M; ++m) {
      const float gate = affine(a, f + j, out[j * M + m]);
      const float up = affine(a, H + f + j, out[(half + j) * M + m]);
      store(a, m0 + m, f + j, gate / (1.f + std::exp(-gate)) * up);  // silu(gate)·up
    }
}

template <class W, int NB, int MB>
void features(const Args& a, int64_t f_begin, int64_t f_end) {
  const W* weight = static_cast<const W*>(a.weight);
  constexpr int64_t per_block = NB / 2;  // SwiGLU features per block; linear: NB
  for (int64_t m0 = 0; m0 < a.M; m0 += kMaxRowsOfX) {
    const int64_t M = a.M - m0 < kMaxRowsOfX ? a.M - m0 : kMaxRowsOfX;
    int64_t f = f_begin;
    if (a.swiglu) {
      for (; f + per_block <= f_end; f += per_block) swiglu_block<W, NB, MB>(a, weight, f, m0, M);
      for (; f < f_end; ++f) swiglu_block<W, 2, MB>(a, weight, f, m0, M);
    } else {
      for (; f + NB <= f_end; f += NB) linear_block<W, NB, MB>(a, weight, f, m0, M);
      for (; f < f_end; ++f) linear_block<W, 1, MB>(a, weight, f, m0, M);
    }
  }
}

}  // namespace side_by_side

namespace row_by_row {

// acc[0] + … + acc[n-1] pairwise (n a power of two): log2(n) dependent adds at the end of a row.
template <int n>
inline Vf chain_sum(const Vf* acc) {
  if constexpr (n == 1) {
    return acc[0];
  } else {
    return chain_sum<n / 2>(acc) + chain_sum<n / 2>(acc + n / 2);
  }
}

inline Vf load_x(const float* p) { return *reinterpret_cast<const VfUnaligned*>(p); }

// One prefetch per cache line of w[k, k + n): `ahead` bytes further on (0: none). Past the end of
// the weight this asks for lines nobody reads; in integer arithmetic, as the address is no pointer
// into the weight there, and a prefetch never faults. always_inline: as a function of its own,
// GCC 12 finds it free of side effects (a prefetch does not count) and deletes every call.
template <class W>
__attribute__((always_inline)) inline void prefetch_ahead(const W* w, int64_t n,
                                                          uintptr_t ahead) {
  if (ahead == 0) return;
  const uintptr_t first = reinterpret_cast<uintptr_t>(w) + ahead;
  for (uintptr_t b = 0; b < static_cast<uintptr_t>(n) * sizeof(W); b += 64)
    __builtin_prefetch(reinterpret_cast<const void*>(first + b), 0, 3);
}

// out[m] = Σ_k w[k] · x[m·ldx + k] for one weight row and MB rows of x, prefetching `ahead` bytes
// ahead of each weight read (see row_prefetch_bytes() in linear_small_cpu.cpp).
template <class W, int C, int MB>
inline void dot_block(const float* x, int64_t ldx, const W* w, int64_t K, float* out,
                      uintptr_t ahead) {
  Vf acc[C][MB];
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c)
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) acc[c][m] = Vf{};
  int64_t k = 0;
  if constexpr (kInt8Groups && std::is_same_v<W, int8_t>) {
    // x is the permuted copy of features(): its group vector j holds the elements 4i + j.
    static_assert(C <= 4 && 4 % C == 0, "a group's 4 vectors are dealt to the C chains");
    for (; k + 4 * kVec <= K; k += 4 * kVec) {
      prefetch_ahead(w + k, 4 * kVec, ahead);
      Vf wv[4];
      load_int8_group(w + k, wv);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j)
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m)
          acc[j % C][m] = fmadd(wv[j], load_x(x + m * ldx + k + j * kVec), acc[j % C][m]);
    }
  }
  for (; k + C * kVec <= K; k += C * kVec) {
    prefetch_ahead(w + k, C * kVec, ahead);
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      const Vf wv = load_w(w + k + c * kVec);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) acc[c][m] = fmadd(wv, load_x(x + m * ldx + k + c * kVec), acc[c][m]);
    }
  }
  for (int c = 0; k + kVec <= K; k += kVec, ++c) {  // fewer than C vectors left
    const Vf wv = load_w(w + k);
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) acc[c][m] = fmadd(wv, load_x(x + m * ldx + k), acc[c][m]);
  }
  for (int m = 0; m < MB; ++m) {
    Vf chains[C];
    for (int c = 0; c < C; ++c) chains[c] = acc[c][m];
    float s = lane_sum(chain_sum<C>(chains));
    for (int64_t t = k; t < K; ++t) s += scalar_w(w[t]) * x[m * ldx + t];
    out[m] = s;
  }
}

// The last M mod MB rows (R = MB-1 … 1), C chains each.
template <class W, int C, int R>
inline void dot_rest(int64_t rest, const float* x, int64_t ldx, const W* w, int64_t K,
                     float* out, uintptr_t ahead) {
  if (rest == R) {
    dot_block<W, C, R>(x, ldx, w, K, out, ahead);
  } else if constexpr (R > 1) {
    dot_rest<W, C, R - 1>(rest, x, ldx, w, K, out, ahead);
  }
}

// out[m] for one weight row and all M (≤ kMaxRowsOfX) rows of x; a pass after the first finds
// the row in L1 (and does not prefetch).
template <class W, int C, int MB>
inline void dot_rows(const Args& a, const float* x, int64_t M, const W* w, float* out) {
  const uintptr_t ahead = static_cast<uintptr_t>(a.row_prefetch_bytes);
  int64_t m = 0;
  for (; m + MB <= M; m += MB)
    dot_block<W, C, MB>(x + m * a.ldx, a.ldx, w, a.K, out + m, m == 0 ? ahead : 0);
  if constexpr (MB > 1) {
    if (m < M) {
      dot_rest<W, C, MB - 1>(M - m, x + m * a.ldx, a.ldx, w, a.K, out + m, m == 0 ? ahead : 0);
    }
  }
}

// Feature f of a linear: one weight row.
template <class W, int C, int MB>
inline void linear_feature(const Args& a, const W* weight, int64_t f, int64_t m0, int64_t M) {
  float out[kMaxRowsOfX];
  dot_rows<W, C, MB>(a, a.x + m0 * a.ldx, M, weight + f * a.K, out);
  for (int64_t m = 0; m < M; ++m) store(a, m0 + m, f, affine(a, f, out[m]));
}

// Feature f of a SwiGLU: its gate row, then its up row.
template <class W, int C, int MB>
inline void swiglu_feature(const Args& a, const W* weight, int64_t f, int64_t m0, int64_t M) {
  const int64_t H = a.features;
  float gate_out[kMaxRowsOfX], up_out[kMaxRowsOfX];
  dot_rows<W, C, MB>(a, a.x + m0 * a.ldx, M, weight + f * a.K, gate_out);
  dot_rows<W, C, MB>(a, a.x + m0 * a.ldx, M, weight + (H + f) * a.K, up_out);
  for (int64_t m = 0; m < M; ++m) {
    const float gate = affine(a, f, gate_out[m]);
    const float up = affine(a, H + f, up_out[m]);
    store(a, m0 + m, f, gate / (1.f + std::exp(-gate)) * up);  // silu(gate)·up
  }
}

// A thread's copy of x. malloc, not a std container: no template is instantiated under this
// file's `#pragma GCC target` (linear_small.h says why that matters).
struct XBuffer {
  float* data = nullptr;
  int64_t size = 0;
  float* reserve(int64_t n) {
    if (n > size) {
      std::free(data);
      data = static_cast<float*>(std::malloc(static_cast<size_t>(n) * sizeof(float)));
      size = data != nullptr ? n : 0;
      if (data == nullptr) throw std::bad_alloc();
    }
    return data;
  }
  ~XBuffer() { std::free(data); }
};

// x in the order of load_int8_group within each whole group of 4·kVec elements (the rest as it
// is), contiguous rows: [M, K] in `buffer`.
inline const float* x_in_int8_group_order(const Args& a, XBuffer& buffer) {
  constexpr int64_t group = 4 * kVec;
  float* out = buffer.reserve(a.M * a.K);
  for (int64_t m = 0; m < a.M; ++m) {
    const float* src = a.x + m * a.ldx;
    float* dst = out + m * a.K;
    int64_t k = 0;
    for (; k + group <= a.K; k += group)
      for (int j = 0; j < 4; ++j)
        for (int i = 0; i < kVec; ++i) dst[k + j * kVec + i] = src[k + 4 * i + j];
    for (; k < a.K; ++k) dst[k] = src[k];
  }
  return out;
}

template <class W, int C, int MB>
void features(const Args& given, int64_t f_begin, int64_t f_end) {
  Args a = given;
  if constexpr (kInt8Groups && std::is_same_v<W, int8_t>) {
    thread_local XBuffer permuted;  // ≤ 8 rows of x: a few KiB per thread
    a.x = x_in_int8_group_order(given, permuted);
    a.ldx = a.K;
  }
  const W* weight = static_cast<const W*>(a.weight);
  for (int64_t m0 = 0; m0 < a.M; m0 += kMaxRowsOfX) {
    const int64_t M = a.M - m0 < kMaxRowsOfX ? a.M - m0 : kMaxRowsOfX;
    for (int64_t f = f_begin; f < f_end; ++f) {
      if (a.swiglu) {
        swiglu_feature<W, C, MB>(a, weight, f, m0, M);
      } else {
        linear_feature<W, C, MB>(a, weight, f, m0, M);
      }
    }
  }
}

}  // namespace row_by_row
