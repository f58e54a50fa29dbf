// Run-time choice of the instruction set of the CPU kernels (docs/design.md §3.6): one build holds
// each hot kernel file compiled three times, for AVX-512 (x86-64-v4), AVX2 + FMA (x86-64-v3) and
// the baseline (portable generic vectors), and the op registered with the dispatcher calls the
// best one this CPU runs, or the one PLDR_KERNELS_ISA names (avx512 | avx2 | portable) to force a
// lower path. Read once per process, at the first call of a kernel.
//
// How a kernel file takes part: it ends with PLDR_CPU_KERNEL(op, fn) instead of TORCH_LIBRARY_IMPL,
// and csrc/cpu/isa/<file>_<isa>.cpp compiles it again for <isa> (cpu/isa_variant.h). The headers
// with vector code put their contents in `inline namespace PLDR_ISA_NAMESPACE`, so that the copies
// compiled for different ISAs are different symbols and the linker cannot mix them up.
// linear_small's kernels, whose files include no torch header, are plain functions compiled per
// ISA (csrc/cpu/isa/linear_small_<isa>.cpp) that linear_small_cpu.cpp picks with for_isa().
#pragma once

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <utility>

namespace pldr::cpu {

enum class Isa { portable = 0, avx2 = 1, avx512 = 2 };

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "portable";
  }
}

// The best ISA that both this CPU and this build support. PLDR_WITH_ISA_VARIANTS is defined by
// setup.py when it compiled the AVX2 / AVX-512 copies (x86-64 without PLDR_KERNELS_PORTABLE=1).
inline Isa best_supported_isa() {
#if defined(PLDR_WITH_ISA_VARIANTS)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return Isa::avx512;  // AVX-512 F/BW/CD/DQ/VL
  if (__builtin_cpu_supports("x86-64-v3")) return Isa::avx2;    // AVX2, FMA, F16C, BMI2
#endif
  return Isa::portable;
}

// PLDR_KERNELS_ISA parsed and checked against best_supported_isa(); unset or empty = the best.
inline Isa isa_from_environment() {
  const Isa best = best_supported_isa();
  const char* env = std::getenv("PLDR_KERNELS_ISA");
  if (env == nullptr || *env == '\0') return best;
  const std::string wanted(env);
  for (const Isa isa : {Isa::avx512, Isa::avx2, Isa::portable}) {
    if (wanted != isa_name(isa)) continue;
    TORCH_CHECK(isa <= best, "PLDR_KERNELS_ISA=", wanted, ": this CPU and build support at most ",
                isa_name(best), " (expected one of ", isa_name(best), " and the ISAs below it)");
    return isa;
  }
  TORCH_CHECK(false, "PLDR_KERNELS_ISA=", wanted,
              ": expected avx512, avx2 or portable (or unset: the best this CPU runs)");
}

// The ISA the CPU kernels run with: decided once per process (an invalid PLDR_KERNELS_ISA raises
// at every call, naming the variable, until it is fixed).
inline Isa selected_isa() {
  static const Isa isa = isa_from_environment();
  return isa;
}

template <typename Fn>
Fn for_isa(Fn portable, [[maybe_unused]] Fn avx2, [[maybe_unused]] Fn avx512) {
  switch (selected_isa()) {
    case Isa::avx512: return avx512;
    case Isa::avx2: return avx2;
    default: return portable;
  }
}

// The registered entry point of a kernel: forwards to the copy for the selected ISA.
template <typename Chooser, typename Fn>
struct IsaDispatched;
template <typename Chooser, typename R, typename... Args>
struct IsaDispatched<Chooser, R (*)(Args...)> {
  static R call(Args... args) {
    static R (*const chosen)(Args...) = Chooser::choose();
    return chosen(std::forward<Args>(args)...);
  }
};

}  // namespace pldr::cpu

#if defined(PLDR_ISA_VARIANT_AVX512)
#define PLDR_ISA_NAMESPACE isa_avx512
#elif defined(PLDR_ISA_VARIANT_AVX2)
#define PLDR_ISA_NAMESPACE isa_avx2
#else
#define PLDR_ISA_NAMESPACE isa_portable
#endif

// PLDR_CPU_KERNEL(op, fn): registers the CPU kernel `fn` (a function in pldr::cpu) of pldr::<op>.
// In an ISA copy (csrc/cpu/isa/*.cpp) it exports the copy's fn as pldr::cpu::kernels_<isa>::<op>
// instead; the baseline compile registers the dispatching entry point.
#if defined(PLDR_ISA_VARIANT_AVX512) || defined(PLDR_ISA_VARIANT_AVX2)
#define PLDR_CPU_KERNEL(op, fn)                                              \
  namespace pldr::cpu::PLDR_ISA_KERNELS_NAMESPACE {                          \
  extern const decltype(&fn) op;                                             \
  const decltype(&fn) op = &fn;                                              \
  }
#if defined(PLDR_ISA_VARIANT_AVX512)
#define PLDR_ISA_KERNELS_NAMESPACE kernels_avx512
#else
#define PLDR_ISA_KERNELS_NAMESPACE kernels_avx2
#endif
#elif defined(PLDR_WITH_ISA_VARIANTS)
#define PLDR_CPU_KERNEL(op, fn)                                                              \
  namespace pldr::cpu::kernels_avx512 {                                                      \
  extern const decltype(&fn) op;                                                             \
  }                                                                                          \
  namespace pldr::cpu::kernels_avx2 {                                                        \
  extern const decltype(&fn) op;                                                             \
  }                                                                                          \
  namespace pldr::cpu::isa_dispatch {                                                        \
  struct choose_##op {                                                                       \
    static decltype(&fn) choose() {                                                          \
      return ::pldr::cpu::for_isa(&fn, ::pldr::cpu::kernels_avx2::op,                        \
                                  ::pldr::cpu::kernels_avx512::op);                          \
    }                                                                                        \
  };                                                                                         \
  }                                                                                          \
  TORCH_LIBRARY_IMPL(pldr, CPU, m) {                                                         \
    m.impl(#op, &::pldr::cpu::IsaDispatched<::pldr::cpu::isa_dispatch::choose_##op,         \
                                            decltype(&fn)>::call);                           \
  }
#else  // a portable-only build (PLDR_KERNELS_PORTABLE=1, or not x86-64)
#define PLDR_CPU_KERNEL(op, fn)                               \
  TORCH_LIBRARY_IMPL(pldr, CPU, m) { m.impl(#op, &fn); }
#endif
