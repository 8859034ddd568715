"""The per-step matrix products of the CPU loops (fastlstm/step_product.py): through oneDNN's reordered weight where
that pays, through torch.mm otherwise, the same products either way.

Held to float64 references: the products themselves against a float64 matmul, and float32 modules whose loops take
the reordered path (forced down to small shapes by lowering the thresholds, so every branch of the loops runs: the
projection, lengths, restarts, both directions) against a float64 nn.LSTM through autograd.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastlstm
from fastlstm import fused_step, step_product
from fastlstm.step_product import StepProduct

try:
    from support import (
        assert_float32_parity,
        assert_rel,
        assert_resets_parity,
        float32_pair,
        mixed_lengths,
        pack,
        random_resets,
        tolerance,
    )
except ImportError:  # tests/ turned into a package
    from tests.support import (
        assert_float32_parity,
        assert_rel,
        assert_resets_parity,
        float32_pair,
        mixed_lengths,
        pack,
        random_resets,
        tolerance,
    )

needs_onednn = pytest.mark.skipif(
    not step_product._packed_ops_available(), reason="this PyTorch build lacks oneDNN's linear ops"
)
F32 = tolerance(torch.float32)


@pytest.fixture
def packed_everywhere(monkeypatch):
    """Every product of a float32 CPU loop goes through the reordered weight, and the calls that do are counted. The
    loops are the PyTorch-op ones: the compiled loops (fused_step.py) compute their products themselves."""
    monkeypatch.setattr(fused_step, "library", lambda: None)
    monkeypatch.setattr(step_product, "PACKED_MIN_WEIGHT", 1)
    monkeypatch.setattr(step_product, "PACKED_MIN_STEPS", 1)
    calls = []
    original = StepProduct.__call__

    def counting(self, rows, addend=None, out=None):
        calls.append(self.packed is not None)
        return original(self, rows, addend, out)

    monkeypatch.setattr(StepProduct, "__call__", counting)
    return calls


@needs_onednn
@pytest.mark.parametrize("with_addend,into", [(False, None), (True, None), (True, "addend"), (True, "other")])
def test_a_reordered_product_is_the_product(with_addend, into):
    # 2048 x 256 (the weight threshold), a transposed view as the backward passes W_hh.
    matrix = torch.randn(256, 2048).t()
    rows, addend = torch.randn(5, 2048), torch.randn(5, 256)
    product = StepProduct(matrix, batch=5, steps=step_product.PACKED_MIN_STEPS)
    assert product.packed is not None
    expected = rows.double() @ matrix.double() + (addend.double() if with_addend else 0.0)
    out = {None: None, "addend": addend, "other": torch.empty(5, 256)}[into]
    got = product(rows, addend if with_addend else None, out=out)
    if out is not None:
        assert got.data_ptr() == out.data_ptr()
    assert_rel(got, expected, F32, "product")


def test_the_thresholds_decide_and_only_float32_on_the_cpu_is_reordered():
    large = torch.randn(2048, 256)  # the weight threshold
    enough = step_product.PACKED_MIN_STEPS
    assert StepProduct(large, 4, enough - 1).packed is None  # too few steps to earn the reorder back
    assert StepProduct(large[:, :255], 4, enough).packed is None  # just under the weight threshold
    assert StepProduct(large.double(), 4, enough).packed is None  # oneDNN has no float64 kernels here
    if step_product._packed_ops_available():
        assert StepProduct(large, 4, enough).packed is not None


@needs_onednn
@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize(
    "options,packed",
    [
        ({}, False),
        ({"bidirectional": True}, True),
        ({"proj_size": 5}, False),
        ({"proj_size": 5, "bidirectional": True}, True),
    ],
    ids=["plain", "bidirectional-packed", "projection", "projection-bidirectional-packed"],
)
def test_loops_through_reordered_weights_match_float64_nn_lstm(packed_everywhere, backend, options, packed):
    torch.manual_seed(0)
    ref, fast = float32_pair(backend, **options)
    steps, batch = 9, 4
    x = torch.randn(steps, batch, 6, dtype=torch.float64)
    to_input = None
    if packed:
        lengths = mixed_lengths(steps, batch, sorted_=False)
        to_input = lambda t: pack(t, lengths, False, False)
    assert_float32_parity(ref, fast, x, to_input)
    assert packed_everywhere and all(packed_everywhere), "every product of the loops took the reordered weight"


@needs_onednn
@pytest.mark.parametrize("proj_size", [0, 5])
def test_restarts_through_reordered_weights_match_float64_nn_lstm(packed_everywhere, proj_size):
    torch.manual_seed(1)
    ref = nn.LSTM(6, 12, proj_size=proj_size, bidirectional=True, dtype=torch.float64)
    fast = fastlstm.LSTM(6, 12, proj_size=proj_size, bidirectional=True, dtype=torch.float32)
    fast.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    steps, batch = 9, 4
    x = torch.randn(steps, batch, 6, dtype=torch.float64)
    hx = tuple(torch.randn(2, batch, size, dtype=torch.float64) for size in (proj_size or 12, 12))
    lengths = mixed_lengths(steps, batch, sorted_=False)
    assert_resets_parity(fast, ref, x, hx, random_resets(steps, batch), F32, lengths=lengths)
    assert packed_everywhere and all(packed_everywhere)


def test_without_onednn_the_loops_use_the_blas(packed_everywhere, monkeypatch):
    monkeypatch.setattr(step_product, "_packed_ops_available", lambda: False)
    ref, fast = float32_pair("reference", bidirectional=True)
    assert_float32_parity(ref, fast, torch.randn(9, 4, 6, dtype=torch.float64))
    assert packed_everywhere and not any(packed_everywhere)
