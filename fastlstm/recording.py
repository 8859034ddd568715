"""What a Monitor measures on the device between two windows, and where the LSTMs of a model are.

`DeviceMoments` accumulates per-feature moments of what each LSTM receives (and of the targets), `StateCarry` counts
how each LSTM pass was started; both use device operations only, and are read at window boundaries through the
deferred reads (windows.py). Pooled statistics read back from a history are `history_view.FeatureStats`, a
different thing: this module is the writing side.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from .module import LSTM


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DistributedDataParallel / DataParallel wrappers, so names stay the same."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def named_lstms(model: nn.Module) -> dict:
    """{module path: fastlstm.LSTM} inside `model`, unwrapped (the names the Monitor records); the model itself, if it
    is one, is called "lstm". (`fastlstm.init.find_lstms` is the plain list, for initialisers.)"""
    return {name or "lstm": m for name, m in unwrap_model(model).named_modules() if isinstance(m, LSTM)}


class DeviceMoments:
    """Per-feature count, sum, sum of squares, min and max of vectors, accumulated with device operations only.

    The count is a host integer (it only depends on shapes). Sums are float64 so that long windows stay exact
    enough for a standard deviation. A change in the number of features closes the current accumulation.
    """

    def __init__(self):
        self.count = 0
        self.moments = None  # float64 [4, F]: sum, sum of squares, min, max
        self.closed: list = []  # (count, moments) closed early by a change of feature count

    def add(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        x = x.detach()
        x = x.reshape(-1, x.shape[-1] if x.dim() > 1 else 1).to(torch.float64)
        current = torch.stack((x.sum(0), (x * x).sum(0), x.amin(0), x.amax(0)))
        if self.moments is not None and self.moments.shape != current.shape:
            self.closed.append((self.count, self.moments))
            self.count, self.moments = 0, None
        if self.moments is None:
            self.moments = current
        else:
            m = self.moments
            # torch.minimum/maximum propagate NaN, so a NaN input shows in min/max as it does in the sums.
            self.moments = torch.stack(
                (m[0] + current[0], m[1] + current[1], torch.minimum(m[2], current[2]), torch.maximum(m[3], current[3]))
            )
        self.count += x.shape[0]

    def take(self) -> list:
        """[(count, moments)] accumulated since the previous take, and start again."""
        taken = self.closed + ([(self.count, self.moments)] if self.count else [])
        self.count, self.moments, self.closed = 0, None, []
        return taken


class StateCarry:
    """Per window: how many training passes of one LSTM were given an initial state, how many of those states
    still carried an autograd graph (the gradient flows into the previous chunk), and, on the device, how many
    were not all zeros (a state carried over, not a fresh one passed explicitly)."""

    def __init__(self):
        self.passes = self.with_state = self.attached = self.timesteps = 0
        self.nonzero = None  # device count

    def add(self, hx, timesteps: int) -> None:
        self.passes += 1
        self.timesteps = max(self.timesteps, timesteps)
        states = [t for t in (hx if isinstance(hx, (tuple, list)) else [hx]) if isinstance(t, torch.Tensor)]
        if not states:
            return
        self.with_state += 1
        self.attached += int(any(t.grad_fn is not None for t in states))
        flag = torch.stack([(t.detach() != 0).any() for t in states]).any().to(torch.int64)
        self.nonzero = flag if self.nonzero is None else self.nonzero + flag

    def take(self):
        """(entry without nonzero_state, device count of nonzero states or None) since the last take, or None."""
        if not self.passes:
            return None
        entry = {
            "passes": self.passes,
            "with_state": self.with_state,
            "attached_state": self.attached,
            "timesteps": self.timesteps,
        }
        taken = (entry, self.nonzero)
        self.passes = self.with_state = self.attached = self.timesteps = 0
        self.nonzero = None
        return taken


def describe_lstm(lstm: LSTM) -> dict:
    return {
        "input_size": lstm.input_size,
        "hidden_size": lstm.hidden_size,
        "proj_size": lstm.proj_size,
        "num_layers": lstm.num_layers,
        "num_directions": 2 if lstm.bidirectional else 1,
    }


def current_grad_norm(params: list):
    grads = [p.grad for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else None


def trained_parameters(model: nn.Module, optimizer) -> list:
    """The parameters the optimizer updates (the model's that require grad without one), each once."""
    if optimizer is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    return list({id(p): p for p in params}.values())


def timesteps(x, batch_first: bool) -> int:
    if isinstance(x, PackedSequence):
        return int(x.batch_sizes.numel())
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        return 0
    return int(x.shape[1] if (batch_first and x.dim() == 3) else x.shape[0])
