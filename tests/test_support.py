"""The shared helpers themselves: the host-read guard catches reads (so the tests that rely on it can fail), the
relative error follows its documented conventions, and the benchmark's gate uses the suite's budgets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from support import HOST_READS, HostReadGuard, rel_err, tolerance

from fastlstm.bench.providers import THRESHOLDS


def _deliberate_reads(t: torch.Tensor) -> None:
    t.sum().item()
    t.cpu()


def test_host_read_guard_catches_a_deliberate_item_and_cpu():
    t = torch.randn(3)
    with HostReadGuard() as guard:
        assert guard.reads == []  # the self-check's own reads are not counted
        _deliberate_reads(t)
        bool(t[0] > 0)
    assert guard.reads == ["item", "cpu", "__bool__"]


def test_host_read_guard_skips_allowed_storage_only():
    meta, data = torch.tensor([3, 2, 1]), torch.ones(2)
    with HostReadGuard() as guard:
        guard.allow(meta)
        meta.tolist(), int(meta[0])  # a view of meta shares its storage
        data.tolist()
    assert guard.reads == ["tolist"]


def test_host_read_guard_restores_the_tensor_methods():
    before = {name: torch.Tensor.__dict__.get(name) for name in HOST_READS}
    with HostReadGuard() as guard:
        pass
    assert {name: torch.Tensor.__dict__.get(name) for name in HOST_READS} == before
    torch.ones(()).item()
    assert guard.reads == []


def test_host_read_guard_refuses_to_start_when_a_read_is_not_intercepted():
    class Partial(HostReadGuard):
        def _install(self, names):
            super()._install([n for n in names if n != "cpu"])

    before = torch.Tensor.__dict__.get("item")
    with pytest.raises(AssertionError, match="missed reads"), Partial():
        pass
    assert torch.Tensor.__dict__.get("item") is before  # and it left nothing installed


def test_rel_err_is_the_float64_norm_ratio():
    a, b = torch.randn(4, 5, dtype=torch.float32), torch.randn(4, 5, dtype=torch.float32)
    want = np.linalg.norm(a.double().numpy() - b.double().numpy()) / np.linalg.norm(b.double().numpy())
    assert rel_err(a, b) == pytest.approx(want, rel=1e-12)


def test_rel_err_of_a_zero_reference_is_the_absolute_error():
    actual = torch.tensor([3.0, 4.0])
    assert rel_err(actual, torch.zeros(2)) == pytest.approx(5.0)
    assert rel_err(torch.zeros(2), torch.zeros(2)) == 0.0


@pytest.mark.parametrize("actual", [None, torch.ones(3), torch.tensor([1.0, math.nan]), torch.tensor([math.inf, 1])])
def test_rel_err_of_a_missing_misshapen_or_non_finite_result_is_inf(actual):
    assert rel_err(actual, torch.ones(2)) == math.inf


def test_the_benchmark_gate_uses_the_suites_budgets():
    assert {key: tolerance(key) for key in THRESHOLDS} == THRESHOLDS
    assert tolerance(torch.float32) == tolerance("fp32") and tolerance(torch.bfloat16) == tolerance("bf16")
    with pytest.raises(KeyError, match="no tolerance"):
        tolerance(torch.int32)
