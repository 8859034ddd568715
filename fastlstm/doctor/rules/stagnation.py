"""The training loss does not move. Its own module so that it ranks after every fault that can explain it (a rising
loss and a NaN loss are never "not moving": loss_diverging and non_finite say what they did)."""

from __future__ import annotations

import math

import numpy as np

from ..findings import Finding
from ..measures import median_se
from ..registry import rule
from ..signals import Signals
from .common import num


@rule(
    "loss_stagnant",
    family="loss",
    severity="warning",
    signal=(
        "fall of the loss from start to end, relative and against its noise; "
        "never a rising loss or one that turned non-finite"
    ),
    threshold="`stagnant_improvement` = 0.05; `stagnant_sigmas` = 3; needs `min_steps` = 10",
)
def rule_loss_stagnant(s: Signals) -> list:
    th = s.th
    _steps, loss = s.losses
    if loss.size < th.min_steps or s.ended_nonfinite or s.rising is not None:
        return []  # a loss that turned NaN, or rose, is not "not moving": non_finite / loss_diverging say what it did
    first = loss[: max(3, loss.size // 10)]
    last = s.final_window
    drop = s.initial_loss - s.final_loss
    scale = max(abs(s.initial_loss), abs(s.final_loss), 1e-12)
    # Standard errors of the two medians (1.25 σ/√n with σ from the MAD), so a noisy curve needs a larger fall.
    noise = math.hypot(median_se(first), median_se(last))
    relative = drop / scale
    if abs(relative) >= th.stagnant_improvement and abs(drop) > th.stagnant_sigmas * noise:
        return []  # it moved: down (learning) or up (rising, below loss_diverging's threshold)
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
    if s.clipped.size:
        evidence["clipped_share"] = s.clip_share
    _, ratios = s.update_ratios
    if ratios.size:
        evidence["update_ratio_median"] = float(np.median(ratios))
    if s.chunked_lstms:
        evidence["truncated_by_loop_at"] = {name: c["timesteps"] for name, c in s.chunked_lstms.items()}
    change = f"{num(100 * abs(relative), 2)}% {'lower' if relative >= 0 else 'higher'}"
    message = (
        f"The training loss does not move: {num(s.initial_loss)} at the start, {num(s.final_loss)} over the last "
        f"{last.size} steps ({change}; needs ≥{num(100 * th.stagnant_improvement)}% lower and "
        f"{num(th.stagnant_sigmas)} standard errors)."
    )
    if math.isfinite(s.constant_predictor_mse) and s.final_loss >= 0.9 * s.constant_predictor_mse:
        message += f" It is no better than predicting the target mean (MSE {num(s.constant_predictor_mse)})."
    return [Finding("loss_stagnant", "warning", message, evidence, _stagnant_remedy(s, evidence))]


def _stagnant_remedy(s: Signals, evidence: dict) -> str:
    lr = s.lr
    if lr == 0:
        return (
            "The learning rate is 0 (check the scheduler: a warm-up that never ends or a decay that reached 0). "
            "Start from 1e-3 for Adam."
        )
    if math.isfinite(lr) and lr < 1e-5:
        return f"The learning rate {num(lr)} is too small to move the weights; try 1e-3 (Adam) or {num(lr * 100)}."
    if evidence.get("grad_norm_median", 1.0) < 1e-8:
        return (
            "The gradients are (almost) zero: check that the loss depends on the parameters (no `.detach()`, "
            "`.item()` or `torch.no_grad()` in the forward path) and that the optimizer holds the model's parameters."
        )
    unscaled = ", ".join([name for names in s.unscaled.values() for name in names][:5])
    if unscaled:
        return f"Scale the inputs first ({unscaled} are unscaled; see unscaled_inputs); then raise the learning rate."
    lr_text = f" (currently {num(lr)})" if math.isfinite(lr) else ""
    _, ratios = s.update_ratios
    big_steps = ratios.size and float(np.median(ratios)) > s.th.update_ratio_high
    if big_steps or s.clip_share >= s.th.clip_active_share:
        how = []
        if big_steps:
            how.append(f"each step changes the weights by {num(100 * float(np.median(ratios)), 2)}% of their norm")
        if s.clip_share >= s.th.clip_active_share:
            how.append(f"clipping scales {num(100 * s.clip_share)}% of the steps down")
        return (
            f"The steps are large, not small ({' and '.join(how)}): the loss bounces instead of descending. Lower "
            f"the learning rate{lr_text} 3-10× rather than raising it, and check the gate saturation findings."
        )
    text = (
        f"Raise the learning rate{lr_text} by 3-10×, check the gate saturation and gradient findings, and verify "
        "on one small batch that the model can overfit it (if it cannot, the loss or the data pipeline is broken)."
    )
    for lstm, carried in s.chunked_lstms.items():
        text += (
            f" The loop truncates backpropagation at {carried['timesteps']} steps (LSTM {lstm!r} starts each chunk "
            "from the previous chunk's state, detached): a dependency longer than that cannot be learned, so try "
            "longer chunks as well."
        )
    return text
