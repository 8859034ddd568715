"""The worker process of `fastlstm bench --gpu-check`: measures the problems it is given and reports each as one
JSON line on stdout, so that the parent (gpu_supervisor.py) can kill it when a case hangs and lose nothing else.

    python -m fastlstm.bench.gpu_worker CASES.json [--device cuda] [--seed 0] [--providers fastlstm,nn.LSTM]

For each problem: the correctness gate against float64 nn.LSTM, then forward and forward+backward timing of every
provider (one untimed first call, then a few separately timed samples within a fixed budget).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

from .. import jsonio
from .cases import Problem
from .gpu_plan import MODES, PROVIDERS

MEASURE_BUDGET_S = 4.0  # timed calls of one measurement, after the untimed first call
REPEATS = 5  # at most this many separately timed calls (or runs of calls, for short ones)
SHORT_CALL_MS = 20.0  # calls shorter than this are timed in runs of several calls


def timed(step, device, budget_s: float = MEASURE_BUDGET_S) -> dict:
    """One untimed first call (compilation, allocation), then up to REPEATS separately timed samples within
    budget_s: single calls when they are slow, runs of calls (per-call mean) when they are short."""
    from .timing import Clock, summarize

    clock = Clock(device)
    clock.sync()
    start = time.perf_counter()
    step(0)
    clock.sync()
    first_ms = (time.perf_counter() - start) * 1000
    estimate = clock.calls(step, 1, 1)[0]
    samples, index = [[estimate]], 2
    per_run = max(1, math.ceil(SHORT_CALL_MS / max(estimate, 1e-3))) if estimate < SHORT_CALL_MS else 1
    spent = estimate
    while len(samples) < REPEATS and spent + per_run * estimate <= budget_s * 1000:
        run = clock.calls(step, index, per_run)
        samples.append(run)
        spent += sum(run)
        index += per_run
    stats = summarize(samples)
    return {**stats, "first_call_ms": first_ms, "samples": len(samples)}


def measure_problem(problem: Problem, device, seed: int, providers=PROVIDERS) -> dict:
    """The correctness gate, then every mode and provider that passed it. The baseline (nn.LSTM) is timed
    whatever its gate says (a bf16 nn.LSTM accumulates in bf16 and can miss the float64 budget at T = 1024): it is
    the time users get; its gate result is recorded beside it."""
    import torch

    from .providers import (
        BASELINE,
        POOL,
        check_correctness,
        make_inputs,
        make_step,
        make_weights,
        precision,
        problem_seed,
    )
    from .providers import PROVIDERS as ALL

    case_seed = problem_seed(problem, seed)
    result = {"correctness": {}, "timing": {}}
    passed = []
    for name in providers:
        provider = ALL[name]
        reason = provider.unsupported(problem, device)
        if reason:
            result["correctness"][name] = {"passed": None, "skipped": reason}
            continue
        with provider.environment():
            check = check_correctness(problem, provider, device, case_seed)
        result["correctness"][name] = check
        if check["passed"] or name == BASELINE:
            passed.append(name)
    for mode in MODES:
        result["timing"][mode] = {}
        for name in passed:
            provider = ALL[name]
            with provider.environment(), precision(problem.dtype):
                module = provider.build(problem, make_weights(problem, case_seed), device)
                inputs = make_inputs(problem, device, POOL, requires_grad=mode != "forward", seed=case_seed + 1)
                stats = timed(make_step(mode, module, inputs), device)
            stats["us_per_step"] = stats["median_ms"] * 1000 / problem.seq
            result["timing"][mode][name] = stats
            del module, inputs
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return result


def worker(cases_path: str, device_name: str, seed: int, providers=PROVIDERS) -> int:
    """One JSON line per event on stdout ({"event": "start" | "result", "case": ...})."""
    import torch

    from .timing import cpu_threads

    device = torch.device(device_name)
    with open(cases_path) as f:
        problems = [Problem(**p) for p in json.load(f)]
    with cpu_threads(1 if device.type == "cpu" else None):  # as `fastlstm bench` does on the CPU (timing.cpu_threads)
        for problem in problems:
            _emit({"event": "start", "case": problem.name})
            try:
                result = {"status": "ok", **measure_problem(problem, device, seed, providers)}
            except Exception as exc:  # noqa: BLE001 - recorded; the next case still runs
                result = {"status": "error", "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
                if not device_usable(device):
                    result["reason"] += "; the device is unusable in this process, the next case gets a fresh one"
                    _emit({"event": "result", "case": problem.name, "result": jsonio.to_json_safe(result)})
                    return EXIT_DEVICE_LOST
            _emit({"event": "result", "case": problem.name, "result": jsonio.to_json_safe(result)})
    return 0


# A device-side assert (the launcher's guard against a stuck exchange) leaves the process's CUDA context failing every
# later call: the worker exits after reporting the case, and the supervisor starts a new one for the cases left.
EXIT_DEVICE_LOST = 3


def device_usable(device) -> bool:
    """Whether the device still runs work in this process (a CUDA error is sticky)."""
    import torch

    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
    except Exception:  # noqa: BLE001 - whatever the error, the context cannot be trusted
        return False
    return True


def _emit(event: dict) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastlstm.bench.gpu_worker")
    p.add_argument("cases")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--providers", default=",".join(PROVIDERS))
    a = p.parse_args(argv)
    return worker(a.cases, a.device, a.seed, tuple(a.providers.split(",")))


if __name__ == "__main__":
    raise SystemExit(main())
