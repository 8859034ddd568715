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

from .monitor import History

# ---- truncation estimates from the gradient norms ----


class DependencyEstimate(NamedTuple):
    rate: float  # fitted per-step decay of ‖∂L/∂h_{t-k}‖ over the last half of the measured lags (>= 1: none)
    dependency: float  # smallest lag whose relative gradient bias is <= the target (inf without decay)
    bias: float  # relative gradient bias of the truncation that was measured (mass beyond its last lag)


def estimate_dependency(lag_profile, target_bias: float) -> DependencyEstimate | None:
    """How far back gradients matter, from g[k] = ‖∂L/∂h‖ at lag k = 0..m before the first loss of a window.

    The relative bias of truncating at lag k is the gradient mass beyond k over the total, with the measured
    values up to m and a geometric tail beyond m (rate fitted on the last half of the profile):
    bias(k) = (Σ_{k<j<=m} g_j + T) / (Σ_{j<=m} g_j + T), T = g_m·β/(1-β). Returns None when the profile is too
    short (m < 2) or not usable (non-finite, zero).
    """
    g = np.asarray(lag_profile, dtype=np.float64)
    if g.size < 3 or not np.all(np.isfinite(g)) or g[0] <= 0:
        return None
    g = np.maximum(g, g[0] * 1e-12)  # logs of exact zeros
    m = g.size - 1
    lags = np.arange(max(1, m // 2), m + 1)
    slope = np.polyfit(lags, np.log(g[lags]), 1)[0]
    rate = float(math.exp(slope))
    if rate >= 1.0:
        return DependencyEstimate(rate, math.inf, 1.0)
    beyond = g[m] * rate / (1.0 - rate)
    total = g.sum() + beyond
    after = np.append(np.cumsum(g[::-1])[::-1][1:], 0.0) + beyond  # mass beyond lag k, k = 0..m
    bias = after / total
    within = np.flatnonzero(bias <= target_bias)
    if within.size:
        dependency = float(within[0])
    else:  # beyond the measured lags: beyond·β^(k-m) <= target·total
        dependency = float(m + math.ceil(math.log(target_bias * total / beyond) / math.log(rate)))
    return DependencyEstimate(rate, dependency, float(bias[m]))


class AdaptiveTruncation:
    """Chooses the backpropagation lag (k2 - k1) from dependency estimates: an exponential moving average of the
    gradient-decay estimates (starting from the initial lag), raised to the residual floor (the farthest lag at
    which the residual probe still sees an unexplained dependency), rounded up, bounded to [k_min, k_max], and
    changed only when it moves by at least max(1, lag / 8)."""

    def __init__(
        self, k_min: int, k_max: int, target_bias: float = 0.1, smoothing: float = 0.7, initial: int | None = None
    ):
        if not 2 <= k_min <= k_max:
            raise ValueError(f"need 2 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}")
        if not 0 < target_bias < 1 or not 0 <= smoothing < 1:
            raise ValueError("target_bias must be in (0, 1) and smoothing in [0, 1)")
        self.k_min, self.k_max = int(k_min), int(k_max)
        self.target_bias = float(target_bias)
        self.smoothing = float(smoothing)
        # Start long: a dependency the model has not learned yet cannot show in its gradients.
        self.lag = int(min(max(initial if initial is not None else k_max, k_min), k_max))
        self.dependency: float = float(self.lag)
        self.rate: float | None = None
        self.floor: int = 0

    def observe(self, dependency: float | None, rate: float | None, floor: int | None = None) -> bool:
        """Fold in one window's estimate (the largest over the monitored layers; None: no estimate) and the
        latest residual floor (None: unchanged); True when the lag changed."""
        s = self.smoothing
        if dependency is not None:
            dependency = min(dependency, 2.0 * self.k_max)  # infinity (no decay seen): "far beyond k_max"
            self.dependency = s * self.dependency + (1 - s) * dependency
        if rate is not None:
            rate = min(rate, 1.0)
            self.rate = rate if self.rate is None else s * self.rate + (1 - s) * rate
        if floor is not None:
            self.floor = int(floor)
        wanted = max(math.ceil(self.dependency - 1e-9), self.floor)
        target = int(min(max(wanted, self.k_min), self.k_max))
        if abs(target - self.lag) >= max(1, self.lag // 8):
            self.lag = target
            return True
        return False

    def state_dict(self) -> dict:
        return {"lag": self.lag, "dependency": self.dependency, "rate": self.rate, "floor": self.floor}

    def load_state_dict(self, state: dict) -> None:
        self.lag, self.dependency, self.rate = int(state["lag"]), float(state["dependency"]), state["rate"]
        self.floor = int(state["floor"])


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


def residual_dependencies(correlation, noise: float, *, z: float = 5.0, min_correlation: float = 0.05):
    """Lags whose residual correlation is significant (above z·noise and min_correlation) and at least half the
    largest one, ascending."""
    r = np.nan_to_num(np.asarray(correlation, dtype=np.float64))
    threshold = max(z * noise, min_correlation, 0.5 * r.max(initial=0.0))
    return np.flatnonzero(r > threshold)


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
    """Evidence that the truncation in force is shorter than the dependencies in the data, or None.

    Two sources, the first that fires wins:
      residual_correlation: in the latest `dependency` entry, the residual correlates with the input at some lag
        >= k2 (no loss of a window reaches that far) above z/sqrt(count) and min_correlation, and at least half as
        much as at any lag (`residual_dependencies`); the farthest such lag is the estimated dependency;
      gradient_decay: over the latter half of the `truncation_estimates` for the k2 in force, the median relative
        gradient bias (mass beyond the measured lag) exceeds bias_threshold.
    Keys: k (k2 in force), k1, lag (k2 - k1), estimated_dependency (steps), source, lstm (name or None), step, and
    correlation/noise or bias/rate.
    """
    h = history if isinstance(history, History) else History.from_dict(history)
    truncations = h.events_of("truncation")
    if not truncations:
        return None
    detail = truncations[-1]["detail"]
    k1, k2 = int(detail["k1"]), int(detail["k2"])
    base = {"k": k2, "k1": k1, "lag": k2 - k1}
    single = next(iter(h.lstms)) if len(h.lstms) == 1 else None

    probes = [e for e in h.extra.get("dependency", []) if e.get("count", 0) > 0 and int(e.get("k2", -1)) == k2]
    if probes:
        latest = max(probes, key=lambda e: e["step"])
        r = np.nan_to_num(np.asarray(latest["correlation"], dtype=np.float64))
        significant = residual_dependencies(r, float(latest["noise"]), z=z, min_correlation=min_correlation)
        beyond = significant[significant >= k2]
        if beyond.size:
            lag = int(beyond[-1])
            return {
                **base,
                "estimated_dependency": lag,
                "source": "residual_correlation",
                "lstm": single,
                "step": latest["step"],
                "correlation": float(r[lag]),
                "noise": float(latest["noise"]),
            }

    estimates = sorted(
        (e for e in h.extra.get("truncation_estimates", []) if int(e["k2"]) == k2), key=lambda e: e["step"]
    )
    recent = estimates[len(estimates) // 2 :]
    if recent:
        bias = float(np.median([e["bias"] for e in recent]))
        if bias > bias_threshold:
            dependency = float(np.median([e["estimated_dependency"] for e in recent]))
            worst = max(recent, key=lambda e: e["bias"])
            return {
                **base,
                "estimated_dependency": dependency,
                "source": "gradient_decay",
                "lstm": worst["lstm"],
                "step": recent[-1]["step"],
                "bias": bias,
                "rate": float(np.median([e["rate"] for e in recent])),
            }
    return None
