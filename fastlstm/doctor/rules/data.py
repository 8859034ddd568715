"""The data the LSTM is given: constant targets, inputs and targets far from unit scale."""

from __future__ import annotations

import math

import numpy as np

from ..findings import Finding
from ..measures import constant_targets, scale_offenders
from ..registry import rule
from ..signals import Signals
from .common import num, stat


@rule(
    "constant_target",
    family="data",
    severity="error if every target is constant, else warning",
    signal="recorded target range max − min",
    threshold="0 (up to 1e-12 relative)",
)
def rule_constant_target(s: Signals) -> list:
    stats = s.view.target_stats()
    constant = constant_targets(s.view)
    if not constant:
        return []
    names = s.view.target_names(stats.mean.size)
    all_constant = len(constant) == stats.mean.size
    evidence = {
        "constant_targets": {names[j]: float(stats.mean[j]) for j in constant},
        "targets": int(stats.mean.size),
        "samples": stats.count,
    }
    which = ", ".join(f"{names[j]} = {num(stats.mean[j])}" for j in constant[:6])
    message = (
        f"{'Every' if all_constant else 'Some'} target is constant over all {stats.count} recorded samples ({which}): "
        "the model can only learn that constant."
    )
    remedy = (
        "Inspect the target construction: an indexing or shift mistake, a column of padding, a classification set "
        "with a single class, or targets overwritten in place. Drop target dimensions that never vary."
    )
    return [Finding("constant_target", "error" if all_constant else "warning", message, evidence, remedy)]


@rule(
    "unscaled_inputs",
    family="data",
    severity="warning",
    signal="per-feature sqrt(mean² + std²) of the LSTM's inputs, pooled and in the first window; spread of those "
    "magnitudes",
    threshold="`feature_rms_max` = 10; `feature_spread_max` = 1e3",
)
def rule_unscaled_inputs(s: Signals) -> list:
    th = s.th
    findings = []
    for lstm in s.view.inputs:
        stats = s.view.input_stats(lstm)
        if stats is None or not np.all(np.isfinite(stats.rms)):
            continue
        big, small, spread = _offenders_from_the_start(s, lstm, stats)
        if not big and not small:
            continue
        names = s.view.feature_names(lstm, stats.mean.size)
        evidence = {
            "lstm": lstm,
            "features": stats.mean.size,
            "too_large": {names[j]: {"rms": float(stats.rms[j]), **stat(stats, j)} for j in big},
            "rms_spread": spread,
            "threshold_rms": th.feature_rms_max,
            "threshold_spread": th.feature_spread_max,
            "samples": stats.count,
        }
        if small:
            evidence["too_small"] = {names[j]: {"rms": float(stats.rms[j]), **stat(stats, j)} for j in small}
        parts = []
        if big:
            listed = ", ".join(f"{names[j]} (≈{num(stats.rms[j])})" for j in big[:6])
            more = f" and {len(big) - 6} more" if len(big) > 6 else ""
            parts.append(
                f"{len(big)} of {stats.mean.size} input features of LSTM {lstm!r} have a typical magnitude "
                f"sqrt(mean²+std²) above {num(th.feature_rms_max)}: {listed}{more}"
            )
        if small:
            parts.append(
                f"feature magnitudes span {num(spread)}× (threshold {num(th.feature_spread_max)}×), so the smallest "
                f"({', '.join(names[j] for j in small[:6])}) barely register next to the largest"
            )
        message = "Unscaled inputs: " + "; ".join(parts) + "."
        remedy = (
            "Standardise every input feature with statistics of the training data only: `mean, std = "
            "x_train.mean(dim=(0, 1)), x_train.std(dim=(0, 1))` then `x = (x - mean) / std` for training, validation "
            "and inference alike (fastlstm.data.Standardizer does this)."
        )
        if big:
            remedy += (
                f" Features as large as {names[big[0]]} (≈{num(stats.rms[big[0]])}) otherwise saturate the gates from "
                "the first step."
            )
        findings.append(Finding("unscaled_inputs", "warning", message, evidence, remedy))
    return findings


def _offenders_from_the_start(s: Signals, lstm: str, stats) -> tuple:
    """scale_offenders of the pooled statistics, keeping only features that were already offending in the first
    window: data arrives at its scale from the first step, whereas inputs that grew during training come from a
    layer that learns (an embedding, the layer below) and are a symptom of that layer's weights growing."""
    big, small, spread = scale_offenders(stats, s.th)
    first = s.view.first_input_stats(lstm)
    if first is None or not np.all(np.isfinite(first.rms)):
        return big, small, spread
    first_big, first_small, _ = scale_offenders(first, s.th)
    return [j for j in big if j in first_big], [j for j in small if j in first_small], spread


@rule(
    "unscaled_targets",
    family="data",
    severity="warning",
    signal="per-target magnitude; initial loss vs. the loss of predicting the target mean",
    threshold="`feature_rms_max`; `target_offset` = 3 with `initial_vs_constant` = 10",
)
def rule_unscaled_targets(s: Signals) -> list:
    th = s.th
    stats = s.view.target_stats()
    if stats is None or not np.all(np.isfinite(stats.rms)):
        return []
    names = s.view.target_names(stats.mean.size)
    big = [j for j in range(stats.mean.size) if stats.rms[j] > th.feature_rms_max]
    with np.errstate(divide="ignore", invalid="ignore"):
        offset = np.abs(stats.mean) / stats.std
    offset_dims = [j for j in range(stats.mean.size) if offset[j] > th.target_offset]
    ratio = s.initial_loss / s.constant_predictor_mse if s.constant_predictor_mse > 0 else math.nan
    start_far = offset_dims and ratio > th.initial_vs_constant
    if not big and not start_far:
        return []
    chosen = sorted(set(big) | (set(offset_dims) if start_far else set()))
    evidence = {
        "targets": {names[j]: {"rms": float(stats.rms[j]), **stat(stats, j)} for j in chosen},
        "loss_initial": s.initial_loss,
        "constant_predictor_mse": s.constant_predictor_mse,
        "initial_over_constant": ratio,
        "threshold_rms": th.feature_rms_max,
        "threshold_initial_over_constant": th.initial_vs_constant,
    }
    listed = ", ".join(f"{names[j]} (mean {num(stats.mean[j])}, std {num(stats.std[j])})" for j in chosen[:6])
    message = f"Targets are not scaled: {listed}."
    if math.isfinite(ratio):
        message += (
            f" The initial loss {num(s.initial_loss)} is {num(ratio)}× the MSE of always predicting the target mean "
            f"({num(s.constant_predictor_mse)}), so the first steps are spent learning an offset."
        )
    remedy = (
        "Standardise the targets with training statistics (`y = (y - y_mean) / y_std`, invert on prediction), or at "
        "least start the output layer at the target mean: `head.bias.data.copy_(torch.as_tensor(y_mean))`."
    )
    return [Finding("unscaled_targets", "warning", message, evidence, remedy)]
