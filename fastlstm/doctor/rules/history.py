"""What the history lacks, and so which rules could not look."""

from __future__ import annotations

from ..findings import Finding
from ..registry import rule
from ..signals import Signals


@rule(
    "history_incomplete",
    family="history",
    severity="info",
    signal="a whole section of the history is missing",
    threshold="-",
)
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
        "`monitor.step` (with TBPTTTrainer: `fit(..., val_data=...)`) to enable every rule."
    )
    return [Finding("history_incomplete", "info", message, {"skipped": missing}, remedy)]
