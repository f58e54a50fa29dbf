// In a build without CUDA kernels, CUDA tensors reach these instead of the dispatcher's generic
// "could not run ... with arguments from the 'CUDA' backend", so the user learns how to rebuild.
#ifndef PLDR_WITH_CUDA
#include <torch/library.h>

namespace {

void no_cuda_kernel(const c10::OperatorHandle& op, torch::jit::Stack* /*stack*/) {
  TORCH_CHECK(false, "pldr_kernels was built without CUDA kernels, so ", op.schema().name(),
              " cannot run on CUDA tensors. Rebuild with a CUDA build of torch and nvcc on PATH:"
              " `PLDR_KERNELS_FORCE_CUDA=1 pip install --no-build-isolation -e .` (see"
              " `python -m pldr_kernels` for how this build was made), or move the inputs to the CPU.");
}

}  // namespace

TORCH_LIBRARY_IMPL(pldr, CUDA, m) {
  m.impl("metric_tensors", torch::CppFunction::makeFromBoxedFunction<&no_cuda_kernel>());
  m.impl("g_attention", torch::CppFunction::makeFromBoxedFunction<&no_cuda_kernel>());
  m.impl("g_attention_decode", torch::CppFunction::makeFromBoxedFunction<&no_cuda_kernel>());
}
#endif  // PLDR_WITH_CUDA
