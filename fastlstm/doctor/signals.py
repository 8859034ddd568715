"""What the doctor measures in a History, once per history, for the rules to share.

`Signals` derives the quantities several rules read (initial and final loss, the loss of a constant predictor,
gradient-norm profiles through time, gate saturation series, input scale offenders) from a HistoryView; the
statistics it and the rules apply are measures.py's, the numbers the rules compare them with thresholds.py's.
Nothing here decides what is a problem: that is the rules' job (rules/<family>.py).
"""

from __future__ import annotations

import dataclasses
import math
from functools import cached_property

import numpy as np

from ..history_view import HistoryView
from .measures import kendall_tau, median_positive, median_se, scale_offenders
from .thresholds import Thresholds

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


def _onset(steps: np.ndarray, loss: np.ndarray, width: int, level: float, start: int) -> int:
    """The first step from index `start` on at which the running median of `width` losses exceeds `level`."""
    smooth = _running_median(loss, width)
    start = min(start, smooth.size - 1)
    above = np.flatnonzero(smooth[start:] > level)
    index = start + (int(above[0]) if above.size else smooth.size - 1 - start)
    return int(steps[min(index + width // 2, steps.size - 1)])  # the middle of the first window above


def train_level_near(s: Signals, step: int) -> float:
    """Median training loss over the steps just before `step` (the 20 preceding finite losses)."""
    steps, loss = s.losses
    before = loss[steps <= step][-20:]
    return float(np.median(before)) if before.size else math.nan
