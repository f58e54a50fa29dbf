// The prelude of an ISA copy of a kernel file (csrc/cpu/isa/<file>_<isa>.cpp; see cpu/isa.h).
// Every header outside csrc/cpu is included here first, compiled for the baseline, and only then
// does `#pragma GCC target` switch the rest of the file (the kernel code, all of it in anonymous
// or ISA-named namespaces) to the ISA. A torch or standard-library inline function compiled after
// the pragma would be a weak symbol the linker may pick for every file, and run AVX-512
// instructions on a CPU without them.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <immintrin.h>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/numerics.h"
#include "cpu/isa.h"
#include "cpu/workspace.h"

#if defined(PLDR_ISA_VARIANT_AVX512)
#pragma GCC target("arch=x86-64-v4")
#define PLDR_TARGET_AVX512 1  // the pragma does not define __AVX512F__
#elif defined(PLDR_ISA_VARIANT_AVX2)
#pragma GCC target("arch=x86-64-v3")
#define PLDR_TARGET_AVX2 1  // nor __AVX2__ / __FMA__
#else
#error "cpu/isa_variant.h: define PLDR_ISA_VARIANT_AVX512 or PLDR_ISA_VARIANT_AVX2 first"
#endif
