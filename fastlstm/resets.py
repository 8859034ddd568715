"""State resets inside the loop (docs/resets.md): the user's `resets` mask, checked and turned into each direction's
`restarts`, the form the reference and the kernels take (fastlstm/reference.py).

  resets    what `LSTM.forward(..., resets=mask)` receives: [T, B] in the module's layout ([B, T] batch_first, [T]
            unbatched), bool or integer (nonzero: True), True where a step starts a new episode
  restarts  per direction, [T, B] bool in time-major order: True where the state entering step t is h0/c0
"""

from __future__ import annotations

import torch
from torch import Tensor


def time_major_resets(resets, x: Tensor, batched: bool, batch_first: bool, sorted_indices) -> Tensor:
    """The user's resets as a contiguous bool [T, B] in the order of x's sequences (x: the module's time-major
    padded input; sorted_indices: a PackedSequence's, whose sequences x holds in sorted order), with nn.LSTM's kinds
    of error for a wrong one: TypeError for a non-tensor, RuntimeError for a wrong dtype, device or shape."""
    if not isinstance(resets, torch.Tensor):
        raise TypeError(f"LSTM: resets must be a Tensor or None, got {type(resets).__name__}")
    if resets.dtype.is_floating_point or resets.dtype.is_complex:
        raise RuntimeError(f"LSTM: resets must be a bool or integer tensor, got {resets.dtype}")
    if resets.device != x.device:
        raise RuntimeError(f"LSTM: resets is on {resets.device} but input is on {x.device}")
    steps, batch = x.shape[0], x.shape[1]
    if batched:
        expected = (batch, steps) if batch_first else (steps, batch)
        layout = "[batch, time] (batch_first)" if batch_first else "[time, batch]"
    else:
        expected, layout = (steps,), "[time] (unbatched input)"
    if tuple(resets.shape) != expected:
        raise RuntimeError(f"LSTM: Expected resets of shape {list(expected)} {layout}, got {list(resets.shape)}")
    if not batched:
        resets = resets.unsqueeze(1)
    elif batch_first:
        resets = resets.t()
    if sorted_indices is not None:
        resets = resets.index_select(1, sorted_indices)
    return (resets if resets.dtype == torch.bool else resets != 0).contiguous()


def direction_restarts(resets: Tensor | None, num_directions: int) -> tuple:
    """(direction 0's restarts, direction 1's or None) from the time-major resets [T, B].

    Direction 0 restarts where a step starts an episode. Direction 1 walks time backwards, so an episode boundary
    before step t is met after step t, when entering step t - 1: it restarts at the last step of each episode."""
    if resets is None:
        return (None, None)
    if num_directions == 1:
        return (resets, None)
    backwards = torch.cat((resets[1:], torch.zeros_like(resets[:1])))
    return (resets, backwards)
