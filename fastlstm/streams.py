"""Streams, chunks and recurrent state for truncated BPTT: the data model of the trainer (tbptt.py).

A batch of streams is rows of long sequences with their lengths; a chunk is k1 new steps and the window of k2 steps
that ends with them; `StreamCursor` is where training stands; the state helpers work on any nest of tensors in
nn.LSTM's layout (batch on dimension 1). Nothing here knows the model, the optimizer or the Monitor.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable
from typing import NamedTuple

import torch


class Streams(NamedTuple):
    """One batch of streams: every row of `inputs`/`targets` is one long sequence, `lengths[b]` steps long."""

    inputs: torch.Tensor
    targets: torch.Tensor
    lengths: list  # host ints

    @property
    def longest(self) -> int:
        return max(self.lengths)


class Chunk(NamedTuple):
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


_DATA_FORM = "data must be one (inputs, targets[, lengths]) tuple of tensors or a sequence of such tuples"


def _is_tensor(t) -> bool:
    return isinstance(t, torch.Tensor)


def _whole_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and float(v).is_integer()


def _describe(item) -> str:
    if isinstance(item, (tuple, list)):
        return f"a {type(item).__name__} of {len(item)} ({', '.join(type(t).__name__ for t in item)})"
    return f"a {type(item).__name__}"


def as_batches(data, batch_first: bool) -> list:
    """Normalise `(inputs, targets[, lengths])` or a sequence of such tuples into a list of `Streams`."""
    if isinstance(data, (tuple, list)) and data and isinstance(data[0], torch.Tensor):  # one batch
        if not 2 <= len(data) <= 3:
            raise TypeError(f"{_DATA_FORM}, got {_describe(data)}")
        data = [data]
    if isinstance(data, torch.Tensor):
        raise TypeError(_DATA_FORM + ", got one tensor")
    batches = []
    for item in data:
        if not (isinstance(item, (tuple, list)) and 2 <= len(item) <= 3 and all(_is_tensor(t) for t in item[:2])):
            raise TypeError(f"{_DATA_FORM}, got {_describe(item)}")
        inputs, targets, *rest = item
        lengths = rest[0] if rest else None
        if inputs.dim() < 2 or targets.dim() < 2:
            raise ValueError("inputs and targets need a batch and a time dimension")
        rows, steps = (inputs.shape[0], inputs.shape[1]) if batch_first else (inputs.shape[1], inputs.shape[0])
        if rows == 0 or steps == 0:
            layout = "[batch, time, ...]" if batch_first else "[time, batch, ...]"
            raise ValueError(f"no streams or no steps to train on: inputs {tuple(inputs.shape)}, laid out {layout}")
        if tuple(targets.shape[:2]) != tuple(inputs.shape[:2]):
            raise ValueError(f"targets {tuple(targets.shape)} do not match inputs {tuple(inputs.shape)} in batch/time")
        if lengths is None:
            lengths = [steps] * rows
        else:  # read once, before training: lengths belong on the host
            values = lengths.tolist() if isinstance(lengths, torch.Tensor) else list(lengths)
            if not all(_whole_number(v) for v in values):
                raise ValueError(f"lengths must be whole numbers of steps, got {values}")
            lengths = [int(v) for v in values]
            if len(lengths) != rows or min(lengths) < 1 or max(lengths) > steps:
                raise ValueError(f"lengths must be {rows} values in [1, {steps}]")
        batches.append(Streams(inputs, targets, lengths))
    if not batches:
        raise ValueError("no data")
    return batches


def map_tensors(fn: Callable, obj):
    """Apply `fn` to every tensor of a nested tuple/list/dict (a model's recurrent state)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(map_tensors(fn, v) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(fn, v) for v in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(fn, v) for k, v in obj.items()}
    return obj


def tensors_of(obj) -> list:
    found = []
    map_tensors(found.append, obj)
    return found


def detach_state(state):
    return map_tensors(lambda t: t.detach(), state)


def select_rows(state, index: torch.Tensor):
    """Keep the rows `index` of a state in nn.LSTM's layout (batch on dimension 1)."""
    return map_tensors(lambda t: t.index_select(1, index) if t.dim() >= 2 else t, state)


def reset_nonfinite_rows(state):
    """Rows (streams) whose state holds a NaN/inf restart from zeros, as at the start of a stream: a poisoned
    input would otherwise poison every later chunk of that stream. Device operations only."""
    tensors = [t for t in tensors_of(state) if t.dim() >= 2 and t.is_floating_point()]
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

    return map_tensors(fix, state)


@dataclasses.dataclass
class StreamCursor:
    """Where training stands in the data: the epoch, the batch (its index in the epoch's order), the time step
    within that batch's streams, and what the next window starts from (its first step, the rows still alive, the
    carried state). A checkpoint's "position" is exactly this."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    rows: list | None = None  # rows of the current batch carried in start_state (None: all)
    window_start: int = 0
    start_state: object = None

    def next_batch(self) -> None:
        self.batch, self.step = self.batch + 1, 0
        self.reset_streams()

    def next_epoch(self) -> None:
        self.epoch, self.batch, self.step = self.epoch + 1, 0, 0
        self.reset_streams()

    def reset_streams(self) -> None:
        self.rows, self.window_start, self.start_state = None, 0, None

    def align_rows(self, rows: list, device) -> None:
        """Streams that ended leave the batch: drop their rows from the carried state."""
        if self.rows is None:  # first chunk of this batch of streams: every row is alive
            self.rows = list(rows)
            return
        if rows == self.rows:
            return
        keep = [self.rows.index(b) for b in rows]
        if self.start_state is not None:
            self.start_state = select_rows(self.start_state, torch.tensor(keep).to(device, non_blocking=True))
        self.rows = list(rows)

    def state_dict(self, chunks: int) -> dict:
        return {
            "pos": [self.epoch, self.batch, self.step],
            "chunks": chunks,
            "rows": self.rows,
            "start_pos": self.window_start,
            "start_state": self.start_state,
        }

    def load_state_dict(self, state: dict) -> int:
        """Restore the position; returns the chunk count saved with it."""
        self.epoch, self.batch, self.step = (int(v) for v in state["pos"])
        self.rows, self.window_start = state["rows"], int(state["start_pos"])
        self.start_state = state["start_state"]
        return int(state["chunks"])


class Layout:
    """Slicing in the data's layout (batch_first or time-major): time ranges, rows, flattening to positions."""

    def __init__(self, batch_first: bool):
        self.batch_first = bool(batch_first)
        self._row_index_cache: dict = {}

    def time(self, t: torch.Tensor, a: int, b: int) -> torch.Tensor:
        return t[:, a:b] if self.batch_first else t[a:b]

    def slice(self, t: torch.Tensor, index, a: int, b: int) -> torch.Tensor:
        t = self.time(t, a, b)
        return t if index is None else t.index_select(0 if self.batch_first else 1, index)

    @staticmethod
    def flatten(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, *t.shape[2:])

    def flat_index(self, valid: list, n: int, device) -> torch.Tensor:
        """Flat positions (in the layout `flatten` produces) of the steps inside each stream."""
        rows = len(valid)
        if self.batch_first:
            flat = [b * n + t for b in range(rows) for t in range(valid[b])]
        else:
            flat = [t * rows + b for t in range(n) for b in range(rows) if t < valid[b]]
        return torch.tensor(flat, dtype=torch.int64).to(device, non_blocking=True)

    def row_index(self, rows: list, device) -> torch.Tensor:
        key = (tuple(rows), device)
        if key not in self._row_index_cache:
            self._row_index_cache = {key: torch.tensor(rows).to(device, non_blocking=True)}
        return self._row_index_cache[key]
