"""A read-only, analysis-friendly view of a training History (the dict format of docs/history.md).

The doctor, the plots and the TensorBoard adapter read histories through this view so that none of them depends
on how the history was recorded (`fastlstm.Monitor`, the TBPTT trainer, a hand-written loop, or a JSON file):
anything with `.to_dict()`, a dict, or a path to a JSON file is accepted. JSON cannot hold NaN or infinity, so the
format writes them as the strings "nan", "inf", "-inf"; they are decoded back to floats here.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import defaultdict

import numpy as np

from .jsonio import HISTORY_FORMAT, read_json, to_float


def float_array(values) -> np.ndarray:
    return np.array([to_float(v) for v in (values or [])], dtype=np.float64)


def as_history_dict(history) -> dict:
    """Accept a History object (anything with `.to_dict()`), a dict, or a path to a saved History."""
    if hasattr(history, "to_dict"):
        history = history.to_dict()
    elif isinstance(history, (str, os.PathLike)):
        history = read_json(history)
    if not isinstance(history, dict):
        raise TypeError(f"expected a History, a dict in docs/history.md's format or a path, got {type(history)!r}")
    fmt = history.get("format", HISTORY_FORMAT)  # a hand-built dict may omit it, as History.from_dict allows
    if fmt != HISTORY_FORMAT:
        raise ValueError(f"not a fastlstm history (format {fmt!r}, expected {HISTORY_FORMAT!r})")
    return history


@dataclasses.dataclass(frozen=True)
class LayerWindow:
    """One layer-direction's telemetry over one window."""

    layer: int
    direction: int
    elements: int
    gate_saturation: dict  # gate -> fraction (nan when the window saw nothing)
    forget_gate_mean: float
    cell_absmax: float
    grad_norm_per_step: np.ndarray  # in input time order, nan where no backward pass reached

    def grad_in_own_order(self) -> np.ndarray:
        """The per-step gradient norms in the direction's own time order, so that the last entry is the step
        backpropagation starts from (the reverse direction runs t = T-1 down to 0)."""
        return self.grad_norm_per_step[::-1] if self.direction == 1 else self.grad_norm_per_step


@dataclasses.dataclass(frozen=True)
class TelemetryWindow:
    step: int
    layers: list  # LayerWindow per slot k = layer * num_directions + direction
    first_nonfinite: dict | None
    first_step: int | None = None  # the first training step the window covers, when recorded


@dataclasses.dataclass(frozen=True)
class FeatureStats:
    """Per-feature statistics pooled over a run's windows (exact pooling of count/mean/std/min/max)."""

    count: int
    mean: np.ndarray
    std: np.ndarray
    min: np.ndarray
    max: np.ndarray

    @property
    def rms(self) -> np.ndarray:
        """sqrt(mean^2 + std^2): the typical magnitude the network sees, offset included."""
        return np.sqrt(self.mean**2 + self.std**2)


class HistoryView:
    """Columns and per-LSTM series of one history; nothing here interprets them."""

    def __init__(self, history):
        self.raw = as_history_dict(history)
        raw = self.raw
        steps = raw.get("steps") or []
        self.step = np.array([int(s.get("step", i)) for i, s in enumerate(steps)], dtype=np.int64)
        self.loss = float_array([s.get("loss") for s in steps])
        self.lr = float_array([s.get("lr") for s in steps])
        self.grad_norm = float_array([s.get("grad_norm") for s in steps])  # before clipping
        self.grad_norm_applied = float_array([s.get("grad_norm_applied") for s in steps])  # what the step used
        self.update_ratio = float_array([s.get("update_ratio") for s in steps])  # ‖Δθ‖ / ‖θ‖, sampled steps
        # null means "not measured", "nan" means a measured NaN: keep the difference.
        self.loss_known = np.array([s.get("loss") is not None for s in steps], dtype=bool)
        self.grad_norm_known = np.array([s.get("grad_norm") is not None for s in steps], dtype=bool)
        self.skipped = np.array([bool(s.get("skipped", False)) for s in steps], dtype=bool)
        # Sampled telemetry (docs/history.md): which steps recorded telemetry; a history without the key, all.
        self.instrumented = np.array([bool(s.get("instrumented", True)) for s in steps], dtype=bool)
        self.instrument_every = int((raw.get("sampling") or {}).get("instrument_every") or 1)
        self.evals = [_eval_entry(e) for e in raw.get("evals") or []]
        self.events = list(raw.get("events") or [])
        self.lstms = dict(raw.get("lstms") or {})
        self.telemetry = _telemetry_by_lstm(raw.get("telemetry") or [])
        self.inputs = _group_by_lstm(raw.get("inputs") or [])
        self.targets = list(raw.get("targets") or [])
        self.states = _group_by_lstm(raw.get("states") or [])

    # ---- losses ----

    @property
    def num_steps(self) -> int:
        return int(self.step.size)

    def finite_losses(self) -> tuple:
        """(steps, losses) of the steps whose loss is finite and that were not skipped."""
        keep = np.isfinite(self.loss) & ~self.skipped
        return self.step[keep], self.loss[keep]

    # ---- evaluations ----

    def val_series(self) -> tuple:
        """(steps, epochs, val losses) of the evaluations with a finite val_loss."""
        rows = [e for e in self.evals if math.isfinite(e["val_loss"])]
        return (
            np.array([e["step"] for e in rows], dtype=np.int64),
            [e["epoch"] for e in rows],
            np.array([e["val_loss"] for e in rows], dtype=np.float64),
        )

    # ---- inputs and targets ----

    def input_stats(self, lstm: str) -> FeatureStats | None:
        return pool_feature_stats(self.inputs.get(lstm, []))

    def first_input_stats(self, lstm: str) -> FeatureStats | None:
        """The statistics of the first window in which the LSTM saw inputs."""
        entries = sorted(self.inputs.get(lstm, []), key=lambda e: int(e.get("step", 0)))
        for entry in entries:
            stats = pool_feature_stats([entry])
            if stats is not None:
                return stats
        return None

    def target_stats(self) -> FeatureStats | None:
        return pool_feature_stats(self.targets)

    def feature_names(self, lstm: str, width: int) -> list:
        """Names of the LSTM's input features: the optional `feature_names` of its `lstms` record, of its inputs
        entries, or of the history itself; "feature 3" style names otherwise."""
        candidates = [self.lstms.get(lstm, {}).get("feature_names"), self.raw.get("feature_names")]
        candidates += [entry.get("feature_names") for entry in self.inputs.get(lstm, [])]
        return _names_or_default(candidates, width, "feature")

    def target_names(self, width: int) -> list:
        candidates = [self.raw.get("target_names")] + [entry.get("target_names") for entry in self.targets]
        return _names_or_default(candidates, width, "target")

    # ---- events ----

    def events_of(self, *kinds: str) -> list:
        return [e for e in self.events if e.get("kind") in kinds]

    # ---- recurrent state carried into the LSTMs ----

    def carried_state(self, lstm: str) -> dict:
        """Totals of the LSTM's `states` entries: training forward passes, passes given an initial state, passes
        whose state was not all zeros, passes whose state still carried an autograd graph, and the longest
        sequence seen (docs/history.md)."""
        keys = ("passes", "with_state", "nonzero_state", "attached_state")
        entries = self.states.get(lstm, [])
        totals = {k: int(sum(int(e.get(k) or 0) for e in entries)) for k in keys}
        totals["timesteps"] = max((int(e.get("timesteps") or 0) for e in entries), default=0)
        return totals


def _names_or_default(candidates, width: int, prefix: str) -> list:
    for names in candidates:
        if isinstance(names, (list, tuple)) and len(names) == width:
            return [str(n) for n in names]
    return [f"{prefix} {j}" for j in range(width)]


def _eval_entry(entry: dict) -> dict:
    subsets = entry.get("subset_losses") or {}
    return {
        "step": int(entry.get("step", 0)),
        "epoch": entry.get("epoch"),
        "val_loss": to_float(entry.get("val_loss")),
        "subset_losses": {str(k): to_float(v) for k, v in subsets.items()},
    }


def _group_by_lstm(entries) -> dict:
    grouped = defaultdict(list)
    for entry in entries:
        grouped[str(entry.get("lstm", ""))].append(entry)
    return dict(grouped)


def _telemetry_by_lstm(entries) -> dict:
    grouped = defaultdict(list)
    for entry in entries:
        snapshot = entry.get("snapshot") or {}
        layers = [_layer_window(k, layer) for k, layer in enumerate(snapshot.get("layers") or [])]
        first = entry.get("first_step")
        window = TelemetryWindow(
            int(entry.get("step", 0)), layers, snapshot.get("first_nonfinite"), None if first is None else int(first)
        )
        grouped[str(entry.get("lstm", ""))].append(window)
    return dict(grouped)


def _layer_window(slot: int, layer: dict) -> LayerWindow:
    saturation = layer.get("gate_saturation") or {}
    return LayerWindow(
        layer=int(layer.get("layer", slot)),
        direction=int(layer.get("direction", 0)),
        elements=int(layer.get("elements") or 0),
        gate_saturation={g: to_float(saturation.get(g)) for g in ("i", "f", "g", "o")},
        forget_gate_mean=to_float(layer.get("forget_gate_mean")),
        cell_absmax=to_float(layer.get("cell_absmax")),
        grad_norm_per_step=float_array(layer.get("grad_norm_per_step")),
    )


def pool_feature_stats(entries) -> FeatureStats | None:
    """Combine per-window (count, mean, std, min, max) entries into the statistics of all the data they saw."""
    rows = [e for e in entries if int(e.get("count") or 0) > 0 and e.get("mean") is not None]
    if not rows:
        return None
    counts = np.array([int(e["count"]) for e in rows], dtype=np.float64)[:, None]
    means = np.array([float_array(e["mean"]) for e in rows])
    stds = np.array([float_array(e.get("std")) for e in rows])
    total = counts.sum()
    mean = (counts * means).sum(axis=0) / total
    # Pooled variance: within-window variance plus the spread of the window means around the pooled mean.
    var = (counts * (stds**2 + (means - mean) ** 2)).sum(axis=0) / total
    return FeatureStats(
        count=int(total),
        mean=mean,
        std=np.sqrt(var),
        min=np.min(np.array([float_array(e.get("min")) for e in rows]), axis=0),
        max=np.max(np.array([float_array(e.get("max")) for e in rows]), axis=0),
    )
