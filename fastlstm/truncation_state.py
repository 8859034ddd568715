"""The trainer's side of adaptive truncation: what it remembers between telemetry windows, and how it turns closed
windows, probe sums and the training loss into the lag in force (docs/training.md, "Adaptive truncation").

`TruncationState` is the data a checkpoint holds ("truncation"); `TruncationTracker` is the Monitor listener and the
decision at each window boundary. The maths (estimates, the controller, the probe) lives in truncation.py.
"""

from __future__ import annotations

import dataclasses
import math

import torch.nn.functional as F

from .distributed import all_reduce_max, world_size
from .history import DEPENDENCY, TRUNCATION_ESTIMATES, DependencyProbe, TruncationEstimate
from .padding import without_padding
from .truncation import GUARD_CHUNKS, correlation_by_lag, estimate_state_dependency, residual_dependencies


@dataclasses.dataclass
class TruncationState:
    """What the truncation remembers between windows (besides the controller's own state)."""

    lag: int = 0  # k2 - k1 in force
    estimates: list = dataclasses.field(default_factory=list)  # (dependency, rate) since the last decision
    geometry: dict = dataclasses.field(default_factory=dict)  # step -> (overlap, window length) of its chunk
    residual_floor: int | None = None  # farthest significant residual lag of the latest probe entry

    def state_dict(self, controller) -> dict:
        return {
            "lag": self.lag,
            "controller": None if controller is None else controller.state_dict(),
            "estimates": list(self.estimates),
            "geometry": sorted(self.geometry.items()),
            "residual_floor": self.residual_floor,
        }

    def load_state_dict(self, state: dict, controller) -> None:
        self.lag = int(state["lag"])
        if controller is not None:
            controller.load_state_dict(state["controller"])
        self.estimates = [tuple(e) for e in state["estimates"]]
        self.geometry = {int(k): tuple(v) for k, v in state["geometry"]}
        self.residual_floor = state["residual_floor"]


class TruncationTracker:
    """Relates each closed telemetry window to the chunks it covers, records the estimates and the residual probe
    in the history, and (adaptive) decides the lag at each window boundary. Every rank takes the same decision."""

    def __init__(self, k1: int, lag: int, adaptive, probe, monitor, target_bias: float, reach_fraction: float, group):
        self.k1 = k1
        self.adaptive = adaptive  # AdaptiveTruncation or None
        self.probe = probe  # ResidualProbe or None
        self.monitor = monitor
        self.target_bias, self.reach_fraction = float(target_bias), float(reach_fraction)
        self.group = group
        self.state = TruncationState(lag=lag)
        monitor.listeners.append(self.on_windows)

    @property
    def k2(self) -> int:
        return self.k1 + self.state.lag

    def detail(self) -> dict:
        """The `truncation` event's detail (docs/training.md)."""
        detail = {"k1": self.k1, "k2": self.k2, "adaptive": self.adaptive is not None}
        if self.adaptive is not None:
            a = self.adaptive
            detail.update(
                lag=a.lag,
                k_min=a.k_min,
                k_max=a.k_max,
                target_bias=a.target_bias,
                reach_fraction=a.reach_fraction,
                estimated_dependency=a.dependency,
                rate=a.rate,
                residual_floor=a.floor,
                loss_floor=a.loss_floor,
            )
        return detail

    def record_chunk(self, step: int, overlap: int, length: int) -> None:
        """The geometry of the chunk trained at `step` (before the Monitor's step may close its window)."""
        self.state.geometry[step] = (overlap, length)

    # ---- telemetry ----

    def on_windows(self, windows: list) -> None:
        """Monitor listener: estimate the dependency from every closed telemetry window of one geometry."""
        for name, first, last, snap in windows:
            geometry = self._uniform_geometry(first, last)
            if geometry is None or geometry[0] < 2:
                continue
            overlap, length = geometry
            for layer in snap.layers:
                g_h, g_c = layer.grad_norm_per_step, layer.cell_grad_norm_per_step
                if layer.direction != 0 or g_h.size <= overlap:
                    continue
                # Lag k = 0..overlap before the chunk's first loss, for both parts of the state.
                cell = g_c[overlap::-1] if g_c.size > overlap else None
                estimate = estimate_state_dependency(g_h[overlap::-1], cell, self.target_bias, self.reach_fraction)
                if estimate is None:
                    continue
                parts = {
                    part: (e.rate, e.dependency, e.bias, e.reach)
                    for part, e in (("hidden", estimate.hidden), ("cell", estimate.cell))
                    if e is not None
                }
                record = TruncationEstimate(
                    last,
                    first,
                    name,
                    layer.layer,
                    length - overlap,
                    length,
                    overlap,
                    estimate.rate,
                    estimate.dependency,
                    estimate.bias,
                    parts,
                )
                self.monitor.live_history.add(TRUNCATION_ESTIMATES, record.to_entry())
                self.state.estimates.append((estimate.dependency, estimate.rate))

    def _uniform_geometry(self, first: int, last: int):
        """The (overlap, window length) every chunk whose telemetry the window holds had, or None if they differ."""
        shapes = {self.state.geometry.get(step) for step in self.monitor.instrumented_steps(first, last)}
        return shapes.pop() if len(shapes) == 1 and None not in shapes else None

    # ---- the decision at a window boundary ----

    def at_boundary(self, device) -> None:
        """Judge a pending decrease by the training loss, then fold the collected estimates and the residual floor
        into the controller; forget the geometry no window still to be decoded covers."""
        self._adapt(device)
        horizon = self.monitor.oldest_undecoded_step()
        self.state.geometry = {k: v for k, v in self.state.geometry.items() if k >= horizon}

    def _adapt(self, device) -> None:
        s = self.state
        if self.adaptive is None:
            s.estimates.clear()
            return
        a = self.adaptive
        dependency = max((d for d, _ in s.estimates), default=-1.0)
        rate = max((r for _, r in s.estimates), default=-1.0)
        floor = -1.0 if s.residual_floor is None else float(s.residual_floor)
        s.estimates.clear()
        s.residual_floor = None
        # The estimates are reduced with a max first; the losses are already means over the ranks.
        if world_size(self.group) > 1:
            dependency, rate, floor = all_reduce_max([min(dependency, 1e30), rate, floor], device, self.group)
        if a.guard is not None:
            horizon = self._losses_read_below()
            if a.check_loss(self._read_losses(a.guard.step - GUARD_CHUNKS, horizon), horizon):
                self._set_lag("loss_rose")
        before = a.lag
        if a.observe(
            dependency if dependency >= 0 else None, rate if rate >= 0 else None, int(floor) if floor >= 0 else None
        ):
            if a.lag < before:
                a.decreased(self.monitor.step_count, before)
            else:
                a.increased()
            self._set_lag("estimate")

    def _set_lag(self, reason: str) -> None:
        self.state.lag = self.adaptive.lag
        self.monitor.event("truncation", {**self.detail(), "reason": reason})

    def _losses_read_below(self) -> int:
        """Every training loss of a step below this one has been read back, whatever else read the history
        (checkpoints, `trainer.history`): the batch of a read period is decoded at the end of the next one. A
        bound that depends on the step alone keeps the loss guard's decisions identical across ranks and resumes."""
        every = self.monitor.read_every
        return (self.monitor.step_count // every - 1) * every

    def _read_losses(self, first: int, horizon: int) -> list:
        """(step, loss) of the steps in [first, horizon) whose loss has been read back, oldest first."""
        found = []
        for entry in reversed(self.monitor.live_history.steps):
            step = entry["step"]
            if step < first:
                break
            if step < horizon and entry.get("loss") is not None:
                found.append((step, float(entry["loss"])))
        return found[::-1]

    # ---- residual probe ----

    def lagged_inputs(self, streams, chunk, layout):
        """The inputs of the probe's lags before the chunk's new steps (zeros before the stream start)."""
        lags, s, n = self.probe.lags, chunk.first, chunk.end - chunk.first
        lo = max(0, s - lags)
        x = layout.slice(streams.inputs, chunk.rows, lo, s + n).detach()
        x = without_padding(x, chunk.valid(lo, s + n), layout.batch_first)
        if not layout.batch_first:
            x = x.transpose(0, 1)
        return F.pad(x, (0, 0, lags - (s - lo), 0))

    def record_probe(self, step: int) -> None:
        taken = self.probe.take()
        if taken is None:
            return
        count, sums = taken
        record = DependencyProbe(step, count, self.k1, self.k2, self.probe.lags, 1.0 / math.sqrt(count))

        def read(cross, residual_energy, input_energy):
            r = correlation_by_lag(cross, residual_energy, input_energy)
            record.correlation = r.tolist()
            self.monitor.live_history.add(DEPENDENCY, record.to_entry())
            significant = residual_dependencies(r, record.noise)
            self.state.residual_floor = int(significant[-1]) if significant.size else 0

        self.monitor.defer(sums, read)
