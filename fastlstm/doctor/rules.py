"""The doctor's rules: each reads `Signals` and returns findings with evidence and a remedy specific to it.

One function per code (`rule_<code>`), in `RULES`; helpers next to the rule that uses them. docs/doctor.md
documents each rule's signal, threshold, evidence and remedy. `CONSEQUENCES` links faults to the findings they
cause, so that symptoms name their likely cause.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..history_view import HistoryView, to_float
from ..tbptt import truncation_evidence
from .findings import SEVERITIES, Finding
from .findings import format_number as _g
from .signals import (
    GradientProfile,
    Signals,
    Thresholds,
    constant_targets,
    forget_open_share,
    kendall_tau,
    median_se,
    nanmean,
    scale_offenders,
    suggest_truncation,
    train_level_near,
    truncated_gradient_share,
)

# Faults that produce other findings as symptoms: when the cause is present, its symptoms say so, so that the
# reader fixes the cause first instead of treating each symptom.
CONSEQUENCES = {
    "non_finite": ("loss_stagnant",),
    "unscaled_inputs": (
        "gate_saturation", "loss_stagnant", "exploding_gradients", "vanishing_gradients", "truncation_too_short",
    ),
    "unscaled_targets": ("gate_saturation", "loss_stagnant", "exploding_gradients"),
    "constant_target": ("loss_zero", "gate_saturation", "train_val_divergence"),
    "loss_zero": ("loss_stagnant",),
    "exploding_gradients": ("loss_stagnant", "val_oscillation"),
}  # fmt: skip


def attribute_causes(findings: list) -> list:
    flagged = {f.code for f in findings if f.severity != "info"}
    result = []
    for f in findings:
        causes = [c for c, symptoms in CONSEQUENCES.items() if c in flagged and f.code in symptoms and c != f.code]
        if causes and f.severity != "info":
            note = f"Probably a consequence of {' and '.join(causes)}: fix that first, then re-check. "
            f = dataclasses.replace(f, evidence={**f.evidence, "likely_caused_by": causes}, remedy=note + f.remedy)
        result.append(f)
    return result


def _round_up_nice(x: float) -> float:
    """x rounded up to 1, 2 or 5 × a power of ten: a clip value or length a person would type."""
    if not x > 0 or not math.isfinite(x):
        return 1.0
    exponent = math.floor(math.log10(x))
    for mantissa in (1, 2, 5, 10):
        if mantissa * 10**exponent >= x:
            return float(mantissa * 10**exponent)
    return float(10 ** (exponent + 1))


def _lstm_label(where: dict) -> str:
    direction = " (reverse)" if where.get("direction") == 1 else ""
    return f"{where['lstm']!r} layer {where['layer']}{direction}"


def _stat(stats, j: int) -> dict:
    return {
        "mean": float(stats.mean[j]),
        "std": float(stats.std[j]),
        "min": float(stats.min[j]),
        "max": float(stats.max[j]),
    }


def rule_non_finite(s: Signals) -> list:
    view = s.view
    bad_loss = view.loss_known & ~np.isfinite(view.loss)
    bad_grad = view.grad_norm_known & ~np.isfinite(view.grad_norm)
    flagged = bad_loss | bad_grad | view.skipped
    events = view.events_of("nonfinite_step_skipped", "nonfinite_stop")
    location = _first_nonfinite_location(view)
    bad_inputs = _nonfinite_features(view)
    if not flagged.any() and not events and location is None and not bad_inputs:
        return []
    first_step = _first_of(
        ([int(view.step[flagged][0])] if flagged.any() else [])
        + [int(e.get("step", 0)) for e in events]
        + ([location["step"]] if location else [])
    )
    evidence = {
        "first_step": first_step,
        "nonfinite_loss_steps": int(bad_loss.sum()),
        "nonfinite_grad_steps": int(bad_grad.sum()),
        "skipped_steps": int(view.skipped.sum()),
        "total_steps": view.num_steps,
        "stopped": bool(view.events_of("nonfinite_stop")),
    }
    if location:
        evidence["first_location"] = location
    evidence.update(bad_inputs)
    where = _describe_location(location) if location else "no telemetry location recorded"
    message = (
        f"Non-finite values (NaN/inf) appeared from step {first_step}: {evidence['nonfinite_loss_steps']} of "
        f"{view.num_steps} steps had a non-finite loss; first seen {where}."
    )
    return [Finding("non_finite", "error", message, evidence, _nonfinite_remedy(location, bad_inputs, s))]


def _first_of(values) -> int:
    return min(values) if values else 0


def _first_nonfinite_location(view: HistoryView) -> dict | None:
    """The earliest telemetry first_nonfinite record (or one carried by a non-finite event)."""
    candidates = []
    for name, windows in view.telemetry.items():
        for w in windows:
            if w.first_nonfinite:
                candidates.append({"step": w.step, "lstm": name, **w.first_nonfinite})
                break
    for event in view.events_of("nonfinite_step_skipped", "nonfinite_stop"):
        record = (event.get("detail") or {}).get("first_nonfinite")
        if isinstance(record, dict) and record:
            candidates.append({"step": int(event.get("step", 0)), **record})
            break
    return min(candidates, key=lambda c: c["step"]) if candidates else None


def _describe_location(loc: dict) -> str:
    lstm = f"LSTM {loc['lstm']!r} " if loc.get("lstm") else ""
    return (
        f"in the {loc.get('stage', '?')} pass of {lstm}layer {loc.get('layer', '?')}, direction "
        f"{loc.get('direction', '?')}, timestep {loc.get('timestep', '?')}, tensor {loc.get('tensor', '?')!r} "
        f"(window ending at step {loc.get('step', '?')})"
    )


def _nonfinite_features(view: HistoryView) -> dict:
    """{"input_features": [...], "target_features": [...]} whose recorded statistics are not finite."""
    result = {}
    for name in view.inputs:
        stats = view.input_stats(name)
        if stats is None:
            continue
        bad = _nonfinite_columns(stats)
        if bad:
            names = view.feature_names(name, stats.mean.size)
            result.setdefault("input_features", []).extend(f"{name}:{names[j]}" for j in bad)
    stats = view.target_stats()
    if stats is not None:
        bad = _nonfinite_columns(stats)
        if bad:
            names = view.target_names(stats.mean.size)
            result["target_features"] = [names[j] for j in bad]
    return result


def _nonfinite_columns(stats) -> list:
    columns = np.stack([stats.mean, stats.std, stats.min, stats.max])
    return [int(j) for j in np.flatnonzero(~np.isfinite(columns).all(axis=0))]


def _nonfinite_remedy(location: dict | None, bad_features: dict, s: Signals) -> str:
    stage, tensor = (location or {}).get("stage"), (location or {}).get("tensor")
    if bad_features.get("input_features") or (stage == "forward" and tensor == "input"):
        feats = ", ".join(bad_features.get("input_features", [])) or "see first_location"
        return (
            f"The data fed to the LSTM contains NaN/inf ({feats}). Find and repair it before training, e.g. "
            "`assert torch.isfinite(x).all()` in the data pipeline, then impute or drop the bad rows "
            "(`x = torch.nan_to_num(x, nan=0.0)` only if a zero is meaningful). The TBPTT trainer skips such "
            "steps without stopping, but the bad rows still teach nothing."
        )
    if bad_features.get("target_features") or (stage == "backward" and tensor == "grad_output"):
        feats = ", ".join(bad_features.get("target_features", [])) or "the loss"
        return (
            f"The loss itself is non-finite (targets affected: {feats}). Mask missing targets instead of storing "
            "them as NaN (`loss = ((pred - y)**2)[torch.isfinite(y)].mean()`), and check the loss for log(0), "
            "division by zero or an unbounded output (use log_softmax / softplus / BCEWithLogitsLoss)."
        )
    if stage == "forward":
        return (
            "Activations overflowed inside the LSTM: the weights have grown too large. Lower the learning rate "
            f"(currently {_g(s.lr)}), clip gradients with `torch.nn.utils.clip_grad_norm_(model.parameters(), "
            f"{_g(_clip_value(s))})`, and consider mixed-precision loss scaling if you train in fp16."
        )
    if stage == "backward":
        return (
            "Gradients overflowed while flowing back through time. Clip them with "
            f"`torch.nn.utils.clip_grad_norm_(model.parameters(), {_g(_clip_value(s))})`, lower the learning rate "
            "and re-initialise the recurrent weights with `fastlstm.init.orthogonal_(lstm)`."
        )
    return (
        "Record telemetry (fastlstm.Monitor) to locate the first non-finite value. Meanwhile check the data and "
        "targets with `torch.isfinite(...).all()`, lower the learning rate and clip gradients."
    )


def rule_initial_loss_nonfinite(s: Signals) -> list:
    view = s.view
    if view.num_steps == 0 or not view.loss_known[0] or math.isfinite(view.loss[0]):
        return []
    finite = np.flatnonzero(np.isfinite(view.loss))
    first_finite = int(view.step[finite[0]]) if finite.size else None
    location = _first_nonfinite_location(view)
    bad_features = _nonfinite_features(view)
    evidence = {"first_step": int(view.step[0]), "first_finite_step": first_finite, **bad_features}
    if location:
        evidence["first_location"] = location
    message = (
        f"The loss is non-finite from the very first step ({view.loss[0]})"
        + (f" until step {first_finite}." if first_finite is not None else " and never becomes finite.")
        + " Training never started from a valid state."
    )
    return [Finding("initial_loss_nonfinite", "error", message, evidence, _nonfinite_remedy(location, bad_features, s))]


def rule_exploding_gradients(s: Signals) -> list:
    findings = []
    th = s.th
    for p in s.profiles:
        limit = max(th.explode_through_time, 10.0 * len(p.norms))
        if p.peak_growth > limit:
            findings.append(_exploding_through_time(s, p, limit))
    steps, norms = s.grad_norms
    if norms.size >= th.min_steps:
        median = float(np.median(norms))
        peak = int(np.argmax(norms))
        # A zero median means no gradient at all (a detached or masked loss): a different fault, not a spike.
        spike = float(norms[peak]) / median if median > 0 else math.nan
        if spike > th.explode_spike:
            findings.append(_exploding_across_steps(s, steps, norms, peak, spike, median))
    return _merge_same_code(findings)


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
        f"Gradients grow going back in time in {_lstm_label(p.where)}: ‖∂L/∂h_t‖ reaches {_g(p.peak_growth)}× its "
        f"value at the last step over {len(p.norms)} timesteps (threshold {_g(limit)}×)."
    )
    return Finding("exploding_gradients", severity, message, evidence, _exploding_remedy(s))


def _exploding_across_steps(s: Signals, steps, norms, peak, spike, median) -> Finding:
    evidence = {
        "grad_norm_max": float(norms[peak]),
        "grad_norm_max_step": int(steps[peak]),
        "grad_norm_median": median,
        "spike_ratio": spike,
        "threshold": s.th.explode_spike,
        "steps_above_10x_median": int((norms > 10 * median).sum()),
    }
    severity = "error" if spike > s.th.explode_error else "warning"
    message = (
        f"The gradient norm spikes to {_g(norms[peak])} at step {int(steps[peak])}, {_g(spike)}× its median "
        f"{_g(median)} (threshold {_g(s.th.explode_spike)}×); {evidence['steps_above_10x_median']} steps exceed 10× "
        "the median."
    )
    return Finding("exploding_gradients", severity, message, evidence, _exploding_remedy(s))


def _clip_value(s: Signals) -> float:
    """A clip threshold from the measured norms: twice the median step's norm, rounded up to a nice number, so
    ordinary steps pass untouched and only the spikes are scaled down."""
    _, norms = s.grad_norms
    return _round_up_nice(2.0 * float(np.median(norms))) if norms.size else 1.0


def _exploding_remedy(s: Signals) -> str:
    lr = f" (currently {_g(s.lr)})" if math.isfinite(s.lr) else ""
    return (
        f"Clip gradients: `torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={_g(_clip_value(s))})` "
        "after `loss.backward()` (2× the median measured norm, so ordinary steps are unaffected). Lower the learning "
        f"rate{lr} by 3-10×, and re-initialise the recurrent weights with `fastlstm.init.orthogonal_(lstm)` so the "
        "recurrence starts norm-preserving."
    )


def _merge_same_code(findings: list) -> list:
    """Several layers or signals can show one problem: report it once, with every piece of evidence."""
    if len(findings) <= 1:
        return findings
    worst = max(findings, key=lambda f: SEVERITIES.index(f.severity))
    evidence = {"signals": [f.evidence for f in findings]}
    message = " ".join(f.message for f in findings)
    return [Finding(worst.code, worst.severity, message, evidence, worst.remedy)]


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
            f"Gradients vanish through time in {_lstm_label(p.where)}: ‖∂L/∂h‖ at the sequence start is "
            f"{_g(p.decay)}× its value at the end (threshold {_g(th.vanish_ratio)}); it stays above 1% of the end "
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
            f"~{_round_up_nice(max(horizon, 1) * 2)} steps loses nothing and is cheaper."
        )
        findings.append(Finding("vanishing_gradients", severity, message, evidence, remedy))
    return _merge_same_code(findings)


def rule_gate_saturation(s: Signals) -> list:
    """One finding per layer-direction whose gates are saturated over the later half of training."""
    th = s.th
    layers = {}
    for lstm, layer, direction, gate, series, forget in s.saturation_series():
        values = np.array([v for _, v in series], dtype=np.float64)
        recent = values[len(values) // 2 :]
        recent = recent[np.isfinite(recent)]
        if recent.size == 0 or recent.mean() <= th.saturation_warning:
            continue
        key = (lstm, layer, direction)
        entry = layers.setdefault(key, {"gates": {}, "forget_mean": nanmean(forget[len(forget) // 2 :])})
        entry["gates"][gate] = {
            "saturated_fraction_recent": float(recent.mean()),
            "saturated_fraction_first_window": float(values[0]),
        }
        entry["steps"] = [int(series[0][0]), int(series[-1][0])]
        entry["windows"] = int(values.size)
    findings = []
    for (lstm, layer, direction), entry in layers.items():
        where = {"lstm": lstm, "layer": layer, "direction": direction}
        gates = entry["gates"]
        if "f" in gates:
            gates["f"]["saturated_open_share_at_least"] = forget_open_share(
                entry["forget_mean"], gates["f"]["saturated_fraction_recent"]
            )
        evidence = {
            **where,
            "gates": gates,
            "forget_gate_mean": entry["forget_mean"],
            "threshold": th.saturation_warning,
            "windows": entry["windows"],
            "steps": entry["steps"],
        }
        memory = "f" in gates and gates["f"]["saturated_open_share_at_least"] >= th.forget_open_share
        faulty = [g for g in gates if not (g == "f" and memory)]
        if not faulty:
            message = (
                f"The forget gate of {_lstm_label(where)} is saturated open "
                f"({_g(100 * gates['f']['saturated_fraction_recent'])}% of activations, mean "
                f"{_g(entry['forget_mean'])}): the cells keep their state for long stretches. This is what chrono / "
                "forget-bias initialisation aims for and is not a fault by itself."
            )
            remedy = "Nothing to do unless the loss stalls; then check exploding_gradients and the cell magnitudes."
            findings.append(Finding("gate_saturation", "info", message, evidence, remedy))
            continue
        levels = ", ".join(f"{g} {_g(100 * gates[g]['saturated_fraction_recent'])}%" for g in faulty)
        firsts = ", ".join(f"{g} {_g(100 * gates[g]['saturated_fraction_first_window'])}%" for g in faulty)
        message = (
            f"Gate{'s' if len(faulty) > 1 else ''} {', '.join(faulty)} of {_lstm_label(where)} "
            f"{'are' if len(faulty) > 1 else 'is'} saturated over the later half of training: {levels} of the "
            f"activations sit in the flat part of the nonlinearity (threshold {_g(100 * th.saturation_warning)}%; "
            f"first window: {firsts}). Saturated gates pass almost no gradient."
        )
        findings.append(Finding("gate_saturation", "warning", message, evidence, _saturation_remedy(s, lstm, faulty)))
    return _merge_same_code(findings)


def _saturation_remedy(s: Signals, lstm: str, gates: list) -> str:
    if lstm in s.unscaled:
        return (
            f"The inputs are unscaled ({', '.join(s.unscaled[lstm][:5])}): large inputs drive the gate "
            "pre-activations far from zero. Standardise the features first (see unscaled_inputs)."
        )
    text = (
        "Pre-activations are too large. Re-initialise with `fastlstm.init.xavier_(lstm)` and "
        "`fastlstm.init.orthogonal_(lstm)`, lower the learning rate, and add weight decay "
        "(`torch.optim.AdamW(..., weight_decay=1e-4)`) to keep the weights from growing."
    )
    if "f" in gates:
        text += " A forget gate stuck closed forgets every step: `fastlstm.init.forget_bias_(lstm, 1.0)`."
    return text


def rule_unscaled_inputs(s: Signals) -> list:
    th = s.th
    findings = []
    for lstm in s.view.inputs:
        stats = s.view.input_stats(lstm)
        if stats is None or not np.all(np.isfinite(stats.rms)):
            continue
        big, small, spread = scale_offenders(stats, th)
        if not big and not small:
            continue
        names = s.view.feature_names(lstm, stats.mean.size)
        evidence = {
            "lstm": lstm,
            "features": stats.mean.size,
            "too_large": {names[j]: {"rms": float(stats.rms[j]), **_stat(stats, j)} for j in big},
            "rms_spread": spread,
            "threshold_rms": th.feature_rms_max,
            "threshold_spread": th.feature_spread_max,
            "samples": stats.count,
        }
        if small:
            evidence["too_small"] = {names[j]: {"rms": float(stats.rms[j]), **_stat(stats, j)} for j in small}
        parts = []
        if big:
            listed = ", ".join(f"{names[j]} (≈{_g(stats.rms[j])})" for j in big[:6])
            more = f" and {len(big) - 6} more" if len(big) > 6 else ""
            parts.append(
                f"{len(big)} of {stats.mean.size} input features of LSTM {lstm!r} have a typical magnitude "
                f"sqrt(mean²+std²) above {_g(th.feature_rms_max)}: {listed}{more}"
            )
        if small:
            parts.append(
                f"feature magnitudes span {_g(spread)}× (threshold {_g(th.feature_spread_max)}×), so the smallest "
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
                f" Features as large as {names[big[0]]} (≈{_g(stats.rms[big[0]])}) otherwise saturate the gates from "
                "the first step."
            )
        findings.append(Finding("unscaled_inputs", "warning", message, evidence, remedy))
    return findings


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
        "targets": {names[j]: {"rms": float(stats.rms[j]), **_stat(stats, j)} for j in chosen},
        "loss_initial": s.initial_loss,
        "constant_predictor_mse": s.constant_predictor_mse,
        "initial_over_constant": ratio,
        "threshold_rms": th.feature_rms_max,
        "threshold_initial_over_constant": th.initial_vs_constant,
    }
    listed = ", ".join(f"{names[j]} (mean {_g(stats.mean[j])}, std {_g(stats.std[j])})" for j in chosen[:6])
    message = f"Targets are not scaled: {listed}."
    if math.isfinite(ratio):
        message += (
            f" The initial loss {_g(s.initial_loss)} is {_g(ratio)}× the MSE of always predicting the target mean "
            f"({_g(s.constant_predictor_mse)}), so the first steps are spent learning an offset."
        )
    remedy = (
        "Standardise the targets with training statistics (`y = (y - y_mean) / y_std`, invert on prediction), or at "
        "least start the output layer at the target mean: `head.bias.data.copy_(torch.as_tensor(y_mean))`."
    )
    return [Finding("unscaled_targets", "warning", message, evidence, remedy)]


def rule_loss_stagnant(s: Signals) -> list:
    th = s.th
    _steps, loss = s.losses
    if loss.size < th.min_steps:
        return []
    first = loss[: max(3, loss.size // 10)]
    last = s.final_window
    drop = s.initial_loss - s.final_loss
    scale = max(abs(s.initial_loss), abs(s.final_loss), 1e-12)
    # Standard errors of the two medians (1.25 σ/√n with σ from the MAD), so a noisy curve needs a larger fall.
    noise = math.hypot(median_se(first), median_se(last))
    relative = drop / scale
    if relative >= th.stagnant_improvement and drop > th.stagnant_sigmas * noise:
        return []
    evidence = {
        "loss_initial": s.initial_loss,
        "loss_final": s.final_loss,
        "relative_improvement": relative,
        "threshold_improvement": th.stagnant_improvement,
        "noise_standard_error": noise,
        "steps": int(loss.size),
        "lr_median": s.lr,
    }
    if math.isfinite(s.constant_predictor_mse):
        evidence["constant_predictor_mse"] = s.constant_predictor_mse
    _, norms = s.grad_norms
    if norms.size:
        evidence["grad_norm_median"] = float(np.median(norms))
    message = (
        f"The training loss does not move: {_g(s.initial_loss)} at the start, {_g(s.final_loss)} over the last "
        f"{last.size} steps ({_g(100 * relative, 2)}% lower; needs ≥{_g(100 * th.stagnant_improvement)}% and "
        f"{_g(th.stagnant_sigmas)} standard errors)."
    )
    if math.isfinite(s.constant_predictor_mse) and s.final_loss >= 0.9 * s.constant_predictor_mse:
        message += f" It is no better than predicting the target mean (MSE {_g(s.constant_predictor_mse)})."
    return [Finding("loss_stagnant", "warning", message, evidence, _stagnant_remedy(s, evidence))]


def _stagnant_remedy(s: Signals, evidence: dict) -> str:
    lr = s.lr
    if lr == 0:
        return (
            "The learning rate is 0 (check the scheduler: a warm-up that never ends or a decay that reached 0). "
            "Start from 1e-3 for Adam."
        )
    if math.isfinite(lr) and lr < 1e-5:
        return f"The learning rate {_g(lr)} is too small to move the weights; try 1e-3 (Adam) or {_g(lr * 100)}."
    if evidence.get("grad_norm_median", 1.0) < 1e-8:
        return (
            "The gradients are (almost) zero: check that the loss depends on the parameters (no `.detach()`, "
            "`.item()` or `torch.no_grad()` in the forward path) and that the optimizer holds the model's parameters."
        )
    unscaled = ", ".join([name for names in s.unscaled.values() for name in names][:5])
    if unscaled:
        return f"Scale the inputs first ({unscaled} are unscaled; see unscaled_inputs); then raise the learning rate."
    lr_text = f" (currently {_g(lr)})" if math.isfinite(lr) else ""
    return (
        f"Raise the learning rate{lr_text} by 3-10×, check the gate saturation and gradient findings, and verify "
        "on one small batch that the model can overfit it (if it cannot, the loss or the data pipeline is broken)."
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
    evidence = {
        "loss_initial": s.initial_loss,
        "loss_final": final,
        "exactly_zero_in_final_window": exact_zero,
        "final_window": int(s.final_window.size),
        "first_zero_step": int(steps[zero_steps[0]]) if zero_steps.size else None,
        "threshold_relative": th.zero_relative,
    }
    message = (
        f"The training loss is {'exactly zero' if final == 0 else 'essentially zero'}: {_g(final)} over the last "
        f"{s.final_window.size} steps against {_g(s.initial_loss)} at the start. Real data rarely allows that."
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
    which = ", ".join(f"{names[j]} = {_g(stats.mean[j])}" for j in constant[:6])
    message = (
        f"{'Every' if all_constant else 'Some'} target is constant over all {stats.count} recorded samples ({which}): "
        "the model can only learn that constant."
    )
    remedy = (
        "Inspect the target construction: an indexing or shift mistake, a column of padding, a classification set "
        "with a single class, or targets overwritten in place. Drop target dimensions that never vary."
    )
    return [Finding("constant_target", "error" if all_constant else "warning", message, evidence, remedy)]


def rule_train_val_divergence(s: Signals) -> list:
    th = s.th
    eval_steps, epochs, val = s.view.val_series()
    if val.size < th.min_evals:
        return []
    best = int(np.argmin(val))
    after = val[best:]
    if after.size < 3:
        return []
    recent = float(np.median(val[-3:]))
    rise = recent / val[best] - 1.0 if val[best] > 0 else math.inf
    tau = kendall_tau(after)
    train_at_best = train_level_near(s, int(eval_steps[best]))
    train_now = s.final_loss
    train_change = train_now / train_at_best - 1.0 if train_at_best > 0 else math.nan
    significance = _rise_over_noise(val, rise)
    # Overfitting: validation turns up, keeps rising, by more than its own evaluation-to-evaluation noise, while
    # training keeps falling (or holds).
    if not (
        rise > th.divergence_rise
        and tau > th.divergence_trend
        and significance >= th.divergence_noise_multiple
        and train_change <= 0.0
    ):
        return []
    evidence = {
        "best_val_loss": float(val[best]),
        "best_step": int(eval_steps[best]),
        "best_epoch": epochs[best],
        "recent_val_loss": recent,
        "val_rise": rise,
        "trend_kendall_tau": tau,
        "rise_over_noise": significance,
        "train_loss_at_best": train_at_best,
        "train_loss_final": train_now,
        "train_change": train_change,
        "evals_after_best": int(after.size - 1),
        "threshold_rise": th.divergence_rise,
    }
    when = (
        f"epoch {epochs[best]} (step {int(eval_steps[best])})"
        if epochs[best] is not None
        else f"step {int(eval_steps[best])}"
    )
    message = (
        f"Validation loss is diverging from training loss: best {_g(val[best])} at {when}, now {_g(recent)} "
        f"({_g(100 * rise)}% worse, rising over {after.size - 1} evaluations, Kendall τ {_g(tau, 2)}), while the "
        f"training loss went from {_g(train_at_best)} to {_g(train_now)}. The model is overfitting."
    )
    hidden = _hidden_sizes(s.view)
    remedy = (
        f"Stop at the best point: keep the checkpoint from {when} (early stopping with a patience of "
        f"{max(2, (after.size - 1) // 2)} evaluations). Regularise: weight decay (`torch.optim.AdamW(..., "
        "weight_decay=1e-4)`), dropout on the LSTM output or between layers (`fastlstm.LSTM(..., num_layers=2, "
        f"dropout=0.2)`), a smaller hidden size{hidden}, or more training data."
    )
    return [Finding("train_val_divergence", "warning", message, evidence, remedy)]


def _rise_over_noise(val: np.ndarray, rise: float) -> float:
    """The rise in log terms divided by the curve's noise, from the second differences of log(val_loss) (a trend
    leaves them near zero; for white noise σ, median|Δ²| ≈ 1.65σ)."""
    if not rise > -1.0 or np.any(val <= 0):
        return math.nan
    jitter = float(np.median(np.abs(np.diff(np.log(val), n=2)))) / 1.65
    return math.log1p(rise) / jitter if jitter > 0 else math.inf


def _hidden_sizes(view: HistoryView) -> str:
    sizes = sorted({int(m.get("hidden_size", 0)) for m in view.lstms.values() if m.get("hidden_size")})
    return f" (now {', '.join(map(str, sizes))})" if sizes else ""


def rule_val_oscillation(s: Signals) -> list:
    th = s.th
    eval_steps, _epochs, val = s.view.val_series()
    if val.size < max(6, th.min_evals):
        return []
    # The later half: the first evaluations fall steeply in any healthy run.
    later = val[val.size // 2 - 1 :] if val.size >= 8 else val[1:]
    changes = np.diff(later)
    changes = changes[changes != 0]
    if changes.size < 3:
        return []
    reversals = float(np.mean(np.sign(changes[1:]) != np.sign(changes[:-1])))
    # How far the loss jumps back up when it does, relative to where it was: a converging curve's rises are small
    # wiggles, an overshooting optimiser's are large.
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = later[1:] / later[:-1]
    rises = ratios[ratios > 1.0] - 1.0
    typical_rise = float(np.median(rises)) if rises.size >= 3 else 0.0
    # Swings versus progress: a noisy but improving (or steeply converging) curve travels little more than its net
    # change; an oscillating one travels many times it.
    net = abs(float(later[-1] - later[0]))
    swing_to_trend = float(np.abs(changes).sum()) / net if net > 0 else math.inf
    if not (
        reversals >= th.oscillation_sign_changes
        and typical_rise >= th.oscillation_rise
        and swing_to_trend >= th.oscillation_swing_to_trend
    ):
        return []
    evidence = {
        "evals": int(later.size),
        "from_step": int(eval_steps[-later.size]),
        "rises": int(rises.size),
        "median_rise": typical_rise,
        "direction_reversals": reversals,
        "swing_over_net_change": swing_to_trend,
        "val_min": float(later.min()),
        "val_max": float(later.max()),
        "lr_median": s.lr,
        "threshold_rise": th.oscillation_rise,
        "threshold_reversals": th.oscillation_sign_changes,
        "threshold_swing_over_net_change": th.oscillation_swing_to_trend,
    }
    message = (
        f"Validation loss oscillates: over the last {later.size} evaluations it jumped back up {rises.size} times, "
        f"typically by {_g(100 * typical_rise, 2)}%, between {_g(later.min())} and {_g(later.max())}, reversing "
        f"direction {_g(100 * reversals, 2)}% of the time and travelling {_g(swing_to_trend, 2)}× its net change. "
        "The optimiser is overshooting."
    )
    lr = s.lr
    target = f"{_g(lr / 5)} (from {_g(lr)})" if math.isfinite(lr) and lr > 0 else "3-10× lower"
    remedy = (
        f"Lower the learning rate to ~{target}, or decay it when validation stops improving: "
        "`torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=2)` stepped with the val loss. "
        f"Gradient clipping (`clip_grad_norm_(..., {_g(_clip_value(s))})`) and larger batches also damp the swings."
    )
    return [Finding("val_oscillation", "warning", message, evidence, remedy)]


def rule_subset_disparity(s: Signals) -> list:
    th = s.th
    with_subsets = [e for e in s.view.evals if sum(math.isfinite(v) for v in e["subset_losses"].values()) >= 2]
    if not with_subsets:
        return []
    last = with_subsets[-1]
    losses = {k: v for k, v in last["subset_losses"].items() if math.isfinite(v)}
    worst = max(losses, key=losses.get)
    others = np.array([v for k, v in losses.items() if k != worst])
    reference = float(np.median(others))
    ratio = losses[worst] / reference if reference > 0 else math.inf
    if ratio < th.subset_ratio:
        return []
    first = with_subsets[0]["subset_losses"]
    first_others = [v for k, v in first.items() if k != worst and math.isfinite(v)]
    first_ratio = first.get(worst, math.nan) / float(np.median(first_others)) if first_others else math.nan
    evidence = {
        "step": last["step"],
        "subset_losses": losses,
        "worst_subset": worst,
        "worst_over_median_of_others": ratio,
        "ratio_at_first_eval": first_ratio,
        "threshold": th.subset_ratio,
    }
    trend = ""
    if math.isfinite(first_ratio):
        trend = f" (it was {_g(first_ratio)}× at the first evaluation: the gap {'widened' if ratio > first_ratio else 'narrowed'})"
    message = (
        f"Subset {worst!r} does much worse than the others: loss {_g(losses[worst])} against a median of "
        f"{_g(reference)}, {_g(ratio)}× (threshold {_g(th.subset_ratio)}×){trend}."
    )
    remedy = (
        f"Give {worst!r} more weight in training: oversample it (`torch.utils.data.WeightedRandomSampler` with "
        "weights ∝ 1 / subset frequency) or weight its loss; check that its features are scaled like the others' and "
        "that its data are clean; if its dynamics differ, add the subset identity as an input feature or give the "
        "model more capacity."
    )
    return [Finding("subset_disparity", "warning", message, evidence, remedy)]


def rule_truncation_too_short(s: Signals) -> list:
    """Two independent signals, merged into one finding: the trainer's own evidence (a residual that still
    correlates with inputs beyond k2, or its gradient-decay estimates; `fastlstm.tbptt.truncation_evidence`), and
    the share of gradient this rule estimates lies beyond the window from the telemetry's gradient profile."""
    events = s.view.events_of("truncation")
    if not events:
        return []
    detail = events[-1].get("detail") or {}
    since = int(events[-1].get("step", 0))
    k1 = int(detail.get("k1") or 0)
    k2 = int(detail.get("k2") or k1)
    signals, suggestions, parts = {}, [], []
    trainer = _trainer_truncation_evidence(s.view)
    weak = None
    if trainer is not None and _weak_residual(trainer, s.th):
        weak, trainer = trainer, None
    if trainer is not None:
        signals["trainer"] = trainer
        dependency = to_float(trainer.get("estimated_dependency"))
        if math.isfinite(dependency):
            # Every loss position of a chunk must reach the dependency: k2 - k1 >= L.
            suggestions.append(math.ceil(dependency) + k1)
        if trainer.get("source") == "residual_correlation":
            parts.append(
                f"the prediction error still correlates with the input {int(dependency)} steps back (r = "
                f"{_g(trainer.get('correlation'))}, noise level {_g(trainer.get('noise'))}), beyond the {k2} steps "
                "any loss can reach"
            )
        else:
            parts.append(
                f"the trainer's gradient-decay estimate puts {_g(100 * to_float(trainer.get('bias')))}% of the gradient "
                f"beyond the window (dependency ≈ {_g(dependency)} steps)"
            )
    profile = _worst_truncated_profile(s, k1, since)
    if profile is not None:
        p, share, method = profile
        signals["gradient_profile"] = {
            **p.where,
            "window_steps": len(p.norms),
            "gradient_share_beyond_window": share,
            "estimate": method,
            "threshold": s.th.truncation_bias,
            "steps": [p.first_step, p.last_step],
        }
        suggestions.append(suggest_truncation(share, len(p.norms), s.th.truncation_bias))
        parts.append(
            f"in {_lstm_label(p.where)} the gradient has not decayed at the start of the {len(p.norms)}-step window: "
            f"an estimated {_g(100 * share)}% of it lies further back ({method}; threshold "
            f"{_g(100 * s.th.truncation_bias)}%)"
        )
    if not signals:
        return [_weak_truncation_finding(weak, k1, k2)] if weak is not None else []
    suggested = max(suggestions) if suggestions else 2 * k2
    evidence = {"k1": k1, "k2": k2, "adaptive": bool(detail.get("adaptive", False)), "suggested_k2": suggested}
    evidence.update(signals)
    message = f"Truncation at k2={k2} steps is too short: " + "; and ".join(parts) + "."
    remedy = (
        f"Backpropagate further: `TBPTTTrainer(..., k1={k1 or 'k1'}, k2={suggested})` (k2 - k1 must cover the "
        "dependency so that every loss position reaches it), or `adaptive=True` to let the trainer choose. If memory "
        "is the limit, keep k1 small and raise only k2 (Williams & Peng): windows overlap, but the loss stays on the "
        "last k1 steps."
    )
    return [Finding("truncation_too_short", "warning", message, evidence, remedy)]


def _weak_residual(evidence: dict, th: Thresholds) -> bool:
    """A residual correlation that is statistically significant but explains too little of the error to matter
    (r² < truncation_min_correlation²): slow trends in the inputs produce those at every lag."""
    r = abs(to_float(evidence.get("correlation")))
    return evidence.get("source") == "residual_correlation" and math.isfinite(r) and r < th.truncation_min_correlation


def _weak_truncation_finding(evidence: dict, k1: int, k2: int) -> Finding:
    r = to_float(evidence.get("correlation"))
    message = (
        f"The prediction error correlates weakly with the input {evidence.get('estimated_dependency')} steps back "
        f"(r = {_g(r)}, beyond k2 = {k2}): statistically detectable, but a dependency that long would explain only "
        f"{_g(100 * r * r, 2)}% of the remaining error. Slow trends in the inputs produce such correlations."
    )
    remedy = "Nothing required. If you suspect a real long-range dependency, try k2 larger or `adaptive=True`."
    return Finding("truncation_too_short", "info", message, {"k1": k1, "k2": k2, "trainer": evidence}, remedy)


def _trainer_truncation_evidence(view: HistoryView) -> dict | None:
    """The TBPTT trainer's evidence (fastlstm.tbptt), or None."""
    try:
        return truncation_evidence(view.raw)
    except (KeyError, ValueError, TypeError, IndexError):
        return None  # a history from another recorder need not carry the trainer's extra lists


def _worst_truncated_profile(s: Signals, k1: int, since: int):
    """(profile, share, method) of the layer with the largest gradient share beyond the window, if above the
    threshold."""
    worst = None
    for p in s.profiles:
        if p.last_step < since:
            continue
        share, method = truncated_gradient_share(p.norms, k1)
        if share > s.th.truncation_bias and (worst is None or share > worst[1]):
            worst = (p, share, method)
    return worst


def rule_history_incomplete(s: Signals) -> list:
    view = s.view
    missing = {}
    if view.num_steps == 0:
        missing["steps"] = "loss rules"
    if not view.telemetry:
        missing["telemetry"] = "gradient-through-time, saturation and truncation rules"
    if not view.inputs:
        missing["inputs"] = "unscaled_inputs"
    if not view.targets:
        missing["targets"] = "constant_target, unscaled_targets"
    if not view.evals:
        missing["evals"] = "train_val_divergence, val_oscillation, subset_disparity"
    if not missing:
        return []
    message = "The history has no " + ", no ".join(missing) + ": the rules that need them were skipped."
    remedy = (
        "Record with fastlstm.Monitor (telemetry, inputs and targets come with it) and pass val_loss to "
        "`monitor.step` to enable every rule."
    )
    return [Finding("history_incomplete", "info", message, {"skipped": missing}, remedy)]


RULES = (
    rule_non_finite,
    rule_initial_loss_nonfinite,
    rule_exploding_gradients,
    rule_vanishing_gradients,
    rule_gate_saturation,
    rule_unscaled_inputs,
    rule_unscaled_targets,
    rule_loss_stagnant,
    rule_loss_zero,
    rule_constant_target,
    rule_train_val_divergence,
    rule_val_oscillation,
    rule_subset_disparity,
    rule_truncation_too_short,
    rule_history_incomplete,
)
