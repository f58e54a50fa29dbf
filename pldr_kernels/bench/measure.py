"""Measuring: a clock per device, interleaved repeats, quantiles, peak extra memory, the machine.

Contestants are timed in one process and interleaved: each repeat runs every contestant once, in a
rotated order, so a machine that slows down mid-run slows all of them alike and their ratios
survive. A sample is the time of ``inner`` back-to-back calls divided by ``inner``; ``inner`` grows
until a sample lasts ``min_sample_ms``, so microsecond calls are not dominated by the clock.
"""
from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


# ---- statistics and timing -------------------------------------------------------------------
def summarize(samples: Sequence[float]) -> dict[str, float]:
    """p10 p20 p50 p80 p90 (linear interpolation, as numpy's default)."""
    if not samples:
        raise ValueError("summarize: no samples")
    xs = list(samples)
    deciles = statistics.quantiles(xs, n=10, method="inclusive") if len(xs) > 1 else xs * 9
    return {f"p{q}": deciles[q // 10 - 1] for q in (10, 20, 50, 80, 90)}


def rotated(items: list, shift: int) -> list:
    """``items`` starting at ``shift`` (mod its length): each repeat puts another one first."""
    shift %= len(items)
    return items[shift:] + items[:shift]


class Clock:
    """Time on one device: ``perf_counter_ns`` on the CPU; on CUDA events recorded on the current
    stream (GPU time, not launch time)."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def mark(self):
        if not self.is_cuda:
            return time.perf_counter_ns()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed_ms(self, start, end) -> float:
        if not self.is_cuda:
            return (end - start) / 1e6
        end.synchronize()
        return start.elapsed_time(end)

    def time_ms(self, fn: Callable[[], object], inner: int = 1) -> float:
        """Milliseconds per call of ``inner`` calls back to back."""
        start = self.mark()
        for _ in range(inner):
            fn()
        return self.elapsed_ms(start, self.mark()) / inner


@dataclass
class Measurement:
    samples_ms: list[float]
    inner: int

    @property
    def stats(self) -> dict[str, float]:
        return summarize(self.samples_ms)


def calibrate_inner(clock: Clock, fn: Callable[[], object], min_sample_ms: float) -> int:
    """The smallest power of two ``inner`` (at most 1024) whose sample lasts ``min_sample_ms``."""
    inner = 1
    while inner < 1024 and clock.time_ms(fn, inner) * inner < min_sample_ms:
        inner *= 2
    return inner


def measure_interleaved(contestants: dict[str, Callable[[], object]], clock: Clock,
                        warmup: int = 2, repeats: int = 10, min_sample_ms: float = 1.0,
                        inner: int | None = None) -> dict[str, Measurement]:
    """Time every contestant ``repeats`` times, round robin in a rotating order, after ``warmup``
    calls each. ``inner`` fixes the calls per sample instead of calibrating it."""
    names = list(contestants)
    for _ in range(warmup):
        for name in names:
            contestants[name]()
    clock.synchronize()
    inner_of = {n: inner or calibrate_inner(clock, contestants[n], min_sample_ms) for n in names}
    samples: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(repeats):
        for name in rotated(names, rep):
            samples[name].append(clock.time_ms(contestants[name], inner_of[name]))
    return {n: Measurement(samples[n], inner_of[n]) for n in names}


def progress_bar(total: int, desc: str, enabled: bool = True):
    from tqdm.auto import tqdm  # the CLI checks it is installed before a run
    return tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True,
                disable=not enabled)


# ---- peak extra memory -----------------------------------------------------------------------
# The most bytes one call holds at once beyond what existed before, outputs included (every
# contestant of an op allocates those alike). CUDA: the caching allocator's peak statistic. CPU:
# torch keeps no allocator statistics and tracemalloc does not see its allocations, so the call is
# recorded under torch.profiler(profile_memory=True) and its allocation events (sizes, frees
# negative, also from at::parallel_for workers) are summed in time order; the peak is the answer.
# The memory the CPU kernels keep between calls (pldr_kernels.ops.release_cpu_workspace) is freed
# first, so a call's peak includes its workspace as if it were the first call.
@contextlib.contextmanager
def _quiet_stderr_fd():
    """Silence fd 2 while the profiler starts and stops (kineto prints markers from C++)."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def run_with_peak(fn: Callable[[], object], device="cpu") -> tuple[object, int, str]:
    """``(fn(), peak extra bytes, method)`` of one call."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return (result, torch.cuda.max_memory_allocated(device) - before,
                "torch.cuda.max_memory_allocated")
    from torch.profiler import ProfilerActivity, profile

    from .. import ops
    if ops._LOAD_ERROR is None:  # the call allocates its kept workspace again, inside the window
        ops.release_cpu_workspace()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _quiet_stderr_fd(), profile(activities=[ProfilerActivity.CPU],
                                         profile_memory=True) as prof:
            result = fn()  # kept alive past the window: the output stays counted
    finally:
        torch.set_num_threads(threads)
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        f = node.extra_fields
        if type(f).__name__.endswith("Allocation") and str(f.device).startswith("cpu"):
            events.append((node.start_time_ns, f.alloc_size))
    sizes = (size for _, size in sorted(events, key=lambda e: e[0]))
    return (result, max(itertools.accumulate(sizes, initial=0)),
            "torch.profiler allocation events, 1 thread")


# ---- the machine -----------------------------------------------------------------------------
def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def git_commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "-C", root, "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip()
    return "unknown"


def competing_runnable(samples: int = 10, interval_s: float = 0.02) -> float | None:
    """Runnable threads besides this reader, averaged over a short window (Linux /proc/stat).

    Unlike the load average, which trails by a minute, this sees what competes for the cores now."""
    counts = []
    for _ in range(samples):
        try:
            with open("/proc/stat") as f:
                line = next(line for line in f if line.startswith("procs_running"))
        except (OSError, StopIteration):
            return None
        counts.append(int(line.split()[1]) - 1)
        time.sleep(interval_s)
    return sum(counts) / len(counts)


def busy_machine_warning(threads: int, competing: float | None = None) -> str | None:
    """A warning when other processes compete for the cores: times are then inflated, more so for
    multi-threaded ops, whose OpenMP barriers wait for descheduled threads."""
    cores = os.cpu_count() or 1
    competing = competing_runnable() if competing is None else competing
    if competing is None or competing <= 0.5 * cores:
        return None
    what = f"{competing:.1f} other runnable threads on {cores} cores"
    advice = ("multi-threaded contestants suffer most (OpenMP barriers wait for descheduled "
              "threads); compare ratios only, repeat the run, or use --threads 1" if threads > 1
              else "compare ratios only and repeat the run")
    return f"the machine is busy ({what}): absolute times are inflated and noisy; {advice}"


def collect_env(device: torch.device, argv: Sequence[str]) -> dict:
    import pldr_kernels
    from pldr_kernels.__main__ import report

    env = {"device": str(device), "cpu": cpu_model(), "threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
           else cpu_model(),
           "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "python": sys.version.split()[0], "platform": platform.platform(),
           "pldr_kernels": pldr_kernels.__version__, "git_commit": git_commit(),
           "build_info": pldr_kernels.ops.build_info(), "build_report": report(),
           "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
           "time_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "argv": list(argv)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["cuda_capability"] = f"{props.major}.{props.minor}"
        env["cuda_memory_gb"] = round(props.total_memory / 2**30, 1)
    return env
