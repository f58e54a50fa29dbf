// The CPU kernels' kept scratch memory (cpu/workspace.h).
#include "cpu/workspace.h"

#include <mutex>

namespace pldr::cpu {
namespace {

struct KeptWorkspace {
  std::mutex mutex;
  at::Tensor memory;  // bytes, undefined until the first lease
  bool leased = false;
};

// Never destroyed: a static tensor would be freed after torch's own teardown at exit.
KeptWorkspace& kept() {
  static auto* workspace = new KeptWorkspace();
  return *workspace;
}

at::Tensor allocate(int64_t bytes) {
  return at::empty({std::max<int64_t>(bytes, 1)}, at::TensorOptions().dtype(at::kByte));
}

}  // namespace

WorkspaceLease::WorkspaceLease(int64_t bytes) {
  KeptWorkspace& w = kept();
  if (bytes <= kKeptWorkspaceBytes) {
    std::lock_guard<std::mutex> lock(w.mutex);
    if (!w.leased) {
      if (!w.memory.defined() || w.memory.numel() < bytes) {
        w.memory = at::Tensor();  // free the smaller block before allocating the larger
        w.memory = allocate(bytes);
      }
      w.leased = kept_ = true;
      data_ = static_cast<char*>(w.memory.data_ptr());
      return;
    }
  }
  own_ = allocate(bytes);
  data_ = static_cast<char*>(own_.data_ptr());
}

WorkspaceLease::~WorkspaceLease() {
  if (!kept_) return;
  KeptWorkspace& w = kept();
  std::lock_guard<std::mutex> lock(w.mutex);
  w.leased = false;
}

int64_t release_cpu_workspace() {
  KeptWorkspace& w = kept();
  std::lock_guard<std::mutex> lock(w.mutex);
  if (w.leased || !w.memory.defined()) return 0;
  const int64_t bytes = w.memory.numel();
  w.memory = at::Tensor();
  return bytes;
}

}  // namespace pldr::cpu

// Read through ctypes (pldr_kernels.ops.release_cpu_workspace), like pldr_kernels_cpu_isa: no op
// in the pldr library's schema for a memory-management call.
extern "C" __attribute__((visibility("default"))) int64_t pldr_kernels_release_cpu_workspace() {
  return pldr::cpu::release_cpu_workspace();
}
