"""Timing primitives: a clock per device, interleaved round-robin measurement, percentiles, progress.

Contestants are measured in one process and interleaved (each repeat runs every contestant once, in
a rotated order), so a machine that slows down mid-run slows every contestant alike and the ratios
between them survive. Each sample is the median-friendly wall time of ``inner`` back-to-back calls
divided by ``inner`` (``inner`` grows until a sample lasts at least ``min_sample_ms``, so that
microsecond-scale decode calls are not dominated by the clock's own cost).
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

PERCENTILES = (10, 20, 50, 80, 90)


def percentile(samples: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method) of a non-empty sequence."""
    if not samples:
        raise ValueError("percentile of an empty sample list")
    xs = sorted(samples)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """``{"p10": …, "p20": …, "p50": …, "p80": …, "p90": …, "mean": …, "n": …}`` of samples."""
    out = {f"p{q}": percentile(samples, q) for q in PERCENTILES}
    out["mean"] = sum(samples) / len(samples)
    out["n"] = len(samples)
    return out


class Clock:
    """Measures the time of a callable in milliseconds on one device.

    CPU: ``time.perf_counter_ns``. CUDA: a pair of CUDA events around the calls on the current
    stream, then a synchronize (so the sample is GPU time, not launch time).
    """

    def __init__(self, device: str = "cpu"):
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def time_ms(self, fn: Callable[[], object], inner: int = 1) -> float:
        """Mean time of one call of ``fn`` over ``inner`` back-to-back calls, in ms."""
        if self.is_cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / inner
        t0 = time.perf_counter_ns()
        for _ in range(inner):
            fn()
        return (time.perf_counter_ns() - t0) / 1e6 / inner

    def now_ms(self) -> float:
        """A host timestamp after the device has finished all queued work (for coarse events)."""
        self.synchronize()
        return time.perf_counter_ns() / 1e6


@dataclass
class Measurement:
    samples_ms: list[float]
    inner: int

    @property
    def stats(self) -> dict[str, float]:
        return summarize(self.samples_ms)

    def median_band_ms(self) -> dict[str, float]:
        """``{"median_ms", "p20_ms", "p80_ms"}``: the fields of the CUDA benchmark scripts' JSON."""
        return {"median_ms": percentile(self.samples_ms, 50),
                "p20_ms": percentile(self.samples_ms, 20),
                "p80_ms": percentile(self.samples_ms, 80)}


def calibrate_inner(clock: Clock, fn: Callable[[], object], min_sample_ms: float,
                    max_inner: int = 1000) -> int:
    """Smallest power-of-two ``inner`` whose sample lasts ``min_sample_ms`` (one call = warm-up)."""
    inner = 1
    while inner < max_inner:
        if clock.time_ms(fn, inner) * inner >= min_sample_ms:
            break
        inner *= 2
    return inner


def measure_interleaved(contestants: dict[str, Callable[[], object]], clock: Clock,
                        warmup: int = 2, repeats: int = 10, min_sample_ms: float = 1.0,
                        progress: Progress | None = None,
                        inner: int | None = None) -> dict[str, Measurement]:
    """Time every contestant ``repeats`` times, round-robin, after ``warmup`` calls each.

    The order rotates each repeat so no contestant always runs right after the same neighbour
    (caches, turbo states and allocator reuse then favour nobody systematically). ``inner`` fixes
    the calls per sample for every contestant instead of calibrating it from ``min_sample_ms``.
    """
    names = list(contestants)
    for _ in range(warmup):
        for name in names:
            contestants[name]()
    clock.synchronize()
    inner_of = {name: inner or calibrate_inner(clock, contestants[name], min_sample_ms)
                for name in names}
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(clock.time_ms(contestants[name], inner_of[name]))
        if progress is not None:
            progress.update(1)
    return {name: Measurement(samples[name], inner_of[name]) for name in names}


def median_bands_ms(contestants: dict[str, Callable[[], object]], clock: Clock, repeats: int,
                    warmup: int = 2, inner: int | None = None) -> dict[str, dict[str, float]]:
    """``measure_interleaved``, each contestant summarised by ``Measurement.median_band_ms``."""
    measured = measure_interleaved(contestants, clock, warmup=warmup, repeats=repeats, inner=inner)
    return {name: m.median_band_ms() for name, m in measured.items()}


class Progress:
    """A progress bar on stderr: tqdm when it is installed, else a plain self-overwriting line."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.desc, self.enabled, self.count = total, desc, enabled, 0
        self._bar = None
        self._last_len = 0
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, desc=desc, leave=False, file=sys.stderr,
                             dynamic_ncols=True)
        except ImportError:
            self._draw()

    def update(self, n: int = 1, note: str = "") -> None:
        self.count += n
        if not self.enabled:
            return
        if self._bar is not None:
            if note:
                self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(n)
        else:
            self._draw(note)

    def _draw(self, note: str = "") -> None:
        line = f"{self.desc}: {self.count}/{self.total}" + (f"  {note}" if note else "")
        sys.stderr.write("\r" + line.ljust(self._last_len))
        sys.stderr.flush()
        self._last_len = len(line)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            sys.stderr.write("\r" + " " * self._last_len + "\r")
            sys.stderr.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
