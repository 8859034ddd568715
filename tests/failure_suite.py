"""Failure reproductions for the doctor: small fastlstm.LSTMs trained into each failure on purpose, plus healthy
controls, each recorded into a History dict (docs/history.md) and diagnosed.

Used by tests/test_doctor.py, and runnable on its own to print the precision/recall tables of docs/doctor.md:

    python tests/failure_suite.py 0 1 2                    # every scenario, seeds 0-2
    python tests/failure_suite.py --group real 40 41       # one group (synthetic, loops, lm, real)
    python tests/failure_suite.py --held-out 40 41 42      # only the held-out datasets
    python tests/failure_suite.py --compare-sampled 4 0    # findings of sampled histories against full ones

Every scenario is a real training run on the CPU (reference backend, a few seconds each); nothing is synthesised
into the history. `expected` are the codes the run must produce; `allowed` are other warning/error codes that the
run genuinely exhibits as a consequence of the same fault (e.g. a NaN loss also stalls the loss curve), which are
neither required nor counted as false positives; `lead` are the codes the report may lead with (its first root
cause at warning or error level), by default the expected ones. Scenarios beyond this module's synthetic ones live
in doctor_loops.py (the user's own loops), doctor_lm.py (word-language-model runs) and doctor_real.py (real
datasets, some held out), collected by `all_scenarios()`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from support import Forecaster, one_cpu_thread
from torch import nn

import fastlstm
import fastlstm.init as finit
from fastlstm import doctor

HIDDEN = 24

# How every scenario records (scenario modules build their LSTMs, Monitors and trainers through the helpers below):
# telemetry on every step on the reference backend, as the doctor's tables in docs/doctor.md were measured; or, in
# `sampled(n)`, telemetry on one step in n, with backend "auto" so that the other steps run PyTorch's own LSTM op.
RECORDING = {"instrument_every": 1}


def lstm_backend() -> str:
    return "reference" if RECORDING["instrument_every"] == 1 else "auto"


def make_monitor(model, **kwargs) -> fastlstm.Monitor:
    return fastlstm.Monitor(model, instrument_every=RECORDING["instrument_every"], **kwargs)


def make_trainer(model, optimizer, loss_fn, **kwargs) -> fastlstm.TBPTTTrainer:
    return fastlstm.TBPTTTrainer(model, optimizer, loss_fn, instrument_every=RECORDING["instrument_every"], **kwargs)


@contextlib.contextmanager
def sampled(instrument_every: int):
    """Record the scenarios run inside with telemetry on one step in `instrument_every`."""
    before = dict(RECORDING)
    RECORDING["instrument_every"] = int(instrument_every)
    try:
        yield
    finally:
        RECORDING.update(before)


# ---------------------------------------------------------------------------------------------------------------
# Tasks: batches of (x [B, T, F], y [B, T, O] or [B, O]).
# ---------------------------------------------------------------------------------------------------------------


def sines(gen: torch.Generator, batch: int, steps: int, features: int = 3, noise: float = 0.05, freq=(0.15, 0.6)):
    """Standardised multi-sine series with random frequencies and phases; y is feature 0 one step ahead."""
    t = torch.arange(steps + 1, dtype=torch.float32)
    f = torch.empty(batch, 1, features).uniform_(*freq, generator=gen)
    phase = torch.empty(batch, 1, features).uniform_(0, 2 * math.pi, generator=gen)
    series = torch.sin(t[None, :, None] * f + phase) * math.sqrt(2.0)
    series = series + noise * torch.randn(series.shape, generator=gen)
    return series[:, :-1], series[:, 1:, :1]


def lag_recall(gen, batch: int, steps: int, lag: int, features: int = 2):
    """y_t = x_{t-lag} (feature 0), zero before the lag: needs memory of exactly `lag` steps."""
    x = torch.randn(batch, steps, features, generator=gen)
    y = torch.zeros(batch, steps, 1)
    y[:, lag:, 0] = x[:, :-lag, 0]
    return x, y


def remember_first(gen, batch: int, steps: int):
    """Only the last output counts and it must recall the first input: a dependency spanning the whole sequence."""
    x = torch.randn(batch, steps, 1, generator=gen)
    return x, x[:, 0, :].clone()


class Net(Forecaster):
    """The scenarios' model: the shared Forecaster at the suite's size, on the backend the recording mode needs."""

    def __init__(self, features: int, outputs: int = 1, hidden: int = HIDDEN, layers: int = 1):
        super().__init__(features, outputs, hidden, layers, backend=lstm_backend())


# ---------------------------------------------------------------------------------------------------------------
# The training loop every scenario shares.
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    """What differs between scenarios. `batch(gen)` yields training (x, y); `val(gen)` validation data as a dict
    name -> (x, y) (one entry, or several named subsets)."""

    batch: Callable
    val: Callable
    features: int
    steps: int = 120
    lr: float = 1e-2
    optimizer: str = "adam"
    layers: int = 1
    hidden: int = HIDDEN
    last_only: bool = False  # loss on the last output only (sequence regression)
    eval_every: int = 10
    prepare: Callable | None = None  # called with the model before training (initialisation faults)
    loss_fn: Callable | None = None  # (prediction, target) -> loss; MSE by default
    corrupt: Callable | None = None  # (step, x, y) -> (x, y), to inject bad data
    truncation: tuple | None = None  # (k1, k2, stream length, epochs): train with fastlstm.TBPTTTrainer instead
    residual_probe: bool = True  # the trainer's residual-correlation probe (off: gradient telemetry only)


OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
    # Adam without momentum (RMSprop with bias correction): nothing averages the noisy steps of a too-high rate.
    "adam_no_momentum": lambda params, lr: torch.optim.Adam(params, lr=lr, betas=(0.0, 0.99)),
}


def _mse(pred, y):
    return (pred - y).pow(2).mean()


def single_threaded(fn: Callable) -> Callable:
    """fn run on one CPU thread: tiny models are faster that way, and immune to OpenMP stalls on a busy machine."""

    def wrapped(*args, **kwargs):
        with one_cpu_thread():
            return fn(*args, **kwargs)

    return wrapped


def train(setup: Setup, seed: int) -> dict:
    """Train as the scenario says and return the History dict the fastlstm.Monitor recorded."""
    return single_threaded(_train)(setup, seed)


def _train(setup: Setup, seed: int) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = Net(setup.features, hidden=setup.hidden, layers=setup.layers)
    if setup.prepare is not None:
        setup.prepare(model)
    opt = OPTIMIZERS[setup.optimizer](model.parameters(), lr=setup.lr)
    if setup.truncation:
        return _train_tbptt(setup, model, opt, gen)
    loss_fn = setup.loss_fn or _mse
    recorder = make_monitor(model, optimizer=opt, every=5)
    val_sets = setup.val(torch.Generator().manual_seed(seed + 1))
    for step in range(setup.steps):
        x, y = setup.batch(gen)
        if setup.corrupt is not None:
            x, y = setup.corrupt(step, x, y)
        model.train()
        pred, _ = model(x)
        loss = loss_fn(pred[:, -1] if setup.last_only else pred, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        recorder.step(loss=loss.detach(), targets=y)
        if (step + 1) % setup.eval_every == 0:
            total, subsets = _validate(model, val_sets, setup.last_only, loss_fn)
            recorder.evaluate(total, subset_losses=subsets, epoch=(step + 1) // setup.eval_every)
    return recorder.history.to_dict()


def _train_tbptt(setup: Setup, model, opt, gen) -> dict:
    k1, k2, length, epochs = setup.truncation
    x, y = setup.batch(gen, length)
    xv, yv = setup.val(gen)["all"]
    trainer = make_trainer(
        model,
        opt,
        setup.loss_fn or nn.MSELoss(),
        k1=k1,
        k2=k2,
        telemetry_every=5,
        read_every=10,
        validate_every=setup.eval_every,
        dependency_lags=None if setup.residual_probe else 0,
    )
    return trainer.fit((x, y), epochs=epochs, val_data=(xv, yv)).to_dict()


@torch.no_grad()
def _validate(model, val_sets: dict, last_only: bool, loss_fn) -> tuple:
    """Validation with telemetry off: those forwards are not training and must not enter the windows."""
    model.eval()
    model.lstm.telemetry.enabled = False
    try:
        losses = {}
        for name, (x, y) in val_sets.items():
            pred, _ = model(x)
            losses[name] = float(loss_fn(pred[:, -1] if last_only else pred, y))
    finally:
        model.lstm.telemetry.enabled = True
    total = float(np.mean(list(losses.values())))
    return total, (losses if len(losses) > 1 else None)


# ---------------------------------------------------------------------------------------------------------------
# Scenarios.
# ---------------------------------------------------------------------------------------------------------------


def _val(fn, **kw):
    return lambda gen: {"all": fn(gen, **kw)}


def _sine_setup(**overrides) -> Setup:
    base = {
        "batch": lambda g: sines(g, 16, 32),
        "val": _val(sines, batch=64, steps=32),
        "features": 3,
    }
    base.update(overrides)
    return Setup(**base)


def _scale_features(factors):
    factors = torch.tensor(factors, dtype=torch.float32)

    def batch(gen):
        x, y = sines(gen, 16, 32)
        return x * factors + factors / 2, y  # large and offset, as raw measurements often are

    def val(gen):
        x, y = sines(gen, 64, 32)
        return {"all": (x * factors + factors / 2, y)}

    return batch, val


def _scaled_weights(name_prefix, factor):
    def prepare(model):
        with torch.no_grad():
            for name, p in model.lstm.named_parameters():
                if name.startswith(name_prefix):
                    p.mul_(factor)

    return prepare


def _nan_at(step_index):
    def corrupt(step, x, y):
        if step == step_index:
            x = x.clone()
            x[3, 7, 1] = float("nan")  # one bad sensor reading
        return x, y

    return corrupt


def _missing_targets_as_nan(step, x, y):
    y = y.clone()
    y[0, 5, 0] = float("nan")  # missing values left as NaN in every batch
    return x, y


def _masked_loss_bug(pred, y):
    mask = torch.zeros_like(y)  # bug: the padding mask is all zeros, so nothing counts
    return ((pred - y) ** 2 * mask).sum() / mask.numel()


def _raw_unit_targets(gen, batch=16):
    x, y = sines(gen, batch, 32)
    return x, 50.0 * y + 400.0  # e.g. a sensor reading left in its physical units


def _constant_targets(gen):
    x, y = sines(gen, 16, 32)
    return x, torch.full_like(y, 2.5)


def _tiny_train_set(count: int, noise: float):
    """The same `count` noisy sequences every step: a network with capacity to spare memorises their noise."""
    fixed = {}

    def batch(gen):
        if "data" not in fixed:
            fixed["data"] = sines(torch.Generator().manual_seed(123), count, 32, noise=noise)
        return fixed["data"]

    return batch


def _subsets(hard_fraction):
    """Subgroup "B" is a fast, noisy regime that makes up a small share of training: the model neglects it."""

    def mixed(gen, batch):
        easy_x, easy_y = sines(gen, batch, 32, freq=(0.1, 0.3), noise=0.02)
        hard_x, hard_y = sines(gen, batch, 32, freq=(1.0, 2.5), noise=0.3)
        take_hard = torch.rand(batch, generator=gen) < hard_fraction
        pick = take_hard[:, None, None]
        return torch.where(pick, hard_x, easy_x), torch.where(pick, hard_y, easy_y)

    def val(gen):
        return {
            "regime-A": sines(gen, 64, 32, freq=(0.1, 0.3), noise=0.02),
            "regime-B": sines(gen, 64, 32, freq=(1.0, 2.5), noise=0.3),
        }

    return (lambda gen: mixed(gen, 16)), val


def _similar_subsets():
    def val(gen):
        return {"phase-A": sines(gen, 64, 32), "phase-B": sines(gen, 64, 32)}

    return val


@dataclasses.dataclass
class Scenario:
    name: str
    setup: Callable | None  # () -> Setup, or None with a runner
    expected: frozenset  # codes that must be found (empty for a healthy control)
    allowed: frozenset = frozenset()  # other warning/error codes this fault genuinely causes
    what: str = ""
    lead: frozenset = frozenset()  # codes the report may lead with (default: the expected ones)
    runner: Callable | None = None  # seed -> History dict, for runs the shared loop cannot express
    group: str = "synthetic"
    held_out: bool = False  # data never looked at while the rules were written

    @property
    def healthy(self) -> bool:
        return not self.expected

    @property
    def lead_codes(self) -> frozenset:
        return self.lead or self.expected


def _s(name, setup, expected=(), allowed=(), what="", lead=(), **kw):
    return Scenario(name, setup, frozenset(expected), frozenset(allowed), what, frozenset(lead), **kw)


SCENARIOS = [
    # ---- healthy controls: no warning or error allowed ----
    _s("healthy_forecast", lambda: _sine_setup(), what="1-layer forecaster on standardised sines"),
    _s(
        "healthy_two_layer_recall",
        lambda: Setup(
            batch=lambda g: lag_recall(g, 16, 32, lag=3),
            val=_val(lag_recall, batch=64, steps=32, lag=3),
            features=2,
            layers=2,
            steps=150,
        ),
        what="2 layers, y_t = x_(t-3)",
    ),
    _s(
        "healthy_sequence_regression",
        lambda: Setup(
            batch=lambda g: _last_mean(g, 16),
            val=lambda g: {"all": _last_mean(g, 64)},
            features=1,
            last_only=True,
            steps=150,
        ),
        what="loss on the last step only: mean of the last 4 inputs",
    ),
    _s(
        "healthy_truncated",
        lambda: Setup(
            batch=lambda g, n: lag_recall(g, 16, n, lag=3),
            val=_val(lag_recall, batch=32, steps=128, lag=3),
            features=2,
            truncation=(16, 16, 256, 10),
            eval_every=20,
        ),
        what="fastlstm.TBPTTTrainer, k1=k2=16, dependency of 3 steps",
    ),
    _s("healthy_subsets", lambda: _sine_setup(val=_similar_subsets()), what="two subsets of equal difficulty"),
    _s(
        "healthy_chrono_init",
        lambda: _sine_setup(prepare=lambda m: finit.chrono_(m.lstm, 32)),
        what="chrono initialisation (forget gates deliberately near 1)",
    ),
    # ---- failures ----
    _s(
        "exploding",
        lambda: _sine_setup(optimizer="sgd", lr=3.0, prepare=_scaled_weights("weight_hh", 6.0)),
        # The loss rises by 30 orders of magnitude before it turns NaN: it diverges, and the gradients explode.
        expected={"exploding_gradients", "loss_diverging"},
        allowed={"non_finite", "gate_saturation", "val_oscillation", "train_val_divergence"},
        what="recurrent weights x6, SGD lr=3",
    ),
    _s(
        "vanishing",
        lambda: Setup(
            batch=lambda g: remember_first(g, 16, 60),
            val=lambda g: {"all": remember_first(g, 64, 60)},
            features=1,
            last_only=True,
            steps=60,
            prepare=_scaled_weights("weight", 0.3),
        ),
        expected={"vanishing_gradients"},
        allowed={"loss_stagnant"},
        what="60 steps, loss on the last output recalling the first input, weights x0.3",
    ),
    _s(
        "gate_saturation",
        lambda: _sine_setup(prepare=_scaled_weights("weight_ih", 40.0)),
        expected={"gate_saturation"},
        allowed={"loss_stagnant"},
        what="input weights x40 on standardised inputs",
    ),
    _s(
        "unscaled_inputs",
        lambda: _sine_setup(**dict(zip(("batch", "val"), _scale_features([1.0, 300.0, 20000.0])))),
        expected={"unscaled_inputs"},
        allowed={"gate_saturation", "loss_stagnant", "exploding_gradients"},
        what="features in units of 1, 300 and 20000",
    ),
    _s(
        "unscaled_targets",
        lambda: _sine_setup(batch=_raw_unit_targets, val=lambda g: {"all": _raw_unit_targets(g, 64)}),
        expected={"unscaled_targets"},
        allowed={"loss_stagnant", "gate_saturation", "exploding_gradients"},
        what="targets in raw units: 50 x signal + 400",
    ),
    _s(
        "nan_input",
        lambda: _sine_setup(corrupt=_nan_at(40)),
        expected={"non_finite"},
        allowed={"loss_stagnant"},
        what="one NaN reading in the batch of step 40",
    ),
    _s(
        "nan_from_start",
        lambda: _sine_setup(corrupt=_missing_targets_as_nan, steps=30),
        expected={"initial_loss_nonfinite", "non_finite"},
        allowed={"loss_stagnant"},
        what="missing targets stored as NaN in every batch",
    ),
    _s(
        "stagnant_lr_zero",
        lambda: _sine_setup(lr=0.0, steps=80),
        expected={"loss_stagnant"},
        what="learning rate 0",
    ),
    _s(
        "stagnant_tiny_lr",
        lambda: _sine_setup(lr=1e-6, steps=80),
        expected={"loss_stagnant"},
        what="Adam lr=1e-6",
    ),
    _s(
        "loss_zero",
        lambda: _sine_setup(loss_fn=_masked_loss_bug, steps=60),
        expected={"loss_zero"},
        allowed={"loss_stagnant"},
        what="loss masked to zero by an all-zero mask",
    ),
    _s(
        "constant_target",
        lambda: _sine_setup(batch=_constant_targets, steps=80),
        expected={"constant_target"},
        # The validation targets are the real ones, so validation gets worse while training fits the constant.
        allowed={"loss_zero", "gate_saturation", "train_val_divergence"},
        what="every target equals 2.5",
    ),
    _s(
        "train_val_divergence",
        lambda: _sine_setup(batch=_tiny_train_set(8, noise=0.6), hidden=64, steps=300, lr=3e-3, eval_every=15),
        expected={"train_val_divergence"},
        allowed={"val_oscillation"},
        what="8 noisy training sequences, hidden 64, 300 steps: validation falls, then climbs",
    ),
    _s(
        "val_oscillation",
        lambda: _sine_setup(optimizer="adam_no_momentum", lr=0.05, steps=150, eval_every=5),
        expected={"val_oscillation"},
        allowed={"exploding_gradients", "gate_saturation", "loss_stagnant", "train_val_divergence"},
        what="Adam without momentum at lr=0.05 (50x the usual 1e-3)",
    ),
    _s(
        "subset_disparity",
        lambda: _sine_setup(**dict(zip(("batch", "val"), _subsets(0.1))), steps=150),
        expected={"subset_disparity"},
        what="a fast noisy regime that is 10% of training",
    ),
    _s(
        "truncation_too_short",
        lambda: Setup(
            batch=lambda g, n: lag_recall(g, 16, n, lag=20),
            val=_val(lag_recall, batch=32, steps=128, lag=20),
            features=2,
            truncation=(8, 8, 256, 5),
            eval_every=20,
        ),
        expected={"truncation_too_short"},
        allowed={"loss_stagnant"},
        what="y_t = x_(t-20) trained by fastlstm.TBPTTTrainer with k1=k2=8",
    ),
    _s(
        "truncation_too_short_learned",
        lambda: Setup(
            batch=lambda g, n: lag_recall(g, 16, n, lag=6),
            val=_val(lag_recall, batch=32, steps=128, lag=6),
            features=2,
            truncation=(4, 4, 128, 2),
            eval_every=16,
            residual_probe=False,
            prepare=_pretrained_recall(lag=6, steps=100),
        ),
        expected={"truncation_too_short"},
        allowed={"loss_stagnant", "loss_diverging"},  # the model forgets the lag it knew: its loss rises
        what="a model that learned a 6-step lag with full BPTT, then trained with k1=k2=4; residual probe off",
    ),
]


def _pretrained_recall(lag: int, steps: int):
    """Train the model on the lag task with full backpropagation first, so that it uses a `lag`-step memory
    (gradient telemetry only shows memory the network already uses)."""

    def prepare(model):
        gen = torch.Generator().manual_seed(99)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(steps):
            x, y = lag_recall(gen, 16, lag + 16, lag)
            pred, _ = model(x)
            loss = (pred[:, lag:] - y[:, lag:]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.lstm.telemetry.reset()

    return prepare


def _last_mean(gen, batch, steps=24, window=4):
    x = torch.randn(batch, steps, 1, generator=gen)
    return x, x[:, -window:, :].mean(dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Scoring.
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    scenario: Scenario
    findings: list
    seconds: float
    history: dict

    @property
    def flagged(self) -> set:
        """Codes raised at warning or error level (info is advice, not an alarm)."""
        return {f.code for f in self.findings if f.severity in ("warning", "error")}

    @property
    def found(self) -> set:
        return {f.code for f in self.findings}

    @property
    def missed(self) -> set:
        return set(self.scenario.expected) - self.found

    @property
    def false_alarms(self) -> set:
        return self.flagged - self.scenario.expected - self.scenario.allowed

    @property
    def lead(self) -> str | None:
        """The code the report leads with: its first root cause at warning or error level."""
        roots = [f for f in self.findings if not f.caused_by and f.severity in ("warning", "error")]
        return roots[0].code if roots else None

    @property
    def lead_ok(self) -> bool:
        return self.scenario.healthy or self.lead in self.scenario.lead_codes

    @property
    def ok(self) -> bool:
        return not self.missed and not self.false_alarms and self.lead_ok


def run(scenario: Scenario, seed: int = 0) -> Outcome:
    start = time.perf_counter()
    history = scenario.runner(seed) if scenario.runner is not None else train(scenario.setup(), seed)
    findings = doctor.diagnose(history)
    return Outcome(scenario, findings, time.perf_counter() - start, history)


def all_scenarios() -> list:
    """This module's synthetic scenarios, then the user-loop, language-model and real-data ones."""
    import doctor_lm
    import doctor_loops
    import doctor_real

    return SCENARIOS + doctor_loops.SCENARIOS + doctor_lm.SCENARIOS + doctor_real.SCENARIOS


def scores(outcomes) -> dict:
    """Per code: true positives (expected and found), false negatives (expected, not found), false positives
    (flagged at warning/error where neither expected nor allowed)."""
    table = {code: {"tp": 0, "fn": 0, "fp": 0} for code in doctor.CODES}
    for o in outcomes:
        for code in o.scenario.expected:
            table[code]["tp" if code in o.found else "fn"] += 1
        for code in o.false_alarms:
            table[code]["fp"] += 1
    return table


def markdown(outcomes) -> str:
    table = scores(outcomes)
    lines = [
        "| code | runs expecting it | found (TP) | missed (FN) | false alarms (FP) | precision | recall |",
        "|---|---|---|---|---|---|---|",
    ]
    tp_all = fn_all = fp_all = 0
    for code, s in table.items():
        if not any(s.values()):
            continue
        tp_all, fn_all, fp_all = tp_all + s["tp"], fn_all + s["fn"], fp_all + s["fp"]
        lines.append(
            f"| `{code}` | {s['tp'] + s['fn']} | {s['tp']} | {s['fn']} | {s['fp']} | "
            f"{_ratio(s['tp'], s['tp'] + s['fp'])} | {_ratio(s['tp'], s['tp'] + s['fn'])} |"
        )
    lines.append(
        f"| **all** | {tp_all + fn_all} | {tp_all} | {fn_all} | {fp_all} | "
        f"{_ratio(tp_all, tp_all + fp_all)} | {_ratio(tp_all, tp_all + fn_all)} |"
    )
    faulty = [o for o in outcomes if not o.scenario.healthy]
    healthy = [o for o in outcomes if o.scenario.healthy]
    lines.append("")
    lines.append(
        f"Reports leading with the intended root cause: {sum(o.lead_ok for o in faulty)} of {len(faulty)} failure "
        f"runs. Healthy runs with no warning or error: {sum(not o.flagged for o in healthy)} of {len(healthy)}."
    )
    return "\n".join(lines)


def scenario_table(outcomes) -> str:
    """Per run: what was done, what had to be found, and everything flagged at warning/error level."""
    lines = [
        "| scenario | fault injected | must find | report leads with | flagged (warning/error) | result |",
        "|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        expected = ", ".join(f"`{c}`" for c in sorted(o.scenario.expected)) or "nothing (healthy control)"
        flagged = ", ".join(f"`{c}`" for c in sorted(o.flagged)) or "-"
        lead = f"`{o.lead}`" if o.lead else "-"
        lines.append(f"| {o.scenario.name} | {o.scenario.what} | {expected} | {lead} | {flagged} | {_verdict(o)} |")
    return "\n".join(lines)


def _verdict(o: Outcome) -> str:
    if o.ok:
        return "ok"
    parts = []
    if o.missed:
        parts.append(f"missed {sorted(o.missed)}")
    if o.false_alarms:
        parts.append(f"false {sorted(o.false_alarms)}")
    if not o.lead_ok:
        parts.append(f"led with {o.lead}")
    return ", ".join(parts)


def _ratio(num, den) -> str:
    return "n/a" if den == 0 else f"{num / den:.2f}"


def findings_key(findings, severe_only: bool = False) -> list:
    """What two runs' reports are compared by: (code, severity, caused_by) of every finding, in report order."""
    return [
        (f.code, f.severity, tuple(f.caused_by))
        for f in findings
        if not severe_only or f.severity in ("warning", "error")
    ]


def compare_sampled(scenarios, seeds, instrument_every: int, log=print) -> list:
    """Each scenario trained twice per seed, recorded on every step and sampled; [(scenario, seed, full outcome,
    sampled outcome)]."""
    pairs = []
    for seed in seeds:
        for scenario in scenarios:
            full = run(scenario, seed)
            with sampled(instrument_every):
                part = run(scenario, seed)
            pairs.append((scenario, seed, full, part))
            same = findings_key(full.findings) == findings_key(part.findings)
            severe = findings_key(full.findings, True) == findings_key(part.findings, True)
            log(
                f"seed {seed} {scenario.name:34s} {full.seconds:5.1f}s {part.seconds:5.1f}s  "
                f"{'same' if same else ('same warnings/errors' if severe else 'DIFFERENT')}: "
                f"{_codes(full.findings)} | {_codes(part.findings)}",
            )
    return pairs


def _codes(findings) -> str:
    return ", ".join(f"{f.code}:{f.severity}" for f in findings) or "-"


def sampled_table(pairs, instrument_every: int) -> str:
    rows = [
        f"| scenario | seed | full: findings | instrument_every={instrument_every}: findings | same |",
        "|---|---|---|---|---|",
    ]
    for scenario, seed, full, part in pairs:
        if findings_key(full.findings) == findings_key(part.findings):
            verdict = "yes"
        elif findings_key(full.findings, True) == findings_key(part.findings, True):
            verdict = "warnings/errors"
        else:
            verdict = "**no**"
        rows.append(f"| {scenario.name} | {seed} | {_codes(full.findings)} | {_codes(part.findings)} | {verdict} |")
    same = sum(findings_key(f.findings) == findings_key(p.findings) for _, _, f, p in pairs)
    severe = sum(findings_key(f.findings, True) == findings_key(p.findings, True) for _, _, f, p in pairs)
    rows += [
        "",
        f"Identical reports: {same} of {len(pairs)} runs; identical warnings and errors: {severe} of {len(pairs)}.",
    ]
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Train the doctor's failure reproductions and score the findings.")
    parser.add_argument("seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--group", action="append", choices=("synthetic", "loops", "lm", "real"))
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--held-out", action="store_true", help="only scenarios on held-out data")
    data.add_argument("--development", action="store_true", help="only scenarios not on held-out data")
    parser.add_argument(
        "--compare-sampled",
        type=int,
        metavar="N",
        default=None,
        help="train each scenario twice, telemetry on every step and on one step in N, and compare the findings",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    chosen = [
        s
        for s in all_scenarios()
        if (not args.group or s.group in args.group)
        and not (args.held_out and not s.held_out)
        and not (args.development and s.held_out)
    ]
    if args.compare_sampled is not None:
        pairs = compare_sampled(chosen, args.seeds, args.compare_sampled)
        print()
        print(sampled_table(pairs, args.compare_sampled))
        return 0
    outcomes = []
    for seed in args.seeds:
        for scenario in chosen:
            o = run(scenario, seed)
            outcomes.append(o)
            flags = ", ".join(f"{f.code}:{f.severity}{'<' + f.caused_by[0] if f.caused_by else ''}" for f in o.findings)
            print(f"seed {seed} {scenario.name:34s} {o.seconds:5.1f}s  {_verdict(o):10s} {flags or '-'}", flush=True)
    print()
    print(markdown(outcomes))
    print()
    print(scenario_table(outcomes[: len(chosen)]))  # the first seed's runs
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
