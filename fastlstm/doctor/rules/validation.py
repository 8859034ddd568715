"""Validation: overfitting (validation rises while training falls), oscillation, and a subset left behind."""

from __future__ import annotations

import math

import numpy as np

from ...history_view import HistoryView
from ..findings import Finding
from ..measures import kendall_tau
from ..registry import rule
from ..signals import Signals, train_level_near
from .common import clip_value, num


@rule(
    "train_val_divergence",
    family="validation",
    severity="warning",
    signal="rise of validation loss after its best, its trend and noise, and the training loss meanwhile",
    threshold="`divergence_rise` = 0.1; `divergence_trend` = 0.3; `divergence_noise_multiple` = 3; needs "
    "`min_evals` = 5",
)
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
        f"Validation loss is diverging from training loss: best {num(val[best])} at {when}, now {num(recent)} "
        f"({num(100 * rise)}% worse, rising over {after.size - 1} evaluations, Kendall τ {num(tau, 2)}), while the "
        f"training loss went from {num(train_at_best)} to {num(train_now)}. The model is overfitting."
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


@rule(
    "val_oscillation",
    family="validation",
    severity="warning",
    signal="reversals, typical rise and swing-to-progress ratio of validation loss over the later evaluations",
    threshold="`oscillation_sign_changes` = 0.5; `oscillation_rise` = 0.15; `oscillation_swing_to_trend` = 4",
)
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
        f"typically by {num(100 * typical_rise, 2)}%, between {num(later.min())} and {num(later.max())}, reversing "
        f"direction {num(100 * reversals, 2)}% of the time and travelling {num(swing_to_trend, 2)}× its net change. "
        "The optimiser is overshooting."
    )
    lr = s.lr
    target = f"{num(lr / 5)} (from {num(lr)})" if math.isfinite(lr) and lr > 0 else "3-10× lower"
    remedy = (
        f"Lower the learning rate to ~{target}, or decay it when validation stops improving: "
        "`torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=2)` stepped with the val loss. "
        f"Gradient clipping (`clip_grad_norm_(..., {num(clip_value(s))})`) and larger batches also damp the swings."
    )
    return [Finding("val_oscillation", "warning", message, evidence, remedy)]


def _loss_ratio(loss: float, reference: float) -> float:
    """loss / reference for losses ≥ 0: infinite when only the reference is zero, 1 when both are."""
    if reference > 0:
        return loss / reference
    return math.inf if loss > 0 else 1.0


@rule(
    "subset_disparity",
    family="validation",
    severity="warning",
    signal="worst subset loss / median of the other subsets, at the last evaluation",
    threshold="`subset_ratio` = 2",
)
def rule_subset_disparity(s: Signals) -> list:
    th = s.th
    with_subsets = [e for e in s.view.evals if sum(math.isfinite(v) for v in e["subset_losses"].values()) >= 2]
    if not with_subsets:
        return []
    last = with_subsets[-1]
    losses = {k: v for k, v in last["subset_losses"].items() if math.isfinite(v)}
    if min(losses.values()) < 0:
        return []  # a loss that can be negative (a Gaussian NLL) has no zero to measure a ratio from
    worst = max(losses, key=losses.get)
    reference = float(np.median([v for k, v in losses.items() if k != worst]))
    ratio = _loss_ratio(losses[worst], reference)
    if ratio < th.subset_ratio:
        return []
    first = with_subsets[0]["subset_losses"]
    first_others = [v for k, v in first.items() if k != worst and math.isfinite(v)]
    first_ratio = math.nan
    if first_others and math.isfinite(first.get(worst, math.nan)) and min(first_others + [first[worst]]) >= 0:
        first_ratio = _loss_ratio(first[worst], float(np.median(first_others)))
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
        change = "widened" if ratio > first_ratio else "narrowed"
        trend = f" (it was {num(first_ratio)}× at the first evaluation: the gap {change})"
    message = (
        f"Subset {worst!r} does much worse than the others: loss {num(losses[worst])} against a median of "
        f"{num(reference)}, {num(ratio)}× (threshold {num(th.subset_ratio)}×){trend}."
    )
    remedy = (
        f"Give {worst!r} more weight in training: oversample it (`torch.utils.data.WeightedRandomSampler` with "
        "weights ∝ 1 / subset frequency) or weight its loss; check that its features are scaled like the others' and "
        "that its data are clean; if its dynamics differ, add the subset identity as an input feature or give the "
        "model more capacity."
    )
    return [Finding("subset_disparity", "warning", message, evidence, remedy)]
