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
    explode_spike: float = 100.0  # a step's grad norm / its baseline (see `spike_baseline_steps`)
    explode_error: float = 1e4  # spike or growth ratio at which the finding is an error
    spike_baseline_steps: int = 20  # baseline: median norm of this many preceding steps, floored (docs/doctor.md)
    spike_min_steps: int = 2  # a warning needs this many spiking steps; a lone spike is info
    explode_growth: float = 100.0  # median grad norm of the last 20% of steps / of the first 10%
    clip_contains: float = 0.9  # clipping "contains" the spikes when it was in effect on this share of them
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
    # loss_diverging
    diverge_rise: float = 0.2  # final loss above the lower of its initial and best level by this fraction
    diverge_error: float = 10.0  # final / reference at which the finding is an error (or a non-finite end)
    update_ratio_high: float = 1e-2  # ‖Δθ‖/‖θ‖ per step; ~1e-3 is the usual healthy order
    clip_active_share: float = 0.5  # clipping counts as in effect when it scaled this share of the steps
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
    carried_share: float = 0.5  # share of an LSTM's training passes given a nonzero, detached state: chunked


DEFAULT_THRESHOLDS = Thresholds()

# Loss levels are compared over five consecutive blocks (fifths of the run): long enough to average out structure
# within a run (a stream's easy first chunks, an epoch's batch order), short enough that a late rise is its own block.
LOSS_BLOCKS = 5


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

    @cached_property
    def loss_blocks(self) -> list:
        """The finite training losses cut into `LOSS_BLOCKS` consecutive blocks of (nearly) equal length: levels
        compared block by block, not step by step, so that structure within a run (a stream whose first chunks are
        easy, an epoch's order) averages out inside each block."""
        _, loss = self.losses
        return [b for b in np.array_split(loss, LOSS_BLOCKS) if b.size] if loss.size >= self.th.min_steps else []

    @cached_property
    def best_level(self) -> float:
        """The lowest block median before the final block: the best level the loss held, not one lucky batch."""
        medians = [float(np.median(b)) for b in self.loss_blocks[:-1]]
        return min(medians) if medians else math.nan

    @cached_property
    def ended_nonfinite(self) -> bool:
        """The last measured loss is NaN/inf and its step was not skipped: the run ended broken."""
        view = self.view
        known = np.flatnonzero(view.loss_known & ~view.skipped)
        return bool(known.size) and not math.isfinite(view.loss[known[-1]])

    @cached_property
    def rising(self) -> dict | None:
        """Evidence that the training loss rose instead of falling, or None. The final block's median must exceed
        the best earlier block's by more than `diverge_rise` and by more than `stagnant_sigmas` standard errors of
        the two, and either by orders of magnitude (≥ `diverge_error`×, measured from the lower of the best block
        and the first few losses) or as a trend (Kendall's τ of the block medians from the best block on ≥ 0.5).
        Keys: reference, final, rise, noise_standard_error, onset_step (the first step after the best block whose
        running median passes reference × (1 + diverge_rise))."""
        th, blocks = self.th, self.loss_blocks
        if len(blocks) < 2:
            return None
        medians = np.array([np.median(b) for b in blocks])
        final = float(medians[-1])
        _, loss = self.losses
        best = int(np.argmin(medians[:-1]))
        best_start = sum(b.size for b in blocks[:best])
        # Orders of magnitude above the loss at initialisation need no trend (the rise may be over within a few
        # steps), only a final block that never comes back near it (a stream whose first chunks are easy revisits
        # its low start every epoch); a moderate rise must be a trend across blocks.
        candidates = [(float(loss[0]), loss[:1], True), (float(medians[best]), blocks[best], False)]
        for reference, near, fast in candidates:
            if not reference > 0:
                continue
            if fast and not (final >= th.diverge_error * reference and blocks[-1].min() > 2.0 * reference):
                continue
            if not fast and not final > reference * (1.0 + th.diverge_rise):
                continue
            # Positive losses are compared in log terms: after a rise by orders of magnitude the last block's
            # spread is as large as its level, which would swamp a linear comparison.
            logs = bool(near.min() > 0 and blocks[-1].min() > 0)
            scale = np.log if logs else (lambda x: x)
            noise = math.hypot(median_se(scale(near)), median_se(scale(blocks[-1])))
            if not float(scale(final) - scale(reference)) > th.stagnant_sigmas * noise:
                continue
            trend = kendall_tau(medians[best:]) if medians.size - best >= 3 else 1.0
            if not fast and trend < 0.5:
                continue
            break
        else:
            return None
        steps, loss = self.losses
        width = max(3, loss.size // 20)
        return {
            "reference": reference,
            "final": final,
            "rise": final / reference - 1.0,
            "noise_standard_error": noise,
            "noise_in_log_terms": logs,
            "block_trend_kendall_tau": trend,
            "from_initialisation": fast,
            "onset_step": _onset(steps, loss, width, reference * (1.0 + th.diverge_rise), 0 if fast else best_start),
        }

    @property
    def divergence_onset(self) -> int | None:
        return None if self.rising is None else self.rising["onset_step"]

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

    @cached_property
    def applied_norms(self) -> tuple:
        """(steps, norm before clipping, norm the optimizer step used) where both were measured and finite."""
        v = self.view
        keep = np.isfinite(v.grad_norm) & np.isfinite(v.grad_norm_applied) & ~v.skipped
        return v.step[keep], v.grad_norm[keep], v.grad_norm_applied[keep]

    @cached_property
    def clipped(self) -> np.ndarray:
        """Per step of `applied_norms`: clipping scaled the gradient down (by more than 0.1%)."""
        _, before, after = self.applied_norms
        return after < (1.0 - 1e-3) * before

    @property
    def clip_share(self) -> float:
        """Share of the measured steps whose gradient was clipped; nan when nothing says."""
        return float(self.clipped.mean()) if self.clipped.size else math.nan

    @cached_property
    def update_ratios(self) -> tuple:
        """(steps, ‖Δθ‖/‖θ‖) of the sampled steps with a finite ratio."""
        v = self.view
        keep = np.isfinite(v.update_ratio) & ~v.skipped
        return v.step[keep], v.update_ratio[keep]

    # ---- recurrent state ----

    @cached_property
    def chunked_lstms(self) -> dict:
        """LSTM name -> carried_state totals, for the LSTMs whose training passes mostly started from a state that
        was passed in, not all zeros, and detached: a stream cut into chunks whose gradient stops at each chunk's
        start, whoever does the chunking."""
        result = {}
        share = self.th.carried_share
        for name in self.view.states:
            c = self.view.carried_state(name)
            if c["passes"] and c["nonzero_state"] >= share * c["passes"] and c["attached_state"] < share * c["passes"]:
                result[name] = c
        return result

    # ---- telemetry ----

    @cached_property
    def profiles(self) -> list:
        """One GradientProfile per LSTM layer-direction that has backward telemetry (the later half of its
        windows)."""
        return self._profiles(0.5)

    @cached_property
    def latest_profiles(self) -> list:
        """The same from the latest quarter of the windows (at least three): the network as it ends."""
        return self._profiles(0.25)

    def _profiles(self, fraction: float) -> list:
        result = []
        for name, windows in self.view.telemetry.items():
            slots = max((len(w.layers) for w in windows), default=0)
            for k in range(slots):
                profile = _recent_profile(name, windows, k, fraction)
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


def _recent_profile(name: str, windows: list, slot: int, fraction: float = 0.5) -> GradientProfile | None:
    """The profile of one layer-direction from the latest `fraction` of its usable windows (at least three).

    A window is usable when no non-finite value arose in it and its gradient norms are finite: a window in which
    the backward overflowed says nothing about how gradients decay. Windows are compared by shape, not scale
    (each divided by its own end level before the median), so that windows from different stages of a run whose
    gradients grew or shrank by orders of magnitude do not mix into a profile that none of them had.
    """
    rows = []
    for w in windows:
        if slot >= len(w.layers) or w.first_nonfinite:
            continue
        norms = w.layers[slot].grad_in_own_order()
        if norms.size >= 4 and np.isfinite(norms).all() and median_positive(norms[-max(1, norms.size // 10) :]) > 0:
            rows.append((w.step, w.layers[slot], norms))
    if not rows:
        return None
    # Windows can differ in length (a shorter last chunk); keep those of the most common length.
    lengths = [r[2].size for r in rows]
    modal = max(set(lengths), key=lengths.count)
    rows = [r for r in rows if r[2].size == modal]
    recent = rows[-max(3, math.ceil(fraction * len(rows))) :]
    ends = np.array([median_positive(r[2][-max(1, modal // 10) :]) for r in recent])
    shapes = np.stack([r[2] / end for r, end in zip(recent, ends)])
    norms = np.median(shapes, axis=0) * float(np.median(ends))
    layer = recent[0][1]
    return GradientProfile(name, layer.layer, layer.direction, norms, len(recent), recent[0][0], recent[-1][0])


def _running_median(loss: np.ndarray, width: int) -> np.ndarray:
    if loss.size < width:
        return np.array([np.median(loss)]) if loss.size else loss
    return np.median(np.lib.stride_tricks.sliding_window_view(loss, width), axis=1)


def _lowest_run(loss: np.ndarray, width: int) -> np.ndarray:
    """The `width` consecutive losses with the lowest median (the best level and its noise)."""
    if loss.size <= width:
        return loss
    start = int(np.argmin(_running_median(loss, width)))
    return loss[start : start + width]


def _onset(steps: np.ndarray, loss: np.ndarray, width: int, level: float, start: int) -> int:
    """The first step from index `start` on at which the running median of `width` losses exceeds `level`."""
    smooth = _running_median(loss, width)
    start = min(start, smooth.size - 1)
    above = np.flatnonzero(smooth[start:] > level)
    index = start + (int(above[0]) if above.size else smooth.size - 1 - start)
    return int(steps[min(index + width // 2, steps.size - 1)])  # the middle of the first window above


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
