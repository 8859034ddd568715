"""Truncated backpropagation through time, driven by the LSTMs' telemetry (docs/training.md).

`TBPTTTrainer` walks long streams in chunks of k1 steps and backpropagates through windows of k2 >= k1 steps
(Williams & Peng's TBPTT(k1, k2)); k1 == k2 is ordinary truncation. Around that loop:

  * adaptive truncation (truncation.py): the per-timestep gradient norms of the telemetry give the decay of
    ‖∂L/∂h_{t-k}‖ and ‖∂L/∂c_{t-k}‖ with the lag k; the trainer keeps every lag the gradients still reach and whose
    gradient mass matters (in the spirit of Aicher, Foti & Fox, UAI 2019), smoothed, bounded, and undone when a
    decrease makes the loss rise;
  * padding past a stream's end takes no part in the computation (padding.py): zeroed in the inputs, packed away
    from every recurrent module, dropped from the loss;
  * non-finite steps are skipped on the device: parameters and optimizer state stay bit-identical, nothing waits
    for the GPU; the event and its first location are read later, in a batch;
  * checkpoints hold everything needed to continue bit for bit, written atomically;
  * under DistributedDataParallel the non-finite flag (and the adaptive estimate) is reduced across ranks.

Sections: data and state helpers · non-finite skipping · the trainer (checkpoints at its end).
"""

from __future__ import annotations

import contextlib
import io
import math
import random
import warnings
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .jsonio import atomic_write
from .monitor import History, Monitor, find_lstms, unwrap_model
from .padding import RecurrentLengths, without_padding
from .truncation import (
    GUARD_CHUNKS,
    USED_GRADIENT,
    AdaptiveTruncation,
    DependencyEstimate,
    ResidualProbe,
    correlation_by_lag,
    estimate_dependency,
    estimate_state_dependency,
    residual_dependencies,
    truncation_evidence,
)

__all__ = [
    "AdaptiveTruncation",
    "DependencyEstimate",
    "NonFiniteError",
    "ResidualProbe",
    "StepGuard",
    "TBPTTTrainer",
    "estimate_dependency",
    "truncation_evidence",
]

CHECKPOINT_FORMAT = "fastlstm.tbptt/1"


class NonFiniteError(FloatingPointError):
    """Raised by `TBPTTTrainer.fit` with on_nonfinite="stop" once a non-finite step has been read back."""

    def __init__(self, message: str, event: dict):
        super().__init__(message)
        self.event = event


# ---- data and state helpers ----


class _Streams(NamedTuple):
    """One batch of streams: every row of `inputs`/`targets` is one long sequence, `lengths[b]` steps long."""

    inputs: torch.Tensor
    targets: torch.Tensor
    lengths: list  # host ints

    @property
    def longest(self) -> int:
        return max(self.lengths)


class _Chunk(NamedTuple):
    """One chunk: its new steps [first, end), its window [start, end), where the next window starts."""

    start: int
    first: int
    end: int
    next_start: int
    rows: torch.Tensor | None  # indices of the rows still alive (None: all)
    lengths: list  # host ints: the stream length of each row still alive
    flat_index: torch.Tensor | None  # valid positions among the flattened chunk (None: all)
    inputs: torch.Tensor  # the window's inputs, zero past each stream's end
    targets: torch.Tensor  # the chunk's targets

    def valid(self, a: int, b: int) -> list:
        """Steps of [a, b) inside each row's stream (>= 1 for a < first: every row alive starts before first)."""
        return [max(0, min(length, b) - a) for length in self.lengths]


def _as_batches(data, batch_first: bool) -> list:
    """Normalise `(inputs, targets[, lengths])` or a sequence of such tuples into a list of `_Streams`."""
    if isinstance(data, (tuple, list)) and 2 <= len(data) <= 3 and isinstance(data[0], torch.Tensor):
        data = [data]
    batches = []
    for item in data:
        inputs, targets, *rest = item
        lengths = rest[0] if rest else None
        if inputs.dim() < 2 or targets.dim() < 2:
            raise ValueError("inputs and targets need a batch and a time dimension")
        rows, steps = (inputs.shape[0], inputs.shape[1]) if batch_first else (inputs.shape[1], inputs.shape[0])
        if tuple(targets.shape[:2]) != tuple(inputs.shape[:2]):
            raise ValueError(f"targets {tuple(targets.shape)} do not match inputs {tuple(inputs.shape)} in batch/time")
        if lengths is None:
            lengths = [steps] * rows
        else:  # read once, before training: lengths belong on the host
            lengths = [int(v) for v in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
            if len(lengths) != rows or min(lengths) < 1 or max(lengths) > steps:
                raise ValueError(f"lengths must be {rows} values in [1, {steps}]")
        batches.append(_Streams(inputs, targets, lengths))
    if not batches:
        raise ValueError("no data")
    return batches


def _map_tensors(fn: Callable, obj):
    """Apply `fn` to every tensor of a nested tuple/list/dict (a model's recurrent state)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_map_tensors(fn, v) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(fn, v) for v in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(fn, v) for k, v in obj.items()}
    return obj


def _tensors(obj) -> list:
    found = []
    _map_tensors(found.append, obj)
    return found


def detach_state(state):
    return _map_tensors(lambda t: t.detach(), state)


def select_rows(state, index: torch.Tensor):
    """Keep the rows `index` of a state in nn.LSTM's layout (batch on dimension 1)."""
    return _map_tensors(lambda t: t.index_select(1, index) if t.dim() >= 2 else t, state)


def reset_nonfinite_rows(state):
    """Rows (streams) whose state holds a NaN/inf restart from zeros, as at the start of a stream: a poisoned
    input would otherwise poison every later chunk of that stream. Device operations only."""
    tensors = [t for t in _tensors(state) if t.dim() >= 2 and t.is_floating_point()]
    if not tensors:
        return state
    ok = None
    for t in tensors:
        row_ok = torch.isfinite(t).transpose(0, 1).reshape(t.shape[1], -1).all(dim=1)
        ok = row_ok if ok is None else ok & row_ok

    def fix(t):
        if t.dim() < 2 or not t.is_floating_point():
            return t
        shape = [1] * t.dim()
        shape[1] = -1
        return torch.where(ok.view(shape), t, torch.zeros((), dtype=t.dtype, device=t.device))

    return _map_tensors(fix, state)


# ---- non-finite skipping ----


class StepGuard:
    """`optimizer.step()` that becomes a no-op when a device flag is set, without reading the flag on the host.

    Fused Adam/AdamW take the flag natively (`found_inf`, as under GradScaler). Any other optimizer steps as usual
    and then every parameter and state tensor is put back with `torch.where(skip, before, after)`, which restores
    the exact bits. State created by a skipped first step is reset to zeros (the initial state of Adam, AdamW,
    RMSprop and momentum SGD without dampening).
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.native = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and all(
            g.get("fused") for g in optimizer.param_groups
        )
        self._warned = False

    def step(self, skip: torch.Tensor) -> None:
        if self.native:
            self.optimizer.found_inf = skip.to(torch.float32)
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
            return
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        with torch.no_grad():
            before = [p.detach().clone() for p in params]
            state_before = [_tensor_state(self.optimizer.state.get(p), clone=True) for p in params]
        self.optimizer.step()
        with torch.no_grad():
            for p, old in zip(params, before):
                p.copy_(torch.where(skip, old, p))
            for p, old_state in zip(params, state_before):
                for key, value in (self.optimizer.state.get(p) or {}).items():
                    self._restore(skip, key, value, old_state.get(key))

    def _restore(self, skip, key, value, old) -> None:
        if not isinstance(value, torch.Tensor) or value.device != skip.device:
            # A host value (Adam's `step` without capturable=True on a GPU) cannot follow a device flag without
            # a synchronisation; the parameters are still restored exactly.
            if not self._warned:
                warnings.warn(
                    f"optimizer state {key!r} is not a tensor on {skip.device}: it advances on skipped "
                    "steps (use fused=True or capturable=True for exact skips)",
                    stacklevel=3,
                )
                self._warned = True
            return
        value.copy_(torch.where(skip, torch.zeros_like(value) if old is None else old, value))


def _tensor_state(state, clone: bool) -> dict:
    if not state:
        return {}
    return {k: (v.clone() if clone else v) for k, v in state.items() if isinstance(v, torch.Tensor)}


# ---- the trainer ----


class TBPTTTrainer:
    """Truncated-BPTT training of `model` on long streams (docs/training.md).

    Args:
      model:      callable as `model(inputs, state) -> (outputs, state)`; `state` is None at a stream start, and
                  any nest of tensors in nn.LSTM's layout (batch on dimension 1) afterwards, e.g. a bare
                  fastlstm.LSTM. May be wrapped in DistributedDataParallel.
      optimizer, loss_fn: `loss_fn(outputs, targets)` gets the chunk's valid positions flattened to [N, ...].
      k1:         steps per chunk (one optimizer step per chunk).
      k2:         steps backpropagated per window, >= k1 (default k1). Ignored when adaptive.
      adaptive:   choose k2 = k1 + lag with the lag in [k_min, k_max] from the telemetry (default bounds 2, 8·k1).
      target_bias, smoothing, k_init, reach_fraction: the adaptive controller (see AdaptiveTruncation).
      scheduler:  an LR scheduler stepped per chunk (scheduler_interval="chunk") or per epoch ("epoch");
                  ReduceLROnPlateau is stepped with the validation loss.
      clip_grad_norm: clip the global gradient 2-norm to this value.
      on_nonfinite: "skip" (skip the step on the device and continue) or "stop" (skip every step from the first
                  non-finite one and raise NonFiniteError at the next batched read).
      telemetry_every, read_every: the Monitor's window and read periods, in chunks.
      instrument_every: record telemetry on every this many chunks only (the Monitor's instrument_every; the other
                  chunks run PyTorch's own LSTM op under backend="auto"). Non-finite chunks are still skipped on
                  every chunk; the adaptive truncation estimates from the instrumented chunks.
      dependency_lags: lags of the residual probe (None: automatic, 0: off).
      validate_every: validate every this many chunks (and at each epoch end) when fit gets val_data.
      checkpoint_path, checkpoint_every: save a checkpoint every this many chunks (and at the end of fit).
      batch_first: layout of the data; default: that of the first fastlstm.LSTM in the model.
      shuffle, seed: visit the batches of streams in a per-epoch permutation drawn from (seed, epoch).
      process_group: for the cross-rank reductions under DDP (default: the world).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable,
        *,
        k1: int,
        k2: int | None = None,
        adaptive: bool = False,
        k_min: int = 2,
        k_max: int | None = None,
        k_init: int | None = None,
        target_bias: float = 0.1,
        smoothing: float = 0.7,
        reach_fraction: float = USED_GRADIENT,
        scheduler=None,
        scheduler_interval: str = "chunk",
        clip_grad_norm: float | None = None,
        on_nonfinite: str = "skip",
        telemetry_every: int = 10,
        read_every: int = 50,
        instrument_every: int = 1,
        dependency_lags: int | None = None,
        validate_every: int | None = None,
        val_chunk: int | None = None,
        checkpoint_path: str | None = None,
        checkpoint_every: int | None = None,
        batch_first: bool | None = None,
        shuffle: bool = False,
        seed: int = 0,
        process_group=None,
        monitor: Monitor | None = None,
    ):
        if k1 < 1:
            raise ValueError("k1 must be >= 1")
        if on_nonfinite not in ("skip", "stop"):
            raise ValueError("on_nonfinite must be 'skip' or 'stop'")
        if scheduler_interval not in ("chunk", "epoch"):
            raise ValueError("scheduler_interval must be 'chunk' or 'epoch'")
        self.model = model
        self.core = unwrap_model(model)
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.k1 = int(k1)
        self.adaptive = None
        if adaptive:
            k_max = int(k_max if k_max is not None else 8 * self.k1)
            self.adaptive = AdaptiveTruncation(k_min, k_max, target_bias, smoothing, k_init, reach_fraction)
            self._lag = self.adaptive.lag
        else:
            k2 = self.k1 if k2 is None else int(k2)
            if k2 < self.k1:
                raise ValueError(f"k2 ({k2}) must be >= k1 ({self.k1})")
            self._lag = k2 - self.k1
        self.target_bias = float(target_bias)
        self.reach_fraction = float(reach_fraction)
        self.scheduler = scheduler
        self.scheduler_interval = scheduler_interval
        self.clip_grad_norm = clip_grad_norm
        self.on_nonfinite = on_nonfinite
        self.validate_every = validate_every
        self.val_chunk = val_chunk
        self.checkpoint_path = checkpoint_path
        self.checkpoint_every = checkpoint_every
        self.shuffle, self.seed = shuffle, int(seed)
        self.process_group = process_group
        self.lstms = find_lstms(model)
        if batch_first is None:
            batch_first = next(iter(self.lstms.values())).batch_first if self.lstms else False
        self.batch_first = bool(batch_first)
        self.monitor = monitor or Monitor(
            model, every=telemetry_every, read_every=read_every, instrument_every=instrument_every, grad_norm=False
        )
        self.monitor.listeners.append(self._on_telemetry)
        if dependency_lags is None:
            longest = self.k1 + (self.adaptive.k_max if self.adaptive else self._lag)
            dependency_lags = min(256, max(32, 4 * longest))
        self.probe = ResidualProbe(dependency_lags) if dependency_lags else None
        self._guard = StepGuard(optimizer)
        self._params = [p for p in self.core.parameters() if p.requires_grad]
        self._latched = None  # on_nonfinite="stop": device flag, set from the first non-finite step on
        self._pos = [0, 0, 0]  # epoch, batch (index into the epoch's order), time step within the batch's streams
        self._chunks = 0
        self._reset_streams()
        self._geometry: dict = {}  # step -> (overlap, window length), to keep telemetry windows of one shape
        self._estimates: list = []  # (dependency, rate) collected since the last adaptive decision
        self._residual_floor = None  # farthest significant residual lag of the latest probe entry
        self._row_index_cache: dict = {}
        self._lengths = RecurrentLengths(self.core)
        self.monitor.event("truncation", self._truncation_detail(), step=self.monitor.step_count)

    # ---- public ----

    @property
    def k2(self) -> int:
        return self.k1 + self._lag

    @property
    def history(self) -> History:
        return self.monitor.history

    @property
    def chunks(self) -> int:
        """Chunks (optimizer steps) trained so far, over all fit calls and resumes."""
        return self._chunks

    def fit(self, data, epochs: int = 1, *, val_data=None, max_chunks: int | None = None) -> History:
        """Train until `epochs` epochs are complete, continuing from where the trainer stands (after a resume,
        or a previous call stopped by `max_chunks`). Pass the same data every time. Returns the history; with
        max_chunks, the live one (values still in flight are read by `trainer.history`)."""
        batches = _as_batches(data, self.batch_first)
        trained = 0
        while self._pos[0] < epochs:
            order = self._batch_order(len(batches), self._pos[0])
            while self._pos[1] < len(batches):
                streams = batches[order[self._pos[1]]]
                while self._pos[2] < streams.longest:
                    if max_chunks is not None and trained >= max_chunks:
                        return self.monitor.live_history
                    self._train_chunk(streams)
                    trained += 1
                    self._after_chunk(val_data)
                self._pos[1] += 1
                self._pos[2] = 0
                self._reset_streams()
            self._end_epoch(val_data)
        if self.checkpoint_path is not None:
            self.save_checkpoint()
        return self.monitor.history

    def validate(self, val_data) -> tuple:
        """(validation loss, {subset: loss}) as device tensors: the position-weighted mean of loss_fn over the
        streams, run in eval mode by chunks without gradients. `val_data` is streams data, or a dict of named
        subsets of it (whose losses become `subset_losses`)."""
        subsets = val_data if isinstance(val_data, dict) else {None: val_data}
        was_training = self.model.training
        self.model.eval()
        totals = {}
        try:
            with torch.no_grad(), self._quiet():
                for name, data in subsets.items():
                    totals[name] = self._validation_sums(_as_batches(data, self.batch_first))
        finally:
            self.model.train(was_training)
        totals = self._all_reduce_sums(totals)
        losses = {name: total / count for name, (total, count) in totals.items()}
        overall = sum(total for total, _ in totals.values()) / sum(count for _, count in totals.values())
        return overall, ({} if None in subsets else losses)

    # ---- one chunk ----

    def _train_chunk(self, streams: _Streams) -> None:
        chunk = self._plan(streams)
        carry = None
        if chunk.start < chunk.next_start < chunk.end:  # the next window starts inside this one
            steps = chunk.next_start - chunk.start
            with self._lengths(chunk.valid(chunk.start, chunk.next_start), steps):
                carry = self._carry_pass(self._time(chunk.inputs, 0, steps), self._start_state)
        loss, target, state = self._window_loss(streams, chunk)
        mean_loss, norm, skip, lr = self._optimizer_step(loss)
        if chunk.next_start == chunk.end:
            new_start = detach_state(state)
        else:
            new_start = carry if chunk.next_start > chunk.start else self._start_state
        self._start_state = None if new_start is None else reset_nonfinite_rows(new_start)
        self._start_pos = chunk.next_start
        self._pos[2] = chunk.end
        self._chunks += 1
        step = self.monitor.step_count
        # Recorded before step(), which may close the telemetry window that this chunk ends.
        self._geometry[step] = (chunk.first - chunk.start, chunk.end - chunk.start)
        if self.probe is not None and (step + 1) % self.monitor.read_every == 0:
            self._record_probe(step)  # queued now, it travels with the batch that step() is about to read
        self.monitor.step(loss=mean_loss, lr=lr, grad_norm=norm, skipped=skip, targets=target.detach())

    def _plan(self, streams: _Streams) -> _Chunk:
        """Where the chunk and its window lie, the rows still alive, and their inputs and targets."""
        s = self._pos[2]
        rows = [b for b, length in enumerate(streams.lengths) if length > s]
        n = min(self.k1, max(streams.lengths[b] for b in rows) - s)
        device = streams.inputs.device
        index = None if len(rows) == len(streams.lengths) else self._row_index(rows, device)
        self._align_rows(rows, device)
        w = self._start_pos
        lengths = [streams.lengths[b] for b in rows]
        valid = [min(length - s, n) for length in lengths]
        inputs = self._slice(streams.inputs, index, w, s + n)
        return _Chunk(
            start=w,
            first=s,
            end=s + n,
            next_start=max(w, s + n - self._lag),
            rows=index,
            lengths=lengths,
            flat_index=None if min(valid) == n else self._flat_index(valid, n, device),
            inputs=without_padding(inputs, [length - w for length in lengths], self.batch_first),
            targets=self._slice(streams.targets, index, s, s + n),
        )

    def _window_loss(self, streams: _Streams, chunk: _Chunk) -> tuple:
        """Forward over the window from the carried state; the loss on the chunk's valid positions."""
        with self._lengths(chunk.valid(chunk.start, chunk.end), chunk.end - chunk.start):
            out, state = self.model(chunk.inputs, self._start_state)
        offset = chunk.first - chunk.start
        pred = self._flatten(self._time(out, offset, offset + chunk.end - chunk.first))
        target = self._flatten(chunk.targets)
        if chunk.flat_index is not None:
            pred, target = pred.index_select(0, chunk.flat_index), target.index_select(0, chunk.flat_index)
        if self.probe is not None and self._probe_applies(streams):
            steps = chunk.end - chunk.first
            lagged = self._lagged_inputs(streams, chunk, steps)
            self.probe.watch(pred, lagged, steps, chunk.flat_index, self.batch_first)
        return self.loss_fn(pred, target), target, state

    def _optimizer_step(self, loss: torch.Tensor) -> tuple:
        """Backward, norm, non-finite flag, clipping, then the step (or its skip) and the scheduler, all on the
        device. Returns (loss as reported, gradient norm, skip flag, learning rate used)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in self._params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=loss.device)
        bad = ~(torch.isfinite(loss.detach()) & torch.isfinite(norm))
        reduced = self._reduce_flag(loss.detach(), bad)  # asynchronous across ranks; waited just before the step
        if self.clip_grad_norm is not None and grads:
            torch.nn.utils.clip_grads_with_norm_(self._params, self.clip_grad_norm, norm)
        lr = self.optimizer.param_groups[0]["lr"]
        mean_loss, skip = reduced()
        if self.on_nonfinite == "stop":
            skip = skip if self._latched is None else skip | self._latched
            self._latched = skip
        self._guard.step(skip)
        if self.scheduler is not None and self.scheduler_interval == "chunk" and not _is_plateau(self.scheduler):
            self.scheduler.step()
        return mean_loss, norm, skip, lr

    def _after_chunk(self, val_data) -> None:
        monitor = self.monitor
        if monitor.step_count % monitor.every == 0:
            self._adapt()
            # A window still to be decoded spans at most the last two periods (one more on CUDA, where a
            # window is decoded at the next boundary).
            horizon = monitor.step_count - 3 * monitor.every
            self._geometry = {k: v for k, v in self._geometry.items() if k >= horizon}
        if self.on_nonfinite == "stop" and monitor.skipped_steps:
            self._stop()
        if val_data is not None and self.validate_every and self._chunks % self.validate_every == 0:
            self._record_validation(val_data)
        if self.checkpoint_path is not None and self.checkpoint_every and self._chunks % self.checkpoint_every == 0:
            self.save_checkpoint()

    def _end_epoch(self, val_data) -> None:
        epoch = self._pos[0]
        if val_data is not None:
            self._record_validation(val_data, epoch=epoch + 1)
        if self.scheduler is not None and self.scheduler_interval == "epoch" and not _is_plateau(self.scheduler):
            self.scheduler.step()
        self._pos = [epoch + 1, 0, 0]
        self._reset_streams()

    def _carry_pass(self, x, state):
        """Forward over the first steps of the window, for the next window's start state: no gradient, no
        telemetry, no input statistics (the window's own forward records them)."""
        with torch.no_grad(), self._quiet():
            _, carry = self.core(x, state)
        return detach_state(carry)

    # ---- truncation ----

    def _on_telemetry(self, windows: list) -> None:
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
                entry = {
                    "step": last,
                    "first_step": first,
                    "lstm": name,
                    "layer": layer.layer,
                    "k1": length - overlap,
                    "k2": length,
                    "lag": overlap,
                    "rate": estimate.rate,
                    "estimated_dependency": estimate.dependency,
                    "bias": estimate.bias,
                }
                for part, e in (("hidden", estimate.hidden), ("cell", estimate.cell)):
                    if e is not None:
                        entry.update(
                            {f"{part}_rate": e.rate, f"{part}_dependency": e.dependency, f"{part}_bias": e.bias}
                        )
                        entry[f"{part}_reach"] = e.reach
                self.monitor.live_history.add("truncation_estimates", entry)
                self._estimates.append((estimate.dependency, estimate.rate))

    def _uniform_geometry(self, first: int, last: int):
        """The (overlap, window length) every chunk whose telemetry the window holds had, or None if they differ."""
        shapes = {self._geometry.get(step) for step in self.monitor.instrumented_steps(first, last)}
        return shapes.pop() if len(shapes) == 1 and None not in shapes else None

    def _adapt(self) -> None:
        """At a telemetry boundary: judge a pending decrease by the training loss, then fold the collected
        estimates and the residual floor into the controller. Every rank takes the same decision: the estimates
        are reduced with a max first, and the losses are already means over the ranks."""
        if self.adaptive is None:
            self._estimates.clear()
            return
        a = self.adaptive
        dependency = max((d for d, _ in self._estimates), default=-1.0)
        rate = max((r for _, r in self._estimates), default=-1.0)
        floor = -1.0 if self._residual_floor is None else float(self._residual_floor)
        self._estimates.clear()
        self._residual_floor = None
        if self._world() > 1:
            values = torch.tensor([min(dependency, 1e30), rate, floor], dtype=torch.float64, device=self._device())
            dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.process_group)
            dependency, rate, floor = values.tolist()  # a periodic read, once per telemetry window
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
        self._lag = self.adaptive.lag
        self.monitor.event("truncation", {**self._truncation_detail(), "reason": reason})

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

    def _truncation_detail(self) -> dict:
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

    # ---- residual probe ----

    def _probe_applies(self, streams: _Streams) -> bool:
        return streams.inputs.dim() == 3 and streams.inputs.is_floating_point()

    def _lagged_inputs(self, streams: _Streams, chunk: _Chunk, n: int) -> torch.Tensor:
        lags, s = self.probe.lags, chunk.first
        lo = max(0, s - lags)
        x = self._slice(streams.inputs, chunk.rows, lo, s + n).detach()
        x = without_padding(x, chunk.valid(lo, s + n), self.batch_first)
        if not self.batch_first:
            x = x.transpose(0, 1)
        return F.pad(x, (0, 0, lags - (s - lo), 0))  # zeros before the stream start

    def _record_probe(self, step: int) -> None:
        taken = self.probe.take()
        if taken is None:
            return
        count, sums = taken
        entry = {
            "step": step,
            "count": count,
            "k1": self.k1,
            "k2": self.k2,
            "lags": self.probe.lags,
            "noise": 1.0 / math.sqrt(count),
        }

        def record(cross, residual_energy, input_energy):
            r = correlation_by_lag(cross, residual_energy, input_energy)
            entry["correlation"] = r.tolist()
            self.monitor.live_history.add("dependency", entry)
            significant = residual_dependencies(r, entry["noise"])
            self._residual_floor = int(significant[-1]) if significant.size else 0

        self.monitor.defer(sums, record)

    # ---- non-finite ----

    def _reduce_flag(self, loss: torch.Tensor, bad: torch.Tensor) -> Callable:
        """Start the cross-rank reduction of (loss, non-finite flag); the returned function waits for it."""
        world = self._world()
        if world == 1:
            return lambda: (loss, bad)
        both = torch.stack((loss.to(torch.float64), bad.to(torch.float64)))
        work = dist.all_reduce(both, op=dist.ReduceOp.SUM, group=self.process_group, async_op=True)

        def finish():
            work.wait()  # on NCCL this orders the stream, it does not block the host
            return both[0] / world, both[1] > 0

        return finish

    def _stop(self) -> None:
        self.monitor.flush()
        first = min(self.monitor.skipped_steps)
        skipped = self.monitor.live_history.events_of("nonfinite_step_skipped")
        where = next((e["detail"].get("first_nonfinite") for e in skipped if e["step"] == first), None)
        event = self.monitor.event("nonfinite_stop", {"first_step": first, "first_nonfinite": where})
        if self.checkpoint_path is not None:
            self.save_checkpoint()
        raise NonFiniteError(f"non-finite loss or gradient at step {first}; no update applied since", event)

    # ---- validation ----

    def _record_validation(self, val_data, epoch: int | None = None) -> None:
        loss, subsets = self.validate(val_data)
        self.monitor.evaluate(loss, subset_losses=subsets or None, epoch=epoch)
        if self.scheduler is not None and _is_plateau(self.scheduler):
            self.scheduler.step(float(loss))  # ReduceLROnPlateau needs the number: one read per validation

    def _validation_sums(self, batches: list) -> tuple:
        chunk = self.val_chunk or self.k1
        total, count = None, 0
        for streams in batches:
            state, alive = None, None
            device = streams.inputs.device
            for s in range(0, streams.longest, chunk):
                # As in training: streams that ended leave the batch, padding is zeroed and packed away.
                rows = [b for b, length in enumerate(streams.lengths) if length > s]
                if state is not None and rows != alive:
                    state = select_rows(state, self._row_index([alive.index(b) for b in rows], device))
                alive = rows
                index = None if len(rows) == len(streams.lengths) else self._row_index(rows, device)
                n = min(chunk, max(streams.lengths[b] for b in rows) - s)
                valid = [min(streams.lengths[b] - s, n) for b in rows]
                x = without_padding(self._slice(streams.inputs, index, s, s + n), valid, self.batch_first)
                with self._lengths(valid, n):
                    out, state = self.core(x, state)
                pred, target = self._flatten(out), self._flatten(self._slice(streams.targets, index, s, s + n))
                if min(valid) < n:
                    flat = self._flat_index(valid, n, device)
                    pred, target = pred.index_select(0, flat), target.index_select(0, flat)
                positions = sum(valid)
                part = self.loss_fn(pred, target).detach().to(torch.float64) * positions
                total = part if total is None else total + part
                count += positions
        return total, count

    def _all_reduce_sums(self, totals: dict) -> dict:
        if self._world() == 1:
            return totals
        names = list(totals)
        packed = torch.stack(
            [
                torch.stack(
                    (totals[k][0], torch.tensor(float(totals[k][1]), dtype=torch.float64, device=totals[k][0].device))
                )
                for k in names
            ]
        )
        dist.all_reduce(packed, group=self.process_group)
        return {k: (packed[i, 0], packed[i, 1]) for i, k in enumerate(names)}

    # ---- checkpoints ----

    def state_dict(self) -> dict:
        """Everything the continuation depends on. Reads the history first (one synchronisation)."""
        self.monitor.flush()  # first: reading closes windows, which feeds the truncation estimates saved below
        return {
            "format": CHECKPOINT_FORMAT,
            "config": {"k1": self.k1, "adaptive": self.adaptive is not None, "batch_first": self.batch_first},
            "model": self.core.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "position": {
                "pos": list(self._pos),
                "chunks": self._chunks,
                "rows": self._rows,
                "start_pos": self._start_pos,
                "start_state": self._start_state,
            },
            "truncation": {
                "lag": self._lag,
                "controller": None if self.adaptive is None else self.adaptive.state_dict(),
                "estimates": list(self._estimates),
                "geometry": sorted(self._geometry.items()),
                "residual_floor": self._residual_floor,
            },
            "latched": self._latched,
            "probe": None if self.probe is None else self.probe.state_dict(),
            "rng": _rng_state(),
            "monitor": self.monitor.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not a TBPTTTrainer checkpoint (format {state.get('format')!r})")
        config = state["config"]
        if config["k1"] != self.k1 or config["adaptive"] != (self.adaptive is not None):
            raise ValueError(f"checkpoint was written with k1={config['k1']}, adaptive={config['adaptive']}")
        self.core.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        position = state["position"]
        self._pos, self._chunks = list(position["pos"]), int(position["chunks"])
        self._rows, self._start_pos = position["rows"], int(position["start_pos"])
        self._start_state = position["start_state"]
        truncation = state["truncation"]
        self._lag = int(truncation["lag"])
        if self.adaptive is not None:
            self.adaptive.load_state_dict(truncation["controller"])
        self._estimates = [tuple(e) for e in truncation["estimates"]]
        self._geometry = {int(k): tuple(v) for k, v in truncation["geometry"]}
        self._residual_floor = truncation["residual_floor"]
        self._latched = state["latched"]
        if self.probe is not None and state["probe"] is not None:
            self.probe.load_state_dict(state["probe"])
        self.monitor.load_state_dict(state["monitor"])
        _set_rng_state(state["rng"])

    def save_checkpoint(self, path: str | None = None) -> str:
        """Write the checkpoint atomically (temporary file, fsync, rename); one file per rank under DDP."""
        path = self._rank_path(path or self.checkpoint_path)
        self.monitor.event(
            "checkpoint", {"path": path, "chunks": self._chunks}, step=max(self.monitor.step_count - 1, 0)
        )
        buffer = io.BytesIO()
        torch.save(self.state_dict(), buffer)
        atomic_write(path, buffer.getvalue())
        return path

    def load_checkpoint(self, path: str | None = None, *, weights_only: bool = True) -> None:
        """Restore a checkpoint into this trainer (built with the same configuration, model and optimizer
        types); the next `fit` continues exactly where the checkpointed run stood."""
        path = self._rank_path(path or self.checkpoint_path)
        device = self._device()
        state = torch.load(path, map_location=device, weights_only=weights_only)
        self.load_state_dict(state)
        self.monitor.event("resume", {"path": path, "chunks": self._chunks}, step=self.monitor.step_count)

    # ---- helpers ----

    def _reset_streams(self) -> None:
        self._rows = None  # rows of the current batch of streams carried in _start_state (None: all)
        self._start_pos = 0
        self._start_state = None

    def _align_rows(self, rows: list, device) -> None:
        """Streams that ended leave the batch: drop their rows from the carried state."""
        if self._rows is None:  # first chunk of this batch of streams: every row is alive
            self._rows = list(rows)
            return
        if rows == self._rows:
            return
        keep = [self._rows.index(b) for b in rows]
        if self._start_state is not None:
            self._start_state = select_rows(self._start_state, torch.tensor(keep).to(device, non_blocking=True))
        self._rows = list(rows)

    def _row_index(self, rows: list, device) -> torch.Tensor:
        key = (tuple(rows), device)
        if key not in self._row_index_cache:
            self._row_index_cache = {key: torch.tensor(rows).to(device, non_blocking=True)}
        return self._row_index_cache[key]

    def _time(self, t: torch.Tensor, a: int, b: int) -> torch.Tensor:
        return t[:, a:b] if self.batch_first else t[a:b]

    def _slice(self, t: torch.Tensor, index, a: int, b: int) -> torch.Tensor:
        t = self._time(t, a, b)
        return t if index is None else t.index_select(0 if self.batch_first else 1, index)

    @staticmethod
    def _flatten(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, *t.shape[2:])

    def _flat_index(self, valid: list, n: int, device) -> torch.Tensor:
        """Flat positions (in the layout `_flatten` produces) of the steps inside each stream."""
        rows = len(valid)
        if self.batch_first:
            flat = [b * n + t for b in range(rows) for t in range(valid[b])]
        else:
            flat = [t * rows + b for t in range(n) for b in range(rows) if t < valid[b]]
        return torch.tensor(flat, dtype=torch.int64).to(device, non_blocking=True)

    def _batch_order(self, count: int, epoch: int) -> list:
        if not self.shuffle:
            return list(range(count))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(count, generator=gen).tolist()

    @contextlib.contextmanager
    def _quiet(self):
        """No telemetry and no input statistics: for passes that are not training steps."""
        saved = [(lstm.telemetry, lstm.telemetry.enabled) for lstm in self.lstms.values()]
        for tel, _ in saved:
            tel.enabled = False
        try:
            with self.monitor.paused():
                yield
        finally:
            for tel, enabled in saved:
                tel.enabled = enabled

    def _world(self) -> int:
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(self.process_group)
        return 1

    def _rank_path(self, path: str | None) -> str:
        if path is None:
            raise ValueError("no checkpoint path given")
        if self._world() > 1:
            return f"{path}.rank{dist.get_rank(self.process_group)}"
        return str(path)

    def _device(self) -> torch.device:
        return self._params[0].device if self._params else torch.device("cpu")


def _is_plateau(scheduler) -> bool:
    return isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def _rng_state() -> dict:
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": n["key"].cpu().numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
