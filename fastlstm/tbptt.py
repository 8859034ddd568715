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

The parts live beside it: the data model and stream position (streams.py), the device-side step skip
(step_guard.py), the truncation state and its decisions (truncation_state.py, maths in truncation.py), the
cross-rank reductions (distributed.py) and the checkpoint file (checkpoint.py). This module is the loop.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch
from torch import nn

from .arguments import check_counts
from .checkpoint import CHECKPOINT_FORMAT, rng_state, set_rng_state, write_checkpoint
from .distributed import all_reduce_sums, check_same_on_every_rank, rank_path, start_flag_reduction
from .history import History
from .monitor import Monitor
from .padding import RecurrentLengths, without_padding
from .recording import named_lstms, unwrap_model
from .step_guard import StepGuard
from .streams import Chunk, Layout, StreamCursor, Streams, as_batches, detach_state, reset_nonfinite_rows
from .truncation import (
    USED_GRADIENT,
    AdaptiveTruncation,
    DependencyEstimate,
    ResidualProbe,
    check_estimation,
    estimate_dependency,
    truncation_evidence,
)
from .truncation_state import TruncationTracker
from .validation import loss_sums

__all__ = [
    "CHECKPOINT_FORMAT",
    "AdaptiveTruncation",
    "DependencyEstimate",
    "NonFiniteError",
    "ResidualProbe",
    "StepGuard",
    "TBPTTTrainer",
    "estimate_dependency",
    "truncation_evidence",
]


class NonFiniteError(FloatingPointError):
    """Raised by `TBPTTTrainer.fit` with on_nonfinite="stop" once a non-finite step has been read back."""

    def __init__(self, message: str, event: dict):
        super().__init__(message)
        self.event = event


def _outputs_and_state(result) -> tuple:
    """What the model returned, checked to be (outputs, state): a bare tensor would unpack along its first
    dimension, silently so when that has two rows."""
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        got = f"a tensor of shape {tuple(result.shape)}" if isinstance(result, torch.Tensor) else type(result).__name__
        raise TypeError(
            f"the trained model must return (outputs, state), as an nn.LSTM does; it returned {got} (docs/training.md)"
        )
    return result


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
      batch_first: layout of the data; default: that of the first LSTM (fastlstm's or torch's), GRU or RNN.
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
        check_counts(k1=k1, k2=k2, k_min=k_min, k_max=k_max, k_init=k_init, telemetry_every=telemetry_every)
        check_counts(read_every=read_every, instrument_every=instrument_every, validate_every=validate_every)
        check_counts(val_chunk=val_chunk, checkpoint_every=checkpoint_every)
        check_counts(dependency_lags=dependency_lags, minimum=0)
        real = isinstance(clip_grad_norm, numbers.Real) and not isinstance(clip_grad_norm, bool)
        if clip_grad_norm is not None and not (real and clip_grad_norm > 0):
            raise ValueError(f"clip_grad_norm must be a positive number or None, got {clip_grad_norm!r}")
        if on_nonfinite not in ("skip", "stop"):
            raise ValueError("on_nonfinite must be 'skip' or 'stop'")
        if scheduler_interval not in ("chunk", "epoch"):
            raise ValueError("scheduler_interval must be 'chunk' or 'epoch'")
        check_estimation(target_bias, reach_fraction)  # a fixed k2 still estimates the dependency, for the history
        self.model = model
        self.core = unwrap_model(model)
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.k1 = int(k1)
        self.adaptive = None
        if adaptive:
            k_max = int(k_max if k_max is not None else 8 * self.k1)
            self.adaptive = AdaptiveTruncation(k_min, k_max, target_bias, smoothing, k_init, reach_fraction)
            lag = self.adaptive.lag
        else:
            k2 = self.k1 if k2 is None else int(k2)
            if k2 < self.k1:
                raise ValueError(f"k2 ({k2}) must be >= k1 ({self.k1})")
            lag = k2 - self.k1
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
        self.target_bias, self.reach_fraction = float(target_bias), float(reach_fraction)
        self.lstms = named_lstms(model)
        if batch_first is None:  # the first recurrent module's layout: fastlstm's, or torch's own LSTM, GRU, RNN
            first = next((m for m in self.core.modules() if isinstance(m, nn.RNNBase)), None)
            batch_first = first.batch_first if first is not None else False
        self.batch_first = bool(batch_first)
        self.layout = Layout(self.batch_first)
        # The trainer passes each step's norm before clipping itself; the Monitor's optimizer hooks add the norm
        # the step used and the update ratios, which the doctor's clipping and learning-rate rules read.
        self.monitor = monitor or Monitor(
            model,
            optimizer=optimizer,
            every=telemetry_every,
            read_every=read_every,
            instrument_every=instrument_every,
            grad_hooks=False,
        )
        if dependency_lags is None:
            longest = self.k1 + (self.adaptive.k_max if self.adaptive else lag)
            dependency_lags = min(256, max(32, 4 * longest))
        self.probe = ResidualProbe(dependency_lags) if dependency_lags else None
        self.truncation = TruncationTracker(
            self.k1, lag, self.adaptive, self.probe, self.monitor, target_bias, reach_fraction, process_group
        )
        self._guard = StepGuard(optimizer)
        self._params = [p for p in self.core.parameters() if p.requires_grad]
        self._latched = None  # on_nonfinite="stop": device flag, set from the first non-finite step on
        self.cursor = StreamCursor()
        self._chunks = 0
        self._lengths = RecurrentLengths(self.core)
        self.monitor.event("truncation", self.truncation.detail(), step=self.monitor.step_count)

    # ---- public ----

    @property
    def k2(self) -> int:
        return self.truncation.k2

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
        check_counts(0, epochs=epochs, max_chunks=max_chunks)
        batches = as_batches(data, self.batch_first)
        self._check_ranks_agree(batches, epochs, max_chunks)
        trained, cursor = 0, self.cursor
        while cursor.epoch < epochs:
            order = self._batch_order(len(batches), cursor.epoch)
            while cursor.batch < len(batches):
                streams = batches[order[cursor.batch]]
                while cursor.step < streams.longest:
                    if max_chunks is not None and trained >= max_chunks:
                        return self.monitor.live_history
                    self._train_chunk(streams)
                    trained += 1
                    ends_epoch = cursor.step >= streams.longest and cursor.batch == len(batches) - 1
                    self._after_chunk(val_data, ends_epoch)
                cursor.next_batch()
            self._end_epoch(val_data)
        if self.checkpoint_path is not None:
            self.save_checkpoint()
        return self.monitor.history

    def validate(self, val_data) -> tuple:
        """(validation loss, {subset: loss}) as device tensors: the position-weighted mean of loss_fn over the
        streams, run in eval mode by chunks without gradients. `val_data` is streams data, or a dict of named
        subsets of it (whose losses become `subset_losses`)."""
        subsets = val_data if isinstance(val_data, dict) else {None: val_data}
        if not subsets:
            raise ValueError("val_data is an empty dict: give streams data, or named subsets of it")
        was_training = self.model.training
        self.model.eval()
        totals = {}
        try:
            with torch.no_grad(), self.monitor.quiet():
                for name, data in subsets.items():
                    batches = as_batches(data, self.batch_first)
                    chunk = self.val_chunk or self.k1
                    totals[name] = loss_sums(
                        self.core, batches, chunk, self.layout, self._lengths, self.loss_fn, _outputs_and_state
                    )
        finally:
            self.model.train(was_training)
        totals = all_reduce_sums(totals, self.process_group)
        losses = {name: total / count for name, (total, count) in totals.items()}
        overall = sum(total for total, _ in totals.values()) / sum(count for _, count in totals.values())
        return overall, ({} if None in subsets else losses)

    def _check_ranks_agree(self, batches: list, epochs: int, max_chunks: int | None) -> None:
        """Under DDP, fail on every rank before the first chunk where the ranks would train different numbers of
        chunks (a batch trains one chunk per k1 steps of its longest stream)."""
        device = self._params[0].device if self._params else torch.device("cpu")
        counts = {
            "batches": len(batches),
            "chunks per epoch": sum(-(-streams.longest // self.k1) for streams in batches),
            "chunks already trained": self._chunks,
            "epochs": epochs,
            "max_chunks": -1 if max_chunks is None else max_chunks,
        }
        check_same_on_every_rank(counts, device, self.process_group)

    # ---- one chunk ----

    def _train_chunk(self, streams: Streams) -> None:
        chunk, cursor = self._plan(streams), self.cursor
        carry = None
        if chunk.start < chunk.next_start < chunk.end:  # the next window starts inside this one
            steps = chunk.next_start - chunk.start
            with self._lengths(chunk.valid(chunk.start, chunk.next_start), steps):
                carry = self._carry_pass(self.layout.time(chunk.inputs, 0, steps), cursor.start_state)
        loss, target, state = self._window_loss(streams, chunk)
        mean_loss, norm, skip, lr = self._optimizer_step(loss)
        if chunk.next_start == chunk.end:
            new_start = detach_state(state)
        else:
            new_start = carry if chunk.next_start > chunk.start else cursor.start_state
        cursor.start_state = None if new_start is None else reset_nonfinite_rows(new_start)
        cursor.window_start = chunk.next_start
        cursor.step = chunk.end
        self._chunks += 1
        step = self.monitor.step_count
        # Recorded before step(), which may close the telemetry window that this chunk ends.
        self.truncation.record_chunk(step, chunk.first - chunk.start, chunk.end - chunk.start)
        if self.probe is not None and (step + 1) % self.monitor.read_every == 0:
            self.truncation.record_probe(step)  # queued now, it travels with the batch step() is about to read
        self.monitor.step(loss=mean_loss, lr=lr, grad_norm=norm, skipped=skip, targets=target.detach())

    def _plan(self, streams: Streams) -> Chunk:
        """Where the chunk and its window lie, the rows still alive, and their inputs and targets."""
        s, layout = self.cursor.step, self.layout
        rows = [b for b, length in enumerate(streams.lengths) if length > s]
        n = min(self.k1, max(streams.lengths[b] for b in rows) - s)
        device = streams.inputs.device
        index = None if len(rows) == len(streams.lengths) else layout.row_index(rows, device)
        self.cursor.align_rows(rows, device)
        w = self.cursor.window_start
        lengths = [streams.lengths[b] for b in rows]
        valid = [min(length - s, n) for length in lengths]
        inputs = layout.slice(streams.inputs, index, w, s + n)
        return Chunk(
            start=w,
            first=s,
            end=s + n,
            next_start=max(w, s + n - self.truncation.state.lag),
            rows=index,
            lengths=lengths,
            flat_index=None if min(valid) == n else layout.flat_index(valid, n, device),
            inputs=without_padding(inputs, [length - w for length in lengths], self.batch_first),
            targets=layout.slice(streams.targets, index, s, s + n),
        )

    def _window_loss(self, streams: Streams, chunk: Chunk) -> tuple:
        """Forward over the window from the carried state; the loss on the chunk's valid positions."""
        with self._lengths(chunk.valid(chunk.start, chunk.end), chunk.end - chunk.start):
            out, state = _outputs_and_state(self.model(chunk.inputs, self.cursor.start_state))
        offset, layout = chunk.first - chunk.start, self.layout
        pred = layout.flatten(layout.time(out, offset, offset + chunk.end - chunk.first))
        target = layout.flatten(chunk.targets)
        if chunk.flat_index is not None:
            pred, target = pred.index_select(0, chunk.flat_index), target.index_select(0, chunk.flat_index)
        if self.probe is not None and streams.inputs.dim() == 3 and streams.inputs.is_floating_point():
            lagged = self.truncation.lagged_inputs(streams, chunk, layout)
            self.probe.watch(pred, lagged, chunk.end - chunk.first, chunk.flat_index, self.batch_first)
        return self.loss_fn(pred, target), target, state

    def _optimizer_step(self, loss: torch.Tensor) -> tuple:
        """Backward, norm, non-finite flag, clipping, then the step (or its skip) and the scheduler, all on the
        device. Returns (loss as reported, gradient norm, skip flag, learning rate used)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in self._params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=loss.device)
        bad = ~(torch.isfinite(loss.detach()) & torch.isfinite(norm))
        reduced = start_flag_reduction(loss.detach(), bad, self.process_group)  # waited for just before the step
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

    def _after_chunk(self, val_data, ends_epoch: bool = False) -> None:
        monitor = self.monitor
        if monitor.step_count % monitor.every == 0:
            self.truncation.at_boundary(self._device())
        if self.on_nonfinite == "stop" and monitor.skipped_steps:
            self._stop()
        # A validation due at the epoch's last chunk is the epoch's own (_end_epoch): one evaluation, one plateau step.
        due = val_data is not None and self.validate_every and self._chunks % self.validate_every == 0
        if due and not ends_epoch:
            self._record_validation(val_data)
        if self.checkpoint_path is not None and self.checkpoint_every and self._chunks % self.checkpoint_every == 0:
            self.save_checkpoint()

    def _end_epoch(self, val_data) -> None:
        if val_data is not None:
            self._record_validation(val_data, epoch=self.cursor.epoch + 1)
        if self.scheduler is not None and self.scheduler_interval == "epoch" and not _is_plateau(self.scheduler):
            self.scheduler.step()
        self.cursor.next_epoch()

    def _carry_pass(self, x, state):
        """Forward over the first steps of the window, for the next window's start state: no gradient, no
        telemetry, no input statistics (the window's own forward records them)."""
        with torch.no_grad(), self.monitor.quiet():
            _, carry = _outputs_and_state(self.core(x, state))
        return detach_state(carry)

    # ---- non-finite ----

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

    # ---- checkpoints ----

    def state_dict(self) -> dict:
        """Everything the continuation depends on. Reads the history first (one synchronisation)."""
        self.monitor.flush()  # first: reading closes windows, which feeds the truncation estimates saved below
        return {
            "format": CHECKPOINT_FORMAT,
            "config": {
                "k1": self.k1,
                "k2": None if self.adaptive is not None else self.k2,
                "adaptive": self.adaptive is not None,
                "batch_first": self.batch_first,
            },
            "model": self.core.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "position": self.cursor.state_dict(self._chunks),
            "truncation": self.truncation.state.state_dict(self.adaptive),
            "latched": self._latched,
            "probe": None if self.probe is None else self.probe.state_dict(),
            "rng": rng_state(),
            "monitor": self.monitor.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not a TBPTTTrainer checkpoint (format {state.get('format')!r})")
        config = state["config"]
        fixed_k2 = None if self.adaptive is not None else self.k2
        if (
            config["k1"] != self.k1
            or config["adaptive"] != (self.adaptive is not None)
            or config.get("k2", fixed_k2) != fixed_k2  # checkpoints written before k2 was kept have none
        ):
            raise ValueError(
                f"checkpoint was written with k1={config['k1']}, k2={config.get('k2')}, adaptive={config['adaptive']}; "
                f"this trainer has k1={self.k1}, k2={fixed_k2}, adaptive={self.adaptive is not None}"
            )
        self.core.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self._chunks = self.cursor.load_state_dict(state["position"])
        self.truncation.state.load_state_dict(state["truncation"], self.adaptive)
        self._latched = state["latched"]
        if self.probe is not None and state["probe"] is not None:
            self.probe.load_state_dict(state["probe"])
        self.monitor.load_state_dict(state["monitor"])
        set_rng_state(state["rng"])

    def save_checkpoint(self, path: str | None = None) -> str:
        """Write the checkpoint atomically (temporary file, fsync, rename); one file per rank under DDP."""
        path = rank_path(path or self.checkpoint_path)
        self.monitor.event(
            "checkpoint", {"path": path, "chunks": self._chunks}, step=max(self.monitor.step_count - 1, 0)
        )
        write_checkpoint(path, self.state_dict())
        return path

    def load_checkpoint(self, path: str | None = None, *, weights_only: bool = True) -> None:
        """Restore a checkpoint into this trainer (built with the same configuration, model and optimizer
        types); the next `fit` continues exactly where the checkpointed run stood."""
        path = rank_path(path or self.checkpoint_path)
        device = self._device()
        state = torch.load(path, map_location=device, weights_only=weights_only)
        self.load_state_dict(state)
        self.monitor.event("resume", {"path": path, "chunks": self._chunks}, step=self.monitor.step_count)

    # ---- helpers ----

    def _batch_order(self, count: int, epoch: int) -> list:
        if not self.shuffle:
            return list(range(count))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(count, generator=gen).tolist()

    def _device(self) -> torch.device:
        return self._params[0].device if self._params else torch.device("cpu")


def _is_plateau(scheduler) -> bool:
    return isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
