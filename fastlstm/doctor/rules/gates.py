"""Gates: activations stuck in the flat parts of their nonlinearities (except forget gates held open, which is
memory, not a fault)."""

from __future__ import annotations

import numpy as np

from ..findings import Finding
from ..measures import forget_open_share, nanmean
from ..registry import rule
from ..signals import Signals
from .common import lstm_label, merge_same_code, num


@rule(
    "gate_saturation",
    family="gates",
    severity="warning; info for forget gates saturated open, or saturation that developed as the loss fell",
    signal="saturated fraction per gate, mean over the later half of the windows",
    threshold="`saturation_warning` = 0.6; `forget_open_share` = 0.5",
)
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
                f"The forget gate of {lstm_label(where)} is saturated open "
                f"({num(100 * gates['f']['saturated_fraction_recent'])}% of activations, mean "
                f"{num(entry['forget_mean'])}): the cells keep their state for long stretches. This is what chrono / "
                "forget-bias initialisation aims for and is not a fault by itself."
            )
            remedy = "Nothing to do unless the loss stalls; then check exploding_gradients and the cell magnitudes."
            findings.append(Finding("gate_saturation", "info", message, evidence, remedy))
            continue
        levels = ", ".join(f"{g} {num(100 * gates[g]['saturated_fraction_recent'])}%" for g in faulty)
        firsts = ", ".join(f"{g} {num(100 * gates[g]['saturated_fraction_first_window'])}%" for g in faulty)
        message = (
            f"Gate{'s' if len(faulty) > 1 else ''} {', '.join(faulty)} of {lstm_label(where)} "
            f"{'are' if len(faulty) > 1 else 'is'} saturated over the later half of training: {levels} of the "
            f"activations sit in the flat part of the nonlinearity (threshold {num(100 * th.saturation_warning)}%; "
            f"first window: {firsts}). Saturated gates pass almost no gradient."
        )
        if _grew_with_learning(s, gates, faulty):
            message += (
                " They saturated as training converged (the loss fell from "
                f"{num(s.initial_loss)} to {num(s.final_loss)}): a confident network, not a fault by itself."
            )
            remedy = (
                "Nothing to do while the loss keeps falling. If validation suffers, regularise (weight decay, "
                "dropout) so the weights do not grow to saturate the gates."
            )
            findings.append(Finding("gate_saturation", "info", message, evidence, remedy))
            continue
        findings.append(Finding("gate_saturation", "warning", message, evidence, _saturation_remedy(s, lstm, faulty)))
    return merge_same_code(findings)


def _grew_with_learning(s: Signals, gates: dict, faulty: list) -> bool:
    """Saturation that was not there in the first window and developed while the loss fell substantially (and
    did not rise): the weights grew to make confident predictions. Saturation present from the start (large
    weights or inputs) or alongside a loss that does not fall is the fault."""
    first_ok = all(gates[g]["saturated_fraction_first_window"] <= s.th.saturation_warning for g in faulty)
    return first_ok and s.learned and s.rising is None


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
