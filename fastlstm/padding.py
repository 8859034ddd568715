"""Steps past a stream's end: kept out of every computation of a training step (docs/training.md, "Variable
lengths").

A batch of streams of different lengths is padded to a common length, and the padding may hold anything: zeros,
NaN for readings that never came, inf. Dropping those positions from the loss is not enough: a NaN that enters
the model's forward reaches the gradient through products with zero (0 × NaN = NaN, in the weight-gradient GEMMs
over all T·B positions and in any layer before the LSTM). So the trainer, for a window where some stream ends:

  1. replaces the padding of the inputs by zeros (`without_padding`) before the model sees them, so no value
     placed there can reach any operation of the model, forward or backward;
  2. runs every recurrent module of the model on that window as a PackedSequence of the streams' lengths
     (`RecurrentLengths`): each stream's recurrence stops at its own last step, as torch.nn.LSTM does for packed
     input, so the state, the telemetry and the input statistics see real steps only, and the output is handed back
     padded (zeros past each end), as the model expects it.

Both happen with host integers and non-blocking index copies: no synchronisation with the device.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence


def valid_mask(valid: list, steps: int, batch_first: bool, device) -> torch.Tensor:
    """Bool mask of a [rows, steps] (batch_first) or [steps, rows] window: True at the first valid[b] steps of b."""
    mask = torch.arange(steps).unsqueeze(0) < torch.tensor(valid).unsqueeze(1)
    mask = mask if batch_first else mask.t()
    return mask.to(device, non_blocking=True)


def without_padding(x: torch.Tensor, valid: list, batch_first: bool) -> torch.Tensor:
    """x (a window [rows, steps, ...] or [steps, rows, ...]) with zeros past each row's first valid[b] steps; x
    itself when no row has padding. Never modifies x (it may be a view of the caller's data)."""
    steps = x.shape[1] if batch_first else x.shape[0]
    if min(valid) >= steps:
        return x
    mask = valid_mask(valid, steps, batch_first, x.device)
    mask = mask.view(*mask.shape, *([1] * (x.dim() - 2)))
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


class RecurrentLengths:
    """Makes every recurrent module inside a model (nn.RNNBase: fastlstm.LSTM, torch.nn.LSTM, GRU, RNN) run a padded
    window as a PackedSequence of given lengths, through forward hooks installed only while the context is open.

    A module is packed when its input is a 3-D tensor with the window's batch and time sizes in the module's own
    layout (batch_first); any other input (already packed, unbatched, another time axis) passes untouched. The
    packing hook runs before every other pre-hook, so that input statistics see the packed data only.
    """

    def __init__(self, model: nn.Module):
        self.modules = [m for m in model.modules() if isinstance(m, nn.RNNBase)]
        self._orders: dict = {}

    @contextlib.contextmanager
    def __call__(self, lengths: list | None, steps: int):
        if lengths is None or min(lengths) >= steps or not self.modules:
            yield
            return
        packed_calls: list = []  # one entry per packed call still inside its forward: (module, unsort index)
        handles = []

        def pack(module, args, kwargs):
            x = args[0] if args else kwargs.get("input")
            if not isinstance(x, torch.Tensor) or x.dim() != 3:
                return None
            rows, time = (x.shape[0], x.shape[1]) if module.batch_first else (x.shape[1], x.shape[0])
            if rows != len(lengths) or time != steps:
                return None
            packed = self._pack(x, lengths, module.batch_first)
            packed_calls.append((module, packed.unsorted_indices))
            if args:
                return (packed, *args[1:]), kwargs
            return args, {**kwargs, "input": packed}

        def unpack(module, args, output):
            if not packed_calls or packed_calls[-1][0] is not module:
                return None
            _, unsort = packed_calls.pop()
            out, *rest = output
            padded, _ = pad_packed_sequence(
                PackedSequence(out.data, out.batch_sizes), batch_first=module.batch_first, total_length=steps
            )
            padded = padded.index_select(0 if module.batch_first else 1, unsort)
            return (padded, *rest)

        try:
            for module in self.modules:
                handles.append(module.register_forward_pre_hook(pack, with_kwargs=True, prepend=True))
                handles.append(module.register_forward_hook(unpack, prepend=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _pack(self, x: torch.Tensor, lengths: list, batch_first: bool) -> PackedSequence:
        """pack_padded_sequence(enforce_sorted=False) without its host synchronisations: the order is computed from
        the host lengths and its index tensors are copied to the device without waiting."""
        sorted_index, unsort_index, sorted_lengths = self._order(lengths, x.device)
        x = x.index_select(0 if batch_first else 1, sorted_index)
        data, batch_sizes, _, _ = pack_padded_sequence(x, sorted_lengths, batch_first=batch_first)
        return PackedSequence(data, batch_sizes, sorted_index, unsort_index)

    def _order(self, lengths: list, device) -> tuple:
        key = (tuple(lengths), device)
        if key not in self._orders:
            order = sorted(range(len(lengths)), key=lambda b: -lengths[b])  # stable: ties keep their order
            unsort = [0] * len(order)
            for position, b in enumerate(order):
                unsort[b] = position
            self._orders = {key: (_index(order, device), _index(unsort, device), [lengths[b] for b in order])}
        return self._orders[key]


def _index(values: list, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)


def dropout_between_layers(layer_output: torch.Tensor, p: float, lengths: torch.Tensor | None) -> torch.Tensor:
    """Dropout on a layer's output [T, B, F] before the next layer, with the masks nn.LSTM draws from the same
    generator. nn.LSTM's op drops a padded input's whole tensor but a PackedSequence's data only (the steps each
    sequence has), so with `lengths` (host int64, sorted longest first, as the module passes them) the draw is made
    on the packed rows and the result padded again: zeros past each end, as the output had."""
    if lengths is None:
        return F.dropout(layer_output, p, training=True)
    packed = pack_padded_sequence(layer_output, lengths)
    dropped = F.dropout(packed.data, p, training=True)
    return pad_packed_sequence(PackedSequence(dropped, packed.batch_sizes), total_length=layer_output.shape[0])[0]
