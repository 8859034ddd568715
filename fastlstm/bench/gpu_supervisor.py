"""The parent side of `fastlstm bench --gpu-check`: child processes under time limits, so that the check fits its
budget and never hangs. A hung kernel cannot be interrupted from inside its process; it can be killed from outside.

- `run_tests`: the GPU tests (pytest on tests/test_gpu.py) in a child process with a timeout, their JUnit counts
  and the tail of their log recorded in the document.
- `run_cases`: the problems in worker processes (gpu_worker.py), read event by event; a case that overruns its
  timeout is killed and recorded as "timeout", and the rest continue in a fresh worker. When the budget is spent,
  the remaining cases are recorded as skipped.

Both write into the check's document (gpu_check.py) and call its `save` after every event, so a killed run still
leaves a complete record of what happened so far.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from xml.etree import ElementTree

from .cases import Problem
from .gpu_plan import PROVIDERS, REPO


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
            *(command or [sys.executable, "-m", "fastlstm.bench.gpu_worker"]),
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
