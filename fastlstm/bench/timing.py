"""How `fastlstm bench` measures a step: time (with warm-up and separate repeats), peak memory, host syncs, and
the CPU thread count it measures under (`cpu_threads`).

On CUDA each call is bracketed by CUDA events, so the time is what the GPU's stream spent from the call's first
launch to its last, including any gaps while the host was still launching (the Python overhead a user pays too).
On the CPU, where every op is synchronous, time.perf_counter brackets each call instead.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch

from .cases import TimerSettings


def _percentile(sorted_values: list, q: float) -> float:
    """Linear-interpolated percentile (q in [0, 1]) of an already sorted, non-empty list."""
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(repeats: list[list[float]]) -> dict:
    """Statistics of per-call times (ms), one list per repeat.

    median_ms is the median of the repeats' medians (robust to one disturbed repeat); min_ms/max_ms are the lowest
    and highest repeat medians (the spread between separate runs); q25_ms/q75_ms/iqr_ms are over every call pooled
    (the spread within runs).
    """
    medians = [statistics.median(r) for r in repeats]
    pooled = sorted(t for r in repeats for t in r)
    q25, q75 = _percentile(pooled, 0.25), _percentile(pooled, 0.75)
    median = statistics.median(medians)
    return {
        "median_ms": median,
        "min_ms": min(medians),
        "max_ms": max(medians),
        "q25_ms": q25,
        "q75_ms": q75,
        "iqr_ms": q75 - q25,
        "spread": (max(medians) - min(medians)) / median if median > 0 else 0.0,
        "repeat_medians_ms": medians,
        "calls_per_repeat": [len(r) for r in repeats],
    }


class Clock:
    """Times calls of a step on one device. `calls(step, first, n)` runs step(first) … step(first + n − 1) and
    returns each call's time in ms."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def calls(self, step: Callable[[int], None], first: int, n: int) -> list[float]:
        if not self.cuda:
            times = []
            for i in range(first, first + n):
                start = time.perf_counter()
                step(i)
                times.append((time.perf_counter() - start) * 1000)
            return times
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for i, (start, end) in enumerate(events):
            start.record()
            step(first + i)
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]


def time_step(step: Callable[[int], None], device: torch.device, settings: TimerSettings) -> dict:
    """Warm up, then `settings.repeats` separate runs of the step; returns summarize()'s statistics plus
    first_call_ms (compilation and caches: reported, never part of the statistics) and warmup_calls."""
    clock = Clock(device)
    clock.sync()
    start = time.perf_counter()
    step(0)  # compiles kernels, fills caches, allocates the optimizer state
    clock.sync()
    first_call_ms = (time.perf_counter() - start) * 1000
    estimate = max(clock.calls(step, 1, 1)[0], 1e-3)
    warmup = max(1, math.ceil(settings.warmup_ms / estimate)) if settings.warmup_ms > 0 else 0
    clock.calls(step, 2, warmup)
    n = min(settings.max_iters, max(settings.min_iters, math.ceil(settings.rep_ms / estimate)))
    n = max(1, min(n, math.floor(settings.budget_ms / (estimate * settings.repeats))))  # slow calls: fewer per repeat
    index = 2 + warmup
    repeats = []
    for _ in range(settings.repeats):
        repeats.append(clock.calls(step, index, n))
        index += n
    return {**summarize(repeats), "first_call_ms": first_call_ms, "warmup_calls": warmup}


def peak_memory(step: Callable[[int], None], device: torch.device) -> dict | None:
    """Peak allocated bytes over one call (CUDA; None elsewhere): `peak_bytes` in all, and `peak_extra_bytes` above
    what was already allocated (model, optimizer state, the input pool) — the call's own activations and workspace."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step(0)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_bytes": peak, "peak_extra_bytes": peak - before}


def sync_check(step: Callable[[int], None], device: torch.device) -> dict:
    """Run one (already warmed-up) step with torch.cuda.set_sync_debug_mode("error"): any host synchronisation
    inside it raises. {"status": "passed" | "failed" | "skipped", "detail": ...}."""
    if device.type != "cuda":
        return {"status": "skipped", "detail": "host-sync checks need CUDA"}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(0)
    except RuntimeError as exc:
        return {"status": "failed", "detail": str(exc).splitlines()[0][:300]}
    finally:
        torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
    return {"status": "passed", "detail": "no host synchronisation in a training step"}


@contextmanager
def cpu_threads(n):
    """Run with n intra-op threads (None: leave as is), restored afterwards. CPU runs use one: at smoke-test sizes
    threads buy nothing, and on a shared machine an op whose second thread is descheduled stalls for a scheduler
    tick (measured here: nn.LSTM H=16, T=8 took 84 ms per call with 2 threads next to another busy process, and
    0.13 ms with 1)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
