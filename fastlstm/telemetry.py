"""Telemetry counters on the device, and their lazy, host-side reading.

The backends write into the tensors held here (see docs/telemetry.md for the definitions and constants.py for the
layout); this module only allocates them, hands each layer its slice, and turns a copy of them into a `Snapshot`.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
import torch

from . import constants as C
from .jsonio import to_json_safe


class StageProbe(NamedTuple):
    """Where one launch (one layer-direction, one stage) writes its telemetry; what the backends receive."""

    target: torch.Tensor  # forward: the slot's float64 [NUM_STATS] row; backward: its [NUM_GRAD_ROWS, capacity]
    first: torch.Tensor  # int64 [1]: the stage's first non-finite key (atomic min)
    seq: torch.Tensor  # int64 [1]: the pass number, the key's most significant field
    order: int  # the launch's place in its stage (forward: slot; backward: top-down), a field of the key


class LayerProbe(NamedTuple):
    """Both stages' probes of one layer-direction in one pass."""

    forward: StageProbe
    backward: StageProbe


@dataclasses.dataclass(frozen=True)
class NonFinite:
    """The first NaN/inf of a window, where it arose."""

    layer: int
    direction: int
    timestep: int
    stage: str  # "forward" | "backward"
    tensor: str  # one of constants.FORWARD_TENSORS / BACKWARD_TENSORS

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class LayerTelemetry:
    layer: int
    direction: int
    elements: int
    gate_saturation: dict  # gate -> fraction, or None when the window saw no element
    forget_gate_mean: float | None
    cell_absmax: float | None
    grad_norm_per_step: np.ndarray  # float64 [timesteps], nan where no backward pass reached
    backward_passes: np.ndarray  # int64 [timesteps]
    cell_grad_norm_per_step: np.ndarray  # float64 [timesteps], like grad_norm_per_step for dL/dc_t

    def to_dict(self) -> dict:
        return {
            "layer": self.layer,
            "direction": self.direction,
            "elements": self.elements,
            "gate_saturation": dict(self.gate_saturation),
            "forget_gate_mean": to_json_safe(self.forget_gate_mean),  # NaN once a NaN reached the forget gate
            "cell_absmax": to_json_safe(self.cell_absmax),
            "grad_norm_per_step": to_json_safe(self.grad_norm_per_step),
            "backward_passes": self.backward_passes.tolist(),
            "cell_grad_norm_per_step": to_json_safe(self.cell_grad_norm_per_step),
        }


@dataclasses.dataclass(frozen=True)
class Snapshot:
    layers: list  # LayerTelemetry, indexed by layer * num_directions + direction
    first_nonfinite: NonFinite | None
    launches: int  # kernel launches (one per layer, direction and pass) recorded in the window

    def to_dict(self) -> dict:
        return {
            "layers": [layer.to_dict() for layer in self.layers],
            "first_nonfinite": None if self.first_nonfinite is None else self.first_nonfinite.to_dict(),
            "launches": self.launches,
        }


def decode_nonfinite_key(key: int, num_layers: int, num_directions: int) -> NonFinite | None:
    if key == C.NO_NONFINITE:
        return None
    stage = (key >> C.STAGE_SHIFT) & 1
    order = (key >> C.ORDER_SHIFT) & (C.MAX_SLOTS - 1)
    step = (key >> C.STEP_SHIFT) & C.STEP_MAX
    tensor = key & (2**C.TENSOR_BITS - 1)
    direction = order % num_directions
    layer = order // num_directions
    if stage == C.STAGE_BACKWARD:
        layer = num_layers - 1 - layer  # the backward runs top-down
    ascending = (stage == C.STAGE_FORWARD) == (direction == 0)
    names = C.FORWARD_TENSORS if stage == C.STAGE_FORWARD else C.BACKWARD_TENSORS
    return NonFinite(
        layer=layer,
        direction=direction,
        timestep=step if ascending else C.STEP_MAX - step,
        stage=C.STAGES[stage],
        tensor=names[tensor],
    )


def _layer_from_rows(slot: int, num_directions: int, stats: np.ndarray, grad: np.ndarray) -> LayerTelemetry:
    elements = int(stats[C.STAT_ELEMENTS])
    seen = elements > 0
    passes = grad[C.GRAD_PASSES].astype(np.int64)
    reached = np.flatnonzero(passes)
    steps = int(reached[-1]) + 1 if reached.size else 0
    unreached = passes[:steps] == 0

    def rms(row: int) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            values = np.sqrt(grad[row, :steps] / passes[:steps])
        values[unreached] = np.nan
        return values

    return LayerTelemetry(
        layer=slot // num_directions,
        direction=slot % num_directions,
        elements=elements,
        gate_saturation={
            gate: (float(stats[C.STAT_SATURATED + k]) / elements if seen else None) for k, gate in enumerate(C.GATES)
        },
        forget_gate_mean=float(stats[C.STAT_FORGET_SUM]) / elements if seen else None,
        cell_absmax=float(stats[C.STAT_CELL_ABSMAX]) if seen else None,
        grad_norm_per_step=rms(C.GRAD_SUMSQ),
        backward_passes=passes[:steps],
        cell_grad_norm_per_step=rms(C.GRAD_CELL_SUMSQ),
    )


class _Capture(NamedTuple):
    host: tuple  # (stats, grad, marks) on the host, possibly still being filled
    done: torch.cuda.Event | None  # None when the copy was synchronous


# Timesteps the per-step gradient rows hold before they grow (by doubling).
INITIAL_STEPS = 1024


class Telemetry:
    """The telemetry window of one `fastlstm.LSTM`: device counters plus lazy reading (docs/telemetry.md)."""

    def __init__(self, num_layers: int, num_directions: int, enabled: bool = True):
        if num_layers * num_directions > C.MAX_SLOTS:
            raise ValueError(f"telemetry supports at most {C.MAX_SLOTS} layer-directions")
        self.num_layers = num_layers
        self.num_directions = num_directions
        self.enabled = enabled
        self.stats = self.grad = self.first_forward = self.first_backward = self.passes = None
        self._pending: _Capture | None = None
        self._latest: Snapshot | None = None

    @property
    def num_slots(self) -> int:
        return self.num_layers * self.num_directions

    # ---- writing side (the module and the backends) ----

    def allocate(self, device: torch.device) -> None:
        """Put the counters on `device` (a new window if they were elsewhere). The module calls this when it is
        built or moved, so that no forward pass has to create them: under torch.compile a tensor created inside
        the graph could not also be updated by the backward."""
        if self.stats is None or self.stats.device != device:
            self._ensure(device, INITIAL_STEPS)

    def begin_pass(self, device: torch.device, steps: int) -> torch.Tensor:
        """Count a new forward pass of the module; returns its number (a device scalar) for the non-finite keys."""
        self._ensure(device, steps)
        self.passes += 1
        return self.passes.clamp(max=C.SEQ_MAX)

    def probe(self, layer: int, direction: int, seq: torch.Tensor) -> LayerProbe:
        """Where this layer-direction writes in the pass `seq` (from begin_pass)."""
        slot = layer * self.num_directions + direction
        backward_order = (self.num_layers - 1 - layer) * self.num_directions + direction
        return LayerProbe(
            StageProbe(self.stats[slot], self.first_forward, seq, slot),
            StageProbe(self.grad[slot], self.first_backward, seq, backward_order),
        )

    def _ensure(self, device: torch.device, steps: int) -> None:
        if self.stats is None or self.stats.device != device:
            # A new device starts a new window: the old counters cannot be merged without a copy across devices.
            def zeros(*shape, dtype=torch.float64):
                return torch.zeros(*shape, dtype=dtype, device=device)

            self.stats = zeros(self.num_slots, C.NUM_STATS)
            self.grad = zeros(self.num_slots, C.NUM_GRAD_ROWS, 0)
            self.first_forward = torch.full((1,), C.NO_NONFINITE, dtype=torch.int64, device=device)
            self.first_backward = torch.full((1,), C.NO_NONFINITE, dtype=torch.int64, device=device)
            self.passes = zeros(1, dtype=torch.int64)
        capacity = self.grad.shape[-1]
        if steps > capacity:
            # A backward whose forward ran before this growth still holds the old rows, and its gradient norms are
            # lost; doubling makes that rare (it needs a longer sequence between a forward and its backward).
            size = 1 << (steps - 1).bit_length()
            grown = torch.zeros(self.num_slots, C.NUM_GRAD_ROWS, size, dtype=torch.float64, device=device)
            grown[..., :capacity] = self.grad
            self.grad = grown

    # ---- reading side ----

    def reset(self) -> None:
        """Start a new window. Stream-ordered device writes only; never synchronises."""
        if self.stats is None:
            return
        self.stats.zero_()
        self.grad.zero_()
        self.first_forward.fill_(C.NO_NONFINITE)
        self.first_backward.fill_(C.NO_NONFINITE)
        self.passes.zero_()

    def snapshot(self, reset: bool = False) -> Snapshot:
        """The current window, read with one host synchronisation."""
        capture = self._capture(reset, blocking=True)
        self._latest = self._decode(capture)
        return self._latest

    def poll(self, reset: bool = False) -> Snapshot | None:
        """The newest snapshot whose copy finished since the previous poll, or None. Never blocks.

        Each call also starts a device-to-host copy when none is in flight, so calling it once per training step
        yields a snapshot every step or two without the step ever waiting for the GPU.
        """
        finished = None
        if self._pending is not None and (self._pending.done is None or self._pending.done.query()):
            finished = self._decode(self._pending)
            self._latest = finished
            self._pending = None
        if self._pending is None:
            self._pending = self._capture(reset, blocking=False)
            if finished is None and self._pending.done is None:  # CPU: the copy is already complete
                finished = self._latest = self._decode(self._pending)
                self._pending = None
        return finished

    @property
    def in_flight(self) -> bool:
        """Whether a copy started by poll() has not been returned yet."""
        return self._pending is not None

    def wait(self) -> None:
        """Block until the copy poll() started has arrived, so that the next poll() returns it. For callers that
        need window boundaries at fixed steps (exact resume); poll() alone never waits."""
        if self._pending is not None and self._pending.done is not None:
            self._pending.done.synchronize()

    @property
    def latest(self) -> Snapshot | None:
        """The last snapshot decoded by `snapshot()` or `poll()`."""
        return self._latest

    def _counters(self) -> tuple:
        return (self.stats, self.grad, self.first_forward, self.first_backward)

    def _capture(self, reset: bool, blocking: bool) -> _Capture:
        if self.stats is None:
            return _Capture(None, None)
        on_gpu = self.stats.is_cuda
        if on_gpu and not blocking:
            host = tuple(t.to("cpu", non_blocking=True) for t in self._counters())
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.stats.device))  # where the copies were queued
        else:
            # copy=True: for CPU counters .cpu() would return the counters themselves, which reset() then zeroes.
            host = tuple(t.to("cpu", copy=True) for t in self._counters())
            done = None
        if reset:
            self.reset()
        return _Capture(host, done)

    def _decode(self, capture: _Capture) -> Snapshot:
        if capture.host is None:
            empty_stats = np.zeros(C.NUM_STATS)
            empty_grad = np.zeros((C.NUM_GRAD_ROWS, 0))
            layers = [_layer_from_rows(s, self.num_directions, empty_stats, empty_grad) for s in range(self.num_slots)]
            return Snapshot(layers, None, 0)
        stats, grad, first_forward, first_backward = (t.numpy() for t in capture.host)
        layers = [_layer_from_rows(s, self.num_directions, stats[s], grad[s]) for s in range(self.num_slots)]
        key = min(int(first_forward[0]), int(first_backward[0]))
        backward_launches = grad[:, C.GRAD_PASSES, 0].sum() if grad.shape[-1] else 0
        launches = int(stats[:, C.STAT_LAUNCHES].sum() + backward_launches)
        return Snapshot(layers, decode_nonfinite_key(key, self.num_layers, self.num_directions), launches)

    # Events and in-flight copies belong to one process: drop them when the module is copied or pickled.
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_pending"] = None
        return state
