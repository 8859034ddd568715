"""Shared helpers for the CPU suite: seeding, reference/candidate module pairs, inputs and error measures.

Every check compares fastlstm against torch.nn.LSTM (or against math recomputed independently in the test), never
against numbers written into the tests.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastlstm


@pytest.fixture(autouse=True)
def _seed_per_case(request):
    """A fresh, reproducible random stream for every test case (seeded by the test id, so cases differ)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64 (absolute when expected is all zeros); NaN stays NaN."""
    assert actual is not None and expected is not None
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    actual, expected = actual.detach().double(), expected.detach().double()
    num = (actual - expected).norm()
    den = expected.norm()
    return float(num / den) if den > 0 else float(num)


def assert_rel(actual, expected, tol: float, what: str = "") -> None:
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def fast_like(ref: nn.LSTM, **kwargs) -> fastlstm.LSTM:
    """A fastlstm.LSTM with ref's configuration, dtype and (copied, not shared) weights."""
    kwargs.setdefault("backend", "reference")
    weight = ref.weight_ih_l0
    m = fastlstm.LSTM(
        ref.input_size, ref.hidden_size, ref.num_layers, ref.bias, ref.batch_first, ref.dropout,
        ref.bidirectional, ref.proj_size, dtype=weight.dtype, device=weight.device, **kwargs,
    )  # fmt: skip
    m.load_state_dict(ref.state_dict())
    return m.train(ref.training)


def make_pair(input_size, hidden_size, num_layers=1, *, dtype=torch.float64, weight_scale=None, **kwargs):
    """(nn.LSTM, fastlstm.LSTM(backend="reference")) with identical weights. weight_scale widens the default
    uniform(±1/sqrt(H)) init to uniform(±weight_scale) so that gates saturate."""
    ref = nn.LSTM(input_size, hidden_size, num_layers, dtype=dtype, **kwargs)
    if weight_scale is not None:
        with torch.no_grad():
            for p in ref.parameters():
                p.uniform_(-weight_scale, weight_scale)
    return ref, fast_like(ref)


def mixed_lengths(steps: int, batch: int, sorted_: bool) -> list[int]:
    """Random lengths in [1, steps] with the maximum present and not all equal; descending when sorted_,
    otherwise in an order that is not sorted (so enforce_sorted=False really permutes)."""
    assert batch >= 2 and steps >= 2
    rest = torch.randint(1, steps + 1, (batch - 2,)).tolist()
    lengths = sorted([steps, 1, *rest], reverse=True)
    if not sorted_:
        lengths = lengths[1:] + lengths[:1]  # the longest last: not descending
    return lengths


def pack(x: torch.Tensor, lengths, batch_first: bool, enforce_sorted: bool) -> PackedSequence:
    return pack_padded_sequence(x, torch.as_tensor(lengths), batch_first=batch_first, enforce_sorted=enforce_sorted)


def random_like_output(out):
    """Random weights with the shape of an LSTM output (tensor or PackedSequence data)."""
    data = out.data if isinstance(out, PackedSequence) else out
    return torch.randn_like(data)


def weighted_loss(out, h_n, c_n, weights):
    """A loss that uses the output and both final states with random weights, so every gradient path matters."""
    w_out, w_h, w_c = weights
    data = out.data if isinstance(out, PackedSequence) else out
    return (data * w_out).sum() + (h_n * w_h).sum() + (c_n * w_c).sum()


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def lstm_cell_step(lstm: nn.LSTM, layer: int, x_t: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple:
    """One step of torch.nn.LSTM's equations for one layer (forward direction, no projection), written out so that
    c_t is the single tensor feeding both h_t and the next step: after `retain_grad()` its gradient is the total
    ∂L/∂c_t (nn.LSTM's own c_n output misses the path through h_t, computed inside the op). x_t [B, I], h, c [B, H]."""
    w_ih, w_hh = getattr(lstm, f"weight_ih_l{layer}"), getattr(lstm, f"weight_hh_l{layer}")
    pre = x_t @ w_ih.t() + h @ w_hh.t()
    if lstm.bias:
        pre = pre + getattr(lstm, f"bias_ih_l{layer}") + getattr(lstm, f"bias_hh_l{layer}")
    i, f, g, o = pre.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c
