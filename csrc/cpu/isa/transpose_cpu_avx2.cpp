// cpu/transpose_cpu.cpp compiled for avx2 (run-time ISA choice: cpu/isa.h, docs/design.md §3.6).
#define PLDR_ISA_VARIANT_AVX2 1
#include "cpu/isa_variant.h"
#include "cpu/transpose_cpu.cpp"
