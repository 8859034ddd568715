"""The training loss: zero (too good to be true), or diverging (rising instead of falling, and why)."""

from __future__ import annotations

import math

import numpy as np

from ..findings import Finding
from ..measures import constant_targets, kendall_tau
from ..registry import rule
from ..signals import Signals
from .common import clip_value, healthy_norms, num


@rule(
    "loss_zero",
    family="loss",
    severity="warning; info when it got there gradually",
    signal="final loss relative to the initial loss; a loss that reached it gradually (and a validation loss that did "
    "not) is info",
    threshold="`zero_relative` = 1e-6 (or exactly 0)",
)
def rule_loss_zero(s: Signals) -> list:
    th = s.th
    steps, loss = s.losses
    if loss.size < th.min_steps:
        return []
    final = s.final_loss
    exact_zero = int((s.final_window == 0).sum())
    tiny = abs(s.initial_loss) > 0 and abs(final) <= th.zero_relative * abs(s.initial_loss)
    if not (final == 0 or tiny):
        return []
    zero_steps = np.flatnonzero(np.abs(loss) <= max(th.zero_relative * abs(s.initial_loss), 0.0))
    before = loss[: zero_steps[0]] if zero_steps.size else loss
    # A loss that passed through the orders of magnitude on its way down converged there (a classifier that
    # memorised a small training set does this); a bug (an all-zero mask, a self-comparison) is zero at once.
    descending = int(np.sum((np.abs(before) < 0.1 * abs(s.initial_loss)) & (np.abs(before) > 0)))
    _, _, val = s.view.val_series()
    val_zero = val.size > 0 and abs(float(val[-1])) <= 1e3 * th.zero_relative * abs(s.initial_loss)
    gradual = descending >= th.min_steps and not val_zero
    evidence = {
        "loss_initial": s.initial_loss,
        "loss_final": final,
        "exactly_zero_in_final_window": exact_zero,
        "final_window": int(s.final_window.size),
        "first_zero_step": int(steps[zero_steps[0]]) if zero_steps.size else None,
        "threshold_relative": th.zero_relative,
        "steps_descending_before_zero": descending,
        "val_loss_final": float(val[-1]) if val.size else None,
    }
    if gradual:
        message = (
            f"The training loss fell to {'exactly zero' if final == 0 else 'essentially zero'} ({num(final)} over the "
            f"last {s.final_window.size} steps, from {num(s.initial_loss)}), passing through the orders of magnitude "
            f"on the way ({descending} steps below 10% of the start first): the model fits its training set exactly."
        )
        remedy = (
            "Nothing is broken if this is a small or easy training set. Compare with the validation loss: if it is "
            "much worse, regularise or stop earlier (see train_val_divergence); in regression on real data, check "
            "that the target does not leak into the inputs."
        )
        return [Finding("loss_zero", "info", message, evidence, remedy)]
    message = (
        f"The training loss is {'exactly zero' if final == 0 else 'essentially zero'}: {num(final)} over the last "
        f"{s.final_window.size} steps against {num(s.initial_loss)} at the start. Real data rarely allows that."
    )
    causes = [
        "a mask or weighting that zeroes every element",
        "the target leaking into the inputs (e.g. not shifted by the forecast horizon)",
        "a loss comparing the prediction with itself",
    ]
    if constant_targets(s.view):
        causes.insert(0, "constant targets (see constant_target)")
    remedy = (
        "Check for " + "; ".join(causes) + ". Compute the loss of one batch by hand and compare; print the number "
        "of elements that contribute to it."
    )
    return [Finding("loss_zero", "warning", message, evidence, remedy)]


@rule(
    "loss_diverging",
    family="loss",
    severity="warning; error beyond `diverge_error`× or when the loss ends non-finite",
    signal="final training loss vs. the lower of its initial and best level, against its noise; the likely cause "
    "from the learning rate, the gradient norm before clipping and its growth, clipping, the update-to-weight ratio",
    threshold="`diverge_rise` = 0.2 and `stagnant_sigmas` = 3; `diverge_error` = 10; causes: `update_ratio_high` = "
    "1e-2, `clip_active_share` = 0.5",
)
def rule_loss_diverging(s: Signals) -> list:
    rising = s.rising
    if rising is None:
        return []
    th = s.th
    onset = rising["onset_step"]
    factor = rising["final"] / rising["reference"]
    evidence = {
        "loss_initial": s.initial_loss,
        "loss_best": s.best_level,
        "loss_final": rising["final"],
        "rise_over_reference": factor,
        "noise_standard_error": rising["noise_standard_error"],
        "noise_in_log_terms": rising["noise_in_log_terms"],
        "onset_step": onset,
        "ended_nonfinite": s.ended_nonfinite,
        "from_initialisation": rising["from_initialisation"],
        "threshold_rise": th.diverge_rise,
        **_optimiser_evidence(s, onset),
    }
    causes = _likely_causes(s, evidence)
    evidence["likely_causes"] = [c for c, _ in causes]
    severity = "error" if factor >= th.diverge_error or s.ended_nonfinite else "warning"
    start = "at initialisation" if rising["from_initialisation"] else "its best level"
    message = (
        f"The training loss diverges: it rose from {num(rising['reference'])} ({start}) to {num(rising['final'])} over "
        f"the last {s.final_window.size} steps, {num(factor)}× (from about step {onset})"
        + (", then turned non-finite" if s.ended_nonfinite else "")
        + ". Likely cause: "
        + "; ".join(text for _, text in causes)
        + "."
    )
    return [Finding("loss_diverging", severity, message, evidence, _diverging_remedy(s, evidence))]


def _optimiser_evidence(s: Signals, onset: int) -> dict:
    """What the optimiser did before and after the loss turned: learning rate, gradient norms before clipping and
    their growth, clipping, update-to-weight ratios (each only when the history has it)."""
    view, evidence = s.view, {}
    lr_steps = np.isfinite(view.lr)
    if lr_steps.any():
        lr, steps = view.lr[lr_steps], view.step[lr_steps]
        evidence["lr_median"] = float(np.median(lr))
        evidence["lr_at_start"] = float(lr[0])
        evidence["lr_at_onset"] = float(lr[min(np.searchsorted(steps, onset), lr.size - 1)])
    steps, norms = s.grad_norms
    if norms.size >= 3:
        healthy = healthy_norms(s)
        after = norms[steps >= onset]
        evidence["grad_norm_before_onset"] = float(np.median(healthy))
        if after.size:
            evidence["grad_norm_after_onset"] = float(np.median(after))
            evidence["grad_norm_growth"] = (
                float(np.median(after) / np.median(healthy)) if np.median(healthy) > 0 else math.inf
            )
        with np.errstate(divide="ignore"):
            evidence["grad_norm_trend_kendall_tau"] = kendall_tau(np.log(np.maximum(norms, 1e-300))[-200:])
    if s.clipped.size:
        evidence["clipped_share"] = s.clip_share
    ratio_steps, ratios = s.update_ratios
    if ratios.size:
        # Up to the onset and one sample after it: the steps that turned the loss, not the wreck that follows.
        upto = ratios[: max(1, int(np.searchsorted(ratio_steps, onset, side="right")) + 1)]
        evidence["update_ratio_to_onset"] = float(np.max(upto))
        evidence["update_ratio_median"] = float(np.median(ratios))
        evidence["update_ratio_samples"] = int(ratios.size)
    grown = _grown_inputs(s)
    if grown:
        evidence["lstm_input_growth"] = grown
    return evidence


def _grown_inputs(s: Signals) -> dict:
    """LSTMs whose inputs grew ≥ 10× in magnitude during training: they come from a layer that learns (an
    embedding, the layer below), whose weights the steps blew up."""
    grown = {}
    for lstm in s.view.inputs:
        first, pooled = s.view.first_input_stats(lstm), s.view.input_stats(lstm)
        if first is None or pooled is None:
            continue
        before, overall = float(np.nanmax(first.rms)), float(np.nanmax(pooled.rms))
        if before > 0 and overall >= 10.0 * before:
            grown[lstm] = {"rms_max_first_window": before, "rms_max_overall": overall}
    return grown


def _likely_causes(s: Signals, e: dict) -> list:
    """[(cause code, sentence)] from the evidence, most specific first; an overshooting learning rate is named
    even when nothing else was recorded (it is the usual cause, and lowering it is always among the remedies)."""
    th, causes = s.th, []
    lr = e.get("lr_median")
    lr_text = f"learning rate {num(lr)}" if lr is not None else "the learning rate"
    if e.get("lr_at_start") and e.get("lr_at_onset", 0) > 1.5 * e["lr_at_start"]:
        text = (
            f"the learning rate rose from {num(e['lr_at_start'])} to {num(e['lr_at_onset'])} before the loss turned "
            "(a warm-up or schedule peaking too high)"
        )
        causes.append(("learning_rate_increased", text))
    clipped = e.get("clipped_share", math.nan) >= th.clip_active_share
    ratio = e.get("update_ratio_to_onset", math.nan)
    if ratio > th.update_ratio_high:
        text = (
            f"steps changed the weights by up to {num(100 * ratio)}% of their norm before the loss turned "
            f"(‖Δθ‖/‖θ‖; about 0.1% is usual, the threshold is {num(100 * th.update_ratio_high, 2)}%): the "
            f"{lr_text} overshoots"
        )
        causes.append(("learning_rate_too_high", text))
    elif clipped:
        text = (
            f"clipping was in effect on {num(100 * e['clipped_share'], 2)}% of the steps, so the gradient's size is "
            f"bounded and the step length is set by the {lr_text}: it is too high for this loss surface"
        )
        causes.append(("learning_rate_too_high", text))
    growth = e.get("grad_norm_growth", math.nan)
    if growth >= 10.0 and not clipped:
        unclipped = "without clipping" if s.clipped.size else "with no clipping recorded"
        text = (
            f"the gradient norm grew {num(growth)}× (median {num(e['grad_norm_before_onset'])} before the loss turned, "
            f"{num(e['grad_norm_after_onset'])} after) {unclipped}: the steps grew with it"
        )
        causes.append(("gradients_growing_unclipped", text))
    for lstm, grown in e.get("lstm_input_growth", {}).items():
        text = (
            f"the inputs of LSTM {lstm!r} grew from magnitude {num(grown['rms_max_first_window'])} to "
            f"{num(grown['rms_max_overall'])}: the layer feeding it (an embedding, the layer below) was blown up by "
            "the same steps"
        )
        causes.append(("upstream_weights_growing", text))
    if not any(code == "learning_rate_too_high" for code, _ in causes):
        text = f"overshooting: the {lr_text} is too high for this loss surface (the usual cause of a rising loss)"
        causes.append(("learning_rate_too_high", text))
    return causes


def _diverging_remedy(s: Signals, e: dict) -> str:
    lr = e.get("lr_at_onset", e.get("lr_median"))
    parts = []
    if lr is not None and lr > 0:
        parts.append(f"Lower the learning rate about 10×, from {num(lr)} to {num(lr / 10)} (at least 3×).")
    else:
        parts.append("Lower the learning rate about 10× (at least 3×).")
    if "learning_rate_increased" in e["likely_causes"]:
        parts.append("Warm up to a lower peak, or over more steps.")
    if e.get("clipped_share", math.nan) >= s.th.clip_active_share:
        parts.append(
            f"Clipping is already in effect on {num(100 * e['clipped_share'], 2)}% of the steps: each step moves the "
            "weights by at most lr × max_norm, so the learning rate is the knob."
        )
    else:
        parts.append(
            "Clip the gradient norm: "
            f"`torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={num(clip_value(s))})` "
            "between `loss.backward()` and `optimizer.step()` (2× the typical norm before the loss turned, so ordinary "
            "steps pass untouched)."
        )
    parts.append(
        "Then decay the rate when the loss stops improving: `torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, "
        "factor=0.5, patience=2)`, stepped with the validation loss."
    )
    return " ".join(parts)
