"""Plots of a training History (docs/history.md): what the doctor looked at, for a person to look at too.

    fastlstm.plots.plot_all(history, findings, "out/")   # -> list of PNG paths

matplotlib is an optional dependency (`pip install "fastlstm[plots]"`); importing this module works without it and
each function raises ImportError with that hint when called. Figures are built with matplotlib's object API
(`matplotlib.figure.Figure`), so no GUI backend or global pyplot state is involved.
"""

from __future__ import annotations

import os

import numpy as np

from .history_view import HistoryView

GATE_NAMES = {"i": "input gate i", "f": "forget gate f", "g": "candidate g (tanh)", "o": "output gate o"}


def _figure(**kwargs):
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError('fastlstm.plots needs matplotlib: pip install "fastlstm[plots]"') from exc
    return Figure(layout="constrained", **kwargs)


def _save(fig, path: str) -> str:
    fig.savefig(path, dpi=110)
    return path


def plot_all(history, findings=(), folder: str = ".") -> list:
    """Every plot the history has data for, as PNG files in `folder`; returns their paths."""
    view = history if isinstance(history, HistoryView) else HistoryView(history)
    os.makedirs(folder, exist_ok=True)
    written = []
    jobs = (
        ("losses.png", lambda p: plot_losses(view, findings, p)),
        ("gradient_vs_lag.png", lambda p: plot_gradient_vs_lag(view, p)),
        ("gate_saturation.png", lambda p: plot_gate_saturation(view, p)),
        ("input_scales.png", lambda p: plot_input_scales(view, p)),
    )
    for name, job in jobs:
        path = job(os.path.join(folder, name))
        if path is not None:
            written.append(path)
    return written


# ---- loss and validation curves ----


def plot_losses(history, findings=(), path: str | None = None):
    """Training loss per step and validation loss per evaluation, log scale when positive, with the steps that
    findings cite marked and labelled by code. Returns the path (or the Figure when `path` is None)."""
    view = history if isinstance(history, HistoryView) else HistoryView(history)
    steps, loss = view.finite_losses()
    val_steps, _, val = view.val_series()
    if loss.size == 0 and val.size == 0:
        return None
    fig = _figure(figsize=(9, 4.5))
    ax = fig.subplots()
    if loss.size:
        ax.plot(steps, loss, lw=0.8, alpha=0.7, label="training loss")
    if val.size:
        ax.plot(val_steps, val, "o-", ms=3, label="validation loss")
    for subset in sorted({k for e in view.evals for k in e["subset_losses"]}):
        points = [(e["step"], e["subset_losses"][subset]) for e in view.evals if subset in e["subset_losses"]]
        ax.plot(*zip(*points), ":", lw=1, label=f"val: {subset}")
    if np.all(np.concatenate([loss, val]) > 0):
        ax.set_yscale("log")
    for step, label, colour in _finding_marks(findings):
        ax.axvline(step, color=colour, lw=1, ls="--", alpha=0.8)
        ax.annotate(
            label,
            (step, 1.0),
            xycoords=("data", "axes fraction"),
            rotation=90,
            va="top",
            ha="right",
            fontsize=7,
            color=colour,
        )
    ax.set_xlabel("training step")
    ax.set_ylabel("loss")
    ax.set_title("Loss curves" + (" (findings marked)" if findings else ""))
    ax.legend(fontsize=8)
    return _save(fig, path) if path else fig


_SEVERITY_COLOUR = {"error": "tab:red", "warning": "tab:orange", "info": "tab:gray"}


def _finding_marks(findings) -> list:
    """(step, label, colour) for each finding that cites a step in its evidence."""
    marks = []
    for f in findings:
        step = _cited_step(f.evidence)
        if step is not None:
            marks.append((step, f"{f.code} ({f.severity})", _SEVERITY_COLOUR.get(f.severity, "k")))
    return marks


def _cited_step(evidence: dict):
    # The most specific step first: where the problem started or peaked, then the window it was measured over.
    for key in ("first_step", "best_step", "grad_norm_max_step", "from_step", "step"):
        value = evidence.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return int(value)
    steps = evidence.get("steps")
    if isinstance(steps, list) and steps and isinstance(steps[0], (int, float)):
        return int(steps[0])
    for nested in evidence.values():
        if isinstance(nested, dict):
            step = _cited_step(nested)
            if step is not None:
                return step
    return None


# ---- gradient norm vs lag ----


def plot_gradient_vs_lag(history, path: str | None = None):
    """‖∂L/∂h_t‖ against the lag from the last step of the window (log scale), one panel per LSTM layer-direction,
    the early half of training dashed and the later half solid (each the median over its telemetry windows)."""
    view = history if isinstance(history, HistoryView) else HistoryView(history)
    curves = _lag_profiles(view)
    if not curves:
        return None
    fig = _figure(figsize=(4.2 * min(3, len(curves)), 3.6 * ((len(curves) + 2) // 3)))
    axes = np.atleast_1d(fig.subplots((len(curves) + 2) // 3, min(3, len(curves)), squeeze=False)).ravel()
    for ax, (title, early, late) in zip(axes, curves):
        for norms, style, label in ((early, "--", "early training"), (late, "-", "late training")):
            if norms is not None and np.any(norms > 0):
                ax.semilogy(np.arange(norms.size), norms, style, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("lag k (steps before the last)")
        ax.set_ylabel("‖∂L/∂h‖")
        ax.legend(fontsize=7)
    for ax in axes[len(curves) :]:
        ax.set_visible(False)
    return _save(fig, path) if path else fig


def _lag_profiles(view: HistoryView) -> list:
    """[(title, early median profile by lag, late median profile by lag)] per LSTM layer-direction."""
    curves = []
    for name, windows in view.telemetry.items():
        slots = max((len(w.layers) for w in windows), default=0)
        for k in range(slots):
            rows = [w.layers[k].grad_in_own_order()[::-1] for w in windows if k < len(w.layers)]
            rows = [r for r in rows if r.size and np.isfinite(r).any()]
            if not rows:
                continue
            length = max({r.size for r in rows}, key=[r.size for r in rows].count)
            rows = [r for r in rows if r.size == length]
            half = max(1, len(rows) // 2)
            early = _nanmedian_rows(rows[:half]) if len(rows) > 1 else None
            late = _nanmedian_rows(rows[half:] if len(rows) > 1 else rows)
            layer = next(w.layers[k] for w in windows if k < len(w.layers))
            direction = " reverse" if layer.direction == 1 else ""
            curves.append((f"{name}: layer {layer.layer}{direction}", early, late))
    return curves


def _nanmedian_rows(rows: list) -> np.ndarray:
    stacked = np.stack(rows)
    with np.errstate(all="ignore"):
        out = np.full(stacked.shape[1], np.nan)
        for j in range(stacked.shape[1]):
            column = stacked[:, j][np.isfinite(stacked[:, j])]
            if column.size:
                out[j] = np.median(column)
    return out


# ---- gate saturation over training ----


def plot_gate_saturation(history, path: str | None = None):
    """Saturated fraction of each gate over training, one panel per LSTM layer-direction."""
    view = history if isinstance(history, HistoryView) else HistoryView(history)
    panels = []
    for name, windows in view.telemetry.items():
        slots = max((len(w.layers) for w in windows), default=0)
        for k in range(slots):
            seen = [(w.step, w.layers[k]) for w in windows if k < len(w.layers) and w.layers[k].elements > 0]
            if seen:
                panels.append((name, seen))
    if not panels:
        return None
    fig = _figure(figsize=(4.2 * min(3, len(panels)), 3.4 * ((len(panels) + 2) // 3)))
    axes = np.atleast_1d(fig.subplots((len(panels) + 2) // 3, min(3, len(panels)), squeeze=False)).ravel()
    for ax, (name, seen) in zip(axes, panels):
        steps = [s for s, _ in seen]
        for gate, label in GATE_NAMES.items():
            ax.plot(steps, [lw.gate_saturation[gate] for _, lw in seen], label=label)
        layer = seen[0][1]
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{name}: layer {layer.layer}{' reverse' if layer.direction else ''}", fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel("fraction saturated")
        ax.legend(fontsize=7)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    return _save(fig, path) if path else fig


# ---- per-feature input scales ----


def plot_input_scales(history, path: str | None = None, threshold: float = 10.0):
    """Per-feature magnitude sqrt(mean² + std²) of each LSTM's inputs (log scale) with their min-max range, and the
    doctor's threshold for "too large"."""
    view = history if isinstance(history, HistoryView) else HistoryView(history)
    panels = [(name, view.input_stats(name)) for name in view.inputs]
    panels = [(name, stats) for name, stats in panels if stats is not None and np.all(np.isfinite(stats.rms))]
    if not panels:
        return None
    fig = _figure(figsize=(max(6, 0.55 * max(s.mean.size for _, s in panels) + 2), 3.8 * len(panels)))
    axes = np.atleast_1d(fig.subplots(len(panels), 1, squeeze=False)).ravel()
    for ax, (name, stats) in zip(axes, panels):
        names = view.feature_names(name, stats.mean.size)
        x = np.arange(stats.mean.size)
        colours = ["tab:red" if r > threshold else "tab:blue" for r in stats.rms]
        ax.bar(x, np.maximum(stats.rms, 1e-12), color=colours, alpha=0.8, label="sqrt(mean² + std²)")
        largest = np.maximum(np.abs(stats.min), np.abs(stats.max))
        ax.scatter(x, np.maximum(largest, 1e-12), marker="_", s=200, color="k", label="max |value|")
        ax.axhline(threshold, color="tab:red", ls="--", lw=1, label=f"doctor threshold ({threshold:g})")
        ax.set_yscale("log")
        ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"Input feature scales of {name!r}", fontsize=10)
        ax.legend(fontsize=7)
    return _save(fig, path) if path else fig
