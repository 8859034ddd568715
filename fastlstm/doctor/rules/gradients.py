"""Gradients: exploding (through time in the telemetry; across steps as spikes against a baseline that does not
collapse, or as sustained growth) and vanishing through time."""

from __future__ import annotations

import math

import numpy as np

from ..findings import Finding
from ..registry import rule
from ..signals import GradientProfile, Signals
from .common import clip_value, lstm_label, merge_same_code, num, round_up_nice


@rule(
    "exploding_gradients",
    family="gradients",
    severity="warning; error beyond `explode_error`; info for a lone spike or spikes clipping contains",
    signal="growth of ‖∂L/∂h_t‖ going back in time; spikes of the global grad norm (before clipping) against the "
    "median of the preceding steps, floored at the early level; growth of the grad norm over the run",
    threshold="`explode_through_time` = 1e3 (or 10·T if larger); `explode_spike` = 100 over "
    "`spike_baseline_steps` = 20, at least `spike_min_steps` = 2; `explode_growth` = 100; `clip_contains` = 0.9",
)
def rule_exploding_gradients(s: Signals) -> list:
    findings = []
    th = s.th
    for p in s.profiles:
        limit = max(th.explode_through_time, 10.0 * len(p.norms))
        if p.peak_growth > limit:
            findings.append(_exploding_through_time(s, p, limit))
    steps, norms = s.grad_norms
    if norms.size >= th.min_steps:
        spikes = _spikes(s, steps, norms)
        if spikes is not None:
            findings.append(spikes)
        growth = _growth(s, steps, norms)
        if growth is not None:
            findings.append(growth)
    return merge_same_code(findings)


def _exploding_through_time(s: Signals, p: GradientProfile, limit: float) -> Finding:
    evidence = {
        **p.where,
        "growth_max_over_end": p.peak_growth,
        "threshold": limit,
        "timesteps": len(p.norms),
        "grad_norm_end": p.end,
        "grad_norm_max": float(np.nanmax(p.norms)),
        "steps": [p.first_step, p.last_step],
    }
    severity = "error" if p.peak_growth > s.th.explode_error * limit / s.th.explode_through_time else "warning"
    message = (
        f"Gradients grow going back in time in {lstm_label(p.where)}: ‖∂L/∂h_t‖ reaches {num(p.peak_growth)}× its "
        f"value at the last step over {len(p.norms)} timesteps (threshold {num(limit)}×)."
    )
    return Finding("exploding_gradients", severity, message, evidence, _exploding_remedy(s))


def spike_baseline(norms: np.ndarray, window: int, floor_ratio: float) -> np.ndarray:
    """Per step, what its gradient norm is compared with: the median of the `window` preceding steps (nan for the
    first three steps, which have too little before them), never below the median of the first `window` steps
    divided by `floor_ratio`. The floor keeps the baseline from collapsing when the loss converges (its gradient
    shrinks by orders of magnitude, and a harmless blip would read as a huge ratio): a spike must at least reach
    the size gradients had early in training."""
    floor = float(np.median(norms[:window])) / floor_ratio
    baseline = np.full(norms.size, np.nan)
    for t in range(3, norms.size):
        baseline[t] = max(float(np.median(norms[max(0, t - window) : t])), floor)
    return baseline


def _spikes(s: Signals, steps: np.ndarray, norms: np.ndarray) -> Finding | None:
    th = s.th
    baseline = spike_baseline(norms, th.spike_baseline_steps, th.explode_spike)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(baseline > 0, norms / baseline, np.nan)
    spiking = np.flatnonzero(ratio > th.explode_spike)
    if spiking.size == 0:
        return None
    peak = int(spiking[np.argmax(ratio[spiking])])
    contained = _clipped_share(s, steps[spiking])
    evidence = {
        "grad_norm_max": float(norms[peak]),
        "grad_norm_max_step": int(steps[peak]),
        "baseline_at_max": float(baseline[peak]),
        "spike_ratio": float(ratio[peak]),
        "spiking_steps": int(spiking.size),
        "onset_step": int(steps[spiking[0]]),
        "threshold": th.explode_spike,
        "baseline_steps": th.spike_baseline_steps,
    }
    if math.isfinite(contained):
        evidence["clipped_share_of_spikes"] = contained
    lone = spiking.size < th.spike_min_steps
    held = contained >= th.clip_contains and s.rising is None
    severity = "info" if lone or held else ("error" if ratio[peak] > th.explode_error else "warning")
    floored = baseline[peak] > float(np.median(norms[max(0, peak - th.spike_baseline_steps) : peak]))
    against = (
        f"the floor of its baseline ({num(baseline[peak])}: the median of the first {th.spike_baseline_steps} steps "
        f"÷ {num(th.explode_spike)}, above the median of the steps before it)"
        if floored
        else f"the median of the {th.spike_baseline_steps} steps before it ({num(baseline[peak])})"
    )
    message = (
        f"The gradient norm (before clipping) spikes to {num(norms[peak])} at step {int(steps[peak])}, "
        f"{num(ratio[peak])}× {against}; threshold {num(th.explode_spike)}×; "
        f"{spiking.size} step{'s' if spiking.size != 1 else ''} spiked."
    )
    if lone:
        message += " A single spike is not a pattern; it becomes one if it repeats."
    elif held:
        message += (
            f" Clipping scaled {num(100 * contained, 2)}% of those steps down and the loss did not rise: contained."
        )
    return Finding("exploding_gradients", severity, message, evidence, _exploding_remedy(s))


def _growth(s: Signals, steps: np.ndarray, norms: np.ndarray) -> Finding | None:
    """Gradients that grow over the run rather than spike: uniformly large late in training."""
    th = s.th
    early = norms[: max(3, norms.size // 10)]
    late = norms[-max(3, norms.size // 5) :]
    if not np.median(early) > 0:
        return None
    growth = float(np.median(late) / np.median(early))
    if not growth > th.explode_growth:
        return None
    late_steps = steps[-late.size :]
    contained = _clipped_share(s, late_steps)
    above = np.flatnonzero(norms > th.explode_growth**0.5 * np.median(early))
    evidence = {
        "grad_norm_early_median": float(np.median(early)),
        "grad_norm_late_median": float(np.median(late)),
        "growth": growth,
        "onset_step": int(steps[above[0]]) if above.size else int(late_steps[0]),
        "threshold_growth": th.explode_growth,
        "steps": [int(steps[0]), int(steps[-1])],
    }
    if math.isfinite(contained):
        evidence["clipped_share_late"] = contained
    held = contained >= th.clip_contains and s.rising is None
    severity = "info" if held else ("error" if growth > th.explode_error else "warning")
    message = (
        f"The gradient norm (before clipping) grew over the run: median {num(np.median(early))} over the first "
        f"{early.size} steps, {num(np.median(late))} over the last {late.size}, {num(growth)}× (threshold "
        f"{num(th.explode_growth)}×)."
    )
    if held:
        message += f" Clipping scaled {num(100 * contained, 2)}% of the late steps down and the loss did not rise."
    return Finding("exploding_gradients", severity, message, evidence, _exploding_remedy(s))


def _clipped_share(s: Signals, at_steps: np.ndarray) -> float:
    """Share of `at_steps` at which clipping scaled the gradient down (nan where nothing was recorded)."""
    clip_steps, _, _ = s.applied_norms
    if clip_steps.size == 0:
        return math.nan
    known = np.isin(at_steps, clip_steps)
    if not known.any():
        return math.nan
    clipped_steps = clip_steps[s.clipped]
    return float(np.isin(at_steps[known], clipped_steps).mean())


def _exploding_remedy(s: Signals) -> str:
    lr = f" (currently {num(s.lr)})" if math.isfinite(s.lr) else ""
    return (
        f"Clip gradients: `torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={num(clip_value(s))})` "
        "after `loss.backward()` (2× the typical norm of the healthy steps, so ordinary steps are unaffected). Lower "
        f"the learning rate{lr} by 3-10×, and re-initialise the recurrent weights with "
        "`fastlstm.init.orthogonal_(lstm)` so the recurrence starts norm-preserving."
    )


@rule(
    "vanishing_gradients",
    family="gradients",
    severity="warning if the run did not learn, info if it did",
    signal="start / end of the gradient profile through time",
    threshold="`vanish_ratio` = 1e-3",
)
def rule_vanishing_gradients(s: Signals) -> list:
    th = s.th
    findings = []
    for p in s.profiles:
        if not p.decay < th.vanish_ratio:
            continue
        horizon = p.horizon(0.01)
        severity = "info" if s.learned else "warning"
        evidence = {
            **p.where,
            "start_over_end": p.decay,
            "threshold": th.vanish_ratio,
            "timesteps": len(p.norms),
            "horizon_steps": horizon,
            "loss_initial": s.initial_loss,
            "loss_final": s.final_loss,
            "steps": [p.first_step, p.last_step],
        }
        message = (
            f"Gradients vanish through time in {lstm_label(p.where)}: ‖∂L/∂h‖ at the sequence start is "
            f"{num(p.decay)}× its value at the end (threshold {num(th.vanish_ratio)}); it stays above 1% of the end "
            f"value only {horizon} of {len(p.norms)} steps back."
        )
        if s.learned:
            message += " The loss still fell, so this only matters if the task needs longer memory."
        remedy = (
            f"Dependencies longer than ~{horizon} steps cannot be learned as things stand. Start the forget gates "
            "open: `fastlstm.init.forget_bias_(lstm, 1.0)`, or better for long dependencies "
            f"`fastlstm.init.chrono_(lstm, max_timescale={max(2, len(p.norms))})` (Tallec & Ollivier 2018); use "
            "`fastlstm.init.orthogonal_(lstm)` for the recurrent weights; and give the loss intermediate targets "
            "if the task allows. If your task only needs short memory, truncating BPTT at "
            f"~{round_up_nice(max(horizon, 1) * 2)} steps loses nothing and is cheaper."
        )
        findings.append(Finding("vanishing_gradients", severity, message, evidence, remedy))
    return merge_same_code(findings)
