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
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from xml.etree import ElementTree

from .. import jsonio
from .cases import Problem

SCHEMA = "fastlstm.gpu-check/1"
BUDGET_S = 480.0  # the whole command, compilation included: 8 minutes on one H200
TESTS_TIMEOUT_S = 210.0  # the GPU tests' share of it
CASE_TIMEOUT_S = 150.0  # one problem: correctness gate, then two modes x two providers
MEASURE_BUDGET_S = 4.0  # timed calls of one measurement, after the untimed first call
REPEATS = 5  # at most this many separately timed calls (or runs of calls, for short ones)
SHORT_CALL_MS = 20.0  # calls shorter than this are timed in runs of several calls
PROVIDERS = ("fastlstm", "nn.LSTM")
MODES = ("forward", "forward_backward")
CPU_PROBLEMS = (Problem(16, 1, 8, "fp32"), Problem(32, 4, 8, "bf16"))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --------------------------------------------------------------------------------------------- the problems


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


# ----------------------------------------------------------------------------------------------- the worker


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
    """Child process: one JSON line per event on stdout ({"event": "start" | "result", "case": ...})."""
    import torch

    from .timing import cpu_threads

    device = torch.device(device_name)
    with open(cases_path) as f:
        problems = [Problem(**p) for p in json.load(f)]
    with cpu_threads(1 if device.type == "cpu" else None):  # as the runner does on the CPU (timing.cpu_threads)
        for problem in problems:
            _emit({"event": "start", "case": problem.name})
            try:
                result = {"status": "ok", **measure_problem(problem, device, seed, providers)}
            except Exception as exc:  # noqa: BLE001 - recorded; the next case still runs
                result = {"status": "error", "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            _emit({"event": "result", "case": problem.name, "result": jsonio.to_json_safe(result)})
    return 0


def _emit(event: dict) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


# ----------------------------------------------------------------------------------------------- the parent


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())


def run_tests(doc: dict, out: str, deadline: Deadline, timeout_s: float, command: list | None) -> None:
    """Stage 1: the GPU tests in a child process, recorded in doc["tests"] with their log."""
    tests = os.path.join(REPO, "tests", "test_gpu.py")
    xml = os.path.join(out, "gpu-tests.xml")
    if command is None:
        if not os.path.exists(tests):
            doc["tests"] = {"status": "skipped", "reason": f"{tests} not found (run from a source checkout)"}
            return
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", tests, f"--junitxml={xml}"]
    limit = min(timeout_s, deadline.left())
    log = os.path.join(out, "gpu-tests.log")
    started = time.monotonic()
    with open(log, "w") as f:
        try:
            done = subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=limit, check=False)
            rc = done.returncode
            status = "passed" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            rc, status = None, "timeout"
    doc["tests"] = {
        "status": status,
        "returncode": rc,
        "seconds": time.monotonic() - started,
        "limit_s": limit,
        "command": " ".join(command),
        "log": os.path.basename(log),
        **_junit_counts(xml),
    }
    with open(log) as f:
        doc["tests"]["tail"] = f.read()[-2000:]


def _junit_counts(path: str) -> dict:
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return {}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return {}
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def run_cases(
    doc: dict,
    problems: list[Problem],
    deadline: Deadline,
    case_timeout_s: float,
    device: str,
    seed: int,
    save,
    log: str,
    command: list | None = None,
    providers=PROVIDERS,
) -> None:
    """Stage 2: the problems in worker processes, a fresh worker after any case that had to be killed."""
    remaining = list(problems)
    while remaining:
        if deadline.left() <= 0:
            _skip(doc, remaining, "time budget spent")
            doc["notes"].append(f"{len(remaining)} cases skipped: the time budget ran out")
            save()
            return
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump([vars(p) for p in remaining], f)
        argv = [
            *(command or [sys.executable, "-m", "fastlstm.bench.gpu_check", "--worker"]),
            f.name,
            "--device",
            device,
            "--seed",
            str(seed),
            "--providers",
            ",".join(providers),
        ]
        try:
            done = _drive_worker(argv, doc, remaining, deadline, case_timeout_s, save, log)
        finally:
            os.unlink(f.name)
        if not done:  # the worker died before finishing any case: another one would too
            _skip(doc, remaining, "the worker process failed (see worker.log)", status="error")
            save()
            return
        remaining = [p for p in remaining if p.name not in done]


def _skip(doc: dict, problems, reason: str, status: str = "skipped") -> None:
    for p in problems:
        doc["cases"][p.name].update(status=status, reason=reason)


def _lines(stream, sink: queue.Queue) -> None:
    for line in stream:
        sink.put(line)
    sink.put(None)  # end of output: the worker exited


def _drive_worker(argv, doc, problems, deadline, case_timeout_s, save, log) -> set:
    """Run one worker until it exits, a case overruns its timeout or the budget ends; returns the cases that got
    a final status (a case running when the worker had to be killed gets "timeout" or "skipped")."""
    lines: queue.Queue = queue.Queue()
    with open(log, "a") as err:
        child = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True)
    threading.Thread(target=_lines, args=(child.stdout, lines), daemon=True).start()
    done, current, started = set(), None, time.monotonic()
    while True:
        wait = min(deadline.left(), started + case_timeout_s - time.monotonic())
        try:
            line = lines.get(timeout=max(0.0, wait))
        except queue.Empty:
            child.kill()
            child.wait()
            if current is None:  # killed between cases (budget): nothing was running
                return done
            if deadline.left() <= 0:
                doc["cases"][current].update(status="skipped", reason="time budget spent")
            else:
                doc["cases"][current].update(status="timeout", reason=f"no result in {case_timeout_s:.0f} s; killed")
            save()
            return done | {current}
        if line is None:
            child.wait()
            if current is not None:
                doc["cases"][current].update(status="error", reason=f"worker exited ({child.returncode}) mid-case")
                save()
                done.add(current)
            return done
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue  # stray output of a library
        if event.get("event") == "start":
            current, started = event["case"], time.monotonic()
        elif event.get("event") == "result":
            doc["cases"][event["case"]].update(event["result"])
            done.add(event["case"])
            current = None
            save()


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


# ------------------------------------------------------------------------------------------------- report


def markdown(doc: dict) -> str:
    env = doc["environment"]
    gpu = (env.get("gpu") or {}).get("name", env.get("device"))
    tests = doc["tests"]
    extras = [p for p in doc["settings"]["providers"] if p not in ("fastlstm", "nn.LSTM")]
    lines = [
        f"# fastlstm GPU check: {gpu}",
        "",
        (
            f"{env.get('date')}, driver {env.get('driver')}, torch {env.get('torch')}, triton {env.get('triton')}, "
            f"CUDA {env.get('cuda')}, git {env.get('git_commit')}. Budget {doc['settings']['budget_s']:.0f} s, "
            f"{doc.get('elapsed_s', 0):.0f} s used. Measured times are medians of separately timed calls (CUDA events; "
            "perf_counter on the CPU) after an untimed first call; `modelled` columns are the committed "
            "performance-model table's estimates, not measurements."
        ),
        "",
        f"GPU tests: **{tests.get('status')}**"
        + (
            f" ({tests.get('tests', '?')} tests, {tests.get('failures', 0)} failures, {tests.get('errors', 0)} errors,"
            f" {tests.get('skipped', 0)} skipped, {tests.get('seconds', 0):.0f} s)"
            if "seconds" in tests
            else f": {tests.get('reason', '')}"
        ),
        "",
        (
            "| case | status | fastlstm fwd ms | modelled | nn.LSTM fwd ms | speedup | "
            "fastlstm fwd+bwd ms | modelled | "
            "nn.LSTM fwd+bwd ms | speedup | "
            + "".join(f"{p} fwd / fwd+bwd ms | " for p in extras)
            + "fastlstm µs/step fwd / fwd+bwd |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(extras) + "---:|",
    ]
    for name, case in doc["cases"].items():
        timing, model = case.get("timing", {}), case.get("modelled") or {}
        cells = []
        for mode, key in (("forward", "forward_ms"), ("forward_backward", "forward_backward_ms")):
            fast, base = _median(timing, mode, "fastlstm"), _median(timing, mode, "nn.LSTM")
            speed = f"{base / fast:.2f}×" if fast and base else "—"
            cells += [_ms(fast), _ms(model.get(key)), _ms(base), speed]
        for extra in extras:
            cells.append("/".join(_ms(_median(timing, m, extra)) for m in MODES))
        per_step = "/".join(
            _ms(_median(timing, m, "fastlstm") and _median(timing, m, "fastlstm") * 1e3 / case["problem"]["seq"])
            for m in MODES
        )
        status = case.get("status", "?") + (f" ({case['reason']})" if case.get("reason") else "")
        missed = [
            f"{p} error {c['max_error']:.1e} > {c['threshold']:.0e}"
            for p, c in case.get("correctness", {}).items()
            if c.get("passed") is False
        ]
        status += f" (gate: {'; '.join(missed)})" if missed else ""
        lines.append(f"| {name} | {status} | {' | '.join(cells)} | {per_step} |")
    if doc["notes"]:
        lines += ["", *[f"- {n}" for n in doc["notes"]]]
    return "\n".join(lines) + "\n"


def _median(timing: dict, mode: str, provider: str):
    record = timing.get(mode, {}).get(provider)
    return None if record is None else record.get("median_ms")


def _ms(value) -> str:
    return "—" if value is None else f"{value:.3g}"


# -------------------------------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        p = argparse.ArgumentParser(prog="fastlstm.bench.gpu_check --worker")
        p.add_argument("cases")
        p.add_argument("--device", default="cuda")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--providers", default=",".join(PROVIDERS))
        a = p.parse_args(argv[1:])
        return worker(a.cases, a.device, a.seed, tuple(a.providers.split(",")))
    parser = argparse.ArgumentParser(prog="fastlstm bench --gpu-check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="fastlstm-gpu-check", help="output folder")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="the whole command's time limit")
    parser.add_argument("--case-timeout-s", type=float, default=CASE_TIMEOUT_S, help="one problem's time limit")
    parser.add_argument("--tests-timeout-s", type=float, default=TESTS_TIMEOUT_S, help="the GPU tests' time limit")
    parser.add_argument("--skip-tests", action="store_true", help="timing only")
    parser.add_argument(
        "--providers",
        default=",".join(PROVIDERS),
        help="comma-separated providers of fastlstm bench (add fastlstm-streaming to time the streaming kernels too)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("fastlstm bench --gpu-check: --device cuda, but torch sees no CUDA device", file=sys.stderr)
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
