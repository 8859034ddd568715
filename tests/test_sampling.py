"""Sampled telemetry (instrument_every): uninstrumented steps run PyTorch's own LSTM op, non-finite values are still
caught on every step, and the steps after one that was not instrumented locate it."""

from __future__ import annotations

import copy

import pytest
import torch
from support import Forecaster, guarded_step
from torch import nn

import fastlstm
from fastlstm import module as module_impl

pytestmark = pytest.mark.usefixtures("single_cpu_thread")


def _model() -> Forecaster:
    return Forecaster(2, 1, 6, backend="auto")  # native wherever nothing is recorded


K1 = 4
DEAD = range(3 * K1 + 1, 8 * K1 - 1)  # a sensor that died: stream 1 is NaN over chunks 3-7
ONE_OFF = 13 * K1 + 2  # and a single NaN sample in chunk 13, which never recurs


def _streams():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 20 * K1, 2, generator=g)
    y = torch.randn(3, 20 * K1, 1, generator=g)
    x[1, DEAD.start : DEAD.stop, 0] = float("nan")
    x[2, ONE_OFF, 1] = float("nan")
    return x, y


@pytest.fixture
def native_steps(monkeypatch):
    """How many LSTM passes ran natively."""
    calls = []
    original = module_impl.native.lstm
    monkeypatch.setattr(module_impl.native, "lstm", lambda *a: calls.append(1) or original(*a))
    return calls


def test_a_nan_on_an_uninstrumented_step_is_skipped_and_located_by_the_steps_after_it(native_steps):
    torch.manual_seed(0)
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    trainer = fastlstm.TBPTTTrainer(
        model, opt, nn.MSELoss(), k1=K1, telemetry_every=2, read_every=2, instrument_every=10, dependency_lags=0
    )
    data = _streams()
    trainer.fit(data, max_chunks=3)
    before = copy.deepcopy(model.state_dict())
    trainer.fit(data, max_chunks=1)  # chunk 3: the first with the dead sensor, not instrumented
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # skipped on the device: bit-identical
    history = trainer.fit(data)

    steps = history.steps
    assert [s["step"] for s in steps if s["skipped"]] == [3, 4, 5, 6, 7, 13]
    # Steps 0 and 10 by the schedule; 6 and 7 hunt for the NaN of step 3 (its flag is read two boundaries later)
    # and 16, 17 for the one of step 13, which does not recur.
    assert [s["step"] for s in steps if s["instrumented"]] == [0, 6, 7, 10, 16, 17]
    assert history.extra["sampling"] == {"instrument_every": 10}
    # Every uninstrumented step ran PyTorch's own op: one training pass per chunk, plus the carry pass (none here).
    assert len(native_steps) == 20 - 6
    hunts = [(e["kind"], e["step"], e["detail"].get("located")) for e in history.events if "hunt" in e["kind"]]
    assert hunts == [
        ("telemetry_hunt", 6, None),
        ("telemetry_hunt_end", 7, True),
        ("telemetry_hunt", 16, None),
        ("telemetry_hunt_end", 17, False),
    ]
    events = {e["step"]: e["detail"] for e in history.events_of("nonfinite_step_skipped")}
    first = events[3]
    assert first["instrumented"] is False and first["located_in_window"] == [6, 7]
    where = first["first_nonfinite"]
    assert (where["lstm"], where["layer"], where["stage"], where["tensor"]) == ("lstm", 0, "forward", "input")
    assert events[6].get("instrumented", True) and events[6]["first_nonfinite"]["tensor"] == "input"
    assert events[13]["instrumented"] is False and events[13]["first_nonfinite"] is None
    windows = [(e["first_step"], e["step"], e["instrumented_steps"]) for e in history.telemetry]
    assert windows == [(0, 1, 1), (6, 7, 2), (10, 11, 1), (16, 17, 2)]
    # The doctor reads it as a history: a data fault, located.
    (finding,) = [f for f in fastlstm.diagnose(history) if f.code == "non_finite"]
    assert finding.evidence["data_fault"] and finding.evidence["first_location"]["tensor"] == "input"


def test_a_plain_loop_with_a_sampling_monitor_records_every_loss_and_samples_telemetry(native_steps):
    torch.manual_seed(1)
    lstm = fastlstm.LSTM(3, 5)
    twin = copy.deepcopy(lstm)  # every step recorded: what the instrumented steps must match
    opt, twin_opt = (torch.optim.SGD(m.parameters(), lr=0.05) for m in (lstm, twin))
    monitor = fastlstm.Monitor(lstm, optimizer=opt, every=4, instrument_every=2)
    twin_windows, losses = [], []
    for step in range(8):
        x = torch.randn(6, 2, 3)
        for m, o in ((lstm, opt), (twin, twin_opt)):
            assert m is twin or monitor.instrumented == (step % 2 == 0)
            loss = m(x)[0].square().mean()
            o.zero_grad()
            loss.backward()
            o.step()
            if m is lstm:
                losses.append(float(loss.detach()))
                monitor.step(loss=loss.detach())
            elif step % 2 == 0:
                twin_windows.append(twin.telemetry.snapshot(reset=True))
            else:
                twin.telemetry.reset()
    history = monitor.history
    assert [s["loss"] for s in history.steps] == pytest.approx(losses, rel=1e-5)
    assert [s["instrumented"] for s in history.steps] == [True, False] * 4
    assert len(native_steps) == 4
    for entry, pair in zip(history.telemetry, (twin_windows[:2], twin_windows[2:])):
        assert entry["instrumented_steps"] == 2
        layer = entry["snapshot"]["layers"][0]
        assert layer["elements"] == sum(w.layers[0].elements for w in pair)
        assert layer["backward_passes"] == [2] * 6
    monitor.close()
    assert not lstm.telemetry.suspended


@pytest.mark.parametrize("interruption", ["read", "resume"])
def test_a_read_or_a_resume_while_a_hunt_is_open_keeps_the_skipped_steps_location(interruption):
    """From step 13 on every input is NaN; step 13 is uninstrumented, so the hunt after it locates the NaN. A history
    read (or a checkpoint, and a resumed Monitor) at step 14 must not close the step's event without it."""

    def run(stop_at=None):
        torch.manual_seed(0)
        model = fastlstm.LSTM(2, 3)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        guard = fastlstm.tbptt.StepGuard(opt)
        monitor = fastlstm.Monitor(model, optimizer=opt, every=4, instrument_every=4)
        for step in range(32):
            x = torch.randn(4, 2, 2)
            if step >= 13:
                x[1, 0, 0] = float("nan")
            guarded_step(model, opt, guard, monitor, x)
            if step == stop_at and interruption == "read":
                monitor.flush()  # what reading monitor.history does
            elif step == stop_at:
                state = monitor.state_dict()
                monitor.close()
                monitor = fastlstm.Monitor(model, optimizer=opt, every=4, instrument_every=4)
                monitor.load_state_dict(state)
        events = monitor.history.events
        return next(e for e in events if e["kind"] == "nonfinite_step_skipped" and e["step"] == 13)["detail"]

    uninterrupted, interrupted = run(), run(stop_at=14)
    assert uninterrupted["first_nonfinite"]["tensor"] == "input" and not uninterrupted["instrumented"]
    assert interrupted["first_nonfinite"] == uninterrupted["first_nonfinite"]
    assert "located_in_window" in interrupted


@pytest.mark.parametrize(
    "flag, loss",
    [
        (True, 1.0),
        (torch.tensor(True), 1.0),
        (1, 1.0),
        (torch.tensor(1.0), 1.0),  # GradScaler's found_inf: a float tensor that is 1.0 for a skipped step
        (False, torch.tensor(float("inf"))),
        (False, float("nan")),
    ],
    ids=["bool", "bool-tensor", "int", "float-tensor", "inf-loss", "nan-loss"],
)
def test_a_skip_or_a_non_finite_loss_on_an_uninstrumented_step_starts_a_hunt(flag, loss):
    model = fastlstm.LSTM(2, 3)
    monitor = fastlstm.Monitor(model, every=2, instrument_every=4)
    for step in range(12):
        model(torch.randn(3, 2, 2))[0].square().mean().backward()
        monitor.step(loss=loss if step == 1 else 1.0, skipped=flag if step == 1 else False)
    hunts = [e["step"] for e in monitor.history.events if e["kind"] == "telemetry_hunt"]
    assert hunts == [4]  # the boundary after the one that captured step 1's flag


def test_the_flag_moves_to_the_device_never_back_to_the_host():
    # A host loss first, a device norm after it: copying the device value to the host without waiting would read
    # it before it landed. The meta device stands in for an accelerator: a copy from it fails.
    sampler = fastlstm.sampling.Sampler(4, 2)
    sampler.watch(1.0, None, None)
    sampler.watch(None, torch.tensor(float("nan"), device="meta"), None)
    sampler.watch(float("nan"), None, False)
    assert sampler._flag.device.type == "meta"


def test_an_integer_loss_starts_no_hunt():
    model = fastlstm.LSTM(2, 3)
    monitor = fastlstm.Monitor(model, every=2, instrument_every=4)
    for _ in range(12):
        model(torch.randn(3, 2, 2))[0].square().mean().backward()
        monitor.step(loss=torch.tensor(3))
    assert not [e for e in monitor.history.events if e["kind"] == "telemetry_hunt"]


@pytest.mark.parametrize("name", ["instrument_every", "every", "read_every"])
def test_the_monitors_periods_must_be_positive_ints(name):
    with pytest.raises(ValueError, match=name):
        fastlstm.Monitor(fastlstm.LSTM(2, 3), **{name: 0})
    for bad in (2.5, True):  # 2.5 was taken as 2, True as 1
        with pytest.raises(TypeError, match=f"{name} must be an int"):
            fastlstm.Monitor(fastlstm.LSTM(2, 3), **{name: bad})
