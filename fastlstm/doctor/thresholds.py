"""The numbers the doctor's rules compare their measurements with, grouped by the finding that uses them.

docs/doctor.md explains each; `diagnose(history, Thresholds(...))` overrides them for experiments.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Every number a rule compares against. docs/doctor.md explains each; override for experiments with
    `diagnose(history, Thresholds(...))`."""

    min_steps: int = 10  # loss rules need at least this many finite training losses
    # exploding_gradients
    explode_through_time: float = 1e3  # max_t ‖∂L/∂h_t‖ / ‖∂L/∂h_T‖ (or 10·T if larger)
    explode_spike: float = 100.0  # a step's grad norm / its baseline (see `spike_baseline_steps`)
    explode_error: float = 1e4  # spike or growth ratio at which the finding is an error
    spike_baseline_steps: int = 20  # baseline: median norm of this many preceding steps, floored (docs/doctor.md)
    spike_min_steps: int = 2  # a warning needs this many spiking steps; a lone spike is info
    explode_growth: float = 100.0  # median grad norm of the last 20% of steps / of the first 10%
    clip_contains: float = 0.9  # clipping "contains" the spikes when it was in effect on this share of them
    # vanishing_gradients
    vanish_ratio: float = 1e-3  # ‖∂L/∂h‖ at the sequence start / at its end
    learned_fraction: float = 0.5  # the run "learned" if final loss < this × initial loss
    # gate_saturation
    saturation_warning: float = 0.6  # fraction of a gate's activations saturated, averaged over recent windows
    forget_open_share: float = 0.5  # forget-gate saturation provably this much *open* is memory, not a fault
    # unscaled_inputs / unscaled_targets
    feature_rms_max: float = 10.0  # sqrt(mean² + std²) of one feature
    feature_spread_max: float = 1e3  # largest / smallest feature RMS
    target_offset: float = 3.0  # |mean| / std of a target beyond which its offset dominates
    initial_vs_constant: float = 10.0  # initial loss / MSE of the constant (mean) predictor
    # loss_stagnant / loss_zero
    stagnant_improvement: float = 0.05  # relative fall of the loss from its start to its end
    stagnant_sigmas: float = 3.0  # the fall must exceed this many standard errors of the loss level
    zero_relative: float = 1e-6  # final / initial loss at or below which the loss counts as zero
    # loss_diverging
    diverge_rise: float = 0.2  # final loss above the lower of its initial and best level by this fraction
    diverge_error: float = 10.0  # final / reference at which the finding is an error (or a non-finite end)
    update_ratio_high: float = 1e-2  # ‖Δθ‖/‖θ‖ per step; ~1e-3 is the usual healthy order
    clip_active_share: float = 0.5  # clipping counts as in effect when it scaled this share of the steps
    # train_val_divergence
    min_evals: int = 5
    divergence_rise: float = 0.1  # recent validation loss above its best by this fraction
    divergence_trend: float = 0.3  # Kendall's tau of the validation loss after its best
    divergence_noise_multiple: float = 3.0  # the rise, in multiples of the curve's evaluation-to-evaluation noise
    # val_oscillation
    oscillation_rise: float = 0.15  # median rise of val_loss (when it rises), relative to the value before it
    oscillation_sign_changes: float = 0.5  # fraction of successive changes that reverse direction
    oscillation_swing_to_trend: float = 4.0  # total |Δ val_loss| / |net change| over the later evaluations
    # subset_disparity
    subset_ratio: float = 2.0  # worst subset loss / median of the other subsets
    # truncation_too_short
    truncation_bias: float = 0.1  # estimated share of the gradient that lies beyond the truncation window
    truncation_min_correlation: float = 0.2  # residual-input correlation beyond k2 that matters (r² ≥ 4%)
    carried_share: float = 0.5  # share of an LSTM's training passes given a nonzero, detached state: chunked


DEFAULT_THRESHOLDS = Thresholds()
