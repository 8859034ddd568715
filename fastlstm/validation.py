"""The trainer's validation walk: a model run over streams by chunks, without gradients, as training runs it.

Kept apart from the training loop (tbptt.py) because it shares none of its state: no window, no carried start
state across calls, no optimizer. What it shares is how a chunk is cut: streams that ended leave the batch, padding
is zeroed and packed away from every recurrent module (padding.py), and the loss is taken on valid positions only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .padding import RecurrentLengths, without_padding
from .streams import Layout, Streams, select_rows


def loss_sums(
    model, batches: list[Streams], chunk: int, layout: Layout, lengths: RecurrentLengths, loss_fn: Callable, check
) -> tuple:
    """(sum of loss_fn × positions as a float64 device tensor, number of positions) over every batch of streams,
    each walked in chunks of `chunk` steps from a zero state. `check` turns the model's result into (outputs,
    state), raising where it is not one. Call it under torch.no_grad()."""
    total, count = None, 0
    for streams in batches:
        state, alive = None, None
        device = streams.inputs.device
        for s in range(0, streams.longest, chunk):
            rows = [b for b, length in enumerate(streams.lengths) if length > s]
            if state is not None and rows != alive:
                state = select_rows(state, layout.row_index([alive.index(b) for b in rows], device))
            alive = rows
            index = None if len(rows) == len(streams.lengths) else layout.row_index(rows, device)
            n = min(chunk, max(streams.lengths[b] for b in rows) - s)
            valid = [min(streams.lengths[b] - s, n) for b in rows]
            x = without_padding(layout.slice(streams.inputs, index, s, s + n), valid, layout.batch_first)
            with lengths(valid, n):
                out, state = check(model(x, state))
            pred, target = layout.flatten(out), layout.flatten(layout.slice(streams.targets, index, s, s + n))
            if min(valid) < n:
                flat = layout.flat_index(valid, n, device)
                pred, target = pred.index_select(0, flat), target.index_select(0, flat)
            positions = sum(valid)
            part = loss_fn(pred, target).detach().to(torch.float64) * positions
            total = part if total is None else total + part
            count += positions
    return total, count
