"""The measurements the doctor takes of a series: robust statistics (medians, their standard errors, Kendall's
tau), then, in sections named after the rule families that read them, the estimates of particular rules: input
scale offenders and constant targets (data), the open share of a saturated forget gate (gates), the share of
gradient a truncation window misses and the window that would catch it (truncation). Plain numpy on arrays and
recorded statistics; deciding what is a problem is the rules' job (rules/<family>.py), against `Thresholds`.
"""

from __future__ import annotations

import math

import numpy as np

from ..history_view import HistoryView
from .thresholds import Thresholds

# ---- robust statistics ----


def median_positive(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(np.median(values)) if values.size else math.nan


def nanmean(values) -> float:
    values = np.array([v for v in values if v is not None], dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else math.nan


def median_se(values: np.ndarray) -> float:
    if values.size < 2:
        return 0.0
    mad = float(np.median(np.abs(values - np.median(values))))
    return 1.25 * 1.4826 * mad / math.sqrt(values.size)


def kendall_tau(values: np.ndarray) -> float:
    """Kendall's tau of `values` against their order: +1 steadily rising, -1 steadily falling, 0 no trend."""
    n = values.size
    if n < 2:
        return 0.0
    diff = np.sign(values[None, :] - values[:, None])
    upper = np.triu_indices(n, k=1)
    return float(diff[upper].sum() / len(upper[0]))


# ---- data: inputs and targets ----


def scale_offenders(stats, th: Thresholds) -> tuple:
    """(indices too large, indices too small relative to the largest, spread) of a FeatureStats."""
    rms = stats.rms
    big = [int(j) for j in np.argsort(-rms) if rms[j] > th.feature_rms_max]
    varying = rms[rms > 0]
    spread = float(varying.max() / varying.min()) if varying.size else 1.0
    small = []
    if spread > th.feature_spread_max:
        small = [int(j) for j in np.argsort(rms) if 0 < rms[j] * th.feature_spread_max < rms.max() and j not in big]
    return big, small, spread


def constant_targets(view: HistoryView) -> list:
    stats = view.target_stats()
    if stats is None:
        return []
    spread = stats.max - stats.min
    return [
        int(j)
        for j in range(spread.size)
        if np.isfinite(spread[j]) and spread[j] <= 1e-12 * max(1.0, abs(stats.mean[j]))
    ]


# ---- gates ----


def forget_open_share(mean: float, saturated: float) -> float:
    """A lower bound on the share of saturated forget activations that are saturated *open* (σ > 0.95), from the
    gate's mean and saturated fraction alone: unsaturated activations contribute at most 0.95 each to the mean, so
    at least mean - 0.95·(1 - saturated) of the activations sit near 1."""
    if not (math.isfinite(mean) and saturated > 0):
        return math.nan
    return float(min(1.0, max(0.0, mean - 0.95 * (1.0 - saturated)) / saturated))


# ---- truncation ----


def truncated_gradient_share(norms: np.ndarray, k1: int) -> tuple:
    """Estimate which share of the gradient lies beyond the start of the backpropagation window.

    Two window shapes (docs/doctor.md has the derivation):
      * the window is longer than the loss region (k2 > k1): the first k2-k1 steps receive gradient only through
        the recurrence, so the ratio across that loss-free prefix is the decay the window still misses;
      * a loss at every step of the window (k1 = k2): the total gradient at lag k from the window's end
        accumulates the contributions of the k later losses, P(k) = Σ_{j<=k} ρ^j in the geometric model, rising
        going back until the recurrence forgets. The rise over lags (q, 2q] divided by the rise over (0, q] is
        exactly ρ^q, so the share beyond the window, ρ^K, is that ratio to the power K/q. Only the later half of
        the window is used: the first steps after a carried state can have larger errors of their own (the
        truncation cuts their credit), which would look like a rise.
    """
    norms = np.where(np.isfinite(norms), norms, np.nan)
    window = norms.size
    prefix = window - k1 if 0 < k1 < window else 0
    if prefix >= 2 and norms[prefix] > 0:
        return float(min(1.0, norms[0] / norms[prefix])), "loss-free prefix decay"
    by_lag = norms[::-1]
    q = max(1, window // 4)
    if 2 * q >= window:
        return math.nan, "insufficient"
    end, quarter, half = by_lag[0], _local_mean(by_lag, q), _local_mean(by_lag, 2 * q)
    if not all(map(math.isfinite, (end, quarter, half))) or end <= 0:
        return math.nan, "insufficient"
    # Noise (or seasonality) of the profile from its second differences, which a smooth rise leaves near zero:
    # for white noise σ, median|Δ²| ≈ 1.65σ. A rise must exceed 2σ to count.
    jitter = 2.0 * float(np.nanmedian(np.abs(np.diff(norms, n=2)))) / 1.65
    first_rise, second_rise = quarter - end, half - quarter
    if first_rise <= max(0.05 * end, jitter):
        return 0.0, "no accumulation"  # the gradient does not build up going back: memory ends at the window end
    second_rise = second_rise if second_rise > jitter else 0.0
    return float(min(1.0, second_rise / first_rise) ** (window / q)), "accumulation curvature"


def _local_mean(values: np.ndarray, k: int) -> float:
    """Mean of values[k-1 : k+2] (three points around k, fewer at the edges): a less noisy reading of lag k."""
    return float(np.nanmean(values[max(0, k - 1) : k + 2]))


def suggest_truncation(bias: float, window: int, target: float) -> int:
    """Window length that would bring the share beyond it to `target`, from share ≈ ρ^window."""
    if not 0 < bias < 0.95:
        return int(4 * window)
    rho = bias ** (1.0 / window)
    return int(min(8 * window, math.ceil(math.log(target) / math.log(rho))))
