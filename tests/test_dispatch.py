"""Which backend runs, and the autocast dtype rule."""

import pytest
import torch
from torch import nn

import fastlstm
from fastlstm import backends, reference


def test_auto_uses_the_reference_on_cpu_and_for_float64():
    assert backends.resolve("auto", torch.device("cpu"), torch.float32) == "reference"
    assert backends.resolve("auto", torch.device("cuda"), torch.float64) == "reference"
    assert backends.backend_module("reference") is reference


def test_unknown_backend_name_is_a_value_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        fastlstm.LSTM(3, 4, backend="cudnn")


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        backends.resolve("triton", torch.device("cpu"), torch.float32)


def test_autocast_runs_in_the_autocast_dtype_and_stays_close_to_float32():
    ref = nn.LSTM(4, 8, num_layers=2)
    fast = fastlstm.LSTM(4, 8, num_layers=2)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(6, 3, 4)
    expected, _ = ref(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h_n, c_n) = fast(x)
    assert out.dtype == h_n.dtype == c_n.dtype == torch.bfloat16
    err = (out.float() - expected).norm() / expected.norm()
    assert err < 2e-2
    out.float().sum().backward()
    assert fast.weight_hh_l0.grad.dtype == torch.float32  # master weights keep their dtype
