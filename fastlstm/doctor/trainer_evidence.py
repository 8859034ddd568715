"""The TBPTT trainer's truncation evidence, read from the lists it adds to a history (docs/training.md), in numpy.

The trainer records two lists besides the standard ones: `dependency` (its residual probe: how strongly the
prediction error still correlates with the input k steps back) and `truncation_estimates` (its gradient-decay
estimates per telemetry window). This module turns them into evidence that the truncation in force is too short,
without importing the trainer or torch: the doctor reads histories on machines that have neither. The same maths
is the one implementation: fastlstm.truncation re-exports it for the trainer (`truncation_evidence`,
`residual_dependencies`).
"""

from __future__ import annotations

import numpy as np

from ..history_view import HistoryView, to_float


def residual_dependencies(correlation, noise: float, *, z: float = 5.0, min_correlation: float = 0.05) -> np.ndarray:
    """Lags whose residual correlation is significant (above z·noise and min_correlation) and at least half the
    largest one, ascending."""
    r = np.nan_to_num(np.asarray(correlation, dtype=np.float64))
    threshold = max(z * noise, min_correlation, 0.5 * r.max(initial=0.0))
    return np.flatnonzero(r > threshold)


def truncation_evidence(
    view: HistoryView, *, z: float = 5.0, min_correlation: float = 0.05, bias_threshold: float = 0.25
) -> dict | None:
    """Evidence that the truncation in force (the last `truncation` event) is shorter than the dependencies in the
    data, or None. The first source that fires wins:

      residual_correlation: in the latest probe entry for the k2 in force, the residual correlates with the input
        at a lag >= k2 (no loss of a window reaches that far), significantly (`residual_dependencies`); the farthest
        such lag is the estimated dependency;
      gradient_decay: over the later half of the `truncation_estimates` for that k2, the median relative gradient
        bias (mass beyond the measured lag) exceeds bias_threshold.

    Keys: k (k2 in force), k1, lag (k2 - k1), estimated_dependency (steps), source, lstm (name or None), step, and
    correlation/noise or bias/rate. Entries that lack a field the source needs are ignored.
    """
    truncations = view.events_of("truncation")
    if not truncations:
        return None
    detail = truncations[-1].get("detail") or {}
    k1 = detail.get("k1")
    k2 = detail.get("k2") or k1
    if not isinstance(k1, (int, float)) or not isinstance(k2, (int, float)):
        return None  # a truncation event from another recorder, without the trainer's fields
    k1, k2 = int(k1), int(k2)
    base = {"k": k2, "k1": k1, "lag": k2 - k1}
    single = next(iter(view.lstms)) if len(view.lstms) == 1 else None
    return _from_probe(view, k2, base, single, z, min_correlation) or _from_estimates(view, k2, base, bias_threshold)


def _from_probe(view: HistoryView, k2: int, base: dict, single, z: float, min_correlation: float) -> dict | None:
    probes = [
        e
        for e in _entries(view, "dependency", ("step", "count", "k2", "noise", "correlation"))
        if e["count"] > 0 and int(e["k2"]) == k2
    ]
    if not probes:
        return None
    latest = max(probes, key=lambda e: e["step"])
    r = np.nan_to_num(np.array([to_float(v) for v in latest["correlation"]], dtype=np.float64))
    noise = to_float(latest["noise"])
    significant = residual_dependencies(r, noise, z=z, min_correlation=min_correlation)
    beyond = significant[significant >= k2]
    if not beyond.size:
        return None
    lag = int(beyond[-1])
    return {
        **base,
        "estimated_dependency": lag,
        "source": "residual_correlation",
        "lstm": single,
        "step": int(latest["step"]),
        "correlation": float(r[lag]),
        "noise": noise,
    }


def _from_estimates(view: HistoryView, k2: int, base: dict, bias_threshold: float) -> dict | None:
    fields = ("step", "k2", "bias", "estimated_dependency", "rate")
    estimates = sorted(
        (e for e in _entries(view, "truncation_estimates", fields) if int(e["k2"]) == k2), key=lambda e: e["step"]
    )
    recent = estimates[len(estimates) // 2 :]
    if not recent:
        return None
    bias = float(np.median([to_float(e["bias"]) for e in recent]))
    if not bias > bias_threshold:
        return None
    worst = max(recent, key=lambda e: to_float(e["bias"]))
    return {
        **base,
        "estimated_dependency": float(np.median([to_float(e["estimated_dependency"]) for e in recent])),
        "source": "gradient_decay",
        "lstm": worst.get("lstm"),
        "step": int(recent[-1]["step"]),
        "bias": bias,
        "rate": float(np.median([to_float(e["rate"]) for e in recent])),
    }


def _entries(view: HistoryView, key: str, fields: tuple) -> list:
    """The entries of an extra list that carry every field in `fields` (a history from another recorder, or an
    older one, may lack some)."""
    entries = view.raw.get(key) or []
    return [e for e in entries if isinstance(e, dict) and all(e.get(f) is not None for f in fields)]
