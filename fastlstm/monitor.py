"""`Monitor` and `History`: what a training loop and its LSTMs did, recorded without host synchronisation.

A `Monitor` attaches to a model (every `fastlstm.LSTM` inside it, named by module path) and to any training loop
through `monitor.step(loss=...)`. The step only queues device tensors; they are read in batches, with one
device-to-host copy every `read_every` steps (or when the history is requested). Telemetry windows and input
statistics are closed every `every` steps. With `instrument_every=N` only every N-th step records telemetry and the
others run PyTorch's own LSTM op (sampling.py). The result is a `History` in the JSON format of docs/history.md.

Owned elsewhere: the History format (history.py), when device values reach the host (windows.py), what the hooks
accumulate on the device (recording.py).

Besides what the loop passes, the Monitor records on the device, with hooks: the gradient norm before clipping
(when each parameter's gradient is accumulated) and the norm the optimizer step used (read right after it), so that
clipping shows; the update-to-weight ratio ‖Δθ‖/‖θ‖ of every `every`-th step; the learning rate; and whether each
LSTM pass started from a state passed in (hx) that was not all zeros and carried no autograd graph: a stream cut
into chunks whose gradient stops at each chunk's start, whoever does the chunking. `monitor.findings()` diagnoses
what has been read so far without waiting for the device.
"""

from __future__ import annotations

import contextlib
import numbers
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from .arguments import check_counts
from .history import EVENT_KINDS, History, stats_entry
from .recording import (
    DeviceMoments,
    StateCarry,
    current_grad_norm,
    describe_lstm,
    named_lstms,
    timesteps,
    trained_parameters,
)
from .sampling import Sampler
from .windows import DeferredReads, WindowClock, oldest_undecoded_step, telemetry_off

__all__ = ["EVENT_KINDS", "History", "Monitor"]  # History and EVENT_KINDS live in history.py


class Monitor:
    """Records a training loop into a `History` without host synchronisation in the step.

    Args:
      model:       any nn.Module; every fastlstm.LSTM inside it is monitored, named by its module path.
      optimizer:   optional; the learning rate of its first parameter group is recorded when `step()` gets none, the
                   gradient norm its step used is measured right after the step (after any clipping), and every
                   `every`-th step's update-to-weight ratio ‖Δθ‖/‖θ‖ (one copy of the parameters, on the device).
      every:       close a telemetry window (one `telemetry` and one `inputs` entry per LSTM) every this many steps.
      read_every:  read the queued device values (losses, norms, flags, statistics) every this many steps, with one
                   device-to-host copy; defaults to `every`.
      instrument_every: let the LSTMs record telemetry on every this many steps only (steps 0, N, 2N, ...; 1:
                   every step). The other steps record no telemetry, so `backend="auto"` runs PyTorch's own LSTM
                   op there. Losses, gradient norms, skip flags, input statistics and everything else are still
                   recorded on every step; a non-finite value on an uninstrumented step makes every step
                   instrumented from two window boundaries later until a window of them has been read (sampling.py).
                   Not to be confused with `every`, the window length.
      input_stats: record per-feature statistics of what each LSTM received (a forward pre-hook, device sums only).
      grad_norm:   when `step()` gets no grad_norm, record the gradient 2-norm before clipping (see grad_hooks) and
                   the norm the step used (after clipping; `grad_norm_applied`).
      grad_hooks:  measure the norm before clipping as each parameter's gradient is accumulated in backward. Off,
                   or under DistributedDataParallel (whose hooks see the local gradient before the all-reduce), the
                   norm of the `.grad`s at `step()` is recorded instead. Under torch.amp.GradScaler the hooks see
                   scaled gradients: pass `grad_norm=clip_grad_norm_(...)` (after `scaler.unscale_`) instead.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizer=None,
        every: int = 10,
        read_every: int | None = None,
        instrument_every: int = 1,
        input_stats: bool = True,
        grad_norm: bool = True,
        grad_hooks: bool = True,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"Monitor: model must be an nn.Module, got {type(model).__name__}")
        check_counts(every=every, read_every=read_every)
        self.model = model
        self.optimizer = optimizer
        self.every = int(every)
        self.read_every = int(read_every or every)
        self.track_grad_norm = grad_norm
        self.lstms = named_lstms(model)
        if not self.lstms:
            torch_lstms = [n for n, m in model.named_modules() if isinstance(m, nn.LSTM)]
            hint = (
                f"; its torch.nn.LSTM ({', '.join(torch_lstms) or 'the model itself'}) can be converted with "
                "fastlstm.convert(model)"
                if torch_lstms
                else ""
            )
            warnings.warn(
                f"no fastlstm.LSTM inside the monitored model: its history gets losses and norms, but no telemetry "
                f"or input statistics{hint}",
                stacklevel=2,
            )
        self.sampler = Sampler(instrument_every, self.every)
        self._history = History()
        self._history.lstms = {name: describe_lstm(m) for name, m in self.lstms.items()}
        if self.sampler.sampling:
            self._history.extra["sampling"] = {"instrument_every": self.sampler.instrument_every}
        self.listeners: list = []  # called with [(lstm name, first step, last step, Snapshot)] per closed window
        self.skipped_steps: list = []  # steps read back as skipped, in the order they were read
        self._step = 0
        self._window_first = 0
        self._windows = WindowClock(self.lstms)
        self._reads = DeferredReads()
        self._paused = 0
        self._input_stats = {name: DeviceMoments() for name in self.lstms} if input_stats else {}
        self._target_stats = DeviceMoments()
        self._unresolved: list = []  # skipped-step events still waiting for their telemetry window
        self._states = {name: StateCarry() for name in self.lstms}
        self._hooks = [
            m.register_forward_pre_hook(_InputHook(self, name), with_kwargs=True) for name, m in self.lstms.items()
        ]
        self._params = trained_parameters(model, optimizer)
        self._grad_norms: dict = {}  # id(parameter) -> ‖grad‖ (device) at its last accumulation, this step
        if grad_norm and grad_hooks and not isinstance(model, nn.parallel.DistributedDataParallel):
            self._hooks += [p.register_post_accumulate_grad_hook(self._grad_hook) for p in self._params]
        self._applied = None  # the norm the optimizer step used (device), measured in its post-hook
        self._update = None  # ‖Δθ‖/‖θ‖ of the sampled step (device), measured in its post-hook
        self._before_update = None  # the parameters before a sampled step
        if optimizer is not None and grad_norm:
            self._hooks += [
                optimizer.register_step_pre_hook(self._before_optimizer_step),
                optimizer.register_step_post_hook(self._after_optimizer_step),
            ]
        self._instrument(self._step)

    # ---- the training loop's side ----

    @property
    def step_count(self) -> int:
        """The index the next `step()` call will record."""
        return self._step

    def step(
        self,
        loss=None,
        *,
        val_loss=None,
        lr=None,
        subset_losses=None,
        targets=None,
        grad_norm=None,
        skipped=None,
        epoch=None,
    ) -> int:
        """Record one optimizer step; returns its index. Tensors (loss, grad_norm, skipped, val_loss, subset
        losses) are kept on the device and read later in a batch."""
        _check_scalars(loss=loss, val_loss=val_loss, lr=lr, grad_norm=grad_norm, skipped=skipped)
        for name, value in (subset_losses or {}).items():
            _check_scalars(**{f"subset_losses[{name!r}]": value})
        n = self._step
        if lr is None and self.optimizer is not None:
            lr = self.optimizer.param_groups[0]["lr"]
        if isinstance(lr, torch.Tensor):  # a scheduler fills a tensor lr in place before the batched read
            lr = lr.detach().clone()
        applied = None
        if self.track_grad_norm:
            applied = self._applied if self.optimizer is not None else None
            if grad_norm is None and self._grad_norms:
                grad_norm = torch.linalg.vector_norm(torch.stack(list(self._grad_norms.values())))
                if applied is None:  # no optimizer hook: the .grad the loop leaves is what its step used
                    applied = current_grad_norm(self._params)
            elif grad_norm is None:
                grad_norm = current_grad_norm(self._params)
        entry = {"step": n, "loss": None, "lr": None, "grad_norm": None, "skipped": False}
        instrumented = self.sampler.instrumented(n)
        if self.sampler.sampling:
            entry["instrumented"] = instrumented
            self.sampler.record(n, instrumented)
            if not instrumented:  # nothing locates a NaN here: watch for one, to instrument the coming steps
                self.sampler.watch(loss, grad_norm, skipped)
        self._history.steps.append(entry)
        self._defer_scalars(entry, loss=loss, lr=lr, grad_norm=grad_norm)
        if applied is not None:
            self._defer_scalars(entry, grad_norm_applied=applied)
        if self._update is not None:
            self._defer_scalars(entry, update_ratio=_zero_where_skipped(self._update, skipped))
        self._grad_norms, self._applied, self._update = {}, None, None
        if isinstance(skipped, torch.Tensor):
            self._reads.add([skipped], lambda v, n=n, e=entry: self._read_skipped(e, n, bool(v)))
        elif skipped:
            self._read_skipped(entry, n, True)
        if targets is not None:
            self._target_stats.add(targets)
        if val_loss is not None or subset_losses:
            self.evaluate(val_loss, subset_losses=subset_losses, epoch=epoch, step=n)
        self._step += 1
        if self._step % self.every == 0:
            self.boundary()
        if self._step % self.read_every == 0:
            self._reads.start()
            self._resolve_skipped()
        self._instrument(self._step)
        return n

    @property
    def instrumented(self) -> bool:
        """Whether the step about to run (the next `step()` call's) records telemetry."""
        return self.sampler.instrumented(self._step)

    def evaluate(self, val_loss=None, *, subset_losses=None, epoch=None, step=None) -> None:
        """Record a validation result at `step` (default: the last recorded step)."""
        step = self._step - 1 if step is None else int(step)
        entry = {"step": max(step, 0), "epoch": epoch, "val_loss": None}
        self._history.evals.append(entry)
        self._defer_scalars(entry, val_loss=val_loss)
        if subset_losses:
            entry["subset_losses"] = {}
            for name, value in subset_losses.items():
                self._defer_scalars(entry["subset_losses"], **{str(name): value})

    def event(self, kind: str, detail: dict | None = None, step: int | None = None) -> dict:
        """Record a discrete event (kinds in EVENT_KINDS, or your own) at `step` (default: the next step)."""
        return self._history.event(self._step if step is None else step, kind, detail)

    def defer(self, tensors, callback: Callable) -> None:
        """Read `tensors` with the next batch and call `callback(*numpy_arrays)` then."""
        self._reads.add(tensors, callback)

    @contextlib.contextmanager
    def paused(self):
        """Input statistics ignore forward passes inside this block (re-runs, validation)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    @contextlib.contextmanager
    def quiet(self):
        """For passes that are not training steps (re-runs, validation): no telemetry from the LSTMs and no input
        statistics."""
        with telemetry_off(self.lstms.values()), self.paused():
            yield

    def oldest_undecoded_step(self) -> int:
        """No telemetry window decoded from now on covers a step below this one (windows.UNDECODED_PERIODS): what a
        listener must keep about its steps to relate them to windows still to come."""
        return oldest_undecoded_step(self._step, self.every)

    # ---- windows and reads ----

    def boundary(self) -> None:
        """Close the current telemetry / statistics window at the last recorded step. Never waits for the device
        except for a telemetry copy started a whole window ago."""
        last = self._step - 1
        closed = self._windows.close(self._window_first, last)
        read = self._record_windows(closed)
        change = self.sampler.boundary(self._step, read)
        if change is not None:
            detail = {"instrument_every": self.sampler.instrument_every}
            if change == "started":
                detail["reason"] = "a non-finite loss, gradient norm or skipped step on an uninstrumented step"
                self._history.event(self._step, "telemetry_hunt", detail)
            else:
                first, last, located = self.sampler.hunts[-1]
                self._history.event(last, "telemetry_hunt_end", {**detail, "first_step": first, "located": located})
            self._instrument(self._step)
        for name, stats in self._input_stats.items():
            for count, moments in stats.take():
                self._defer_stats("inputs", {"step": last, "lstm": name}, count, moments)
        for count, moments in self._target_stats.take():
            self._defer_stats("targets", {"step": last}, count, moments)
        for name, carry in self._states.items():
            self._record_state_carry(name, carry, first=self._window_first, last=last)
        self._window_first = self._step

    def flush(self) -> History:
        """Close the current window and read everything still on the device (one host synchronisation)."""
        self.boundary()
        closed = self._windows.drain(self._step)
        self._record_windows(closed)
        self._reads.finish()
        self._resolve_skipped()  # an event whose hunt is still open keeps waiting: a read does not end a hunt
        return self._history

    @property
    def history(self) -> History:
        """The recorded history, with everything still on the device read first (`flush()`)."""
        return self.flush()

    @property
    def live_history(self) -> History:
        """The history as recorded so far, without reading anything (values in flight are missing)."""
        return self._history

    def findings(self, *, flush: bool = False) -> list:
        """What the doctor sees in the history so far (`fastlstm.diagnose`). Cheap by default: only the values
        already read back are diagnosed, nothing waits for the device; `flush=True` reads everything first (one
        host synchronisation)."""
        from .doctor import diagnose

        return diagnose(self.flush() if flush else self._history)

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for lstm in self.lstms.values():
            lstm.telemetry.suspended = False

    def state_dict(self) -> dict:
        """Everything needed to continue recording after a restart (call `flush()` first)."""
        self.flush()
        return {
            "step": self._step,
            "window_first": self._window_first,
            "skipped_steps": list(self.skipped_steps),
            "history": self._history.to_dict(),
            "sampler": self.sampler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self._step = int(state["step"])
        self._window_first = int(state["window_first"])
        self.skipped_steps = list(state["skipped_steps"])
        lstms = self._history.lstms
        self._history = History.from_dict(state["history"])
        self._history.lstms = {**self._history.lstms, **lstms}
        if "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])
        self._unresolved = [
            e for e in self._history.events if e["kind"] == "nonfinite_step_skipped" and "locations" not in e["detail"]
        ]
        self._instrument(self._step)

    # ---- internals ----

    def _instrument(self, step: int) -> None:
        """Let the LSTMs record telemetry in `step`, or suspend it (sampled telemetry)."""
        if not self.sampler.sampling:
            return
        suspended = not self.sampler.instrumented(step)
        for lstm in self.lstms.values():
            lstm.telemetry.suspended = suspended

    def _record_input(self, name: str, module, args, kwargs) -> None:
        """Before the LSTM `name` runs: its input's statistics and the state it was handed (device, no sync)."""
        if self._paused:
            return
        x = args[0] if args else kwargs.get("input")
        if module.training and torch.is_grad_enabled():
            hx = args[1] if len(args) > 1 else kwargs.get("hx")
            self._states[name].add(hx, timesteps(x, module.batch_first))
        if isinstance(x, PackedSequence):
            x = x.data
        if isinstance(x, torch.Tensor) and name in self._input_stats:
            self._input_stats[name].add(x)

    def _grad_hook(self, p: torch.Tensor) -> None:
        """After p's gradient is accumulated in backward: its norm before any clipping (device, no sync). With
        gradient accumulation the last backward before the step sees the full gradient."""
        if p.grad is not None:
            grad = p.grad.detach()
            grad = grad.coalesce().values() if grad.is_sparse else grad
            wide = torch.float32 if grad.dtype in (torch.float16, torch.bfloat16) else None  # 16-bit sums overflow
            self._grad_norms[id(p)] = torch.linalg.vector_norm(grad, dtype=wide).to(torch.float64)

    def _before_optimizer_step(self, optimizer, args, kwargs) -> None:
        if self._step % self.every == 0:  # a sampled step: keep the parameters to measure the update
            self._before_update = [p.detach().clone() for p in self._params]

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        # The gradient the step used, after any clipping: measured after the step, because a step given a closure
        # (LBFGS, Lightning) computes its gradient inside the step, after the pre-hooks ran.
        self._applied = current_grad_norm(self._params)
        before, self._before_update = self._before_update, None
        if before is None:
            return
        with torch.no_grad():
            delta = torch.nn.utils.get_total_norm([p.detach() - b for p, b in zip(self._params, before)])
            weight = torch.nn.utils.get_total_norm(before)
            self._update = delta / weight

    def _record_state_carry(self, name: str, carry: StateCarry, first: int, last: int) -> None:
        taken = carry.take()
        if taken is None:
            return
        entry, nonzero = taken
        entry = {"step": last, "first_step": first, "lstm": name, **entry}
        if nonzero is None:
            self._history.add("states", {**entry, "nonzero_state": 0})
        else:
            self._reads.add([nonzero], lambda v, e=entry: self._history.add("states", {**e, "nonzero_state": int(v)}))

    def _defer_scalars(self, target: dict, **values) -> None:
        """Set target[key] = value now for host numbers, or when the batch is read for tensors."""
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                self._reads.add([value], lambda v, t=target, k=key: t.__setitem__(k, float(v)))
            elif value is not None:
                target[key] = float(value)

    def _defer_stats(self, key: str, entry: dict, count: int, moments: torch.Tensor) -> None:
        self._reads.add([moments], lambda m: self._history.add(key, {**entry, **stats_entry(count, m)}))

    def _record_windows(self, closed: list) -> list:
        """Append the windows that recorded something; returns (first, last, located) of each."""
        kept = []
        for name, first, last, snap in closed:
            if snap is None or snap.launches == 0:  # nothing ran in the window (or no step of it was instrumented)
                continue
            entry = {"step": last, "first_step": first, "lstm": name, "snapshot": snap.to_dict()}
            if self.sampler.sampling:
                entry["instrumented_steps"] = len(self.sampler.instrumented_between(first, last))
            self._history.telemetry.append(entry)
            kept.append((name, first, last, snap))
        if kept:
            for listener in self.listeners:
                listener(kept)
        return [(first, last, snap.first_nonfinite is not None) for _, first, last, snap in kept]

    def instrumented_steps(self, first: int, last: int) -> list:
        """The steps of [first, last] that recorded telemetry (all of them without sampling), for listeners that
        relate a window's telemetry to what each of its steps did (the TBPTT trainer's truncation estimates)."""
        if not self.sampler.sampling:
            return list(range(first, last + 1))
        return self.sampler.instrumented_between(first, last)

    def _read_skipped(self, entry: dict, step: int, skipped: bool) -> None:
        entry["skipped"] = skipped
        if skipped:
            self.skipped_steps.append(step)
            detail = {"first_nonfinite": None}
            if not entry.get("instrumented", True):
                detail["instrumented"] = False
            event = self._history.event(step, "nonfinite_step_skipped", detail)
            self._unresolved.append(event)

    def _resolve_skipped(self) -> None:
        """Attach to each skipped-step event the first non-finite value of the telemetry windows covering it; for a
        step that was not instrumented, of the first window after it that located one (the hunt's). An event
        without `locations` in its detail is still waiting (its first_nonfinite null until then)."""
        waiting = []
        for event in self._unresolved:
            step = event["step"]
            if event["detail"].get("instrumented", True):
                found = {
                    entry["lstm"]: entry["snapshot"]["first_nonfinite"]
                    for entry in self._history.telemetry
                    if entry.get("first_step", -1) <= step <= entry["step"]
                }
                span = None
            else:
                found, span = self._located_after(step)
            if not found:
                waiting.append(event)
                continue
            located = [dict(where, lstm=name) for name, where in found.items() if where is not None]
            first = next((w for w in located if w["stage"] == "forward"), located[0] if located else None)
            event["detail"] = {**event["detail"], "first_nonfinite": first, "locations": found}
            if span is not None:
                event["detail"]["located_in_window"] = span
        self._unresolved = waiting

    def _located_after(self, step: int) -> tuple:
        """({lstm: first_nonfinite}, [first, last]) of the first telemetry window at or after an uninstrumented
        `step` that located a non-finite value, within the hunt that followed it; ({}, None) while that is still
        open, and ({lstm: None}, None) once the hunt ended without locating one."""
        hunt_end = next((last for first, last, _ in self.sampler.hunts if first > step), None)
        windows: dict = {}
        for entry in self._history.telemetry:
            if entry["step"] >= step and (hunt_end is None or entry.get("first_step", 0) <= hunt_end):
                windows.setdefault((entry.get("first_step", entry["step"]), entry["step"]), {})[entry["lstm"]] = entry[
                    "snapshot"
                ]["first_nonfinite"]
        for span in sorted(windows):
            if any(where is not None for where in windows[span].values()):
                return windows[span], list(span)
        if hunt_end is not None:
            return {name: None for name in self.lstms}, None
        return {}, None


def _check_scalars(**values) -> None:
    """Each given value is one number: a host number or a one-element tensor (checked from its shape, no read).
    Caught here, before the step is recorded, not when a later batched read finds a vector or a string."""
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(
                    f"Monitor.step: {name} must be a single value, got a tensor of shape {tuple(value.shape)}"
                )
        elif not isinstance(value, numbers.Real):
            raise TypeError(
                f"Monitor.step: {name} must be a number or a one-element tensor, got {type(value).__name__}"
            )


class _InputHook:
    """The Monitor's forward pre-hook on one LSTM. It belongs to the run, not to the model: fastlstm.LSTM leaves it
    out of a pickle or deepcopy of the model (LSTM.__getstate__), so no Monitor travels with the model."""

    belongs_to_a_run = True

    def __init__(self, monitor: Monitor, name: str):
        self.monitor, self.name = monitor, name

    def __call__(self, module, args, kwargs):
        self.monitor._record_input(self.name, module, args, kwargs)


def _zero_where_skipped(update_ratio: torch.Tensor, skipped) -> torch.Tensor:
    """A skipped step changed nothing, though the optimizer's post-hook measured the update StepGuard (or the loop)
    undid after it. On the device: the flag may be a tensor not read yet."""
    if isinstance(skipped, torch.Tensor):
        flag = skipped.detach().to(update_ratio.device).bool().any()
        return torch.where(flag, torch.zeros_like(update_ratio), update_ratio)
    return torch.zeros_like(update_ratio) if skipped else update_ratio
