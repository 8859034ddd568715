"""pytest-benchmark cases: fastlstm (telemetry on and off) and nn.LSTM, forward / forward+backward / training step.

    python -m pytest benchmarks/                          # CPU: tiny cases, each run once (CI)
    python -m pytest benchmarks/ --benchmark-only         # on a GPU: the --quick grid of `fastlstm bench`, and
                                                          # the kernels' targets against nn.LSTM

Every case first passes the same correctness gate as the runner (float64 nn.LSTM, the budgets of fastlstm/testing.py)
and is not
benchmarked otherwise; nothing here asserts on a time. GPU cases skip without CUDA; on the CPU fastlstm runs its
reference backend (the kernels would need TRITON_INTERPRET=1, far too slow to benchmark).
"""

from __future__ import annotations

import pytest
import torch

from fastlstm.bench import problem_seed
from fastlstm.bench.cases import KERNEL_TARGETS, MODES, Case, Problem, quick_problems
from fastlstm.bench.providers import POOL, PROVIDERS, check_correctness, make_inputs, make_step, make_weights, precision
from fastlstm.bench.timing import sync_check

PROVIDER_NAMES = ("fastlstm", "fastlstm-notelemetry", "nn.LSTM")
CPU_PROBLEMS = (
    Problem(32, 4, 16, "fp32"),
    Problem(32, 4, 16, "fp32", packed=True),
    Problem(16, 2, 8, "bf16", layers=2, bidirectional=True, proj_size=8),
)
GPU_PROBLEMS = tuple(quick_problems("cuda"))
TARGET_PROVIDERS = ("fastlstm", "fastlstm-streaming", "nn.LSTM")
# nn.LSTM's own note that oneDNN has no projection path on the CPU: expected, not a problem of this suite.
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
NEEDS_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _params():
    for device, problems, marks in (("cpu", CPU_PROBLEMS, []), ("cuda", GPU_PROBLEMS, NEEDS_CUDA)):
        for problem in problems:
            for mode in MODES:
                case = Case(problem, mode)
                for provider in PROVIDER_NAMES:
                    yield pytest.param(case, provider, device, marks=marks, id=f"{device}-{case.name}-{provider}")
    for problem in KERNEL_TARGETS:
        case = Case(problem, "forward_backward")
        for provider in TARGET_PROVIDERS:
            yield pytest.param(case, provider, "cuda", marks=NEEDS_CUDA, id=f"cuda-{case.name}-{provider}")


@pytest.mark.parametrize("case, provider, device", list(_params()))
def test_lstm(benchmark, run_benchmark, case, provider, device):
    device = torch.device(device)
    problem, seed = case.problem, problem_seed(case.problem, 0)
    reason = PROVIDERS[provider].unsupported(problem, device)
    if reason:
        pytest.skip(reason)
    with PROVIDERS[provider].environment():
        _check_and_time(benchmark, run_benchmark, case, provider, device, seed)


def _check_and_time(benchmark, run_benchmark, case, provider, device, seed):
    problem = case.problem
    check = check_correctness(problem, PROVIDERS[provider], device, seed)
    assert check["passed"], f"{provider} is wrong on {problem.name}: {check['worst']} error {check['max_error']:.2e}"

    benchmark.group = case.name
    benchmark.extra_info.update(problem.to_dict(), mode=case.mode, provider=provider, max_error=check["max_error"])
    with precision(problem.dtype):
        module = PROVIDERS[provider].build(problem, make_weights(problem, seed), device)
        inputs = make_inputs(problem, device, POOL, requires_grad=case.mode != "forward", seed=seed + 1)
        step = make_step(case.mode, module, inputs)
        run_benchmark(benchmark, step, device)
        if case.mode == "train_step":  # recorded, not asserted: tests/test_gpu.py holds fastlstm to zero syncs
            benchmark.extra_info["sync_check"] = sync_check(step, device)["status"]
