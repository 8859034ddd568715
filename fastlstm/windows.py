"""Telemetry windows and deferred device reads: the one clock that decides when device values reach the host.

Three users share it. `Telemetry` copies its counters with `HostCopy` (non-blocking on CUDA, with an event; a plain
copy on the CPU). `DeferredReads` batches every other device value a recorder wants later (losses, norms, flags,
statistics) into one copy per read period. `WindowClock` closes the telemetry window of each LSTM at the
Monitor's boundaries and says which window a snapshot belongs to: on the CPU the copy is synchronous and a boundary
returns its own window; on CUDA a boundary starts the copy and returns the window captured at the previous one.
`UNDECODED_PERIODS` is what the trainer (or any listener) may rely on for how long a window stays undecoded, and
`telemetry_off` is the one way a recorder silences the LSTMs for passes that are not training steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import NamedTuple

import numpy as np
import torch

# A step's telemetry is decoded at most this many window periods after the step: the window it belongs to closes
# within one period, and its copy (on CUDA) is decoded at the following boundary; one more for the window in flight.
UNDECODED_PERIODS = 3


class HostCopy(NamedTuple):
    """Host copies of device tensors, possibly still being filled (`done` is None when the copy was synchronous)."""

    host: tuple
    done: torch.cuda.Event | None

    @classmethod
    def start(cls, tensors: Iterable[torch.Tensor], blocking: bool = False) -> HostCopy:
        tensors = list(tensors)
        if tensors and tensors[0].is_cuda and not blocking:
            host = tuple(t.to("cpu", non_blocking=True) for t in tensors)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(tensors[0].device))  # where the copies were queued
            return cls(host, done)
        # copy=True: for CPU tensors .cpu() would return the tensors themselves, which their owner then updates.
        return cls(tuple(t.to("cpu", copy=True) for t in tensors), None)

    def ready(self) -> bool:
        return self.done is None or self.done.query()

    def wait(self) -> None:
        if self.done is not None:
            self.done.synchronize()


class DeferredReads:
    """Device tensors whose values are wanted later, read together with one device-to-host copy.

    `add(tensors, callback)` queues; `start()` launches one non-blocking copy of everything queued; `finish()`
    waits for that copy (normally long done by then) and calls each callback with numpy arrays.
    """

    def __init__(self):
        self._queue: list = []
        self._inflight = None  # ([(tensor indices, HostCopy)], tensor count, layout)

    def add(self, tensors, callback: Callable) -> None:
        self._queue.append(([t.detach() for t in tensors], callback))

    def start(self) -> None:
        self._finish_inflight()  # started one read period ago: long finished on the device
        if not self._queue:
            return
        queue, self._queue = self._queue, []
        tensors = [t for ts, _ in queue for t in ts]
        by_device: dict = {}
        for i, t in enumerate(tensors):
            by_device.setdefault(t.device, []).append(i)
        copies = []
        for indices in by_device.values():
            # One flat float64 tensor per device: one copy, and (on the CPU) a fresh tensor that later in-place
            # updates of the sources cannot reach.
            flat = torch.cat([tensors[i].reshape(-1).to(torch.float64) for i in indices])
            copies.append((indices, HostCopy.start([flat]) if flat.is_cuda else HostCopy((flat,), None)))
        layout = [([tuple(t.shape) for t in ts], callback) for ts, callback in queue]
        self._inflight = (copies, len(tensors), layout)

    def finish(self) -> None:
        self.start()
        self._finish_inflight()

    def _finish_inflight(self) -> None:
        if self._inflight is None:
            return
        copies, count, layout = self._inflight
        self._inflight = None
        for _, copy in copies:
            copy.wait()
        shapes = [shape for tensor_shapes, _ in layout for shape in tensor_shapes]
        values = [None] * count
        for indices, copy in copies:
            host = copy.host[0].numpy()
            offset = 0
            for i in indices:
                size = int(np.prod(shapes[i])) if shapes[i] else 1
                values[i] = host[offset : offset + size].reshape(shapes[i])
                offset += size
        position = 0
        for tensor_shapes, callback in layout:
            callback(*values[position : position + len(tensor_shapes)])
            position += len(tensor_shapes)


class WindowClock:
    """Closes the telemetry windows of named LSTMs at fixed steps and pairs each snapshot with its window.

    `close(first, last)` at a boundary returns [(name, first, last, Snapshot)] of the windows decoded now (this
    one on the CPU, the previous one on CUDA); `drain(step)` waits for every copy still in flight and returns those
    windows too. Only a copy started a whole window ago is ever waited for.
    """

    def __init__(self, lstms: dict):
        self.lstms = lstms
        self._inflight: dict = {}  # LSTM name -> (first, last) of the window whose copy is in flight

    def close(self, first: int, last: int) -> list:
        closed = []
        for name, lstm in self.lstms.items():
            tel = lstm.telemetry
            previous = self._inflight.pop(name, None)
            tel.wait()  # the copy started a whole window ago: keeps boundaries at fixed steps
            snap = tel.poll(reset=True)
            if previous is not None:  # CUDA: poll returned the window captured at the previous boundary
                closed.append((name, *previous, snap))
            elif snap is not None:  # CPU: the copy is synchronous, poll returned this window
                closed.append((name, first, last, snap))
            if tel.in_flight:
                self._inflight[name] = (first, last)
        return closed

    def drain(self, step: int) -> list:
        closed = []
        for name, (first, last) in list(self._inflight.items()):
            tel = self.lstms[name].telemetry
            tel.wait()
            closed.append((name, first, last, tel.poll(reset=True)))
            del self._inflight[name]
            if tel.in_flight:  # that poll started a copy of the empty window since the boundary
                self._inflight[name] = (step, step - 1)
        return closed


def oldest_undecoded_step(step_count: int, every: int) -> int:
    """No window decoded from now on covers a step below this one (see UNDECODED_PERIODS)."""
    return step_count - UNDECODED_PERIODS * every


@contextlib.contextmanager
def telemetry_off(lstms: Iterable):
    """No telemetry from these LSTMs inside the block (their users' switches restored after it)."""
    saved = [(lstm.telemetry, lstm.telemetry.enabled) for lstm in lstms]
    for tel, _ in saved:
        tel.enabled = False
    try:
        yield
    finally:
        for tel, enabled in saved:
            tel.enabled = enabled
