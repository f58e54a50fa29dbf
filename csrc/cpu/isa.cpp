// What `python -m pldr_kernels` prints as the CPU kernels' ISA (cpu/isa.h), read through ctypes so
// that asking needs no op in the pldr library's schema.
#include <string>

#include "cpu/isa.h"

extern "C" __attribute__((visibility("default"))) const char* pldr_kernels_cpu_isa() {
  // "<selected> (best <best>)", or the error an invalid PLDR_KERNELS_ISA raises at each call.
  static const std::string text = [] {
    const char* best = pldr::cpu::isa_name(pldr::cpu::best_supported_isa());
    try {
      return std::string(pldr::cpu::isa_name(pldr::cpu::selected_isa())) + " (best " + best + ")";
    } catch (const c10::Error& e) {
      return std::string("error: ") + e.what_without_backtrace();
    }
  }();
  return text.c_str();
}
