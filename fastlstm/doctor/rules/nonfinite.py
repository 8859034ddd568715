"""Non-finite values: where the first NaN/inf arose (data, loss, forward overflow, backward overflow), and a loss
that is non-finite from the first step."""

from __future__ import annotations

import math

import numpy as np

from ...history_view import HistoryView
from ..findings import Finding
from ..registry import rule
from ..signals import Signals
from .common import clip_value, num


@rule(
    "non_finite",
    family="non-finite values",
    severity="error",
    signal=(
        "non-finite loss or grad norm, skipped steps, non-finite events, telemetry `first_nonfinite`, "
        "non-finite input/target statistics"
    ),
    threshold="any",
)
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
    evidence["data_fault"] = is_data_fault(view, location, bad_inputs)
    if location:
        where = _describe_location(location)
    elif view.instrument_every > 1 and not view.instrumented[flagged].any():
        evidence["instrument_every"] = view.instrument_every
        where = (
            f"on steps that recorded no telemetry (sampled: one step in {view.instrument_every}), and it did not "
            "recur on the instrumented steps after them"
        )
    else:
        where = "no telemetry location recorded"
    message = (
        f"Non-finite values (NaN/inf) appeared from step {first_step}: {evidence['nonfinite_loss_steps']} of "
        f"{view.num_steps} steps had a non-finite loss; first seen {where}."
    )
    return [Finding("non_finite", "error", message, evidence, _nonfinite_remedy(location, bad_inputs, s))]


def is_data_fault(view: HistoryView, location: dict | None, bad_features: dict) -> bool:
    """The non-finite value came with the data or the loss, not from an overflow inside the network: the recorded
    input or target statistics are not finite, or the first location is the input projection (the loss gradient)
    and no input (target) statistics were recorded to clear the data. With finite statistics, a NaN first seen in
    the input projection comes from NaN weights (an earlier step overflowed), not from the data."""
    if bad_features:
        return True
    where = ((location or {}).get("stage"), (location or {}).get("tensor"))
    if where == ("forward", "input"):
        return not view.inputs
    if where == ("backward", "grad_output"):
        return not view.targets
    return False


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
        detail = event.get("detail") or {}
        record = detail.get("first_nonfinite")
        if isinstance(record, dict) and record:
            candidate = {"step": int(event.get("step", 0)), **record}
            if detail.get("located_in_window"):  # an uninstrumented step, located by the instrumented ones after it
                candidate["located_in_window"] = list(detail["located_in_window"])
            candidates.append(candidate)
            break
    return min(candidates, key=lambda c: c["step"]) if candidates else None


def _describe_location(loc: dict) -> str:
    lstm = f"LSTM {loc['lstm']!r} " if loc.get("lstm") else ""
    if loc.get("located_in_window"):
        first, last = loc["located_in_window"]
        when = f"step {loc.get('step', '?')} recorded no telemetry; located on the instrumented steps {first}-{last}"
    else:
        when = f"window ending at step {loc.get('step', '?')}"
    return (
        f"in the {loc.get('stage', '?')} pass of {lstm}layer {loc.get('layer', '?')}, direction "
        f"{loc.get('direction', '?')}, timestep {loc.get('timestep', '?')}, tensor {loc.get('tensor', '?')!r} "
        f"({when})"
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
    data = is_data_fault(s.view, location, bad_features)
    if bad_features.get("input_features") or (data and (stage, tensor) == ("forward", "input")):
        feats = ", ".join(bad_features.get("input_features", [])) or "see first_location"
        return (
            f"The data fed to the LSTM contains NaN/inf ({feats}). Find and repair it before training, e.g. "
            "`assert torch.isfinite(x).all()` in the data pipeline, then impute or drop the bad rows "
            "(`x = torch.nan_to_num(x, nan=0.0)` only if a zero is meaningful). The TBPTT trainer skips such "
            "steps without stopping, but the bad rows still teach nothing."
        )
    if bad_features.get("target_features") or (data and (stage, tensor) == ("backward", "grad_output")):
        feats = ", ".join(bad_features.get("target_features", [])) or "the loss"
        return (
            f"The loss itself is non-finite (targets affected: {feats}). Mask missing targets instead of storing "
            "them as NaN (`loss = ((pred - y)**2)[torch.isfinite(y)].mean()`), and check the loss for log(0), "
            "division by zero or an unbounded output (use log_softmax / softplus / BCEWithLogitsLoss)."
        )
    if stage == "forward":
        return (
            "Activations overflowed inside the LSTM (or the weights became NaN at an earlier step): the weights have "
            "grown too large. Lower the learning rate "
            f"(currently {num(s.lr)}), clip gradients with `torch.nn.utils.clip_grad_norm_(model.parameters(), "
            f"{num(clip_value(s))})`, and consider mixed-precision loss scaling if you train in fp16."
        )
    if stage == "backward":
        return (
            "Gradients overflowed while flowing back through time. Clip them with "
            f"`torch.nn.utils.clip_grad_norm_(model.parameters(), {num(clip_value(s))})`, lower the learning rate "
            "and re-initialise the recurrent weights with `fastlstm.init.orthogonal_(lstm)`."
        )
    if s.view.instrument_every > 1:
        return (
            f"Telemetry was sampled (instrument_every={s.view.instrument_every}) and the value did not recur once "
            "every step was instrumented: a one-off. To locate such values, record every step "
            "(`instrument_every=1`). Meanwhile check the data and targets of the skipped steps with "
            "`torch.isfinite(...).all()`."
        )
    return (
        "Record telemetry (fastlstm.Monitor) to locate the first non-finite value. Meanwhile check the data and "
        "targets with `torch.isfinite(...).all()`, lower the learning rate and clip gradients."
    )


@rule(
    "initial_loss_nonfinite",
    family="non-finite values",
    severity="error",
    signal="the first recorded loss is NaN/inf",
    threshold="any",
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
    evidence["data_fault"] = is_data_fault(view, location, bad_features)
    message = (
        f"The loss is non-finite from the very first step ({view.loss[0]})"
        + (f" until step {first_finite}." if first_finite is not None else " and never becomes finite.")
        + " Training never started from a valid state."
    )
    return [Finding("initial_loss_nonfinite", "error", message, evidence, _nonfinite_remedy(location, bad_features, s))]
