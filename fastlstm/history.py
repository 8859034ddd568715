"""The History format (docs/history.md): its lists, its writer and reader, and the records the trainer adds.

This module owns the on-disk format; `jsonio` only knows JSON. It imports neither torch nor the trainer, so that
the doctor, the plots and a bare `json` reader see exactly what a `Monitor` wrote. Recorders (monitor.py, the
TBPTT trainer) build entries through the helpers here; readers go through history_view.py.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from .jsonio import HISTORY_FORMAT, from_json_safe, read_json, to_json_safe, write_json

EVENT_KINDS = (
    "nonfinite_step_skipped",
    "nonfinite_stop",
    "telemetry_hunt",
    "telemetry_hunt_end",
    "truncation",
    "checkpoint",
    "resume",
)
STANDARD_LISTS = ("steps", "evals", "telemetry", "inputs", "targets", "events")

# The lists the TBPTT trainer adds besides the standard ones (docs/training.md); kept in `History.extra`.
TRUNCATION_ESTIMATES = "truncation_estimates"
DEPENDENCY = "dependency"


class History:
    """A training run as recorded by a `Monitor`: the lists of docs/history.md, each ordered by step.

    Entries are plain dicts. Keys this version does not know (in a file, or added by the TBPTT trainer such as
    `truncation_estimates` and `dependency`) are kept in `extra` and written back unchanged.
    """

    def __init__(self):
        self.lstms: dict = {}
        self.steps: list = []
        self.evals: list = []
        self.telemetry: list = []
        self.inputs: list = []
        self.targets: list = []
        self.events: list = []
        self.extra: dict = {}

    def add(self, key: str, entry: dict) -> None:
        """Append to one of the lists, standard or extra."""
        (getattr(self, key) if key in STANDARD_LISTS else self.extra.setdefault(key, [])).append(entry)

    def event(self, step: int, kind: str, detail: dict | None = None) -> dict:
        entry = {"step": int(step), "kind": kind, "detail": detail or {}}
        self.events.append(entry)
        return entry

    def events_of(self, kind: str) -> list:
        return [e for e in by_step(self.events) if e["kind"] == kind]

    def losses(self) -> list:
        """[(step, loss)] of the training steps whose loss has been read."""
        return [(e["step"], e["loss"]) for e in by_step(self.steps) if e.get("loss") is not None]

    def to_dict(self) -> dict:
        d = {"format": HISTORY_FORMAT, "lstms": self.lstms}
        for key in STANDARD_LISTS:
            d[key] = by_step(getattr(self, key))
        for key, value in self.extra.items():
            d[key] = by_step(value) if _is_step_list(value) else value
        return to_json_safe(d)

    def save(self, path: str | os.PathLike) -> None:
        """Write the history as strict JSON (special floats as strings), atomically."""
        write_json(path, self.to_dict(), indent=None)

    @classmethod
    def from_dict(cls, d: dict) -> History:
        fmt = d.get("format", HISTORY_FORMAT)  # a hand-built dict may omit it
        if not isinstance(fmt, str) or not fmt.startswith("fastlstm.history/1"):
            raise ValueError(f"not a fastlstm history (format {fmt!r}, expected {HISTORY_FORMAT!r})")
        d = from_json_safe(d)
        history = cls()
        history.lstms = dict(d.get("lstms") or {})
        for key in STANDARD_LISTS:
            setattr(history, key, list(d.get(key) or []))
        history.extra = {k: v for k, v in d.items() if k not in STANDARD_LISTS and k not in ("format", "lstms")}
        return history

    @classmethod
    def load(cls, path: str | os.PathLike) -> History:
        return cls.from_dict(read_json(path))

    def __repr__(self) -> str:
        sizes = ", ".join(f"{key}={len(getattr(self, key))}" for key in STANDARD_LISTS)
        return f"History(lstms={list(self.lstms)}, {sizes})"


def _is_step_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(e, dict) and "step" in e for e in value)


def by_step(entries: list) -> list:
    # Entries can be appended out of order (values read lazily); sorted() is stable, so ties keep their order.
    return sorted(entries, key=lambda e: e["step"])


# ---- entries ----


def stats_entry(count: int, moments: np.ndarray) -> dict:
    """The count/mean/std/min/max record of docs/history.md from accumulated moments [sum, sum², min, max]."""
    mean = moments[0] / count
    with np.errstate(invalid="ignore"):
        std = np.sqrt(np.maximum(moments[1] / count - mean * mean, 0.0))
    std = np.where(np.isnan(mean), np.nan, std)
    return {
        "count": int(count),
        "mean": mean.tolist(),
        "std": std.tolist(),
        "min": moments[2].tolist(),
        "max": moments[3].tolist(),
    }


@dataclasses.dataclass
class TruncationEstimate:
    """One `truncation_estimates` entry: the gradient-decay estimate of one layer over one telemetry window whose
    chunks all had the same geometry (docs/training.md)."""

    step: int
    first_step: int
    lstm: str
    layer: int
    k1: int
    k2: int
    lag: int
    rate: float
    estimated_dependency: float
    bias: float
    parts: dict = dataclasses.field(default_factory=dict)  # "hidden"/"cell" -> (rate, dependency, bias, reach)

    def to_entry(self) -> dict:
        entry = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "parts"}
        for part, (rate, dependency, bias, reach) in self.parts.items():
            entry.update({f"{part}_rate": rate, f"{part}_dependency": dependency, f"{part}_bias": bias})
            entry[f"{part}_reach"] = reach
        return entry


@dataclasses.dataclass
class DependencyProbe:
    """One `dependency` entry: the residual probe's correlation of the prediction error with the input k steps
    back, k = 1..lags, over `count` positions (noise: the correlation of unrelated series, 1/sqrt(count))."""

    step: int
    count: int
    k1: int
    k2: int
    lags: int
    noise: float
    correlation: list | None = None  # filled when the probe's sums are read back

    def to_entry(self) -> dict:
        entry = dataclasses.asdict(self)
        if entry["correlation"] is None:
            del entry["correlation"]
        return entry


__all__ = ["DEPENDENCY", "EVENT_KINDS", "TRUNCATION_ESTIMATES", "DependencyProbe", "History", "TruncationEstimate"]
