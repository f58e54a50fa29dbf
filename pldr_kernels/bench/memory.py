"""Peak extra memory of one call: the most bytes the call held at once beyond what existed before.

CUDA: ``torch.cuda.reset_peak_memory_stats`` + ``max_memory_allocated`` − the allocation before the
call (the caching allocator's own accounting of tensor bytes).
CPU: torch has no allocator statistics on CPU, and tracemalloc does not see torch's allocations, so
we record the call under ``torch.profiler`` with ``profile_memory=True`` and replay its allocation
events (every ``c10`` CPU allocation and free, with its size, in time order); the peak of the
running sum is the answer. The profiler also follows ``at::parallel_for`` worker threads (it
propagates its thread-local state into them), so scratch buffers of multi-threaded kernels count.
Both methods count the output tensors too, which every contestant of an op allocates alike.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch


@contextlib.contextmanager
def _quiet_stderr_fd():
    """Silence fd 2 while the profiler starts/stops (kineto prints trace markers from C++)."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _walk(nodes):
    stack = list(nodes)
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.children)


def cpu_peak_extra_bytes(fn: Callable[[], object]) -> tuple[object, int]:
    """``(fn(), peak)``: the peak of (bytes allocated − bytes freed) during ``fn()``, from the
    profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _quiet_stderr_fd():
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                result = fn()  # kept alive past the window: the output stays counted
    finally:
        torch.set_num_threads(threads)
    events = []
    for node in _walk(prof.profiler.kineto_results.experimental_event_tree()):
        fields = node.extra_fields
        if type(fields).__name__.endswith("Allocation") and str(fields.device).startswith("cpu"):
            events.append((node.start_time_ns, fields.alloc_size))
    events.sort(key=lambda e: e[0])
    running = peak = 0
    for _, size in events:
        running += size
        peak = max(peak, running)
    return result, peak


def cuda_peak_extra_bytes(fn: Callable[[], object], device) -> tuple[object, int]:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    return result, peak


def run_with_peak(fn: Callable[[], object], device="cpu") -> tuple[object, int, str]:
    """``(fn(), bytes, method)``: the result of one call and its peak extra memory."""
    device = torch.device(device)
    if device.type == "cuda":
        result, peak = cuda_peak_extra_bytes(fn, device)
        return result, peak, "torch.cuda.max_memory_allocated"
    result, peak = cpu_peak_extra_bytes(fn)
    return result, peak, "torch.profiler allocation events, 1 thread"


def peak_extra_bytes(fn: Callable[[], object], device="cpu") -> tuple[int, str]:
    """``(bytes, method)``: the peak extra memory of one ``fn()`` call on ``device``."""
    _, peak, method = run_with_peak(fn, device)
    return peak, method
