"""`fastlstm demo`: a forecaster trained on the embedded US macroeconomic data, once on raw and once on standardised
features, each run recorded by the TBPTT trainer's Monitor and diagnosed by the doctor.

The raw features span four orders of magnitude (GDP in the thousands of billions of dollars, rates in single
digits): the classic mistake. The doctor should name it, and the features responsible, for the first run, and find
nothing above "info" for the second. Runs on the CPU in well under a minute.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import numpy as np
import torch
from torch import nn

from . import doctor
from .data import Standardizer, chronological_split, load_macrodata
from .jsonio import write_json
from .module import LSTM
from .tbptt import TBPTTTrainer

# Next quarter's unemployment rate and inflation, forecast from this quarter's twelve series.
TARGETS = ("unemp", "infl")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    out: str = "fastlstm-demo"
    epochs: int = 50
    hidden: int = 16
    k1: int = 12  # three years of quarters per truncated-BPTT chunk
    lr: float = 3e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    stream_length: int = 96  # each training stream: 24 years, starting at staggered quarters
    stream_stride: int = 4
    seed: int = 0
    plots: bool = True


class Forecaster(nn.Module):
    """fastlstm.LSTM + a linear head; `model(x, state) -> (prediction, state)` as the TBPTT trainer expects."""

    def __init__(self, features: int, targets: int, hidden: int):
        super().__init__()
        self.lstm = LSTM(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, targets)

    def forward(self, x, state=None):
        out, state = self.lstm(x, state)
        return self.head(out), state


@dataclasses.dataclass(frozen=True)
class Prepared:
    train: tuple  # (inputs [B, T, F], targets [B, T, O]) as streams
    val: tuple  # one stream over the validation quarters
    feature_names: tuple
    target_names: tuple
    description: str


def prepare(scaled: bool, config: DemoConfig) -> Prepared:
    """Streams for the trainer: inputs are quarter t's twelve series, targets the TARGETS at quarter t+1."""
    series = load_macrodata()
    x_all = series.values[:-1]
    y_all = series.select(TARGETS).values[1:]
    train_rows, val_rows = chronological_split(len(x_all), config.val_fraction)
    x_train, y_train, x_val, y_val = x_all[train_rows], y_all[train_rows], x_all[val_rows], y_all[val_rows]
    if scaled:
        # Statistics of the training quarters only: the validation period must not leak into the scaling.
        xs, ys = Standardizer.fit(x_train), Standardizer.fit(y_train)
        x_train, x_val, y_train, y_val = (
            xs.transform(x_train),
            xs.transform(x_val),
            ys.transform(y_train),
            ys.transform(y_val),
        )
    starts = range(0, len(x_train) - config.stream_length + 1, config.stream_stride)
    streams_x = np.stack([x_train[s : s + config.stream_length] for s in starts])
    streams_y = np.stack([y_train[s : s + config.stream_length] for s in starts])
    train = (_tensor(streams_x), _tensor(streams_y))
    val = (_tensor(x_val[None]), _tensor(y_val[None]))
    description = (
        f"{len(starts)} streams of {config.stream_length} quarters from {series.index[0]}-"
        f"{series.index[train_rows.stop - 1]}; validation {series.index[val_rows.start]}-{series.index[-2]}"
    )
    return Prepared(train, val, series.columns, TARGETS, description)


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(a, dtype=torch.float32)


def train_run(prepared: Prepared, config: DemoConfig, label: str, stream=sys.stdout) -> dict:
    """Train one forecaster with the TBPTT trainer and return its history dict, feature names added."""
    torch.manual_seed(config.seed)
    x, y = prepared.train
    model = Forecaster(x.shape[-1], y.shape[-1], config.hidden)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    trainer = TBPTTTrainer(model, optimizer, nn.MSELoss(), k1=config.k1, telemetry_every=5, read_every=20)
    bar = ProgressBar(label, config.epochs, stream)
    for epoch in range(config.epochs):
        trainer.fit(prepared.train, epochs=epoch + 1, val_data=prepared.val)
        bar.update(epoch + 1, _latest(trainer.monitor.live_history))
    bar.close()
    history = trainer.history.to_dict()
    # Optional keys the doctor reads (docs/doctor.md) so that findings name features instead of indices.
    for record in history["lstms"].values():
        record["feature_names"] = list(prepared.feature_names)
    history["target_names"] = list(prepared.target_names)
    return history


def _latest(history) -> dict:
    steps = [e for e in history.steps if e.get("loss") is not None]
    evals = [e for e in history.evals if e.get("val_loss") is not None]
    return {"loss": steps[-1]["loss"] if steps else None, "val": evals[-1]["val_loss"] if evals else None}


class ProgressBar:
    """A one-line text progress bar (no dependency): epoch count, train and validation loss."""

    def __init__(self, label: str, total: int, stream, width: int = 30):
        self.label, self.total, self.stream, self.width = label, total, stream, width
        self.start = time.perf_counter()
        self.interactive = getattr(stream, "isatty", lambda: False)()

    def update(self, done: int, losses: dict) -> None:
        filled = int(self.width * done / self.total)
        text = (
            f"\r{self.label:>9} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} epochs  "
            f"loss {_fmt(losses['loss'])}  val {_fmt(losses['val'])}  {time.perf_counter() - self.start:4.1f}s"
        )
        # Without a terminal, print only every 10% so that logs stay short.
        if self.interactive or done == self.total or done % max(1, self.total // 10) == 0:
            self.stream.write(text if self.interactive else text[1:] + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\n")


def _fmt(value) -> str:
    return "   -   " if value is None else f"{float(value):7.4g}"


def run_demo(config: DemoConfig = DemoConfig(), stream=sys.stdout) -> dict:
    """Both runs: progress, the report of each, history and findings JSON and plots under `config.out`.
    Returns {"unscaled": findings, "scaled": findings}."""
    threads = torch.get_num_threads()
    # A model this small is fastest on one thread: OpenMP's per-op synchronisation costs more than it saves, and
    # on a busy machine a thread waiting for a descheduled sibling can stall each op for milliseconds.
    torch.set_num_threads(1)
    try:
        return _run_both(config, stream)
    finally:
        torch.set_num_threads(threads)


def _run_both(config: DemoConfig, stream) -> dict:
    results = {}
    for label, scaled in (("unscaled", False), ("scaled", True)):
        prepared = prepare(scaled, config)
        stream.write(f"\n== {label} run: {prepared.description}; {', '.join(TARGETS)} one quarter ahead ==\n")
        history = train_run(prepared, config, label, stream)
        findings = doctor.diagnose(history)
        results[label] = findings
        folder = os.path.join(config.out, label)
        os.makedirs(folder, exist_ok=True)
        write_json(os.path.join(folder, "history.json"), history)
        with open(os.path.join(folder, "findings.json"), "w", encoding="utf-8") as handle:
            handle.write(doctor.dumps(findings, source=os.path.join(folder, "history.json")))
        stream.write(doctor.format_report(findings, title=f"doctor, {label} run") + "\n")
        if config.plots:
            _write_plots(history, findings, folder, stream)
    stream.write(f"\nHistories, findings and plots are in {os.path.abspath(config.out)}\n")
    return results


def _write_plots(history: dict, findings: list, folder: str, stream) -> None:
    try:
        from . import plots

        written = plots.plot_all(history, findings, folder)
    except ImportError as exc:  # matplotlib is optional
        stream.write(f"(plots skipped: {exc})\n")
        return
    stream.write("plots: " + ", ".join(os.path.basename(p) for p in written) + "\n")
