"""Which implementation runs a pass (routing.py), and the autocast dtype rule."""

import pytest
import torch
from support import assert_rel, tolerance
from torch import nn

import fastlstm
from fastlstm import constants as C
from fastlstm import fused_step, reference, routing


def test_auto_records_natively_on_the_cpu_and_on_the_reference_for_16_bit_and_cuda_float64():
    assert routing.choose("auto", torch.device("cpu"), torch.float32) == routing.NATIVE_RECORDED
    assert routing.choose("auto", torch.device("cpu"), torch.bfloat16) == "reference"
    assert routing.choose("auto", torch.device("cuda"), torch.float64) == "reference"
    assert routing.time_loops("reference") is reference


@pytest.mark.parametrize(
    "dtype,proj_size,packed,library,expected",
    [
        (torch.float32, 0, False, True, "reference"),
        (torch.float32, 0, False, False, routing.NATIVE_RECORDED),
        (torch.float32, 0, True, True, routing.NATIVE_RECORDED),
        (torch.float32, 3, False, True, routing.NATIVE_RECORDED),
        (torch.float64, 0, False, True, routing.NATIVE_RECORDED),
    ],
    ids=["compiled-step", "no-library", "lengths", "projection", "float64"],
)
def test_auto_records_on_the_cpu_through_the_compiled_step_where_every_loop_takes_it(
    monkeypatch, dtype, proj_size, packed, library, expected
):
    monkeypatch.setattr(fused_step, "library", lambda: object() if library else None)
    shape = routing.PassShape(8, proj_size, 1, False, packed, 4, 10)
    assert routing.choose("auto", torch.device("cpu"), dtype, shape=lambda: shape) == expected
    assert routing.choose("auto", torch.device("cpu"), dtype, records_telemetry=False, shape=lambda: shape) == "native"


def test_unknown_backend_name_is_a_value_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        fastlstm.LSTM(3, 4, backend="cudnn")


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        routing.choose("triton", torch.device("cpu"), torch.float32)


def test_autocast_runs_in_the_autocast_dtype_and_stays_close_to_float32():
    ref = nn.LSTM(4, 8, num_layers=2)
    fast = fastlstm.LSTM(4, 8, num_layers=2)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(6, 3, 4)
    expected, _ = ref(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h_n, c_n) = fast(x)
    assert out.dtype == h_n.dtype == c_n.dtype == torch.bfloat16
    assert_rel(out.float(), expected, tolerance(torch.bfloat16), "bfloat16 autocast output against float32")
    out.float().sum().backward()
    assert fast.weight_hh_l0.grad.dtype == torch.float32  # master weights keep their dtype


@pytest.mark.parametrize("operand", ["input", "hx", "cx"])
def test_autocast_refuses_a_float64_operand_as_nn_lstm_does(operand):
    """Autocast leaves float64 tensors alone, so nn.LSTM fails when one meets the cast weights: fastlstm refuses
    the same mix with nn.LSTM's exception type instead of running it in bfloat16."""
    ref = nn.LSTM(4, 8)
    fast = fastlstm.LSTM(4, 8)
    fast.load_state_dict(ref.state_dict())
    x, h0, c0 = torch.randn(6, 3, 4), torch.zeros(1, 3, 8), torch.zeros(1, 3, 8)
    args = {"input": x, "hx": h0, "cx": c0}
    args[operand] = args[operand].double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError):
            ref(args["input"], (args["hx"], args["cx"]))
        with pytest.raises(RuntimeError, match=f"{operand} is torch.float64"):
            fast(args["input"], (args["hx"], args["cx"]))


def test_program_transforms_are_recognised_and_eager_passes_are_not():
    seen = []

    def note(x):
        seen.append(routing.program_transform())
        return x * 2

    note(torch.randn(3))
    torch.func.grad(lambda x: note(x).sum())(torch.randn(3))
    torch.jit.trace(note, torch.randn(3), check_trace=False)
    assert seen == [None, "torch.func", "tracing"]


@pytest.mark.parametrize("backend", ["auto", "reference", "native"])
def test_every_backend_runs_natively_under_a_program_transform(backend):
    eager = {"auto": routing.NATIVE_RECORDED, "reference": "reference", "native": "native"}
    assert routing.choose(backend, torch.device("cpu"), torch.float32) == eager[backend]
    chosen = []
    torch.func.grad(lambda x: chosen.append(routing.choose(backend, x.device, x.dtype)) or x.sum())(torch.randn(2))
    assert chosen == ["native"]


@pytest.mark.parametrize(
    "value, on",
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        ("on", True),
        ("y", True),
        ("Y", True),
        ("t", False),
        ("", False),
        ("0", False),
        ("2", False),
        ("false", False),
    ],
)
def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch, value, on):
    # triton 3.6 reads TRITON_INTERPRET as a boolean; where fastlstm read "2" or "false" as on, its CPU tensors
    # reached a triton that was not interpreting and failed there with a message about drivers.
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert C.triton_interpreter_on() is on
    triton_knobs = pytest.importorskip("triton.knobs")
    assert triton_knobs.runtime.interpret is on  # the list above is triton's reading, not ours
