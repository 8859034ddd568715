"""Helpers shared by several rule families: number formatting, layer labels, the clip value derived from measured
norms, and merging one problem seen in several layers into one finding."""

from __future__ import annotations

import math

import numpy as np

from ..findings import SEVERITIES, Finding
from ..findings import format_number as num
from ..signals import Signals

__all__ = ["clip_value", "healthy_norms", "lstm_label", "merge_same_code", "num", "round_up_nice", "stat"]


def round_up_nice(x: float) -> float:
    """x rounded up to 1, 2 or 5 × a power of ten: a clip value or length a person would type."""
    if not x > 0 or not math.isfinite(x):
        return 1.0
    exponent = math.floor(math.log10(x))
    for mantissa in (1, 2, 5, 10):
        if mantissa * 10**exponent >= x:
            return float(mantissa * 10**exponent)
    return float(10 ** (exponent + 1))


def lstm_label(where: dict) -> str:
    direction = " (reverse)" if where.get("direction") == 1 else ""
    return f"{where['lstm']!r} layer {where['layer']}{direction}"


def stat(stats, j: int) -> dict:
    return {
        "mean": float(stats.mean[j]),
        "std": float(stats.std[j]),
        "min": float(stats.min[j]),
        "max": float(stats.max[j]),
    }


def healthy_norms(s: Signals) -> np.ndarray:
    """Gradient norms (before clipping) of the steps before anything went wrong: before the loss started to rise,
    and before the norm first reached 10× the median of the first three steps; at least the first three steps."""
    steps, norms = s.grad_norms
    if norms.size <= 3:
        return norms
    end = norms.size
    grown = np.flatnonzero(norms > 10.0 * np.median(norms[:3]))
    if grown.size:
        end = min(end, int(grown[0]))
    onset = s.divergence_onset
    if onset is not None:
        end = min(end, int(np.searchsorted(steps, onset)))
    return norms[: max(3, end)]


def clip_value(s: Signals) -> float:
    """A clip threshold from the measured norms: twice the typical norm of the healthy steps, rounded up to a nice
    number, so ordinary steps pass untouched and only the outliers are scaled down."""
    norms = healthy_norms(s)
    return round_up_nice(2.0 * float(np.median(norms))) if norms.size else 1.0


def merge_same_code(findings: list) -> list:
    """Several layers or signals can show one problem: report it once, with every piece of evidence."""
    if len(findings) <= 1:
        return findings
    worst = max(findings, key=lambda f: SEVERITIES.index(f.severity))
    evidence = {"signals": [f.evidence for f in findings]}
    for key in ("onset_step",):  # keys the causal links read stay at the top
        values = [f.evidence[key] for f in findings if f.evidence.get(key) is not None]
        if values:
            evidence[key] = min(values)
    message = " ".join(f.message for f in findings)
    return [Finding(worst.code, worst.severity, message, evidence, worst.remedy)]
