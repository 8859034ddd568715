"""Telemetry counters on the device, and their lazy, host-side reading.

The backends write into the tensors held here (see docs/telemetry.md for the definitions and constants.py for the
layout); this module only allocates them, hands each layer its slice, and turns a copy of them into a `Snapshot`.

The counters are plain tensor attributes, not registered buffers: DistributedDataParallel broadcasts every buffer
from rank 0 before each forward (which would overwrite each rank's own window), and `.half()`, `.to(dtype)` and
FSDP's mixed precision cast floating-point buffers (which would break exact float64 counts). They follow the
module's device instead (LSTM._apply), stay out of its state_dict, and never appear in an exported or scripted
program, because those run the native implementation, which records nothing (routing.py).
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import NamedTuple

import numpy as np
import torch

from . import constants as C
from .jsonio import to_json_safe
from .windows import HostCopy


class StageProbe(NamedTuple):
    """Where one launch (one layer-direction, one stage) writes its telemetry; what the backends receive."""

    target: torch.Tensor  # forward: the slot's float64 [NUM_STATS] row; backward: its [NUM_GRAD_ROWS, capacity] rows
    first: torch.Tensor  # int64 [1]: the stage's first non-finite key (atomic min)
    seq: torch.Tensor  # int64 [1]: the pass number, the key's most significant field
    order: int  # the launch's place in its stage (forward: slot; backward: top-down), a field of the key


class LayerProbe(NamedTuple):
    """Both stages' probes of one layer-direction in one pass."""

    forward: StageProbe
    backward: StageProbe


class PassProbe(NamedTuple):
    """Where one layer-direction of one module pass writes, as function.py carries it through autograd.

    The counter rows are not here: the ops find them at run time through `telemetry_of(key)` (stats_row,
    step_rows). The per-step rows grow with the longest sequence seen, and a tensor that grows cannot be an input
    of a compiled graph; and any counter of size > 1 in a graph would take part in torch.compile's dynamic-shape
    guards (duck sizing: a [slots, 8] tensor would tie T to 8 when T happens to be 8). What a compiled graph sees
    is only the tensors of size 1 here, which the ops mutate visibly, so that they are never treated as pure."""

    first_forward: torch.Tensor  # int64 [1]: the forward's first non-finite key
    first_backward: torch.Tensor  # int64 [1]
    seq: torch.Tensor  # int64 [1]: the pass number
    slot: int  # layer * num_directions + direction, also the forward launch order
    backward_order: int  # the launch's place in the backward (top-down)
    key: torch.Tensor  # the Telemetry's registry key (a host tensor: the registry below says why)


# Every live Telemetry by key, so that an op (whose arguments can only be tensors and scalars) finds the counters
# it writes. Weak: the registry never keeps a module's counters alive.
#
# The key is a host tensor, found by its storage, and never read: an integer argument of the ops would be a constant
# of a compiled graph, so that every module instance compiled its own graph (the ninth failing under fullgraph=True
# on Dynamo's recompile limit), while a tensor is a graph input, guarded on its dtype and shape only.
_LIVE: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def telemetry_of(key: torch.Tensor) -> Telemetry:
    return _LIVE[key.untyped_storage().data_ptr()]


def _register(telemetry: Telemetry) -> torch.Tensor:
    key = torch.zeros(1, dtype=torch.int64)  # its own storage on the host; the value means nothing
    _LIVE[key.untyped_storage().data_ptr()] = telemetry
    return key


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


# Timesteps the per-step gradient rows hold before they grow (to the next power of two that fits).
INITIAL_STEPS = 1024


class Telemetry:
    """The telemetry window of one `fastlstm.LSTM`: device counters plus lazy reading (docs/telemetry.md)."""

    def __init__(self, num_layers: int, num_directions: int, enabled: bool = True, record_inference: bool = False):
        if num_layers * num_directions > C.MAX_SLOTS:
            # The first non-finite value's location packs the layer-direction into ORDER_BITS of one key.
            raise ValueError(
                f"fastlstm.LSTM takes at most {C.MAX_SLOTS} layer-directions (num_layers x directions), got "
                f"{num_layers * num_directions}: its telemetry locates a non-finite value in that many; use "
                "torch.nn.LSTM for a deeper stack"
            )
        self.num_layers = num_layers
        self.num_directions = num_directions
        self.enabled = enabled  # the user's switch
        self.record_inference = record_inference  # also record passes that autograd does not record
        self.suspended = False  # set by a sampling Monitor for its uninstrumented steps (never by users)
        self.stats = self.grad = self.first_forward = self.first_backward = self.passes = None
        self._pending: HostCopy | None = None  # the counters' copy poll() started (windows.py)
        self._latest: Snapshot | None = None
        self.key = _register(self)

    @property
    def num_slots(self) -> int:
        return self.num_layers * self.num_directions

    def records(self) -> bool:
        """Whether a pass starting now records telemetry (docs/telemetry.md, "Which passes record"): when enabled,
        not suspended by a sampling Monitor, and either autograd records the pass (training, or any pass that can
        be backpropagated) or `record_inference` is set. Inference (torch.no_grad(), torch.inference_mode())
        records nothing by default, so that it runs at nn.LSTM's speed and keeps evaluation out of the window."""
        if not self.enabled or self.suspended:
            return False
        return self.record_inference or torch.is_grad_enabled()

    # ---- writing side (the module and the backends) ----

    def allocate(self, device: torch.device) -> None:
        """Put the counters on `device` (a new window if they were elsewhere). The module calls this when it is
        built, converted, moved or loaded, so that no forward pass has to create them: under torch.compile a tensor
        created inside the graph could not also be updated by the backward."""
        self._ensure(device)

    def begin_pass(self, device: torch.device, steps: int = 0) -> torch.Tensor:
        """Count a new forward pass of the module; returns its number (a device scalar) for the non-finite keys.
        `steps` grows the per-step rows now, for callers that hand `probe()`'s tensors to a backend themselves."""
        self._ensure(device)
        if steps:
            self.step_rows(device, steps)
        self.passes += 1
        return self.passes.clamp(max=C.SEQ_MAX)

    def probe(self, layer: int, direction: int, seq: torch.Tensor) -> LayerProbe:
        """The tensors this layer-direction writes in the pass `seq` (from begin_pass), for a direct backend call."""
        slot = layer * self.num_directions + direction
        return LayerProbe(
            StageProbe(self.stats[slot], self.first_forward, seq, slot),
            StageProbe(self.grad[slot], self.first_backward, seq, self._backward_order(layer, direction)),
        )

    def pass_probe(self, layer: int, direction: int, seq: torch.Tensor) -> PassProbe:
        """What the module hands to function.lstm_layer for this layer-direction in the pass `seq`."""
        slot = layer * self.num_directions + direction
        backward_order = self._backward_order(layer, direction)
        return PassProbe(self.first_forward, self.first_backward, seq, slot, backward_order, self.key)

    def stats_row(self, device: torch.device, slot: int) -> torch.Tensor:
        """The slot's [NUM_STATS] forward counters; the forward op calls this at run time."""
        self._ensure(device)
        return self.stats[slot]

    def step_rows(self, device: torch.device, steps: int) -> torch.Tensor:
        """The per-step gradient rows [slots, NUM_GRAD_ROWS, capacity >= steps], grown first if needed. The
        backward op calls this at run time (eagerly, also inside a compiled graph), which is why T has no cap and
        no compiled graph depends on the capacity."""
        self._ensure(device)
        capacity = self.grad.shape[-1]
        if steps > capacity:
            grown = self.grad.new_zeros(self.num_slots, C.NUM_GRAD_ROWS, 1 << (steps - 1).bit_length())
            grown[..., :capacity] = self.grad
            self.grad = grown
        return self.grad

    def _backward_order(self, layer: int, direction: int) -> int:
        return (self.num_layers - 1 - layer) * self.num_directions + direction

    def _ensure(self, device: torch.device) -> None:
        # Checked on the pass counter, the one tensor of the set that a compiled forward reads anyway.
        if self.passes is not None and self.passes.device == device:
            return

        # A new device starts a new window: the old counters cannot be merged without a copy across devices.
        def zeros(*shape, dtype=torch.float64):
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.stats = zeros(self.num_slots, C.NUM_STATS)
        self.grad = zeros(self.num_slots, C.NUM_GRAD_ROWS, INITIAL_STEPS)
        self.first_forward = torch.full((1,), C.NO_NONFINITE, dtype=torch.int64, device=device)
        self.first_backward = torch.full((1,), C.NO_NONFINITE, dtype=torch.int64, device=device)
        self.passes = zeros(1, dtype=torch.int64)

    # ---- reading side ----

    def reset(self) -> None:
        """Start a new window. Stream-ordered device writes only; never synchronises."""
        if self.stats is None:
            return
        self.stats.zero_()
        self.grad.zero_()
        self.first_forward.fill_(C.NO_NONFINITE)
        self.first_backward.fill_(C.NO_NONFINITE)
        # The pass count carries on: a pass whose forward ran before the reset and whose backward runs after it
        # must still sort before every later pass (restarting it gave two passes one number, and the later forward
        # came out as the first event). It saturates at SEQ_MAX (2**27 passes), past which passes tie.

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
        if self._pending is not None and self._pending.ready():
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
        if self._pending is not None:
            self._pending.wait()

    @property
    def latest(self) -> Snapshot | None:
        """The last snapshot decoded by `snapshot()` or `poll()`."""
        return self._latest

    def _counters(self) -> tuple:
        return (self.stats, self.grad, self.first_forward, self.first_backward)

    def _capture(self, reset: bool, blocking: bool) -> HostCopy:
        if self.stats is None:
            return HostCopy(None, None)
        capture = HostCopy.start(self._counters(), blocking=blocking)
        if reset:
            self.reset()
        return capture

    def _decode(self, capture: HostCopy) -> Snapshot:
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

    # Copies and pickles carry the window's counters as plain data (tensors and numbers, so that
    # torch.load(weights_only=True) accepts them); events, in-flight copies and the last decoded snapshot belong to
    # one process, and the registry key to one object.
    def __getstate__(self) -> dict:
        return {
            "num_layers": self.num_layers,
            "num_directions": self.num_directions,
            "enabled": self.enabled,
            "record_inference": self.record_inference,
            "counters": None if self.stats is None else self._counters() + (self.passes,),
        }

    def __setstate__(self, state: dict) -> None:
        self.__init__(
            state["num_layers"], state["num_directions"], state["enabled"], state.get("record_inference", False)
        )
        if state["counters"] is not None:
            self.stats, self.grad, self.first_forward, self.first_backward, self.passes = state["counters"]
