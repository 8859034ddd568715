"""Sampled telemetry: which training steps a Monitor instruments (docs/training.md, "Sampled telemetry").

With `instrument_every=N` the LSTMs record telemetry on steps 0, N, 2N, ... only. On the other steps the Monitor
suspends their telemetry (`Telemetry.suspended`), and `backend="auto"` then runs PyTorch's own LSTM op: those
steps cost what nn.LSTM costs.

What must not be missed is still watched on every step: the loss, the gradient norm and the skip flag of an
uninstrumented step are folded into one device flag ("something was NaN or infinite"). The flag is copied to the
host at one window boundary and read at the next, a whole window later, so the read never waits for the device and
the decision falls on the same step in every run (a resumed run included). Once it reads set, every step is
instrumented (a hunt) until a telemetry window made of hunt steps has been read: if the fault recurs, that window
says where it arose; either way the hunt then ends and sampling resumes. Flags raised before a hunt started, or
at the boundary where one ended, belong to that hunt and start no other.
"""

from __future__ import annotations

import math
from collections import deque

import torch

from .arguments import check_counts


class Sampler:
    """The instrumentation schedule of one Monitor, and the lazily read non-finite flag that extends it."""

    def __init__(self, instrument_every: int, window: int):
        check_counts(instrument_every=instrument_every)
        self.instrument_every = int(instrument_every)
        self.hunt_from: int | None = None  # first step of the hunt in progress
        self.hunts: list = []  # [first step, last step, located] of every finished hunt
        self._flag = None  # device bool: a non-finite value on an uninstrumented step since the last boundary
        self._captured = None  # (the flag at the previous boundary, its copy's CUDA event or None)
        self._recent = deque(
            maxlen=4 * window + 8
        )  # (step, instrumented): what telemetry windows still being read span

    @property
    def sampling(self) -> bool:
        return self.instrument_every > 1

    def instrumented(self, step: int) -> bool:
        return not self.sampling or self.hunt_from is not None or step % self.instrument_every == 0

    def record(self, step: int, instrumented: bool) -> None:
        self._recent.append((step, instrumented))

    def instrumented_between(self, first: int, last: int) -> list:
        """The instrumented steps in [first, last] among the recent ones (telemetry windows still being read)."""
        return [step for step, on in self._recent if on and first <= step <= last]

    def watch(self, loss, grad_norm, skipped) -> None:
        """Fold an uninstrumented step into the flag: a loss or gradient norm that is not finite, or a skip flag
        that is true (as the Monitor reads it: GradScaler's found_inf is a float 1.0). Tensors, numbers or None;
        device operations only."""
        for value, is_flag in ((loss, False), (grad_norm, False), (skipped, True)):
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(bool(value) if is_flag else not math.isfinite(float(value)))
            elif is_flag:
                value = value.detach().bool().any()
            elif value.is_floating_point() or value.is_complex():
                value = ~torch.isfinite(value.detach()).all()
            else:
                continue  # an integer loss is always finite
            if self._flag is not None and value.device != self._flag.device:
                # Always towards the accelerator: a copy from the host is safe unwaited, while a non-blocking copy
                # of a device value to the host would be read before it landed.
                if value.device.type == "cpu":
                    value = value.to(self._flag.device, non_blocking=True)
                else:
                    self._flag = self._flag.to(value.device, non_blocking=True)
            self._flag = value if self._flag is None else self._flag | value

    def boundary(self, next_step: int, windows: list) -> str | None:
        """At a window boundary, before step `next_step`: act on the flag captured at the previous boundary
        (waiting for a copy started a window ago), capture the current one, and end a hunt whose window has been
        read. `windows`: (first step, last step, located) of the telemetry windows read at this boundary. Returns
        "started" or "ended" when the hunt changed."""
        change = None
        if self.hunt_from is not None:
            read = [located for first, _last, located in windows if first >= self.hunt_from]
            if read:
                self.hunts.append([self.hunt_from, next_step - 1, any(read)])
                self.hunt_from = None
                change = "ended"
        if self._read_captured() and self.hunt_from is None and change is None:
            self.hunt_from = next_step
            change = "started"
        if self.hunt_from is not None or change == "ended":
            # Steps just before a hunt are what it looks after; a hunt's own steps are instrumented (no flag).
            self._flag = None
        self._capture()
        return change

    def _read_captured(self) -> bool:
        if self._captured is None:
            return False
        flag, done = self._captured
        self._captured = None
        if done is not None:
            done.synchronize()  # the copy was queued a whole window ago
        return bool(flag)

    def _capture(self) -> None:
        flag, self._flag = self._flag, None
        if flag is None:
            return
        if flag.is_cuda:
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(flag.device))
            self._captured = (host, done)
        else:
            self._captured = (flag.clone(), None)

    def state_dict(self) -> dict:
        """Everything that decides the coming steps' instrumentation; reads the flags (one synchronisation)."""
        pending = self._read_captured()
        if pending:
            self._captured = (torch.tensor(True), None)
        current = bool(self._flag) if self._flag is not None else False
        return {
            "instrument_every": self.instrument_every,
            "hunt_from": self.hunt_from,
            "hunts": [list(h) for h in self.hunts],
            "captured": pending,
            "flag": current,
            "recent": [list(r) for r in self._recent],
        }

    def load_state_dict(self, state: dict) -> None:
        self.hunt_from = state["hunt_from"]
        self.hunts = [list(h) for h in state["hunts"]]
        self._captured = (torch.tensor(True), None) if state["captured"] else None
        self._flag = torch.tensor(True) if state["flag"] else None
        self._recent.clear()
        self._recent.extend(tuple(r) for r in state["recent"])
