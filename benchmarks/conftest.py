"""Configuration and fixtures of the pytest-benchmark suite (benchmarks/test_bench_lstm.py).

CI has no GPU and runs `python -m pytest -q` without `--benchmark-disable`, so the CPU path is cheap whatever the
flags, in two ways: without CUDA this file switches `--benchmark-disable` on (unless `--benchmark-enable` is given),
so pytest-benchmark runs each case once and prints no table of meaningless CPU timings; and on the CPU each case
is a single `benchmark.pedantic(rounds=1, iterations=1)` call even when benchmarking is enabled. On CUDA the cases
are timed for real: warm-up rounds, then rounds that each end with a device synchronisation, so that
pytest-benchmark's wall clock sees the GPU's work. The precise timings (CUDA events, rotated inputs, repeats, the
correctness gate per provider) are `fastlstm bench`'s job; this suite is the same cases in pytest's harness, for
`--benchmark-compare` and for keeping the code paths alive in CI.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from fastlstm.bench import cpu_threads

GPU_ROUNDS, GPU_WARMUP_ROUNDS = 20, 3


def pytest_configure(config):
    """No GPU: run the cases once (--benchmark-disable) unless benchmarking was forced with --benchmark-enable.
    Runs before pytest-benchmark's own pytest_configure (trylast), which reads the option."""
    if torch.cuda.is_available() or not hasattr(config.option, "benchmark_disable"):
        return
    if not config.getoption("benchmark_enable", default=False):
        config.option.benchmark_disable = True


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    """One intra-op thread on the CPU, as `fastlstm bench --device cpu` does: at these sizes threads buy nothing, and
    on a shared CI machine a descheduled second thread stalls every op (fastlstm/bench/timing.py, cpu_threads)."""
    with cpu_threads(1):
        yield


@pytest.fixture
def run_benchmark():
    """run_benchmark(benchmark, step, device): time step(i) (i counts calls, so inputs rotate) with the fixture."""

    def run(benchmark, step, device: torch.device):
        calls = itertools.count()
        if device.type != "cuda":
            benchmark.pedantic(lambda: step(next(calls)), rounds=1, iterations=1, warmup_rounds=0)
            return

        def synchronized():
            step(next(calls))
            torch.cuda.synchronize()

        benchmark.pedantic(synchronized, rounds=GPU_ROUNDS, iterations=1, warmup_rounds=GPU_WARMUP_ROUNDS)

    return run
