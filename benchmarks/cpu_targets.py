"""fastlstm against nn.LSTM on the CPU, at the shapes of the CPU targets (benchmarks/README.md).

    python benchmarks/cpu_targets.py [--threads 2] [--rounds 9] [--calls 3] [--json out.json]

The CPU is where many LSTM users train. Under `backend="auto"` a pass there that records telemetry runs, at these
float32 shapes, the reference backend with its compiled step (fastlstm/fused_step.py; native-recorded,
fastlstm/native_recorded.py, on a machine without a C compiler) and a pass that records none runs PyTorch's own
LSTM op, which is nn.LSTM. Five modules are compared, each first passing the
float64 correctness gate of `fastlstm bench` (fastlstm/bench/providers.py):

  nn.LSTM             torch.nn.LSTM
  auto                fastlstm.LSTM(backend="auto"), telemetry on: see above
  auto-off            fastlstm.LSTM(backend="auto", telemetry=False): PyTorch's op through fastlstm's module
  reference           fastlstm.LSTM(backend="reference"), telemetry on: the step loop
  reference-off       fastlstm.LSTM(backend="reference", telemetry=False)

Modes as in `fastlstm bench`: `forward` (eval, no_grad) and `forward_backward`. Inference records nothing by
default (and under "auto" then runs PyTorch's op), so in `forward` the telemetry-on modules are given
`telemetry.record_inference = True`: their figure is the cost of a forward that does record.

Built for a shared machine: the modules are interleaved (every round times every module of every case, in an order
rotated from round to round, `--calls` calls each), so that a change of load meets all of them alike; the figure
for each is the median over rounds of the round's median call. The load average is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from fastlstm.bench import cpu_threads, problem_seed
from fastlstm.bench.cases import Problem
from fastlstm.bench.providers import (
    BASELINE,
    POOL,
    PROVIDERS,
    Provider,
    check_correctness,
    make_inputs,
    make_step,
    make_weights,
)

# (input size, hidden size, layers, batch, steps): the shapes of the issue that set the CPU targets.
SHAPES = ((32, 128, 1, 32, 100), (64, 256, 2, 16, 200), (8, 64, 1, 64, 500), (128, 512, 1, 8, 100))


def _fastlstm(backend: str, telemetry: bool):
    def build(problem, weights, device):
        import fastlstm

        module = fastlstm.LSTM(
            problem.inputs, problem.hidden, problem.layers, device=device, backend=backend, telemetry=telemetry
        )
        module.load_state_dict(weights)
        module.telemetry.record_inference = telemetry  # the forward that is timed records, and the gate checks it
        return module

    return build


MODULES = {
    "nn.LSTM": PROVIDERS[BASELINE],
    "auto": Provider("auto", "fastlstm.LSTM(backend='auto')", _fastlstm("auto", True)),
    "auto-off": Provider("auto-off", "fastlstm.LSTM(backend='auto', telemetry=False)", _fastlstm("auto", False)),
    "reference": Provider("reference", "fastlstm.LSTM(backend='reference')", _fastlstm("reference", True)),
    "reference-off": Provider(
        "reference-off", "fastlstm.LSTM(backend='reference', telemetry=False)", _fastlstm("reference", False)
    ),
}
PROVIDER_NAMES = tuple(MODULES)
MODES = ("forward", "forward_backward")
DEVICE = torch.device("cpu")


def problems() -> list:
    return [Problem(h, b, t, "fp32", layers=layers, input_size=i) for i, h, layers, b, t in SHAPES]


def prepare(problem: Problem) -> dict:
    """{(mode, provider): step} for one problem, after every provider passed its correctness gate."""
    seed = problem_seed(problem, 0)
    steps = {}
    for name, provider in MODULES.items():
        check = check_correctness(problem, provider, DEVICE, seed)
        if not check["passed"]:
            raise SystemExit(
                f"{name} fails its correctness gate on {problem.name}: {check['worst']} {check['max_error']}"
            )
        for mode in MODES:
            module = provider.build(problem, make_weights(problem, seed), DEVICE)
            inputs = make_inputs(problem, DEVICE, POOL, requires_grad=mode != "forward", seed=seed + 1)
            steps[mode, name] = make_step(mode, module, inputs)
    return steps


def measure(rounds: int, calls: int, log=print) -> dict:
    """{(problem name, mode, provider): [round medians in ms]}."""
    prepared = {p.name: prepare(p) for p in problems()}
    times: dict = {}
    keys = [(p, mode, name) for p in prepared for mode in MODES for name in PROVIDER_NAMES]
    for step in prepared.values():  # one untimed call each: first-call allocations and caches
        for fn in step.values():
            fn(0)
    for r in range(rounds):
        shift = r % len(PROVIDER_NAMES)
        for p in prepared:
            for mode in MODES:
                order = PROVIDER_NAMES[shift:] + PROVIDER_NAMES[:shift]
                for name in order:
                    fn = prepared[p][mode, name]
                    samples = []
                    for i in range(calls):
                        start = time.perf_counter()
                        fn(i)
                        samples.append((time.perf_counter() - start) * 1000)
                    times.setdefault((p, mode, name), []).append(statistics.median(samples))
        log(f"round {r + 1}/{rounds} done, load average {os.getloadavg()[0]:.2f}")
    return {key: times[key] for key in keys}


def table(times: dict) -> str:
    """Medians in ms and the ratios the targets name. "off" is what a pass recording nothing costs under auto: nn.LSTM's
    own op, so auto's on/off is on / nn.LSTM; the reference's own on/off is given beside it. Spread: (max − min) /
    median over the rounds, of auto with telemetry on."""
    header = (
        "| input, hidden, layers, batch, steps | mode | nn.LSTM ms | auto ms | auto-off ms | reference ms "
        "| reference-off ms | auto / nn.LSTM | auto / auto-off | reference / nn.LSTM | reference / reference-off "
        "| spread auto |"
    )
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (i, h, layers, b, t), problem in zip(SHAPES, problems()):
        for mode in MODES:
            rounds = {name: times[problem.name, mode, name] for name in PROVIDER_NAMES}
            m = {name: statistics.median(v) for name, v in rounds.items()}
            spread = (max(rounds["auto"]) - min(rounds["auto"])) / m["auto"]
            lines.append(
                f"| {i}, {h}, {layers}, {b}, {t} | {mode} | {m['nn.LSTM']:.2f} | {m['auto']:.2f} | "
                f"{m['auto-off']:.2f} | {m['reference']:.2f} | {m['reference-off']:.2f} | "
                f"{m['auto'] / m['nn.LSTM']:.2f}× | {m['auto'] / m['auto-off']:.2f}× | "
                f"{m['reference'] / m['nn.LSTM']:.2f}× | "
                f"{m['reference'] / m['reference-off']:.2f}× | {100 * spread:.0f}% |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=3, help="calls per provider and round")
    parser.add_argument("--json", default=None, help="also write the round medians here")
    parser.add_argument("--table", default=None, help="only print the table of round medians written by --json")
    args = parser.parse_args()
    if args.table:
        with open(args.table) as f:
            print(table({tuple(k.split("|")): v for k, v in json.load(f).items()}))
        return
    before = os.getloadavg()
    with cpu_threads(args.threads):
        times = measure(args.rounds, args.calls)
    after = os.getloadavg()
    print(
        f"\ntorch {torch.__version__}, {args.threads} threads, {args.rounds} rounds × {args.calls} calls; "
        f"load average (1, 5, 15 min) before {before[0]:.2f} {before[1]:.2f} {before[2]:.2f}, "
        f"after {after[0]:.2f} {after[1]:.2f} {after[2]:.2f}\n"
    )
    print(table(times))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"|".join(k): v for k, v in times.items()}, f, indent=1)


if __name__ == "__main__":
    main()
