"""What the doctor measures in a History, and the thresholds its rules compare the measurements with.

`Signals` derives, once per history, the quantities several rules share (initial and final loss, the loss of a
constant predictor, gradient-norm profiles through time, gate saturation series, input scale offenders); the
module-level functions are the measurements themselves (robust medians, Kendall's tau, the share of gradient a
truncation window misses). Nothing here decides what is a problem: that is rules.py, against `Thresholds`.
"""

from __future__ import annotations

import dataclasses
import math
from functools import cached_property

import numpy as np

from ..history_view import HistoryView


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Every number a rule compares against. docs/doctor.md explains each; override for experiments with
    `diagnose(history, Thresholds(...))`."""

    min_steps: int = 10  # loss rules need at least this many finite training losses
    # exploding_gradients
    explode_through_time: float = 1e3  # max_t ‖∂L/∂h_t‖ / ‖∂L/∂h_T‖ (or 10·T if larger)
    explode_spike: float = 100.0  # max grad norm / median grad norm across steps
    explode_error: float = 1e4  # spike or growth ratio at which the finding is an error
    # vanishing_gradients
    vanish_ratio: float = 1e-3  # ‖∂L/∂h‖ at the sequence start / at its end
    learned_fraction: float = 0.5  # the run "learned" if final loss < this × initial loss
    # gate_saturation
    saturation_warning: float = 0.6  # fraction of a gate's activations saturated, averaged over recent windows
    forget_open_share: float = 0.5  # forget-gate saturation provably this much *open* is memory, not a fault
    # unscaled_inputs / unscaled_targets
    feature_rms_max: float = 10.0  # sqrt(mean² + std²) of one feature
    feature_spread_max: float = 1e3  # largest / smallest feature RMS
    target_offset: float = 3.0  # |mean| / std of a target beyond which its offset dominates
    initial_vs_constant: float = 10.0  # initial loss / MSE of the constant (mean) predictor
    # loss_stagnant / loss_zero
    stagnant_improvement: float = 0.05  # relative fall of the loss from its start to its end
    stagnant_sigmas: float = 3.0  # the fall must exceed this many standard errors of the loss level
    zero_relative: float = 1e-6  # final / initial loss at or below which the loss counts as zero
    # train_val_divergence
    min_evals: int = 5
    divergence_rise: float = 0.1  # recent validation loss above its best by this fraction
    divergence_trend: float = 0.3  # Kendall's tau of the validation loss after its best
    divergence_noise_multiple: float = 3.0  # the rise, in multiples of the curve's evaluation-to-evaluation noise
    # val_oscillation
    oscillation_rise: float = 0.15  # median rise of val_loss (when it rises), relative to the value before it
    oscillation_sign_changes: float = 0.5  # fraction of successive changes that reverse direction
    oscillation_swing_to_trend: float = 4.0  # total |Δ val_loss| / |net change| over the later evaluations
    # subset_disparity
    subset_ratio: float = 2.0  # worst subset loss / median of the other subsets
    # truncation_too_short
    truncation_bias: float = 0.1  # estimated share of the gradient that lies beyond the truncation window
    truncation_min_correlation: float = 0.2  # residual-input correlation beyond k2 that matters (r² ≥ 4%)


DEFAULT_THRESHOLDS = Thresholds()


@dataclasses.dataclass(frozen=True)
class GradientProfile:
    """The recent per-timestep gradient norms of one layer-direction, in its own time order (last = where
    backpropagation starts), as the median over the later half of the telemetry windows."""

    lstm: str
    layer: int
    direction: int
    norms: np.ndarray
    windows: int
    first_step: int  # training steps the windows span
    last_step: int

    @property
    def where(self) -> dict:
        return {"lstm": self.lstm, "layer": self.layer, "direction": self.direction}

    @cached_property
    def end(self) -> float:
        """Gradient norm at the last steps (where the loss enters), the profile's reference level."""
        return median_positive(self.norms[-max(1, len(self.norms) // 10) :])

    @cached_property
    def start(self) -> float:
        return median_positive(self.norms[: max(1, len(self.norms) // 10)])

    @property
    def decay(self) -> float:
        """start / end: < 1 when gradients shrink going back in time, > 1 when they grow."""
        return self.start / self.end if self.end > 0 else math.nan

    @property
    def peak_growth(self) -> float:
        return float(np.nanmax(self.norms)) / self.end if self.end > 0 else math.nan

    def horizon(self, fraction: float) -> int:
        """How many steps back from the end the gradient stays above `fraction` × its end level."""
        above = self.norms[::-1] >= fraction * self.end
        return int(np.argmin(above)) if not above.all() else len(self.norms)


def median_positive(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(np.median(values)) if values.size else math.nan


class Signals:
    """Measurements derived from a HistoryView, shared by the rules."""

    def __init__(self, view: HistoryView, thresholds: Thresholds):
        self.view = view
        self.th = thresholds

    # ---- training loss ----

    @cached_property
    def losses(self) -> tuple:
        return self.view.finite_losses()

    @cached_property
    def initial_loss(self) -> float:
        """Median of the first few finite losses (5% of the run, at most 5 steps): the loss at initialisation."""
        _, loss = self.losses
        if loss.size == 0:
            return math.nan
        return float(np.median(loss[: max(1, min(5, math.ceil(0.05 * loss.size)))]))

    @cached_property
    def final_window(self) -> np.ndarray:
        """The last 20% of the finite losses."""
        _, loss = self.losses
        return loss[-max(1, loss.size // 5) :]

    @cached_property
    def final_loss(self) -> float:
        return float(np.median(self.final_window)) if self.final_window.size else math.nan

    @property
    def learned(self) -> bool:
        """The loss fell substantially over the run (a task the network is solving)."""
        return math.isfinite(self.final_loss) and self.final_loss < self.th.learned_fraction * abs(self.initial_loss)

    @cached_property
    def constant_predictor_mse(self) -> float:
        """The MSE of always predicting each target's mean: what a model that learned nothing achieves."""
        stats = self.view.target_stats()
        if stats is None or not np.all(np.isfinite(stats.std)):
            return math.nan
        return float(np.mean(stats.std**2))

    # ---- learning rate and gradient norms ----

    @cached_property
    def lr(self) -> float:
        lr = self.view.lr[np.isfinite(self.view.lr)]
        return float(np.median(lr)) if lr.size else math.nan

    @cached_property
    def grad_norms(self) -> tuple:
        """(steps, finite global gradient norms of non-skipped steps)."""
        keep = np.isfinite(self.view.grad_norm) & ~self.view.skipped
        return self.view.step[keep], self.view.grad_norm[keep]

    # ---- telemetry ----

    @cached_property
    def profiles(self) -> list:
        """One GradientProfile per LSTM layer-direction that has backward telemetry."""
        result = []
        for name, windows in self.view.telemetry.items():
            slots = max((len(w.layers) for w in windows), default=0)
            for k in range(slots):
                profile = _recent_profile(name, windows, k)
                if profile is not None:
                    result.append(profile)
        return result

    def saturation_series(self) -> list:
        """(lstm, layer, direction, gate, [(step, fraction)], [forget_gate_mean]) for every gate with telemetry."""
        result = []
        for name, windows in self.view.telemetry.items():
            slots = max((len(w.layers) for w in windows), default=0)
            for k in range(slots):
                seen = [(w.step, w.layers[k]) for w in windows if k < len(w.layers) and w.layers[k].elements > 0]
                if not seen:
                    continue
                layer = seen[0][1]
                forget = [lw.forget_gate_mean for _, lw in seen]
                for gate in ("i", "f", "g", "o"):
                    series = [(s, lw.gate_saturation[gate]) for s, lw in seen]
                    result.append((name, layer.layer, layer.direction, gate, series, forget))
        return result

    # ---- inputs ----

    @cached_property
    def unscaled(self) -> dict:
        """lstm name -> list of offending feature names (for cross-references from other rules)."""
        result = {}
        for name in self.view.inputs:
            stats = self.view.input_stats(name)
            if stats is None or not np.all(np.isfinite(stats.rms)):
                continue
            big, small, _ = scale_offenders(stats, self.th)
            if big or small:
                names = self.view.feature_names(name, stats.mean.size)
                result[name] = [names[j] for j in big + small]
        return result


def _recent_profile(name: str, windows: list, slot: int) -> GradientProfile | None:
    rows = []
    for w in windows:
        if slot < len(w.layers):
            norms = w.layers[slot].grad_in_own_order()
            if norms.size >= 4 and np.isfinite(norms).any():
                rows.append((w.step, w.layers[slot], norms))
    if not rows:
        return None
    # Windows can differ in length (a shorter last chunk); keep those of the most common length.
    lengths = [r[2].size for r in rows]
    modal = max(set(lengths), key=lengths.count)
    rows = [r for r in rows if r[2].size == modal]
    recent = rows[len(rows) // 2 :]
    with np.errstate(all="ignore"):
        norms = np.nanmedian(np.stack([r[2] for r in recent]), axis=0)
    layer = recent[0][1]
    return GradientProfile(name, layer.layer, layer.direction, norms, len(recent), recent[0][0], recent[-1][0])


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


def nanmean(values) -> float:
    values = np.array([v for v in values if v is not None], dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else math.nan


def forget_open_share(mean: float, saturated: float) -> float:
    """A lower bound on the share of saturated forget activations that are saturated *open* (σ > 0.95), from the
    gate's mean and saturated fraction alone: unsaturated activations contribute at most 0.95 each to the mean, so
    at least mean - 0.95·(1 - saturated) of the activations sit near 1."""
    if not (math.isfinite(mean) and saturated > 0):
        return math.nan
    return float(min(1.0, max(0.0, mean - 0.95 * (1.0 - saturated)) / saturated))


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


def train_level_near(s: Signals, step: int) -> float:
    """Median training loss over the steps just before `step` (the 20 preceding finite losses)."""
    steps, loss = s.losses
    before = loss[steps <= step][-20:]
    return float(np.median(before)) if before.size else math.nan
