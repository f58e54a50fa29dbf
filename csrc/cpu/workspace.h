// Scratch memory the CPU kernels keep between calls (docs/design.md §3.4, "workspace").
//
// A large per-call allocation comes back from the OS as fresh pages: a fault and a zeroing for
// every 4 KiB on first touch. The metric learner's backward at S = 1024 took ~4500 faults (~5 ms
// of a ~25 ms call) that way. So one process-wide block of memory is kept and leased to one call
// at a time; a call that finds it leased (another Python thread inside a kernel) allocates its
// own for that call. The block grows to the largest lease asked for up to kKeptWorkspaceBytes;
// a larger lease is allocated for its call only. It is torch memory (at::empty), so
// torch.profiler's memory events see it when it is allocated; release_cpu_workspace() frees it
// (pldr_kernels.ops.release_cpu_workspace), which the benchmark's memory measurement does first
// so that a call's peak includes its workspace.
//
// Declarations only (the code is in workspace.cpp, compiled once for the baseline ISA), so this
// header may be included by every ISA copy of a kernel file.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace pldr::cpu {

constexpr int64_t kKeptWorkspaceBytes = int64_t{256} << 20;

class WorkspaceLease {
 public:
  explicit WorkspaceLease(int64_t bytes);  // 64-byte aligned, contents undefined
  ~WorkspaceLease();
  WorkspaceLease(const WorkspaceLease&) = delete;
  WorkspaceLease& operator=(const WorkspaceLease&) = delete;
  char* data() const { return data_; }

 private:
  at::Tensor own_;  // this call's memory when the kept block is leased or too small to keep
  bool kept_ = false;
  char* data_ = nullptr;
};

// Frees the kept block unless a call holds it; returns the bytes freed.
int64_t release_cpu_workspace();

}  // namespace pldr::cpu
