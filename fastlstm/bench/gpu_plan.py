"""What `fastlstm bench --gpu-check` measures: the problems (the performance model's shapes on CUDA, two tiny ones
on the CPU), the providers and modes timed for each, the order that lets a budget cut drop the slowest, and the
committed performance-model table whose estimates sit beside the measurements (and which receives them).
"""

from __future__ import annotations

import json
import math
import os

from .cases import Problem

PROVIDERS = ("fastlstm", "nn.LSTM")
MODES = ("forward", "forward_backward")
CPU_PROBLEMS = (Problem(16, 1, 8, "fp32"), Problem(32, 4, 8, "bf16"))
# The source checkout this package runs from: the committed model tables (benchmarks/results) and the GPU tests
# (tests/test_gpu.py) are found there, and the child processes run there.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def check_problems(device: str) -> list[Problem]:
    """The model's shapes on CUDA (same names as the model table's keys), two tiny ones on the CPU."""
    if device != "cuda":
        return list(CPU_PROBLEMS)
    from fastlstm.kernels.model import model_shapes

    return [Problem(s.hidden, s.batch, s.seq, s.dtype) for s in model_shapes()]


def model_document(path: str | None = None) -> dict | None:
    """The committed performance-model table for the installed triton (benchmarks/results), if present."""
    if path is None:
        from fastlstm.kernels.model import file_stem

        from .report import _version

        path = os.path.join(REPO, "benchmarks", "results", file_stem(_version("triton") or "3.6") + ".json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def modelled(model: dict | None, problem: Problem) -> dict | None:
    """The model's estimate for the kernels backend="auto" routes the problem to."""
    case = (model or {}).get("cases", {}).get(problem.name)
    return None if case is None else case.get("modelled")


def modelled_kernels(model: dict | None, problem: Problem) -> dict:
    """The model's estimate for every kernel family it read for the problem (single, split, streaming)."""
    case = (model or {}).get("cases", {}).get(problem.name) or {}
    return {label: k.get("modelled") for label, k in case.get("kernels", {}).items()}


def cheapest_first(problems: list[Problem], model: dict | None) -> list[Problem]:
    """Order by the model's forward+backward estimate, so that a budget cut drops the slowest cases."""

    def cost(p):
        m = modelled(model, p)
        return m["forward_backward_ms"] if m else math.inf

    return sorted(problems, key=cost)


def with_measurements(model: dict, doc: dict) -> dict:
    """The model table with each case's `measured` slot holding this run's medians (ms and µs per step)."""
    merged = json.loads(json.dumps(model))
    for name, case in doc["cases"].items():
        if name in merged["cases"] and case.get("status") == "ok":
            merged["cases"][name]["measured"] = {
                mode: {
                    provider: {"median_ms": t["median_ms"], "us_per_step": t["us_per_step"]}
                    for provider, t in case["timing"][mode].items()
                }
                for mode in case["timing"]
            }
            merged["cases"][name]["measured"]["environment"] = doc["environment"]
    return merged
