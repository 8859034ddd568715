"""Truncated backpropagation through time that is too short for the dependencies the model uses, whether the TBPTT
trainer truncates or the user's own loop does (chunks of a stream with the state carried over, detached)."""

from __future__ import annotations

import math

from ...history_view import to_float
from ..findings import Finding
from ..measures import suggest_truncation, truncated_gradient_share
from ..registry import rule
from ..signals import Signals
from ..thresholds import Thresholds
from ..trainer_evidence import truncation_evidence
from .common import lstm_label, merge_same_code, num


@rule(
    "truncation_too_short",
    family="truncation",
    severity="warning; info for a weak residual correlation",
    signal="the TBPTT trainer's evidence and the gradient share beyond the window; for any loop that carries a "
    "detached state across chunks (seen by the Monitor), the gradient share before the chunk",
    threshold="`truncation_bias` = 0.1; `truncation_min_correlation` = 0.2; `carried_share` = 0.5",
)
def rule_truncation_too_short(s: Signals) -> list:
    """The TBPTT trainer's truncation (a `truncation` event), or chunks cut by the user's own loop (the Monitor saw
    each chunk start from the previous chunk's state, detached); either way judged from the telemetry."""
    events = s.view.events_of("truncation")
    if events:
        return _trainer_truncation(s, events[-1])
    findings = [f for name, carried in s.chunked_lstms.items() for f in _chunked_truncation(s, name, carried)]
    return merge_same_code(findings)


def _trainer_truncation(s: Signals, event: dict) -> list:
    """Two independent signals, merged into one finding: the trainer's own evidence (a residual that still
    correlates with inputs beyond k2, or its gradient-decay estimates; trainer_evidence.py), and the share of
    gradient this rule estimates lies beyond the window from the telemetry's gradient profile."""
    detail = event.get("detail") or {}
    since = int(event.get("step", 0))
    k1 = int(detail.get("k1") or 0)
    k2 = int(detail.get("k2") or k1)
    signals, suggestions, parts = {}, [], []
    trainer = truncation_evidence(s.view)
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
                f"{num(trainer.get('correlation'))}, noise level {num(trainer.get('noise'))}), beyond the {k2} steps "
                "any loss can reach"
            )
        else:
            parts.append(
                "the trainer's gradient-decay estimate puts "
                f"{num(100 * to_float(trainer.get('bias')))}% of the gradient "
                f"beyond the window (dependency ≈ {num(dependency)} steps)"
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
            f"in {lstm_label(p.where)} the gradient has not decayed at the start of the {len(p.norms)}-step window: "
            f"an estimated {num(100 * share)}% of it lies further back ({method}; threshold "
            f"{num(100 * s.th.truncation_bias)}%)"
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
        f"(r = {num(r)}, beyond k2 = {k2}): statistically detectable, but a dependency that long would explain only "
        f"{num(100 * r * r, 2)}% of the remaining error. Slow trends in the inputs produce such correlations."
    )
    remedy = "Nothing required. If you suspect a real long-range dependency, try k2 larger or `adaptive=True`."
    return Finding("truncation_too_short", "info", message, {"k1": k1, "k2": k2, "trainer": evidence}, remedy)


def _worst_truncated_profile(s: Signals, k1: int, since: int, lstm: str | None = None):
    """(profile, share, method) of the layer with the largest gradient share beyond the window, if above the
    threshold."""
    worst = None
    for p in s.profiles:
        if p.last_step < since or (lstm is not None and p.lstm != lstm):
            continue
        share, method = truncated_gradient_share(p.norms, k1)
        if share > s.th.truncation_bias and (worst is None or share > worst[1]):
            worst = (p, share, method)
    return worst


def _chunked_truncation(s: Signals, lstm: str, carried: dict) -> list:
    """A loop that feeds each chunk of a stream the previous chunk's state, detached, truncates backpropagation at
    the chunk length K whoever wrote the loop. The loss positions per chunk come from the recorded target and input
    counts (a target per step: K; one per sequence: 1); without targets every step is assumed to carry a loss."""
    profiles = [p for p in s.profiles if p.lstm == lstm]
    if not profiles:
        return []
    window = len(profiles[0].norms)
    k1 = _loss_positions(s, lstm, window)
    found = _worst_truncated_profile(s, k1, since=0, lstm=lstm)
    if found is None:
        return []
    p, share, method = found
    # Without the trainer's residual probe to corroborate it, the profile must also hold at the end of the run:
    # a network still searching for structure can pass through a phase whose gradients reach far back.
    latest = [q for q in s.latest_profiles if q.where == p.where and len(q.norms) == window]
    latest_share = truncated_gradient_share(latest[0].norms, k1)[0] if latest else math.nan
    if not latest_share > s.th.truncation_bias:
        return []
    share = min(share, latest_share)
    suggested = suggest_truncation(share, window, s.th.truncation_bias)
    evidence = {
        "lstm": lstm,
        "chunk_steps": window,
        "loss_positions_per_chunk": k1,
        "training_passes": carried["passes"],
        "passes_with_carried_state": carried["nonzero_state"],
        "passes_with_attached_state": carried["attached_state"],
        "suggested_steps": suggested,
        "gradient_profile": {
            **p.where,
            "window_steps": window,
            "gradient_share_beyond_window": share,
            "estimate": method,
            "threshold": s.th.truncation_bias,
            "steps": [p.first_step, p.last_step],
        },
    }
    message = (
        f"Backpropagation is truncated at {window} steps by the training loop: {carried['nonzero_state']} of "
        f"{carried['passes']} training passes of LSTM {lstm!r} started from the previous chunk's state, detached, "
        f"so the gradient stops at each chunk's start. In {lstm_label(p.where)} it has not decayed there: an "
        f"estimated {num(100 * share)}% of it lies further back "
        f"({method}; threshold {num(100 * s.th.truncation_bias)}%)."
    )
    remedy = (
        f"Backpropagate over longer chunks: cut the stream (and detach the carried state) every ~{suggested} steps "
        f"instead of {window}. If memory is the limit, keep the loss on {window}-step chunks but backpropagate "
        f"{suggested}: `fastlstm.TBPTTTrainer(model, optimizer, loss_fn, k1={window}, k2={suggested})` does that "
        "(or `adaptive=True` to let it choose)."
    )
    return [Finding("truncation_too_short", "warning", message, evidence, remedy)]


def _loss_positions(s: Signals, lstm: str, window: int) -> int:
    """Loss positions per chunk: target vectors recorded per input vector the LSTM saw, times the chunk length."""
    inputs = s.view.input_stats(lstm)
    targets = s.view.target_stats()
    if inputs is None or targets is None or inputs.count <= 0:
        return window
    per_step = targets.count / inputs.count
    return int(min(window, max(1, round(per_step * window))))
