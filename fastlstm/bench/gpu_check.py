"""`fastlstm bench --gpu-check`: on a machine with a GPU, the GPU tests and the timings the performance model
predicts, in one command that fits a fixed time budget and never hangs.

    fastlstm bench --gpu-check --out DIR [--budget-s 480] [--case-timeout-s 150] [--device cpu]

1. The GPU tests (`python -m pytest tests/test_gpu.py`: parity with float64 nn.LSTM for every routed variant,
   1000 back-to-back launches per grid size, no host sync in a training step), in a child process with a timeout.
2. For each shape of the performance model (fastlstm.kernels.model: bf16 at H 256-1024 x B 1/16/64, T = 1024,
   and two fp32 shapes), cheapest first: the correctness gate against float64 nn.LSTM, then forward and
   forward+backward timing of fastlstm and nn.LSTM (CUDA events, warm-up, rotating inputs, median of separate
   calls). The cases run in a worker process that the parent kills when a case overruns its timeout (a hung
   kernel cannot be interrupted from inside); the rest continue in a fresh worker. When the budget is spent, the
   remaining cases are recorded as skipped.
3. DIR/gpu-check.json (rewritten after every event, so a killed run still leaves it), DIR/gpu-check.md, and
   DIR/model-with-measurements.json: the committed model table with each case's `measured` slot filled.

`--device cpu` runs the same path at tiny sizes on the CPU (fastlstm's reference backend; perf_counter instead of
CUDA events): what the test suite exercises.

This module is the command: its options, the document and the files written. What is measured and the model's
table are gpu_plan.py's, the measuring child process gpu_worker.py's, the child processes under time limits
gpu_supervisor.py's, and gpu-check.md gpu_report.py's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .. import jsonio
from ..arguments import output_folder_usable, positive_float
from .cases import Problem
from .gpu_plan import (
    MODES,
    PROVIDERS,
    cheapest_first,
    check_problems,
    model_document,
    modelled,
    modelled_kernels,
    with_measurements,
)
from .gpu_report import markdown
from .gpu_supervisor import Deadline, run_cases, run_tests
from .gpu_worker import MEASURE_BUDGET_S, REPEATS

SCHEMA = "fastlstm.gpu-check/1"
BUDGET_S = 480.0  # the whole command, compilation included: 8 minutes on one H200
TESTS_TIMEOUT_S = 210.0  # the GPU tests' share of it
CASE_TIMEOUT_S = 150.0  # one problem: correctness gate, then two modes x two providers


def gpu_check(
    out: str,
    device: str = "cuda",
    budget_s: float = BUDGET_S,
    case_timeout_s: float = CASE_TIMEOUT_S,
    tests_timeout_s: float = TESTS_TIMEOUT_S,
    seed: int = 0,
    skip_tests: bool = False,
    tests_command: list | None = None,
    worker_command: list | None = None,
    problems: list[Problem] | None = None,
    model_path: str | None = None,
    providers=PROVIDERS,
) -> dict:
    """The whole check; returns the document it wrote to out/gpu-check.json."""
    import torch

    from .report import environment

    deadline = Deadline(budget_s)
    os.makedirs(out, exist_ok=True)
    model = model_document(model_path)
    problems = cheapest_first(problems or check_problems(device), model)
    doc = {
        "schema": SCHEMA,
        "environment": environment(torch.device(device)),
        "settings": {
            "device": device,
            "budget_s": budget_s,
            "case_timeout_s": case_timeout_s,
            "tests_timeout_s": tests_timeout_s,
            "measure_budget_s": MEASURE_BUDGET_S,
            "repeats": REPEATS,
            "providers": list(providers),
            "modes": list(MODES),
            "seed": seed,
            "model": None if model is None else {"triton": model.get("triton"), "generated": model.get("generated")},
        },
        "tests": {"status": "not run"},
        "cases": {
            p.name: {
                "problem": p.to_dict(),
                "status": "pending",
                "modelled": modelled(model, p),
                "modelled_kernels": modelled_kernels(model, p),
            }
            for p in problems
        },
        "notes": [] if model else ["no performance-model table found: cases carry no modelled estimate"],
    }
    started = time.monotonic()
    json_path = os.path.join(out, "gpu-check.json")

    def save():
        doc["elapsed_s"] = time.monotonic() - started
        jsonio.write_json(json_path, doc)

    save()
    if skip_tests:
        doc["tests"] = {"status": "skipped", "reason": "--skip-tests"}
    else:
        run_tests(doc, out, deadline, tests_timeout_s, tests_command)
    save()
    log = os.path.join(out, "worker.log")
    run_cases(doc, problems, deadline, case_timeout_s, device, seed, save, log, worker_command, providers)
    save()
    with open(os.path.join(out, "gpu-check.md"), "w") as f:
        f.write(markdown(doc))
    if model is not None:
        jsonio.write_json(os.path.join(out, "model-with-measurements.json"), with_measurements(model, doc))
    return doc


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:  # the worker's own command line (gpu_worker.py), by its former name
        from . import gpu_worker

        return gpu_worker.main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="fastlstm bench --gpu-check", description=__doc__.split("\n\n")[0].replace("\n", " ")
    )
    parser.add_argument("--out", default="fastlstm-gpu-check", help="output folder")
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda", help="cuda (default); cpu runs the same code at tiny sizes"
    )
    parser.add_argument("--budget-s", type=positive_float, default=BUDGET_S, help="the whole command's time limit")
    parser.add_argument(
        "--case-timeout-s", type=positive_float, default=CASE_TIMEOUT_S, help="one problem's time limit"
    )
    parser.add_argument(
        "--tests-timeout-s", type=positive_float, default=TESTS_TIMEOUT_S, help="the GPU tests' time limit"
    )
    parser.add_argument("--skip-tests", action="store_true", help="timing only")
    parser.add_argument(
        "--providers",
        default=",".join(PROVIDERS),
        help="comma-separated providers of fastlstm bench (add fastlstm-streaming to time the streaming kernels too)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import torch

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        # A check for a GPU that quietly ran on the CPU would report its skipped GPU tests as passed.
        print(
            "fastlstm bench --gpu-check: torch sees no CUDA device; --device cpu runs the check's code path at tiny "
            "sizes (a smoke run, not a GPU check)",
            file=sys.stderr,
        )
        return 2
    if not output_folder_usable(args.out):
        print(f"fastlstm bench --gpu-check: --out {args.out} is a file, not a folder", file=sys.stderr)
        return 2
    from .providers import PROVIDERS as ALL

    providers = tuple(p.strip() for p in args.providers.split(",") if p.strip())
    unknown = [p for p in providers if p not in ALL]
    if unknown:
        print(f"fastlstm bench --gpu-check: unknown providers {unknown}; choose from {list(ALL)}", file=sys.stderr)
        return 2
    doc = gpu_check(
        args.out,
        device,
        args.budget_s,
        args.case_timeout_s,
        args.tests_timeout_s,
        args.seed,
        args.skip_tests,
        providers=providers,
    )
    print(markdown(doc))
    print(
        f"wrote {args.out}/gpu-check.json, gpu-check.md"
        + (
            ", model-with-measurements.json"
            if os.path.exists(os.path.join(args.out, "model-with-measurements.json"))
            else ""
        )
    )
    bad = [n for n, c in doc["cases"].items() if c.get("status") not in ("ok", "skipped")]
    failed_gate = [
        n
        for n, c in doc["cases"].items()
        if any(v.get("passed") is False for p, v in c.get("correctness", {}).items() if p != "nn.LSTM")
    ]
    return 1 if bad or failed_gate or doc["tests"].get("status") in ("failed", "timeout") else 0


if __name__ == "__main__":
    raise SystemExit(main())
