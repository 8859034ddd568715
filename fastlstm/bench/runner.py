"""`fastlstm bench`: time fastlstm against torch.nn.LSTM (cuDNN) and write results.json, results.md and plots.

    fastlstm bench --out DIR [--quick] [--device cuda|cpu] [-k SUBSTRING] [--list]

For every case of the grid (fastlstm/bench/cases.py) and every provider (fastlstm with telemetry on and off,
nn.LSTM, and other installed LSTMs: fastlstm/bench/providers.py) the runner
  1. checks correctness against float64 nn.LSTM, once per problem and provider, before any timing; a provider
     that fails is recorded as failed and never timed;
  2. times the mode's step with warm-up, rotated inputs and separate repeats (fastlstm/bench/timing.py);
  3. records peak memory, and for training steps on CUDA whether the step ran without a host synchronisation;
then derives speedups and telemetry overhead and writes the report (fastlstm/bench/report.py).
benchmarks/README.md explains what is measured and how. Exit status: 0, or 1 when any case failed its
correctness check or raised, 2 for a bad command line or a missing device.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from dataclasses import asdict, replace

import torch

from ..arguments import output_folder_usable, positive_int
from . import report
from .cases import (
    DTYPES,
    KERNEL_TARGETS,
    MODES,
    TIMER_CPU,
    TIMER_FULL,
    TIMER_QUICK,
    Case,
    cases_for,
    estimate_seconds,
    full_problems,
    quick_problems,
    select,
)
from .providers import (
    POOL,
    PROVIDERS,
    THRESHOLDS,
    Provider,
    check_correctness,
    default_providers,
    make_inputs,
    make_step,
    make_weights,
    precision,
    problem_seed,
)
from .timing import cpu_threads, peak_memory, sync_check, time_step

EXIT_FAILURES = 1
EXIT_USAGE = 2
PRINT_TABLES_UP_TO = 60  # cases; larger runs print the summary and leave the tables to results.md


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--gpu-check" in argv:  # its own command line: fastlstm/bench/gpu_check.py
        from . import gpu_check

        return gpu_check.main([a for a in argv if a != "--gpu-check"])
    args = _parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not args.list and not output_folder_usable(args.out):
        print(f"fastlstm bench: --out {args.out} is a file, not a folder", file=sys.stderr)
        return EXIT_USAGE
    try:
        providers = _providers(args.providers)
        cases = _cases(args, device.type)
    except ValueError as exc:
        print(f"fastlstm bench: {exc}", file=sys.stderr)
        return EXIT_USAGE
    timer = _timer(args, device.type)
    supported = sum(not PROVIDERS[p].unsupported(c.problem, device) for c in cases for p in providers)
    estimate = estimate_seconds(cases, len(providers), timer, device.type, measurements=supported)
    if args.list:
        for case in cases:
            print(case.name)
        print(f"{len(cases)} cases × {len(providers)} providers on {device.type}; estimated at least {_span(estimate)}")
        return 0
    if device.type == "cuda" and not torch.cuda.is_available():
        print("fastlstm bench: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return EXIT_USAGE

    print(
        f"fastlstm bench: {len(cases)} cases × {len(providers)} providers on {device.type}, at least {_span(estimate)}"
    )
    command = " ".join(["fastlstm bench", *argv])
    doc = run(cases, providers, device, timer, seed=args.seed, command=command, quick=args.quick)
    doc["settings"]["estimate_s"] = estimate
    paths = write_outputs(doc, args.out, plots=not args.no_plots)
    text = report.markdown(doc)
    print(text if len(cases) <= PRINT_TABLES_UP_TO else _up_to_second_section(text))
    print("wrote " + ", ".join(paths))
    bad = doc["summary"]["status_counts"].get("failed", 0) + doc["summary"]["status_counts"].get("error", 0)
    return EXIT_FAILURES if bad else 0


def _span(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _up_to_second_section(markdown: str) -> str:
    """The header and the summary of the report, without the per-mode tables."""
    head, summary_section, *_ = markdown.split("\n## ")
    return f"{head}\n## {summary_section}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastlstm bench",
        description="Benchmark fastlstm against torch.nn.LSTM: correctness-gated timings, telemetry overhead, "
        "host-sync checks; writes results.json, results.md and plots.",
    )
    parser.add_argument("--out", default="fastlstm-bench", help="output folder (default: fastlstm-bench)")
    parser.add_argument("--quick", action="store_true", help="a representative subset (< 5 min on one GPU)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    parser.add_argument(
        "--kernel-targets",
        action="store_true",
        help="only the kernels' target problems (H 512/768/1024 x B 1/16/64, T=1024, bf16)",
    )
    parser.add_argument(
        "-k",
        dest="keywords",
        action="append",
        default=[],
        metavar="SUBSTRING",
        help="only cases whose name contains SUBSTRING (repeatable: any of them)",
    )
    parser.add_argument("--dtypes", default=None, help=f"comma-separated subset of {','.join(DTYPES)}")
    parser.add_argument("--modes", default=None, help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument(
        "--providers", default=None, help=f"comma-separated, from {','.join(PROVIDERS)} (default: installed defaults)"
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=None, help="separate timed runs per case (default 5; 3 quick)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    parser.add_argument("--list", action="store_true", help="print the selected cases and the time estimate, then exit")
    parser.add_argument(
        "--gpu-check",
        action="store_true",
        help="the GPU tests plus model-vs-measured timings in a fixed budget (fastlstm/bench/gpu_check.py;"
        " see its --help)",
    )
    return parser


def _split(value, allowed, what) -> list | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in allowed]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; choose from {list(allowed)}")
    return items


def _providers(value) -> list[str]:
    names = _split(value, PROVIDERS, "providers") or default_providers()
    missing = [n for n in names if not PROVIDERS[n].installed()]
    if missing:
        raise ValueError(f"providers not installed: {missing}")
    return names


def _cases(args, device: str) -> list[Case]:
    if args.kernel_targets:
        problems = list(KERNEL_TARGETS)
    else:
        problems = quick_problems(device) if args.quick else full_problems(device)
    dtypes, modes = _split(args.dtypes, DTYPES, "dtypes"), _split(args.modes, MODES, "modes")
    cases = select(cases_for(problems), args.keywords, dtypes, modes)
    if not cases:
        raise ValueError("no case matches the selection")
    return cases


def _timer(args, device: str):
    timer = TIMER_CPU if device != "cuda" else TIMER_QUICK if args.quick else TIMER_FULL
    if args.repeats is not None:
        timer = replace(timer, repeats=max(1, args.repeats))
    return timer


# ---------------------------------------------------------------------------------------------------- the run


def run(cases, providers, device, timer, *, seed=0, command="fastlstm bench", quick=False, log=print) -> dict:
    """Measure every case with every provider; returns the result document (see report.py)."""
    with cpu_threads(1 if device.type == "cpu" else None):
        return _run(cases, providers, device, timer, seed, command, quick, log)


def _run(cases, providers, device, timer, seed, command, quick, log) -> dict:
    started = time.perf_counter()
    checks: dict = {}  # (problem, provider) -> check record: one check serves every mode of a problem
    docs = []
    for n, case in enumerate(cases, 1):
        if n > 1 and case.problem != cases[n - 2].problem:
            _release(device)
        results = {name: measure(case, PROVIDERS[name], device, timer, seed, checks) for name in providers}
        doc = {
            "name": case.name,
            "mode": case.mode,
            "problem": case.problem.to_dict(),
            "padded_twin": case.problem.padded_twin().name,
            "results": results,
        }
        doc["derived"] = report.derive(doc)
        docs.append(doc)
        log(_progress_line(n, len(cases), doc))
    result = {
        "schema": report.SCHEMA,
        "environment": report.environment(device),  # inside cpu_threads: records the thread count used
        "settings": {
            "command": command,
            "device": device.type,
            "quick": quick,
            "timer": asdict(timer),
            "input_pool": POOL,
            "thresholds": THRESHOLDS,
            "providers": list(providers),
            "provider_descriptions": {name: PROVIDERS[name].description for name in providers},
            "seed": seed,
            "elapsed_s": time.perf_counter() - started,
        },
        "cases": docs,
    }
    result["summary"] = report.summary(result)
    return result


def _checked(problem, provider: Provider, device, seed) -> dict:
    try:
        result = check_correctness(problem, provider, device, problem_seed(problem, seed))
    except Exception as exc:  # noqa: BLE001 - a crash is a result too: recorded, and the run goes on
        result = {"passed": False, "exception": _describe(exc)}
    _release(device)  # the float64 reference of a large problem is the biggest allocation of all
    return result


def measure(case: Case, provider: Provider, device, timer, seed: int, checks: dict) -> dict:
    """One provider on one case: skipped (unsupported), failed (correctness), error (raised) or ok (timed)."""
    problem = case.problem
    reason = provider.unsupported(problem, device)
    if reason:
        return {"status": "skipped", "reason": reason}
    key = (problem, provider.name)
    if key not in checks:
        with provider.environment():
            checks[key] = _checked(problem, provider, device, seed)
    check = checks[key]
    if "exception" in check:
        return {"status": "error", "reason": f"correctness check raised {check['exception']}"}
    if not check["passed"]:
        reason = f"{check['worst']}: relative error {check['max_error']:.2e} > {check['threshold']:.0e}"
        return {"status": "failed", "reason": reason, "correctness": check}
    try:
        with provider.environment():
            timing, memory, sync = _timed(case, provider, device, timer, problem_seed(problem, seed))
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory: recorded, and the run goes on
        error = {"status": "error", "reason": _describe(exc), "correctness": check}
    else:
        return {"status": "ok", "correctness": check, "timing": timing, "memory": memory, "sync_check": sync}
    _release(device)  # outside the except block, whose traceback would keep the failed case's tensors alive
    return error


def _timed(case: Case, provider: Provider, device, timer, seed: int):
    problem = case.problem
    with precision(problem.dtype):
        module = provider.build(problem, make_weights(problem, seed), device)
        inputs = make_inputs(problem, device, POOL, requires_grad=case.mode != "forward", seed=seed + 1)
        step = make_step(case.mode, module, inputs)
        timing = time_step(step, device, timer)
        memory = peak_memory(step, device)
        sync = sync_check(step, device) if case.mode == "train_step" else None
    return timing, memory, sync


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def _release(device) -> None:
    """On CUDA, collect what reference cycles still hold (models, graphs, buffers) and return cached blocks, so a
    large problem or an out-of-memory error does not weigh on the next one. Called per problem and after errors,
    not per measurement: a full collection takes ~0.2 s with torch loaded. Nothing to do on the CPU."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def _progress_line(n: int, total: int, doc: dict) -> str:
    parts = []
    for name, r in doc["results"].items():
        t = report.median_ms(r)
        parts.append(f"{name} {t:.3g} ms" if t is not None else f"{name} {r['status']}")
    speedup = doc["derived"]["speedup"].get(report.FAST)
    tail = f" · speedup {speedup:.2f}×" if speedup is not None else ""
    return f"[{n}/{total}] {doc['name']}: " + " · ".join(parts) + tail


def write_outputs(doc: dict, folder: str, plots: bool = True) -> list[str]:
    """results.json, results.md and (when matplotlib is there and `plots`) the PNGs; returns the paths written."""
    os.makedirs(folder, exist_ok=True)
    paths = [report.write_json(doc, os.path.join(folder, "results.json"))]
    md = os.path.join(folder, "results.md")
    if plots:
        pngs, note = report.write_plots(doc["cases"], folder)
        paths += pngs
        if note:
            print(f"fastlstm bench: {note}")
    with open(md, "w") as f:
        f.write(report.markdown(doc))
    paths.insert(1, md)
    return paths


if __name__ == "__main__":
    raise SystemExit(main())
