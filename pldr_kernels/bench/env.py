"""The environment a benchmark ran in: device, torch, build, threads, CPU (the JSON's ``env``)."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import time
from typing import Any

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def git_commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def load_average():
    """The 1/5/15-minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def competing_runnable(samples: int = 10, interval_s: float = 0.02):
    """Runnable threads other than this reader, averaged over a short window (Linux /proc/stat).

    Unlike the load average, which trails by a minute (a test run that just ended still shows), this
    sees what competes for the cores now. None where /proc/stat is unavailable."""
    counts = []
    for _ in range(samples):
        try:
            with open("/proc/stat") as f:
                line = next(l for l in f if l.startswith("procs_running"))
        except (OSError, StopIteration):
            return None
        counts.append(int(line.split()[1]) - 1)  # minus the thread reading
        time.sleep(interval_s)
    return sum(counts) / len(counts)


def busy_machine_warning(threads: int, competing=None):
    """A warning when other processes compete for the cores (timings are then inflated, and more so
    for multi-threaded ops, whose OpenMP barriers wait for descheduled threads)."""
    cores = os.cpu_count() or 1
    competing = competing_runnable() if competing is None else competing
    if competing is not None:
        if competing <= 0.5 * cores:
            return None
        what = f"{competing:.1f} other runnable threads on {cores} cores"
    else:
        load = load_average()
        if load is None or load[0] <= cores:
            return None
        what = f"load average {load[0]:.1f} on {cores} cores"
    return (f"the machine is busy ({what}): absolute times "
            f"are inflated and noisy, multi-threaded contestants suffer most (OpenMP barriers wait "
            f"for descheduled threads); compare ratios only, repeat the run, or use --threads 1"
            if threads > 1 else
            f"the machine is busy ({what}): absolute times "
            f"are inflated and noisy; compare ratios only and repeat the run")


def collect_env(device: torch.device, argv=None) -> dict[str, Any]:
    import pldr_kernels
    from pldr_kernels import __main__ as pk_main
    from pldr_kernels import ops

    try:
        from pldr_kernels._build_info import BUILD_INFO
    except ImportError:
        BUILD_INFO = {}
    env: dict[str, Any] = {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "pldr_kernels": pldr_kernels.__version__,
        "git_commit": git_commit(),
        "extension_loaded": ops._LOAD_ERROR is None,
        "build_info": dict(BUILD_INFO),
        "build_report": pk_main.report(),
        "threads": torch.get_num_threads(),
        "load_average": load_average(),
        "cpu": cpu_model(),
        "cpu_capability": pk_main.cpu_features(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "time_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "argv": list(sys.argv if argv is None else argv),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["cuda_capability"] = f"{props.major}.{props.minor}"
        env["cuda_memory_gb"] = round(props.total_memory / 2**30, 1)
    return env
