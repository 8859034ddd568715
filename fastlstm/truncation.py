"""How far back to backpropagate: truncation estimates from the telemetry, the adaptive controller, the residual
probe and the evidence the doctor reads (docs/training.md, "Adaptive truncation").

The trainer (tbptt.py) feeds this module host numbers (telemetry profiles, probe sums) and asks it for a lag; nothing
here touches the model.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .doctor.trainer_evidence import residual_dependencies  # noqa: F401  (re-exported: the probe's test)
from .doctor.trainer_evidence import truncation_evidence as _evidence_in_view
from .history_view import HistoryView

# ---- truncation estimates from the gradient norms ----

# A lag is still in use while the gradient reaching the state there is at least this fraction of the largest one
# in the window's profile. Why 1%: a memory the model holds sits in a few units whose cell gradient passes back
# undiminished (forget gate near 1) while the other units' gradients decay; measured over all units, the held part
# is about sqrt(units holding it / hidden size) of the total, 1/23 for one unit in 512, and averaging over the k1
# losses of a chunk (only some of which read that memory) costs up to another factor sqrt(k1). 1% keeps one held
# unit in a few hundred visible, while a cell that merely forgets (mean forget gate f) falls below it after
# ln(0.01)/ln(f) steps: 7 at f = 0.5, 21 at f = 0.8, so a short dependency still lets the window shrink.
USED_GRADIENT = 0.01
# A profile value below this fraction of its largest counts as zero (rounding of a gradient that did not arrive).
VANISHED = 1e-12


class DependencyEstimate(NamedTuple):
    rate: float  # fitted per-step decay of the profile over the last half of the measured lags (>= 1: none)
    dependency: float  # smallest lag whose relative gradient bias is <= the target (inf without decay)
    bias: float  # relative gradient bias of the truncation that was measured (mass beyond its last lag)
    reach: float  # farthest lag where the profile is >= reach_fraction of its peak (extrapolated past the window)


def _tail_rate(g: np.ndarray) -> float:
    """Per-step decay of a positive profile: exp of the log-linear slope over its last half."""
    m = g.size - 1
    lags = np.arange(max(1, m // 2), m + 1)
    return float(math.exp(np.polyfit(lags, np.log(g[lags]), 1)[0]))


def check_estimation(target_bias: float, reach_fraction: float) -> None:
    """The two fractions estimate_dependency takes logarithms of: both strictly between 0 and 1."""
    if not 0 < target_bias < 1:
        raise ValueError(f"target_bias must be in (0, 1), got {target_bias!r}")
    if not 0 < reach_fraction < 1:
        raise ValueError(f"reach_fraction must be in (0, 1), got {reach_fraction!r}")


def estimate_dependency(lag_profile, target_bias: float, reach_fraction: float = USED_GRADIENT):
    """How far back gradients matter, from g[k] = ‖∂L/∂h‖ (or ‖∂L/∂c‖) at lag k = 0..m before the first loss of a
    window. Returns a DependencyEstimate, or None when the profile is too short (m < 2) or not usable
    (non-finite, or zero at lag 0).

    dependency (the gradient's mass): the relative bias of truncating at lag k is the mass beyond k over the total,
    with the measured values up to m and a geometric tail beyond m (rate fitted on the last half of the profile):
    bias(k) = (Σ_{k<j<=m} g_j + T) / (Σ_{j<=m} g_j + T), T = g_m·β/(1-β).
    reach (the gradient's extent): the farthest lag k with g_k >= reach_fraction·max(g); when that is the last
    measured lag, the gradient reaches past the window and the geometric tail gives the lag where it falls below.
    The mass criterion alone would cut a memory held at constant strength for D steps at about (1 - target)·D,
    the steps whose gradient trains the memory's write; the reach keeps them.
    """
    g = np.asarray(lag_profile, dtype=np.float64)
    if g.size < 3 or not np.all(np.isfinite(g)) or g[0] <= 0:
        return None
    vanished = g[-1] <= g.max() * VANISHED  # nothing reached the window's start: there is no tail to extrapolate
    g = np.maximum(g, g.max() * VANISHED)  # logs of exact zeros
    m = g.size - 1
    rate = 0.0 if vanished else _tail_rate(g)
    reach = _reach(g, rate, reach_fraction)
    if rate >= 1.0:
        return DependencyEstimate(rate, math.inf, 1.0, reach)
    beyond = 0.0 if vanished else g[m] * rate / (1.0 - rate)
    total = g.sum() + beyond
    after = np.append(np.cumsum(g[::-1])[::-1][1:], 0.0) + beyond  # mass beyond lag k, k = 0..m
    bias = after / total
    within = np.flatnonzero(bias <= target_bias)
    if within.size:
        dependency = float(within[0])
    else:  # beyond the measured lags: beyond·β^(k-m) <= target·total
        dependency = float(m + math.ceil(math.log(target_bias * total / beyond) / math.log(rate)))
    return DependencyEstimate(rate, dependency, float(bias[m]), reach)


def _reach(g: np.ndarray, rate: float, fraction: float) -> float:
    level = fraction * g.max()
    last = int(np.flatnonzero(g >= level)[-1])
    m = g.size - 1
    if last < m:
        return float(last)
    if rate >= 1.0:
        return math.inf
    return m + max(0.0, math.log(level / g[m]) / math.log(rate))


class StateEstimate(NamedTuple):
    """One window's estimate from the gradients reaching both parts of the state, h and c (at least one usable)."""

    hidden: DependencyEstimate | None  # None when that profile was not usable
    cell: DependencyEstimate | None  # None when that profile was not usable (or not recorded)

    @property
    def parts(self) -> tuple:
        return tuple(e for e in (self.hidden, self.cell) if e is not None)

    @property
    def dependency(self) -> float:
        """The lag the window needs: the larger of the mass and the reach criteria, over h and c."""
        return max(max(e.dependency, e.reach) for e in self.parts)

    @property
    def rate(self) -> float:
        return max(e.rate for e in self.parts)

    @property
    def bias(self) -> float:
        return max(e.bias for e in self.parts)


def estimate_state_dependency(
    hidden_profile, cell_profile, target_bias: float, reach_fraction: float = USED_GRADIENT
) -> StateEstimate | None:
    """estimate_dependency on the ‖∂L/∂h‖ and ‖∂L/∂c‖ lag profiles of one layer; None when neither is usable (a
    memory held in c alone can leave ‖∂L/∂h‖ zero at the first loss: the cell profile still counts)."""
    hidden = estimate_dependency(hidden_profile, target_bias, reach_fraction)
    cell = None if cell_profile is None else estimate_dependency(cell_profile, target_bias, reach_fraction)
    return None if hidden is None and cell is None else StateEstimate(hidden, cell)


# The loss guard compares the mean training loss of the GUARD_CHUNKS chunks before a decrease of the lag with that
# of the GUARD_CHUNKS chunks from it on. 20: two default telemetry windows, enough chunks for a mean and its
# standard error, short enough that the next decrease (which waits for the verdict) is not held up for long. A rise
# counts when it exceeds LOSS_RISE_Z standard errors of the difference (chance alone does that about once in 700
# comparisons of independent chunks) and LOSS_RISE_MIN relatively: consecutive chunks of the same streams are
# correlated, which makes the standard error optimistic.
GUARD_CHUNKS = 20
LOSS_RISE_Z = 3.0
LOSS_RISE_MIN = 0.05


class LossGuard(NamedTuple):
    """A decrease of the lag waiting for its verdict."""

    step: int  # the first chunk trained with the lower lag
    previous_lag: int


def _moments(values) -> tuple:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.var(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def loss_rose(before: tuple, after: tuple, z: float = LOSS_RISE_Z, minimum: float = LOSS_RISE_MIN) -> bool:
    """Whether the mean loss `after` (mean, variance, count) is significantly above `before`."""
    (m0, v0, n0), (m1, v1, n1) = before, after
    spread = math.sqrt(v0 / max(n0, 1) + v1 / max(n1, 1))
    return m1 > m0 + z * spread and m1 - m0 > minimum * abs(m0)  # relative to the loss's size: losses may be < 0


class AdaptiveTruncation:
    """Chooses the backpropagation lag (k2 - k1) (docs/training.md, "Adaptive truncation").

    The lag follows an exponential moving average of the window estimates (starting from the initial lag; each
    estimate is the larger of the gradient-mass and gradient-reach criteria over h and c), raised to the residual
    floor (the farthest lag at which the residual probe still sees an unexplained dependency) and to the loss floor
    (a lag whose decrease made the training loss rise), rounded up, bounded to [k_min, k_max], and changed only when
    it moves by at least max(1, lag / 8). Each decrease is checked against the training loss before the next one
    (`LossGuard`); a rise restores the previous lag and keeps it as the loss floor.
    """

    def __init__(
        self,
        k_min: int,
        k_max: int,
        target_bias: float = 0.1,
        smoothing: float = 0.7,
        initial: int | None = None,
        reach_fraction: float = USED_GRADIENT,
    ):
        if not 2 <= k_min <= k_max:
            raise ValueError(f"need 2 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}")
        check_estimation(target_bias, reach_fraction)
        if not 0 <= smoothing < 1:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}")
        self.k_min, self.k_max = int(k_min), int(k_max)
        self.target_bias = float(target_bias)
        self.smoothing = float(smoothing)
        self.reach_fraction = float(reach_fraction)
        # Start long: a dependency the model has not learned yet cannot show in its gradients.
        self.lag = int(min(max(initial if initial is not None else k_max, k_min), k_max))
        self.dependency: float = float(self.lag)
        self.rate: float | None = None
        self.floor: int = 0
        self.loss_floor: int = 0
        self.guard: LossGuard | None = None

    def observe(self, dependency: float | None, rate: float | None, floor: int | None = None) -> bool:
        """Fold in one window's estimate (the largest over the monitored layers; None: no estimate) and the
        latest residual floor (None: unchanged); True when the lag changed. While a decrease awaits its loss
        verdict the lag does not decrease further."""
        s = self.smoothing
        if dependency is not None:
            dependency = min(dependency, 2.0 * self.k_max)  # infinity (no decay seen): "far beyond k_max"
            self.dependency = s * self.dependency + (1 - s) * dependency
        if rate is not None:
            rate = min(rate, 1.0)
            self.rate = rate if self.rate is None else s * self.rate + (1 - s) * rate
        if floor is not None:
            self.floor = int(floor)
        target = self._bounded(max(math.ceil(self.dependency - 1e-9), self.floor, self.loss_floor))
        if target < self.lag and self.guard is not None:
            return False
        if abs(target - self.lag) >= max(1, self.lag // 8):
            self.lag = target
            return True
        return False

    def decreased(self, step: int, previous_lag: int) -> None:
        """Start the loss check of a decrease from `previous_lag` that takes effect at chunk `step`."""
        self.guard = LossGuard(int(step), int(previous_lag))

    def check_loss(self, losses, horizon: int) -> bool | None:
        """Judge the pending decrease. losses: (step, training loss) pairs read back so far, every step below
        `horizon` among them. Returns None while undecided (or nothing pending), False when the decrease stays,
        True when the loss rose: the previous lag is restored and becomes the loss floor."""
        if self.guard is None or horizon < self.guard.step + GUARD_CHUNKS:
            return None
        guard, self.guard = self.guard, None
        before = [v for n, v in losses if guard.step - GUARD_CHUNKS <= n < guard.step and math.isfinite(v)]
        after = [v for n, v in losses if guard.step <= n < guard.step + GUARD_CHUNKS and math.isfinite(v)]
        if len(before) < 2 or len(after) < 2 or not loss_rose(_moments(before), _moments(after)):
            return False
        self.loss_floor = max(self.loss_floor, self._bounded(guard.previous_lag))
        self.lag = max(self.lag, self.loss_floor)
        self.dependency = max(self.dependency, float(self.loss_floor))
        return True

    def increased(self) -> None:
        """An increase back to the lag before a pending decrease makes its check moot."""
        if self.guard is not None and self.lag >= self.guard.previous_lag:
            self.guard = None

    def _bounded(self, lag: int) -> int:
        return int(min(max(lag, self.k_min), self.k_max))

    def state_dict(self) -> dict:
        return {
            "lag": self.lag,
            "dependency": self.dependency,
            "rate": self.rate,
            "floor": self.floor,
            "loss_floor": self.loss_floor,
            "guard": None if self.guard is None else list(self.guard),
        }

    def load_state_dict(self, state: dict) -> None:
        self.lag, self.dependency, self.rate = int(state["lag"]), float(state["dependency"]), state["rate"]
        self.floor = int(state["floor"])
        self.loss_floor = int(state.get("loss_floor", 0))
        guard = state.get("guard")
        self.guard = None if guard is None else LossGuard(int(guard[0]), int(guard[1]))


# ---- residual probe: dependencies the model has not learned ----


class ResidualProbe:
    """Correlation between the loss gradient w.r.t. the model's outputs (the residual) and the inputs k steps
    earlier, k = 0..lags, accumulated on the device.

    The gradient norms only show dependencies the model already uses; a truncation shorter than the data's
    dependency keeps the model from learning it, so its gradients look short. The residual still correlates with
    the input it should have used: Σ e_t x_{t-k}ᵀ is the gradient a direct connection from lag k would receive.
    Inputs and outputs wider than `dims` are reduced by a fixed random projection.
    """

    def __init__(self, lags: int, dims: int = 8):
        self.lags = int(lags)
        self.dims = int(dims)
        self.count = 0
        self.sums = None  # [cross (F, O, lags+1), residual energy (O,), input energy (F, lags+1)], float64
        self._projections: dict = {}

    def watch(self, pred: torch.Tensor, lagged_inputs: torch.Tensor, steps: int, flat_index, batch_first: bool):
        """Register a hook on `pred` (the tensor given to the loss). lagged_inputs: [rows, lags + steps, F], the
        inputs from `lags` steps before the chunk to its end, zero before the stream start."""
        if not pred.requires_grad:
            return
        rows = lagged_inputs.shape[0]
        self.count += pred.shape[0]

        def hook(grad):
            with torch.no_grad():
                self._accumulate(grad, lagged_inputs, rows, steps, flat_index, batch_first)

        pred.register_hook(hook)

    def _accumulate(self, grad, x, rows, steps, flat_index, batch_first):
        e = grad.detach().reshape(grad.shape[0], -1).float()
        mask = None
        if flat_index is not None:  # ragged chunk: scatter the valid positions back into the padded layout
            full = e.new_zeros(rows * steps, e.shape[1])
            e = full.index_copy_(0, flat_index, e)
            mask = e.new_zeros(rows * steps).index_fill_(0, flat_index, 1.0)
        e = e.view(rows, steps, -1) if batch_first else e.view(steps, rows, -1).transpose(0, 1)
        if mask is None:
            mask = e.new_ones(rows, steps)
        else:
            mask = mask.view(rows, steps) if batch_first else mask.view(steps, rows).t()
        e = self._project("out", e)
        x = self._project("in", x.float())
        inputs = x.permute(2, 0, 1).contiguous()  # [F, rows, lags + steps]
        # conv1d(input [F, rows, L+n], weight [O, rows, n])[f, o, j] = Σ_b Σ_t e[b,t,o]·x[b, j+t, f]; j = lags - k.
        cross = F.conv1d(inputs, e.permute(2, 0, 1).contiguous()).flip(-1)
        input_energy = F.conv1d(inputs * inputs, mask.unsqueeze(0)).flip(-1)[:, 0]
        residual_energy = (e * e).sum(dim=(0, 1))
        current = [cross.double(), residual_energy.double(), input_energy.double()]
        # A chunk whose residuals or inputs hold a NaN or inf (the trainer skips its step) adds nothing: one such
        # value would turn every correlation of the period into NaN. Decided on the device, with no sync; its rows
        # still count in `count`, which only sets the noise level of the period's correlations.
        finite = torch.stack([t.isfinite().all() for t in current]).all()
        current = [torch.where(finite, t, torch.zeros_like(t)) for t in current]
        self.sums = current if self.sums is None else [a + b for a, b in zip(self.sums, current)]

    def _project(self, kind: str, t: torch.Tensor) -> torch.Tensor:
        width = t.shape[-1]
        if width <= self.dims:
            return t
        key = (kind, width, t.device)
        if key not in self._projections:
            # Its own generator: the global RNG (dropout) must not notice the probe.
            gen = torch.Generator().manual_seed(1234 + width)
            self._projections[key] = torch.randn(width, self.dims, generator=gen).to(t.device)
        return t @ self._projections[key]

    def take(self):
        """(count, [cross, residual energy, input energy]) since the previous take, or None."""
        if self.sums is None or self.count == 0:
            self.sums, self.count = None, 0
            return None
        taken = (self.count, self.sums)
        self.sums, self.count = None, 0
        return taken

    def state_dict(self) -> dict:
        return {"count": self.count, "sums": self.sums}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.sums = int(state["count"]), state["sums"]


def correlation_by_lag(cross: np.ndarray, residual_energy: np.ndarray, input_energy: np.ndarray) -> np.ndarray:
    """max over (output, input feature) of |correlation| for each lag."""
    with np.errstate(invalid="ignore", divide="ignore"):
        denom = np.sqrt(input_energy[:, None, :] * residual_energy[None, :, None])
        corr = np.where(denom > 0, np.abs(cross) / denom, 0.0)
    return np.nan_to_num(corr.max(axis=(0, 1)), nan=0.0)


# ---- evidence for the doctor ----


def truncation_evidence(
    history, *, z: float = 5.0, min_correlation: float = 0.05, bias_threshold: float = 0.25
) -> dict | None:
    """Evidence that the truncation in force is shorter than the dependencies in the data, or None (a History, its
    dict or a path). The doctor's reading (doctor/trainer_evidence.py) is the one implementation; see it for the
    two sources and the keys."""
    return _evidence_in_view(HistoryView(history), z=z, min_correlation=min_correlation, bias_threshold=bias_threshold)
