"""Monitor and History: the JSON format of docs/history.md, and what a plain training loop records, checked against
values the test computes itself (a twin model's own telemetry snapshots, numpy statistics of the inputs)."""

from __future__ import annotations

import copy
import json
import math
import os

import numpy as np
import pytest
import torch
from support import HostReadGuard, guarded_step
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fastlstm
from fastlstm.monitor import History, Monitor

pytestmark = pytest.mark.usefixtures("single_cpu_thread")


# ---- History ----


def _sample_history() -> History:
    h = History()
    h.lstms = {"enc": {"input_size": 3, "hidden_size": 4, "proj_size": 0, "num_layers": 1, "num_directions": 1}}
    h.steps = [
        {"step": 1, "loss": math.inf, "lr": None, "grad_norm": math.nan, "skipped": True},
        {"step": 0, "loss": 0.5, "lr": 0.1, "grad_norm": 1.5, "skipped": False},
    ]
    h.evals = [{"step": 1, "epoch": 1, "val_loss": -math.inf, "subset_losses": {"a": 0.25, "nan": math.nan}}]
    h.event(1, "nonfinite_step_skipped", {"first_nonfinite": None})
    h.event(0, "truncation", {"k1": 4, "k2": 4, "adaptive": False})
    h.add("custom_list", {"step": 3, "x": 1.0})
    h.add("custom_list", {"step": 2, "x": math.nan})
    h.extra["note"] = "kept"
    return h


def _same(a, b) -> bool:
    """Equality in which NaN equals NaN."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def test_history_json_roundtrip(tmp_path):
    h = _sample_history()
    path = tmp_path / "history.json"
    h.save(path)

    def no_constants(name):
        raise AssertionError(f"bare {name} in the JSON")

    raw = json.loads(path.read_text(), parse_constant=no_constants)  # strict JSON: no NaN/Infinity literals
    assert raw["format"] == "fastlstm.history/1"
    assert raw["steps"][0]["step"] == 0 and raw["steps"][1]["loss"] == "inf" and raw["steps"][1]["grad_norm"] == "nan"
    assert raw["evals"][0]["val_loss"] == "-inf" and raw["evals"][0]["subset_losses"]["nan"] == "nan"
    assert [e["kind"] for e in raw["events"]] == ["truncation", "nonfinite_step_skipped"]  # ordered by step
    assert [e["step"] for e in raw["custom_list"]] == [2, 3] and raw["note"] == "kept"

    loaded = History.load(path)
    assert loaded.steps[1]["loss"] == math.inf and math.isnan(loaded.steps[1]["grad_norm"])
    assert loaded.evals[0]["subset_losses"]["a"] == 0.25
    assert _same(loaded.to_dict(), h.to_dict())
    assert _same(History.from_dict(h.to_dict()).to_dict(), raw)
    with pytest.raises(ValueError):
        History.from_dict({"format": "something/else"})


def test_names_that_read_like_special_floats_stay_names(tmp_path):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.inf = fastlstm.LSTM(2, 3)  # a module attribute that happens to be called "inf"

        def forward(self, x):
            return self.inf(x)[0]

    model = Model()
    monitor = Monitor(model, every=2)
    for _ in range(2):
        model(torch.randn(4, 2, 2)).square().mean().backward()
        monitor.step(loss=float("nan"))
    history = monitor.history
    history.extra["feature_names"] = ["speed", "nan"]
    history.save(tmp_path / "h.json")
    loaded = History.load(tmp_path / "h.json")
    assert loaded.extra["feature_names"] == ["speed", "nan"]
    assert {entry["lstm"] for entry in loaded.telemetry} == {"inf"} == set(loaded.lstms)
    assert all(math.isnan(step["loss"]) for step in loaded.steps)  # the floats still come back as floats


def test_history_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "history.json"
    _sample_history().save(path)
    before = path.read_bytes()

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    h = _sample_history()
    h.steps.append({"step": 9, "loss": 0.0, "lr": None, "grad_norm": None, "skipped": False})
    with pytest.raises(OSError):
        h.save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["history.json"]  # no temporary file left behind


# ---- Monitor on a plain training loop ----


class EncoderDecoder(nn.Module):
    """Two LSTMs, the second fed a PackedSequence, to check naming and packed input statistics."""

    def __init__(self):
        super().__init__()
        self.enc = fastlstm.LSTM(3, 4, batch_first=True, backend="reference", dtype=torch.float64)
        self.dec = nn.Module()
        self.dec.lstm = fastlstm.LSTM(4, 5, batch_first=True, backend="reference", dtype=torch.float64)
        self.head = nn.Linear(5, 2, dtype=torch.float64)

    def forward(self, x, lengths):
        h, _ = self.enc(x)
        packed = pack_padded_sequence(h, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.dec.lstm(packed)
        return self.head(out.data), packed.data


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = 3.0 * torch.randn(4, 6, 3, generator=g, dtype=torch.float64) + 1.0
        lengths = torch.tensor([6, 2, 5, 4])
        y = torch.randn(int(lengths.sum()), 2, generator=g, dtype=torch.float64)
        yield x, lengths, y


def _stats(rows: np.ndarray) -> dict:
    return {"count": rows.shape[0], "mean": rows.mean(0), "std": rows.std(0), "min": rows.min(0), "max": rows.max(0)}


def _assert_stats(entry: dict, want: dict):
    assert entry["count"] == want["count"]
    for key in ("mean", "std", "min", "max"):
        np.testing.assert_allclose(entry[key], want[key], rtol=1e-9, atol=1e-12)


def test_monitor_records_a_plain_training_loop():
    torch.manual_seed(0)
    model = EncoderDecoder()
    twin = copy.deepcopy(model)  # trained identically, read directly: the reference telemetry
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.05)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (opt, twin_opt)]
    monitor = Monitor(model, optimizer=opt, every=3, read_every=2)
    assert set(monitor.lstms) == {"enc", "dec.lstm"}

    want_losses, want_norms, want_lrs, seen, targets, twin_snaps = [], [], [], {"enc": [], "dec.lstm": []}, [], []
    for step, (x, lengths, y) in enumerate(_batches(7)):
        for m, o in ((model, opt), (twin, twin_opt)):
            pred, dec_in = m(x, lengths)
            loss = nn.functional.mse_loss(pred, y)
            o.zero_grad()
            loss.backward()
            if m is model:
                want_norms.append(torch.sqrt(sum(p.grad.square().sum() for p in m.parameters())))
                want_lrs.append(opt.param_groups[0]["lr"])
                want_losses.append(loss.detach().clone())
                seen["enc"].append(x.reshape(-1, 3))
                seen["dec.lstm"].append(dec_in.detach())
                targets.append(y)
                monitor.step(
                    loss=loss.detach(),
                    targets=y,
                    val_loss=loss.detach() * 2 if step == 4 else None,
                    subset_losses={"a": loss.detach(), "b": 1.5} if step == 4 else None,
                )
            o.step()
        for sched in scheds:
            sched.step()
        if step in (2, 5):  # the monitor closes a window every 3 steps
            twin_snaps.append(
                {n: lstm.telemetry.snapshot(reset=True) for n, lstm in (("enc", twin.enc), ("dec.lstm", twin.dec.lstm))}
            )
    twin_snaps.append(
        {"enc": twin.enc.telemetry.snapshot(reset=True), "dec.lstm": twin.dec.lstm.telemetry.snapshot(reset=True)}
    )

    history = monitor.history
    assert history.lstms["dec.lstm"] == {
        "input_size": 4,
        "hidden_size": 5,
        "proj_size": 0,
        "num_layers": 1,
        "num_directions": 1,
    }
    assert [e["step"] for e in history.steps] == list(range(7))
    assert [e["loss"] for e in history.steps] == [float(v) for v in want_losses]
    assert [e["lr"] for e in history.steps] == want_lrs
    np.testing.assert_allclose([e["grad_norm"] for e in history.steps], [float(v) for v in want_norms], rtol=1e-12)
    assert not any(e["skipped"] for e in history.steps)
    (evaluation,) = history.evals
    assert evaluation["step"] == 4 and evaluation["val_loss"] == 2 * float(want_losses[4])
    assert evaluation["subset_losses"] == {"a": float(want_losses[4]), "b": 1.5}

    windows = [(0, 2), (3, 5), (6, 6)]
    for name in ("enc", "dec.lstm"):
        entries = [e for e in history.telemetry if e["lstm"] == name]
        assert [(e["first_step"], e["step"]) for e in entries] == windows
        for entry, snaps in zip(entries, twin_snaps):
            assert _same(entry["snapshot"], snaps[name].to_dict())
        inputs = [e for e in history.inputs if e["lstm"] == name]
        assert [e["step"] for e in inputs] == [2, 5, 6]
        for entry, (first, last) in zip(inputs, windows):
            _assert_stats(entry, _stats(torch.cat(seen[name][first : last + 1]).numpy()))
    for entry, (first, last) in zip(history.targets, windows):
        _assert_stats(entry, _stats(torch.cat(targets[first : last + 1]).numpy()))
    monitor.close()


@pytest.mark.parametrize("fused", [False, True])
def test_a_skipped_step_has_an_update_ratio_of_zero(fused):
    from fastlstm.step_guard import StepGuard

    torch.manual_seed(0)
    model = fastlstm.LSTM(2, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.01, fused=fused)
    monitor, guard = Monitor(model, optimizer=opt, every=1), StepGuard(opt)  # a ratio on every step
    for step in range(3):
        x = torch.randn(5, 2, 2)
        x[0, 0, 0] = float("nan") if step == 1 else x[0, 0, 0]
        before = [p.detach().clone() for p in model.parameters()]
        guarded_step(model, opt, guard, monitor, x)
        moved = torch.nn.utils.get_total_norm([p.detach() - b for p, b in zip(model.parameters(), before)])
        want = float(moved / torch.nn.utils.get_total_norm(before))
        assert monitor.history.steps[step]["update_ratio"] == pytest.approx(want, rel=1e-6, abs=0)
    assert monitor.history.steps[1]["skipped"] and monitor.history.steps[1]["update_ratio"] == 0


def test_skipped_step_event_names_where_the_nan_arose():
    torch.manual_seed(1)
    model = EncoderDecoder()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = Monitor(model, every=1, read_every=4)
    for step, (x, lengths, y) in enumerate(_batches(5, seed=1)):
        if step == 2:
            x[0, 3, 1] = float("nan")
        pred, _ = model(x, lengths)
        loss = nn.functional.mse_loss(pred, y)
        opt.zero_grad()
        loss.backward()
        finite = torch.isfinite(loss)
        if step != 2:
            opt.step()
        monitor.step(loss=loss.detach(), skipped=~finite)
    history = monitor.history
    assert [e["skipped"] for e in history.steps] == [False, False, True, False, False]
    (event,) = history.events_of("nonfinite_step_skipped")
    assert event["step"] == 2
    assert event["detail"]["first_nonfinite"] == {
        "layer": 0,
        "direction": 0,
        "timestep": 3,
        "stage": "forward",
        "tensor": "input",
        "lstm": "enc",
    }
    assert event["detail"]["locations"]["dec.lstm"]["tensor"] == "input"  # it spread there
    enc_inputs = [e for e in history.inputs if e["lstm"] == "enc"]
    assert [e["step"] for e in enc_inputs] == list(range(5))
    assert math.isnan(enc_inputs[2]["mean"][1]) and not math.isnan(enc_inputs[2]["mean"][0])
    assert not math.isnan(enc_inputs[3]["mean"][1])


@pytest.mark.parametrize(
    "bad, error",
    [
        ({"loss": torch.tensor([1.0, 2.0])}, ValueError),
        ({"loss": "abc"}, TypeError),
        ({"grad_norm": torch.ones(3)}, ValueError),
        ({"skipped": torch.zeros(2, dtype=torch.bool)}, ValueError),
        ({"val_loss": [0.5]}, TypeError),
        ({"subset_losses": {"rare": torch.ones(2)}}, ValueError),
    ],
)
def test_a_step_given_something_other_than_one_number_is_refused_and_not_recorded(bad, error):
    monitor = Monitor(fastlstm.LSTM(2, 3))
    monitor.step(loss=1.0)
    with pytest.raises(error, match=next(iter(bad))):
        monitor.step(**bad)
    monitor.step(loss=torch.tensor(3.0))
    assert monitor.history.losses() == [(0, 1.0), (1, 3.0)]


def test_a_tensor_learning_rate_is_recorded_as_each_step_used_it():
    # Adam(lr=tensor) with a scheduler: the scheduler fills the tensor in place before the Monitor's batched read.
    model = fastlstm.LSTM(2, 3)
    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.1))
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    monitor = Monitor(model, optimizer=opt, every=4)
    used = []
    for _ in range(8):
        model(torch.randn(3, 2, 2))[0].square().mean().backward()
        opt.step()
        opt.zero_grad()
        used.append(float(opt.param_groups[0]["lr"]))
        monitor.step(loss=1.0)
        scheduler.step()
    assert [s["lr"] for s in monitor.history.steps] == used


def test_monitor_step_reads_nothing_back():
    model = fastlstm.LSTM(3, 4, backend="reference")
    monitor = Monitor(model, every=50, read_every=50)
    assert list(monitor.lstms) == ["lstm"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    with HostReadGuard() as guard:
        for _ in range(6):
            out, _ = model(torch.randn(5, 2, 3))
            loss = out.square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
            monitor.step(loss=losses[-1], targets=out.detach(), val_loss=loss.detach())
    assert guard.reads == []
    history = monitor.history
    assert [e["loss"] for e in history.steps] == [float(v) for v in losses]
    assert history.inputs[0]["count"] == 6 * 5 * 2 and len(history.evals) == 6


@pytest.mark.parametrize("how", ["torch.save", "deepcopy"])
def test_a_model_being_monitored_can_be_saved_and_copied_without_its_monitor(how, tmp_path):
    """torch.save of the whole model (loaded with weights_only=True) and deepcopy work while a Monitor records it:
    the copy computes what the model computes and carries no Monitor hook, and the Monitor keeps recording the
    original only."""
    torch.manual_seed(0)
    model = EncoderDecoder()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = Monitor(model, optimizer=opt, read_every=1)
    (x, lengths, y), (x2, lengths2, y2) = _batches(2)

    def train_step(net, x, lengths, y):
        out, _ = net(x, lengths)
        loss = (out - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.detach()

    monitor.step(loss=train_step(model, x, lengths, y))
    if how == "deepcopy":
        clone = copy.deepcopy(model)
    else:
        torch.save(model, tmp_path / "model.pt")
        with fastlstm.safe_globals([EncoderDecoder, nn.Module, nn.Linear]):
            clone = torch.load(tmp_path / "model.pt")
    for lstm in (clone.enc, clone.dec.lstm):
        assert not lstm._forward_pre_hooks
    with torch.no_grad():
        for got, want in zip(clone(x2, lengths2), model(x2, lengths2)):
            assert torch.equal(got, want)
    clone(x2, lengths2)[0].sum().backward()  # the copy's passes are not the monitored model's
    monitor.step(loss=train_step(model, x2, lengths2, y2))
    monitor.flush()
    enc = [e["count"] for e in monitor.history.inputs if e["lstm"] == "enc"]
    assert sum(enc) == 3 * 4 * 6  # the original's passes of 4 x 6 steps (two trained, one compared), no copy's


def test_a_model_without_a_fastlstm_layer_gets_a_warning_that_says_what_to_do():
    with pytest.warns(UserWarning, match=r"no fastlstm.LSTM .*fastlstm.convert"):
        Monitor(nn.Sequential(nn.LSTM(2, 3)))
    with pytest.warns(UserWarning, match="no telemetry"):
        Monitor(nn.Linear(2, 3))


def test_a_monitor_of_something_that_is_not_a_module_is_refused():
    with pytest.raises(TypeError, match="must be an nn.Module, got str"):
        Monitor("model")
