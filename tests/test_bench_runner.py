"""The benchmark runner's logic on the CPU (fastlstm/bench/): the grid, the correctness gate, the statistics over
repeats, the derived comparisons and the files `fastlstm bench` writes. No assertion here depends on a measured time.
"""

from __future__ import annotations

import json
import math
import sys
import time

import pytest
import torch

from fastlstm.bench import report as bench_report
from fastlstm.bench import runner as bench
from fastlstm.bench.cases import (
    CPU_SWEEP,
    DTYPES,
    GPU_SWEEP,
    KERNEL_TARGETS,
    MODES,
    TIMER_CPU,
    TIMER_QUICK,
    Case,
    Problem,
    TimerSettings,
    cases_for,
    estimate_seconds,
    full_problems,
    quick_problems,
    select,
)
from fastlstm.bench.providers import PROVIDERS, Provider, make_inputs, make_step
from fastlstm.bench.timing import summarize, sync_check, time_step

CPU = torch.device("cpu")
DEFAULT_PROVIDERS = ["fastlstm", "fastlstm-notelemetry", "fastlstm-streaming", "nn.LSTM"]
CPU_SKIPPED = {"fastlstm-streaming": "the streaming kernels run on CUDA only"}


# ---------------------------------------------------------------------------------------------------------- grid


def test_full_gpu_grid_covers_every_axis_of_the_issue():
    problems = full_problems("cuda")
    assert {p.hidden for p in problems} == set(GPU_SWEEP["hidden"]) == {128, 256, 512, 768, 1024, 2048}
    assert {p.batch for p in problems} == set(GPU_SWEEP["batch"]) == {1, 16, 64, 256}
    assert {p.seq for p in problems} == set(GPU_SWEEP["seq"]) == {128, 1024}
    assert {p.dtype for p in problems} == set(DTYPES)
    assert {p.layers for p in problems} == {1, 2}
    assert {p.variant for p in problems} == {"base", "layers2", "bidirectional", "proj", "packed"}
    # the whole hidden × batch × seq sweep runs in every dtype
    for dtype in DTYPES:
        base = {(p.hidden, p.batch, p.seq) for p in problems if p.dtype == dtype and p.variant == "base"}
        assert len(base) == 6 * 4 * 2
    # every packed problem has its padded twin in the grid, so "packed / padded" can be reported
    names = {p.name for p in problems}
    assert all(p.padded_twin().name in names for p in problems if p.packed)
    cases = cases_for(problems)
    assert len(cases) == 3 * len(problems)
    assert len({c.name for c in cases}) == len(cases)


def test_quick_gpu_selection_is_a_representative_subset_that_fits_five_minutes():
    quick, full = quick_problems("cuda"), set(full_problems("cuda"))
    assert set(quick) <= full
    assert {p.dtype for p in quick} == set(DTYPES)
    assert {p.variant for p in quick} >= {"base", "layers2", "bidirectional", "proj", "packed"}
    assert any(p.hidden == 2048 and p.batch == 1 for p in quick) and any(p.batch > 128 for p in quick)
    cases = cases_for(quick)
    assert len(cases) == 36
    # benchmarks/README.md: under 5 minutes while calls average up to ~150 ms, compiles and checks included
    assert estimate_seconds(cases, 3, TIMER_QUICK, "cuda", call_ms=150) < 300


def test_cpu_grid_is_tiny_and_its_quick_subset_comes_from_it():
    full = full_problems("cpu")
    assert max(p.hidden for p in full) <= max(CPU_SWEEP["hidden"]) <= 32
    assert set(quick_problems("cpu")) <= set(full)
    assert {p.dtype for p in full} <= {"fp32", "bf16"}  # tf32 is a CUDA setting


def test_select_by_keyword_dtype_and_mode():
    cases = cases_for(full_problems("cuda"))
    chosen = select(cases, keywords=["h768-b16-t1024"], dtypes=["fp16"], modes=["forward_backward"])
    assert [c.name for c in chosen] == ["h768-b16-t1024-fp16-fwdbwd"]
    either = [c for c in cases if c.problem.packed or c.problem.bidirectional]
    assert select(cases, keywords=["packed", "-bi-"]) == either


def test_problem_validation_and_names():
    with pytest.raises(ValueError):
        Problem(32, 4, 16, "fp64")
    with pytest.raises(ValueError):
        Problem(32, 4, 16, proj_size=32)
    with pytest.raises(ValueError):
        Case(Problem(32, 4, 16), "backward")
    p = Problem(256, 16, 1024, "bf16", layers=2, bidirectional=True, proj_size=64, packed=True)
    assert p.name == "h256-b16-t1024-l2-bi-proj64-packed-bf16"
    assert p.variant == "layers2+bidirectional+proj+packed"
    assert p.padded_twin().name == "h256-b16-t1024-l2-bi-proj64-bf16"


# ---------------------------------------------------------------------------------------------------- timing


def test_summarize_reports_median_of_repeats_and_their_spread():
    stats = summarize([[3.0, 1.0, 2.0], [10.0, 10.0], [5.0]])
    assert stats["repeat_medians_ms"] == [2.0, 10.0, 5.0]
    assert (stats["median_ms"], stats["min_ms"], stats["max_ms"]) == (5.0, 2.0, 10.0)
    assert stats["spread"] == pytest.approx((10 - 2) / 5)
    assert stats["q25_ms"] == pytest.approx(2.25) and stats["q75_ms"] == pytest.approx(8.75)  # pooled calls
    assert stats["iqr_ms"] == pytest.approx(6.5)
    assert stats["calls_per_repeat"] == [3, 2, 1]


def test_time_step_warms_up_then_runs_separate_repeats_with_rotating_indices():
    seen = []
    settings = TimerSettings(warmup_ms=0, rep_ms=0.001, repeats=4, min_iters=3, max_iters=3, budget_ms=1e9)
    stats = time_step(seen.append, CPU, settings)
    assert stats["calls_per_repeat"] == [3, 3, 3, 3]
    assert len(stats["repeat_medians_ms"]) == 4
    assert stats["min_ms"] <= stats["median_ms"] <= stats["max_ms"]
    # one untimed first call, one to estimate the call time, then the repeats, each with the next input index
    assert seen == list(range(2 + 4 * 3))


def test_slow_calls_shrink_repeats_to_the_budget_but_keep_every_repeat():
    settings = TimerSettings(warmup_ms=0, rep_ms=100, repeats=3, min_iters=3, max_iters=10, budget_ms=1)
    stats = time_step(lambda i: time.sleep(0.003), CPU, settings)  # each call >= 3 ms > budget / repeats
    assert stats["calls_per_repeat"] == [1, 1, 1]


def test_sync_check_is_skipped_off_cuda():
    result = sync_check(lambda i: None, CPU)
    assert result["status"] == "skipped" and "CUDA" in result["detail"]


def test_inputs_rotate_over_distinct_buffers_and_packed_inputs_are_their_own_leaves():
    inputs = make_inputs(Problem(8, 3, 5, packed=True), CPU, pool=4, requires_grad=True, seed=0)
    assert len(inputs) == 4
    assert not torch.equal(inputs.xs[0].data, inputs.xs[1].data)
    assert all(leaf.is_leaf and leaf.requires_grad for leaf in inputs.leaves)
    assert int(inputs.lengths.max()) == 5 and inputs.grad_outs[0].shape == (int(inputs.lengths.sum()), 8)


def test_training_step_changes_the_weights_and_forward_runs_in_eval_mode():
    problem = Problem(8, 2, 4)
    module = PROVIDERS["nn.LSTM"].build(problem, bench.make_weights(problem, 0), CPU)
    before = module.weight_hh_l0.detach().clone()
    make_step("train_step", module, make_inputs(problem, CPU, 2, True, 0))(0)
    assert not torch.equal(before, module.weight_hh_l0)
    forward = make_step("forward", module, make_inputs(problem, CPU, 2, False, 0))
    forward(1)
    assert not module.training and module.weight_hh_l0.grad is not None  # grads of the train step, untouched


# ------------------------------------------------------------------------------------------- correctness gate


def _scaled_hh_build(problem, weights, device):
    """A 'fast' LSTM that is wrong: its recurrent weights are 1% off."""
    module = PROVIDERS["nn.LSTM"].build(problem, weights, device)
    with torch.no_grad():
        module.weight_hh_l0.mul_(1.01)
    return module


def _raising_build(problem, weights, device):
    raise RuntimeError("kernel exploded")


def test_correctness_gate_rejects_a_wrong_implementation_and_never_times_it(monkeypatch):
    builds = []

    def counting_build(problem, weights, device):
        builds.append(problem.name)
        return _scaled_hh_build(problem, weights, device)

    monkeypatch.setitem(PROVIDERS, "wrong", Provider("wrong", "1% off", counting_build))
    monkeypatch.setitem(PROVIDERS, "raising", Provider("raising", "raises", _raising_build))
    timed = []
    real_time_step = bench.time_step
    monkeypatch.setattr(bench, "time_step", lambda *a, **k: timed.append(1) or real_time_step(*a, **k))
    cases = [Case(Problem(16, 4, 8), mode) for mode in MODES]
    doc = bench.run(cases, ["wrong", "raising", "nn.LSTM"], CPU, TIMER_CPU, log=lambda line: None)

    assert builds == ["h16-b4-t8-fp32"]  # built once, for the one check of the problem; never for timing
    assert len(timed) == len(cases)  # only nn.LSTM was timed, once per mode
    for case in doc["cases"]:
        wrong, raising, ok = (case["results"][n] for n in ("wrong", "raising", "nn.LSTM"))
        assert wrong["status"] == "failed" and "timing" not in wrong
        assert wrong["correctness"]["max_error"] > wrong["correctness"]["threshold"] == 1e-5
        assert raising["status"] == "error" and "kernel exploded" in raising["reason"]
        assert ok["status"] == "ok" and ok["correctness"]["passed"] and ok["timing"]["median_ms"] > 0
        assert case["derived"]["speedup"]["wrong"] is None
    assert doc["summary"]["status_counts"] == {"failed": 3, "error": 3, "ok": 3}
    text = bench_report.markdown(doc)
    assert "FAILED" in text and "## Not timed" in text


def test_a_providers_environment_surrounds_its_check_and_its_timing():
    entered = []

    class Recording:
        def __enter__(self):
            entered.append("enter")

        def __exit__(self, *exc):
            entered.append("exit")

    def build(problem, weights, device):
        assert entered and entered[-1] == "enter", "built outside the provider's environment"
        return PROVIDERS["nn.LSTM"].build(problem, weights, device)

    provider = Provider("recorded", "nn.LSTM inside a recorded context", build, environment=Recording)
    case = Case(Problem(8, 2, 4, "fp32"), "forward")
    result = bench.measure(case, provider, CPU, TIMER_CPU, seed=0, checks={})
    assert result["status"] == "ok"
    assert entered == ["enter", "exit", "enter", "exit"]  # the check, then the timing


def test_streaming_provider_pins_the_kernel_choice_and_restores_it():
    planning = pytest.importorskip("fastlstm.kernels.planning", reason="triton is not installed")
    before = planning.KERNELS
    with PROVIDERS["fastlstm-streaming"].environment():
        assert planning.KERNELS == "streaming"
    assert planning.KERNELS == before
    skipped = PROVIDERS["fastlstm-streaming"].unsupported(Problem(1024, 16, 8, "bf16", proj_size=256), CPU)
    assert skipped == CPU_SKIPPED["fastlstm-streaming"]


def test_every_default_provider_passes_the_gate_on_the_cpu():
    problem = Problem(16, 3, 6, "fp32", layers=2, bidirectional=True, proj_size=4, packed=True)
    for name in DEFAULT_PROVIDERS:
        check = bench.check_correctness(problem, PROVIDERS[name], CPU, seed=1)
        assert check["passed"], (name, check["worst"], check["max_error"])
        assert {"output", "h_n", "c_n", "grad_input", "grad_weight_hr_l1_reverse", "output_inference"} <= set(
            check["errors"]
        )


# ------------------------------------------------------------------------------------------------- derivations


def _record(ms):
    return {"status": "ok", "timing": {"median_ms": ms, "spread": 0.0}} if ms else {"status": "failed"}


def test_speedup_and_telemetry_overhead():
    case = {"results": {"fastlstm": _record(2.0), "fastlstm-notelemetry": _record(1.6), "nn.LSTM": _record(4.0)}}
    derived = bench_report.derive(case)
    assert derived["speedup"] == {"fastlstm": 2.0, "fastlstm-notelemetry": 2.5}
    assert derived["telemetry_overhead"] == pytest.approx(1.25)
    case["results"]["nn.LSTM"] = _record(None)
    assert bench_report.derive(case)["speedup"]["fastlstm"] is None


def test_json_output_is_strict_even_with_infinite_errors(tmp_path):
    path = bench_report.write_json({"error": math.inf, "nested": [math.nan, 1.0]}, str(tmp_path / "r.json"))
    with open(path) as f:
        assert json.loads(f.read()) == {"error": "inf", "nested": ["nan", 1.0]}


# ------------------------------------------------------------------------------------------- the command line


def test_bench_command_writes_json_markdown_and_plots(tmp_path, capsys):
    had_kernels = "fastlstm.kernels.launch" in sys.modules
    threads = torch.get_num_threads()
    argv = ["--device", "cpu", "--quick", "--out", str(tmp_path), "--modes", "train_step"]
    argv += ["-k", "t8-fp32", "-k", "t32-fp32", "-k", "packed"]  # the 2 × 2 hidden × batch sweep at two lengths
    assert bench.main(argv) == 0

    doc = json.loads((tmp_path / "results.json").read_text())
    env = doc["environment"]
    for key in ("date", "python", "torch", "triton", "cuda", "cudnn", "gpu", "driver", "torch_threads"):
        assert key in env
    assert env["device"] == "cpu" and env["torch_threads"] == 1  # CPU runs use one thread...
    assert torch.get_num_threads() == threads  # ...and give the setting back
    assert doc["settings"]["thresholds"] == {"fp32": 1e-5, "tf32": 1e-3, "bf16": 2e-2, "fp16": 2e-2}
    names = [c["name"] for c in doc["cases"]]
    assert "h32-b4-t32-packed-fp32-train" in names and "h16-b1-t8-fp32-train" in names
    for case in doc["cases"]:
        assert set(case["results"]) == set(DEFAULT_PROVIDERS)
        assert {"hidden", "batch", "seq", "layers", "bidirectional", "proj_size", "packed", "dtype"} <= set(
            case["problem"]
        )
        for name, r in case["results"].items():
            if name in CPU_SKIPPED:
                assert r == {"status": "skipped", "reason": CPU_SKIPPED[name]}
                continue
            assert r["status"] == "ok" and r["correctness"]["passed"]
            assert r["timing"]["min_ms"] <= r["timing"]["median_ms"] <= r["timing"]["max_ms"]
            assert len(r["timing"]["repeat_medians_ms"]) == TIMER_CPU.repeats
            assert r["sync_check"]["status"] == "skipped"
        assert case["derived"]["telemetry_overhead"] is not None
    assert doc["summary"]["packed_vs_padded"][0]["padded"] == "h32-b4-t32-fp32-train"

    text = (tmp_path / "results.md").read_text()
    assert "| case | nn.LSTM ms | fastlstm ms | speedup |" in text and "CPU smoke run" in text
    assert "## Packed (mixed lengths) / padded" in text
    assert "results.md" in capsys.readouterr().out
    if _has_matplotlib():
        assert (tmp_path / "speedup_heatmap.png").stat().st_size > 0
        assert (tmp_path / "time_per_step.png").stat().st_size > 0
    if not had_kernels:
        assert "fastlstm.kernels.launch" not in sys.modules  # the CPU path never touches the Triton kernels


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_list_prints_cases_and_estimate_without_a_device(capsys):
    assert bench.main(["--list", "--quick", "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "h768-b16-t1024-fp16-fwdbwd" in out and "36 cases × 4 providers on cuda" in out


def test_kernel_targets_are_the_acceptance_grid(capsys):
    assert bench.main(["--list", "--kernel-targets", "--modes", "forward_backward", "--device", "cuda"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("h")]
    assert listed == [f"h{h}-b{b}-t1024-bf16-fwdbwd" for h in (512, 768, 1024) for b in (1, 16, 64)]
    assert set(KERNEL_TARGETS) <= set(full_problems("cuda"))


def test_bad_selections_are_usage_errors(capsys):
    assert bench.main(["--list", "--dtypes", "fp64"]) == bench.EXIT_USAGE
    assert bench.main(["--list", "-k", "no-such-case"]) == bench.EXIT_USAGE
    assert bench.main(["--list", "--providers", "nope"]) == bench.EXIT_USAGE
    assert "unknown providers" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_requested_without_cuda(tmp_path, capsys):
    assert bench.main(["--device", "cuda", "--quick", "--out", str(tmp_path)]) == bench.EXIT_USAGE
    assert "no CUDA device" in capsys.readouterr().err


def test_failures_make_the_command_fail(tmp_path, monkeypatch):
    monkeypatch.setitem(PROVIDERS, "wrong", Provider("wrong", "1% off", _scaled_hh_build))
    argv = ["--device", "cpu", "--quick", "--out", str(tmp_path), "--no-plots", "-k", "h16-b1-t8-fp32-fwd"]
    assert bench.main(argv + ["--providers", "wrong,nn.LSTM"]) == bench.EXIT_FAILURES
    assert not list(tmp_path.glob("*.png"))
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["cases"][0]["results"]["wrong"]["status"] == "failed"


def test_fastlstm_provider_runs_the_reference_backend_on_the_cpu():
    problem = Problem(8, 2, 4)
    module = PROVIDERS["fastlstm"].build(problem, bench.make_weights(problem, 0), CPU)
    assert module.backend == "reference" and module.telemetry.enabled
    assert not PROVIDERS["fastlstm-notelemetry"].build(problem, bench.make_weights(problem, 0), CPU).telemetry.enabled


# ------------------------------------------------------------------------------------ fastlstm bench --gpu-check


def _fake_worker(tmp_path, hang_on: str = "", sleep_s: float = 0.0) -> list:
    """A stand-in for the gpu-check worker process that speaks its protocol without torch: it hangs on cases whose
    name starts with `hang_on` and takes `sleep_s` per case otherwise."""
    script = tmp_path / "fake_worker.py"
    script.write_text(
        "import json, sys, time\n"
        "cases = json.load(open(sys.argv[1]))\n"
        "for c in cases:\n"
        "    name = f\"h{c['hidden']}-b{c['batch']}-t{c['seq']}-{c['dtype']}\"\n"
        "    print(json.dumps({'event': 'start', 'case': name}), flush=True)\n"
        f"    if {hang_on!r} and name.startswith({hang_on!r}):\n"
        "        time.sleep(600)\n"
        f"    time.sleep({sleep_s})\n"
        "    result = {'status': 'ok', 'timing': {'forward': {}, 'forward_backward': {}}, 'correctness': {}}\n"
        "    print(json.dumps({'event': 'result', 'case': name, 'result': result}), flush=True)\n"
    )
    return [sys.executable, str(script)]


GPU_CHECK_TINY = [Problem(16, 1, 8, "fp32"), Problem(32, 4, 8, "bf16"), Problem(32, 1, 8, "fp32")]


def test_gpu_check_grid_is_the_performance_models_shapes():
    from fastlstm.bench.gpu_plan import check_problems
    from fastlstm.kernels.model import model_shapes

    problems = check_problems("cuda")
    assert {p.name for p in problems} == {s.key for s in model_shapes()}
    bf16 = {(p.hidden, p.batch) for p in problems if p.dtype == "bf16"}
    assert bf16 == {(h, b) for h in (256, 512, 768, 1024) for b in (1, 16, 64)}
    assert {p.seq for p in problems} == {1024}
    assert sum(p.dtype == "fp32" for p in problems) == 2


def test_gpu_check_on_the_cpu_gates_times_and_puts_the_model_beside_each_measurement(tmp_path):
    from fastlstm.bench import gpu_check, gpu_plan, gpu_worker

    problem = GPU_CHECK_TINY[0]
    modelled = {"forward_ms": 1.5, "forward_backward_ms": 4.5, "forward_us_per_step": 187.5}
    model = {
        "schema": "fastlstm.model/1",
        "triton": "3.6.0",
        "cases": {problem.name: {"modelled": modelled, "measured": None}},
    }
    model_path = tmp_path / "model.json"
    model_path.write_text(json.dumps(model))
    out = tmp_path / "check"
    tests = [sys.executable, "-c", "print('3 passed')"]
    doc = gpu_check.gpu_check(
        str(out),
        "cpu",
        budget_s=120,
        case_timeout_s=100,
        tests_command=tests,
        problems=[problem],
        model_path=str(model_path),
    )
    case = doc["cases"][problem.name]
    assert case["status"] == "ok", case
    assert case["modelled"] == modelled
    assert all(case["correctness"][p]["passed"] for p in gpu_plan.PROVIDERS)
    for mode in gpu_plan.MODES:
        for provider in gpu_plan.PROVIDERS:
            t = case["timing"][mode][provider]
            assert t["median_ms"] > 0 and 1 <= t["samples"] <= gpu_worker.REPEATS
            assert t["us_per_step"] == pytest.approx(t["median_ms"] * 1000 / problem.seq)
    assert doc["tests"]["status"] == "passed" and "3 passed" in doc["tests"]["tail"]
    written = json.loads((out / "gpu-check.json").read_text())
    assert written["cases"][problem.name]["status"] == "ok" and written["environment"]["device"] == "cpu"
    merged = json.loads((out / "model-with-measurements.json").read_text())
    measured = merged["cases"][problem.name]["measured"]
    assert measured["forward"]["fastlstm"]["median_ms"] == case["timing"]["forward"]["fastlstm"]["median_ms"]
    assert problem.name in (out / "gpu-check.md").read_text()


@pytest.mark.parametrize("name, records", [("fastlstm", True), ("fastlstm-notelemetry", False)])
def test_a_telemetry_provider_records_in_every_mode(name, records):
    from fastlstm.bench.cases import MODES, Problem
    from fastlstm.bench.providers import PROVIDERS, make_inputs, make_step, make_weights, problem_seed

    problem = Problem(8, 2, 4, "fp32")
    seed = problem_seed(problem, 0)
    for mode in MODES:
        module = PROVIDERS[name].build(problem, make_weights(problem, seed), torch.device("cpu"))
        step = make_step(mode, module, make_inputs(problem, "cpu", 2, mode != "forward", seed + 1))
        for call in range(2):
            step(call)
        recorded = module.telemetry.passes is not None and int(module.telemetry.passes) == 2
        assert recorded == records, mode  # the forward mode runs under no_grad, and records all the same


def test_gpu_check_worker_reports_each_case_as_a_start_and_a_result_line(tmp_path, capsys):
    """The worker's protocol, in this process, through the command line it had inside gpu_check (`--worker`)."""
    from fastlstm.bench import gpu_check, gpu_plan

    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps([vars(p) for p in GPU_CHECK_TINY[:2]]))
    assert gpu_check.main(["--worker", str(cases), "--device", "cpu", "--providers", "nn.LSTM"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    names = [p.name for p in GPU_CHECK_TINY[:2]]
    assert [(e["event"], e["case"]) for e in events] == [(kind, n) for n in names for kind in ("start", "result")]
    for event in events[1::2]:
        result = event["result"]
        assert result["status"] == "ok", result
        assert set(result["correctness"]) == {"nn.LSTM"}
        assert all(result["timing"][mode]["nn.LSTM"]["median_ms"] > 0 for mode in gpu_plan.MODES)


def test_gpu_check_worker_exits_after_a_case_that_left_the_device_unusable(tmp_path, capsys, monkeypatch):
    # On CUDA a device-side assert fails every later call of the process: the rest must run in a fresh worker.
    from fastlstm.bench import gpu_check, gpu_worker

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(gpu_worker, "measure_problem", broken)
    monkeypatch.setattr(gpu_worker, "device_usable", lambda device: False)
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps([vars(p) for p in GPU_CHECK_TINY[:2]]))
    code = gpu_check.main(["--worker", str(cases), "--device", "cpu", "--providers", "nn.LSTM"])
    assert code == gpu_worker.EXIT_DEVICE_LOST
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    first = GPU_CHECK_TINY[0].name
    assert [(e["event"], e["case"]) for e in events] == [("start", first), ("result", first)]
    assert events[1]["result"]["status"] == "error" and "fresh" in events[1]["result"]["reason"]


def test_gpu_check_kills_a_hung_case_and_carries_on_in_a_fresh_worker(tmp_path):
    from fastlstm.bench import gpu_check

    worker = _fake_worker(tmp_path, hang_on="h16")
    start = time.monotonic()
    doc = gpu_check.gpu_check(
        str(tmp_path),
        "cpu",
        budget_s=60,
        case_timeout_s=1.0,
        skip_tests=True,
        worker_command=worker,
        problems=GPU_CHECK_TINY,
        model_path=str(tmp_path / "none"),
    )
    assert time.monotonic() - start < 30
    statuses = {name: c["status"] for name, c in doc["cases"].items()}
    assert statuses == {"h16-b1-t8-fp32": "timeout", "h32-b4-t8-bf16": "ok", "h32-b1-t8-fp32": "ok"}
    on_disk = json.loads((tmp_path / "gpu-check.json").read_text())
    assert {n: c["status"] for n, c in on_disk["cases"].items()} == statuses


def test_gpu_check_budget_skips_what_is_left_and_says_so(tmp_path):
    from fastlstm.bench import gpu_check

    worker = _fake_worker(tmp_path, sleep_s=1.0)
    slow_tests = [sys.executable, "-c", "import time; time.sleep(30)"]
    doc = gpu_check.gpu_check(
        str(tmp_path),
        "cpu",
        budget_s=2.5,
        case_timeout_s=20,
        tests_timeout_s=0.5,
        tests_command=slow_tests,
        worker_command=worker,
        problems=GPU_CHECK_TINY,
        model_path=str(tmp_path / "none"),
    )
    assert doc["tests"]["status"] == "timeout"
    statuses = [c["status"] for c in doc["cases"].values()]
    assert "ok" in statuses and "skipped" in statuses
    assert all(s in ("ok", "skipped") for s in statuses)
    assert any("budget" in note for note in doc["notes"]) or any(
        c.get("reason") == "time budget spent" for c in doc["cases"].values()
    )


def test_gpu_check_is_reached_through_fastlstm_bench(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--gpu-check", "--help"])
    assert exit_info.value.code == 0
    assert "--budget-s" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["--device", "cpu", "-k", "h16-b1-t8-fp32", "--out", "FILE"],
        ["--device", "cpu", "--out", "FILE/below"],
        ["--gpu-check", "--device", "cpu", "--out", "FILE"],
    ],
    ids=["bench-out-a-file", "bench-out-below-a-file", "gpu-check-out-a-file"],
)
def test_an_output_folder_that_is_a_file_is_refused_before_anything_runs(tmp_path, capsys, argv):
    path = tmp_path / "results"
    path.write_text("")
    argv = [a.replace("FILE", str(path)) for a in argv]
    assert bench.main(argv) == bench.EXIT_USAGE
    assert "is a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv", [["--repeats", "0"], ["--gpu-check", "--budget-s", "-5"], ["--gpu-check", "--case-timeout-s", "0"]]
)
def test_counts_and_time_limits_that_are_not_positive_are_refused(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2 and "must be" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="refuses only where there is no CUDA device")
def test_gpu_check_without_a_gpu_says_so_instead_of_passing_on_the_cpu(tmp_path, capsys):
    assert bench.main(["--gpu-check", "--out", str(tmp_path / "out")]) == 2
    assert "no CUDA device" in capsys.readouterr().err and not (tmp_path / "out").exists()
