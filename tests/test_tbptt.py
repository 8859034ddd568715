"""TBPTTTrainer against independent references: hand-written truncation loops on torch.nn.LSTM, exact skips of
poisoned steps, bit-identical kill-and-resume, adaptive truncation on a task with a known lag, and no host reads
in the training loop."""

from __future__ import annotations

import copy
import math
import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import fastlstm
from fastlstm.padding import RecurrentLengths
from fastlstm.tbptt import NonFiniteError, TBPTTTrainer, estimate_dependency, truncation_evidence
from fastlstm.truncation import estimate_state_dependency

try:
    from support import Forecaster, HostReadGuard, lstm_cell_step, rel_err
except ImportError:  # tests/ turned into a package
    from tests.support import Forecaster, HostReadGuard, lstm_cell_step, rel_err


pytestmark = pytest.mark.usefixtures("single_cpu_thread")


class Net(Forecaster):
    """The shared Forecaster at this file's sizes, float64 unless told otherwise."""

    def __init__(
        self, inputs=3, hidden=5, outputs=2, layers=1, dropout=0.0, batch_first=True, dtype=torch.float64, bidir=False
    ):
        super().__init__(
            inputs, outputs, hidden, layers, batch_first=batch_first, dropout=dropout, dtype=dtype, bidirectional=bidir
        )


def reference_of(net: Net):
    """torch.nn.LSTM + head with net's weights: the independent implementation."""
    lstm = nn.LSTM(
        net.lstm.input_size,
        net.lstm.hidden_size,
        net.lstm.num_layers,
        batch_first=True,
        bidirectional=net.lstm.bidirectional,
        dtype=net.head.weight.dtype,
    )
    lstm.load_state_dict(net.lstm.state_dict())
    return lstm, copy.deepcopy(net.head)


def streams(rows, steps, inputs, outputs, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, steps, inputs, generator=g, dtype=dtype)
    y = torch.randn(rows, steps, outputs, generator=g, dtype=dtype)
    return x, y


# ---- gradients equal a hand-written truncation loop ----


def hand_written_tbptt(lstm, head, x, y, lengths, k1, k2, lr, clip):
    """TBPTT(k1, k2) one stream at a time (batch_first [B, T, F] data): each chunk's loss is the mean squared
    error over every valid position of every stream; windows start k2 - k1 steps before the chunk (not before
    the stream start), from a detached state computed without gradient in the previous chunk. Yields the
    gradients of each chunk."""
    params = list(lstm.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=lr)
    starts = {b: (0, None) for b in range(len(lengths))}  # stream -> (window start, state there)
    for s in range(0, max(lengths), k1):
        alive = [b for b in range(len(lengths)) if lengths[b] > s]
        positions = sum(min(k1, lengths[b] - s) for b in alive) * y.shape[-1]
        opt.zero_grad()
        for b in alive:
            end = s + min(k1, lengths[b] - s)
            w, state = starts[b]
            out, _ = lstm(x[b : b + 1, w:end], state)
            err = head(out[:, s - w :]) - y[b : b + 1, s:end]
            (err.square().sum() / positions).backward()
            w_next = max(w, s + k1 - (k2 - k1))
            if w_next > w and lengths[b] > s + k1:
                with torch.no_grad():
                    _, state = lstm(x[b : b + 1, w:w_next], state)
                starts[b] = (w_next, state)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        yield [p.grad.clone() for p in params]
        opt.step()


@pytest.mark.parametrize(
    "k1, k2, ragged, clip, bidir",
    [
        (3, 3, False, None, False),
        (3, 7, True, None, False),
        (4, 6, True, 0.05, False),
        (2, 9, False, None, False),
        (3, 3, True, None, True),
    ],
)
def test_gradients_equal_hand_written_truncation(k1, k2, ragged, clip, bidir):
    """Streams that end inside a chunk (ragged), their padding filled with NaN: the trainer's gradients equal those
    of each stream run alone on its real steps (the reverse direction of a bidirectional LSTM starting at the
    stream's own end, as PackedSequence gives it)."""
    torch.manual_seed(0)
    net = Net(layers=2, bidir=bidir)
    lstm, head = reference_of(net)
    x, y = streams(4, 19, 3, 2)
    lengths = [19, 11, 19, 6] if ragged else [19] * 4
    for b, n in enumerate(lengths):
        x[b, n:], y[b, n:] = float("nan"), float("nan")
    trainer = TBPTTTrainer(
        net,
        torch.optim.SGD(net.parameters(), lr=0.3),
        nn.MSELoss(),
        k1=k1,
        k2=k2,
        clip_grad_norm=clip,
        dependency_lags=0,
    )
    expected = hand_written_tbptt(lstm, head, x, y, lengths, k1, k2, lr=0.3, clip=clip)
    chunks = 0
    for want in expected:
        trainer.fit((x, y, lengths), max_chunks=1)
        got = [p.grad for p in list(net.lstm.parameters()) + list(net.head.parameters())]
        for g, w in zip(got, want):
            assert rel_err(g, w) < 1e-10, (chunks, rel_err(g, w))
        chunks += 1
    trainer.fit((x, y, lengths))
    assert trainer.chunks == chunks == math.ceil(19 / k1)
    for p, q in zip(
        list(net.lstm.parameters()) + list(net.head.parameters()), list(lstm.parameters()) + list(head.parameters())
    ):
        assert rel_err(p.detach(), q.detach()) < 1e-10
    losses = trainer.history.losses()
    assert [s for s, _ in losses] == list(range(chunks)) and all(np.isfinite(v) for _, v in losses)


def test_history_holds_the_norm_each_step_used_and_the_update_ratios():
    # What the doctor's clipping and learning-rate rules read: the norm before clipping, the one the step used
    # (the clipped one here) and, every telemetry window, ‖Δθ‖/‖θ‖ of the step.
    torch.manual_seed(0)
    net = Net()
    x, y = streams(4, 24, 3, 2)
    clip = 0.05
    trainer = TBPTTTrainer(
        net, torch.optim.SGD(net.parameters(), lr=0.3), nn.MSELoss(), k1=4, clip_grad_norm=clip, telemetry_every=2
    )
    before = [p.detach().clone() for p in net.parameters()]
    trainer.fit((x, y), max_chunks=1)
    delta = torch.nn.utils.get_total_norm([p.detach() - b for p, b in zip(net.parameters(), before)])
    trainer.fit((x, y))
    steps = trainer.history.steps
    assert len(steps) == 6
    for entry in steps:  # clip_grads_with_norm_ scales by clip / (norm + 1e-6) where that is below 1
        norm = entry["grad_norm"]
        assert entry["grad_norm_applied"] == pytest.approx(norm * min(1.0, clip / (norm + 1e-6)), rel=1e-9)
    assert any(e["grad_norm"] > clip for e in steps)
    assert [e["step"] for e in steps if "update_ratio" in e] == [0, 2, 4]
    assert steps[0]["update_ratio"] == pytest.approx(float(delta / torch.nn.utils.get_total_norm(before)), rel=1e-9)


@pytest.mark.parametrize(
    "options, error",
    [
        ({"clip_grad_norm": -1.0}, ValueError),
        ({"clip_grad_norm": 0}, ValueError),
        ({"clip_grad_norm": True}, ValueError),
        ({"clip_grad_norm": "1.0"}, ValueError),
        ({"k1": 2.5}, TypeError),
        ({"k1": "8"}, TypeError),
        ({"k2": 8.7}, TypeError),
        ({"validate_every": 0}, ValueError),
        ({"checkpoint_every": -1}, ValueError),
        ({"val_chunk": 0}, ValueError),
        ({"telemetry_every": 0}, ValueError),
        ({"instrument_every": 0}, ValueError),
        ({"dependency_lags": -1}, ValueError),
        ({"target_bias": 0.0}, ValueError),  # a fixed k2 still estimates the dependency with both fractions
        ({"reach_fraction": 1.0}, ValueError),
        ({"adaptive": True, "smoothing": 1.0}, ValueError),
    ],
)
def test_bad_trainer_arguments_are_refused(options, error):
    net = Net()
    arguments = {"k1": 4} | options
    with pytest.raises(error, match=list(options)[-1]):
        TBPTTTrainer(net, torch.optim.SGD(net.parameters(), lr=0.1), nn.MSELoss(), **arguments)


def test_clip_value_of_any_real_type_is_taken():
    net = Net()
    trainer = TBPTTTrainer(
        net, torch.optim.SGD(net.parameters(), lr=0.1), nn.MSELoss(), k1=4, clip_grad_norm=np.float32(0.5)
    )
    assert trainer.clip_grad_norm == 0.5


def test_time_major_data_matches_batch_first():
    torch.manual_seed(1)
    a = Net(batch_first=True)
    b = Net(batch_first=False)
    b.load_state_dict(a.state_dict())
    x, y = streams(3, 10, 3, 2)
    for net, data in ((a, (x, y, [10, 7, 10])), (b, (x.transpose(0, 1), y.transpose(0, 1), [10, 7, 10]))):
        TBPTTTrainer(net, torch.optim.SGD(net.parameters(), lr=0.2), nn.MSELoss(), k1=3, k2=5).fit(data)
    for p, q in zip(a.parameters(), b.parameters()):
        assert rel_err(p.detach(), q.detach()) < 1e-12


class _TorchLSTMNet(nn.Module):
    """A model on torch's own nn.LSTM, batch-first: the trainer takes its layout from it."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 5, batch_first=True, dtype=torch.float64)
        self.head = nn.Linear(5, 2, dtype=torch.float64)

    def forward(self, x, state):
        out, state = self.lstm(x, state)
        return self.head(out), state


def test_the_layout_defaults_to_a_torch_lstms():
    torch.manual_seed(2)
    nets = [_TorchLSTMNet(), _TorchLSTMNet()]
    nets[1].load_state_dict(nets[0].state_dict())
    x, y = streams(4, 40, 3, 2)
    with pytest.warns(UserWarning, match="no fastlstm.LSTM"):  # nor telemetry: said once per trainer
        trainers = [
            TBPTTTrainer(net, torch.optim.SGD(net.parameters(), lr=0.1), nn.MSELoss(), k1=8, **told)
            for net, told in zip(nets, ({}, {"batch_first": True}))
        ]
    assert trainers[0].batch_first
    for trainer in trainers:
        trainer.fit((x, y))
    assert trainers[0].chunks == trainers[1].chunks == 5
    for p, q in zip(*(net.parameters() for net in nets)):
        assert torch.equal(p, q)


def test_estimate_dependency_is_exact_for_geometric_decay():
    """For g_k = c·β^k the relative bias of truncating at k is β^(k+1) exactly: measured or extrapolated."""
    for beta, target, measured in ((0.8, 0.1, 40), (0.8, 0.1, 4), (0.95, 0.05, 10), (0.5, 0.2, 3)):
        est = estimate_dependency(3.0 * beta ** np.arange(measured + 1), target)
        k = math.ceil(math.log(target) / math.log(beta) - 1 - 1e-9)
        assert est.rate == pytest.approx(beta, rel=1e-9)
        assert est.dependency == k
        assert est.bias == pytest.approx(beta ** (measured + 1), rel=1e-9)
    assert math.isinf(estimate_dependency(np.ones(6), 0.1).dependency)
    assert estimate_dependency([1.0, 0.5], 0.1) is None


def _with_forget_bias(net: Net, bias: float) -> Net:
    """Set the forget-gate bias: large values make a cell that barely forgets (long memory), negative a short one."""
    hidden = net.lstm.hidden_size
    with torch.no_grad():
        net.lstm.bias_ih_l0[hidden : 2 * hidden] = bias / 2
        net.lstm.bias_hh_l0[hidden : 2 * hidden] = bias / 2
    return net


def test_recorded_dependency_estimates_use_the_autograd_lag_profile():
    """With frozen weights (lr 0) every window can be replayed on torch.nn.LSTM one step at a time; the total
    gradients reaching each h_t and c_t, lag by lag before the chunk's first loss, must give the recorded
    estimates."""
    torch.manual_seed(3)
    net = _with_forget_bias(Net(inputs=2, hidden=6, outputs=1), 2.0)
    lstm, head = reference_of(net)
    x, y = streams(3, 30, 2, 1, seed=16)
    k1, k2 = 3, 9
    trainer = TBPTTTrainer(
        net,
        torch.optim.SGD(net.parameters(), lr=0.0),
        nn.MSELoss(),
        k1=k1,
        k2=k2,
        telemetry_every=1,
        read_every=1,
        dependency_lags=0,
    )
    trainer.fit((x, y))
    estimates = trainer.history.extra["truncation_estimates"]
    assert [e["step"] for e in estimates] == list(range(1, 30 // k1))  # chunk 0's window has no lag to measure
    for entry in estimates:
        first = entry["step"] * k1
        start = max(0, first - (k2 - k1))  # the first windows start at the stream start
        with torch.no_grad():
            h, c = (t[0] for t in lstm(x[:, :start])[1]) if start else (torch.zeros(3, 6, dtype=torch.float64),) * 2
        hidden, cells = [], []
        for t in range(start, first + k1):
            h, c = lstm_cell_step(lstm, 0, x[:, t], h, c)
            h.retain_grad()
            c.retain_grad()
            hidden.append(h)
            cells.append(c)
        pred = torch.cat([head(h) for h in hidden[-k1:]])
        nn.functional.mse_loss(pred, y[:, first : first + k1].transpose(0, 1).reshape(-1, 1)).backward()
        lags = slice(first - start, None, -1)
        h_norms = [float(h.grad.norm()) for h in hidden][lags]
        c_norms = [float(c.grad.norm()) for c in cells][lags]
        assert (entry["k1"], entry["k2"], entry["lag"]) == (k1, k1 + first - start, first - start)
        for part, norms in (("hidden", h_norms), ("cell", c_norms)):
            want = estimate_dependency(norms, trainer.target_bias)
            assert entry[f"{part}_rate"] == pytest.approx(want.rate, rel=1e-9)
            assert entry[f"{part}_bias"] == pytest.approx(want.bias, rel=1e-9)
            assert entry[f"{part}_dependency"] == want.dependency
            assert entry[f"{part}_reach"] == pytest.approx(want.reach, rel=1e-9)
        want = estimate_state_dependency(h_norms, c_norms, trainer.target_bias)
        assert entry["estimated_dependency"] == pytest.approx(want.dependency, rel=1e-9)
        assert entry["bias"] == pytest.approx(want.bias, rel=1e-9)
    # the case discriminates: with a forget bias of 2 the cell's gradient reaches farther than the hidden state's
    assert any(e["cell_reach"] > e["hidden_reach"] for e in estimates)


def test_gradients_reaching_past_a_fixed_truncation_are_reported():
    x, y = streams(4, 24, 3, 2, seed=17)
    found = {}
    for bias in (12.0, -6.0):  # a cell that keeps everything, and one that forgets at once
        torch.manual_seed(5)
        net = _with_forget_bias(Net(), bias)
        trainer = TBPTTTrainer(
            net,
            torch.optim.SGD(net.parameters(), lr=0.0),
            nn.MSELoss(),
            k1=3,
            k2=6,
            telemetry_every=1,
            dependency_lags=0,
        )
        found[bias] = truncation_evidence(trainer.fit((x, y)))
    assert found[-6.0] is None
    evidence = found[12.0]
    assert evidence["source"] == "gradient_decay" and evidence["k"] == 6 and evidence["lstm"] == "lstm"
    assert evidence["bias"] > 0.25 and evidence["estimated_dependency"] > 3


# ---- non-finite steps ----


def _train_chunk_by_chunk(trainer, data, chunks):
    net = trainer.model
    weights, states = [], []
    for _ in range(chunks):
        trainer.fit(data, max_chunks=1)
        weights.append([p.detach().clone() for p in net.parameters()])
        states.append(copy.deepcopy(trainer.optimizer.state_dict()["state"]))
    return weights, states


def _hand_loop_skipping(net, opt, x, y, k1, skip_chunk, poisoned_row):
    """Ordinary truncation with the optimizer step of `skip_chunk` left out and the poisoned stream restarted
    from zeros afterwards: what skipping must be equivalent to."""
    state = None
    for j, s in enumerate(range(0, x.shape[1], k1)):
        out, state = net(x[:, s : s + k1], state)
        loss = nn.functional.mse_loss(out.reshape(-1, out.shape[-1]), y[:, s : s + k1].reshape(-1, y.shape[-1]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if j != skip_chunk:
            opt.step()
        state = tuple(t.detach() for t in state)
        if j == skip_chunk:
            for t in state:
                t[:, poisoned_row] = 0.0
    return [p.detach().clone() for p in net.parameters()]


OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adam_fused": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
}


ZERO_STARTED = {
    "adam": (torch.optim.Adam, {}),
    "adamax": (torch.optim.Adamax, {}),
    "radam": (torch.optim.RAdam, {}),
    "rmsprop": (torch.optim.RMSprop, {}),
    "adadelta": (torch.optim.Adadelta, {}),
    "adagrad": (torch.optim.Adagrad, {}),
    "sgd-momentum": (torch.optim.SGD, {"momentum": 0.9}),
}
NOT_ZERO_STARTED = {
    "nadam": (torch.optim.NAdam, {}),
    "sgd-dampened": (torch.optim.SGD, {"momentum": 0.9, "dampening": 0.1}),
}


@pytest.mark.parametrize("name", sorted(ZERO_STARTED) + sorted(NOT_ZERO_STARTED))
def test_a_skipped_first_step_leaves_the_optimizer_as_never_stepped_or_warns(name):
    # What a skipped first step created is reset to zeros: exact where the optimizer's state starts as zeros (the
    # later steps then equal those of a twin that never saw the skipped step), warned about elsewhere.
    from fastlstm.step_guard import StepGuard

    kind, options = {**ZERO_STARTED, **NOT_ZERO_STARTED}[name]
    torch.manual_seed(0)
    guarded, twin = nn.Parameter(torch.randn(6)), nn.Parameter(torch.zeros(6))
    twin.data.copy_(guarded.data)
    guard, plain = StepGuard(kind([guarded], lr=0.1, **options)), kind([twin], lr=0.1, **options)
    guarded.grad = torch.randn(6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guard.step(torch.tensor(True))
    warned = any("creates its state at its first step" in str(w.message) for w in caught)
    assert warned == (name in NOT_ZERO_STARTED)
    if name in ZERO_STARTED:
        for _ in range(3):
            gradient = torch.randn(6)
            guarded.grad, twin.grad = gradient.clone(), gradient.clone()
            guard.step(torch.tensor(False))
            plain.step()
        assert torch.equal(guarded.data, twin.data)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_poisoned_step_is_skipped_bit_exactly_and_training_recovers(optimizer):
    torch.manual_seed(2)
    net = Net(dtype=torch.float32)
    twin = copy.deepcopy(net)
    x, y = streams(4, 32, 3, 2, dtype=torch.float32, seed=3)
    x[1, 13, 0] = float("nan")  # chunk 3 (k1 = 4), timestep 1 of its window, stream 1
    trainer = TBPTTTrainer(
        net, OPTIMIZERS[optimizer](net.parameters()), nn.MSELoss(), k1=4, telemetry_every=1, read_every=3
    )
    weights, states = _train_chunk_by_chunk(trainer, (x, y), 8)

    for before, after in zip(weights[2], weights[3]):
        assert torch.equal(before, after)
    for key, state in states[3].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(states[2][key][name])), (key, name)
    assert all(torch.isfinite(w).all() for w in weights[-1])
    assert any(not torch.equal(a, b) for a, b in zip(weights[3], weights[4]))  # steps resume

    expected = _hand_loop_skipping(twin, OPTIMIZERS[optimizer](twin.parameters()), x, y, 4, 3, 1)
    for got, want in zip(weights[-1], expected):
        assert torch.equal(got, want)

    history = trainer.history
    assert [e["skipped"] for e in history.steps] == [i == 3 for i in range(8)]
    (event,) = history.events_of("nonfinite_step_skipped")
    assert event["step"] == 3
    assert event["detail"]["first_nonfinite"] == {
        "layer": 0,
        "direction": 0,
        "timestep": 1,
        "stage": "forward",
        "tensor": "input",
        "lstm": "lstm",
    }
    losses = dict(history.losses())
    assert math.isnan(losses[3]) and all(math.isfinite(losses[i]) for i in range(8) if i != 3)


def test_stop_mode_freezes_weights_at_the_first_nonfinite_step():
    torch.manual_seed(4)
    net = Net(dtype=torch.float32)
    x, y = streams(2, 40, 3, 2, dtype=torch.float32, seed=5)
    y[0, 9, 1] = float("inf")  # chunk 2: only the loss is non-finite, the forward is clean
    trainer = TBPTTTrainer(
        net,
        torch.optim.SGD(net.parameters(), lr=0.1),
        nn.MSELoss(),
        k1=4,
        on_nonfinite="stop",
        read_every=4,
        telemetry_every=2,
    )
    trainer.fit((x, y), max_chunks=2)
    frozen = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(NonFiniteError) as info:
        trainer.fit((x, y))
    assert info.value.event["detail"]["first_step"] == 2
    assert info.value.event["detail"]["first_nonfinite"]["stage"] == "backward"
    assert 2 < trainer.chunks < 10  # stopped at a batched read, not at the end
    for p, q in zip(net.parameters(), frozen):
        assert torch.equal(p, q)
    assert [e["kind"] for e in trainer.history.events][-1] == "nonfinite_stop"


# ---- checkpoint and resume ----


def _resume_setup(seed):
    torch.manual_seed(seed)
    net = Net(inputs=3, hidden=6, outputs=2, layers=2, dropout=0.3, dtype=torch.float32)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.8)
    return net, opt, sched


def _resume_data():
    a = streams(3, 23, 3, 2, dtype=torch.float32, seed=10)
    b = streams(3, 17, 3, 2, dtype=torch.float32, seed=11)
    val = streams(2, 12, 3, 2, dtype=torch.float32, seed=12)
    return [(*a, [23, 9, 20]), (*b, [17, 17, 5])], {"long": val, "short": (*val, [4, 6])}


def _make_trainer(net, opt, sched, path):
    return TBPTTTrainer(
        net,
        opt,
        nn.MSELoss(),
        k1=3,
        adaptive=True,
        k_min=2,
        k_max=12,
        k_init=12,
        smoothing=0.3,
        scheduler=sched,
        clip_grad_norm=1.0,
        telemetry_every=2,
        read_every=4,
        validate_every=5,
        checkpoint_path=path,
        checkpoint_every=3,
        shuffle=True,
        seed=7,
    )


def test_a_checkpoint_resumes_only_a_trainer_with_its_truncation():
    net = Net()
    x, y = streams(2, 12, 3, 2)

    def trainer(**truncation):
        return TBPTTTrainer(net, torch.optim.SGD(net.parameters(), lr=0.1), nn.MSELoss(), **truncation)

    written = trainer(k1=4, k2=8)
    written.fit((x, y), max_chunks=1)
    state = written.state_dict()
    trainer(k1=4, k2=8).load_state_dict(state)
    for other in ({"k1": 4, "k2": 6}, {"k1": 3, "k2": 8}, {"k1": 4, "adaptive": True}):
        with pytest.raises(ValueError, match="checkpoint was written with k1=4, k2=8"):
            trainer(**other).load_state_dict(state)


def test_a_validation_due_at_an_epoch_end_is_the_epochs_own():
    # validate_every=3 over 6 chunks an epoch: chunk 3 validates, and chunk 6 once, as the epoch's validation
    # (counted twice, the doctor saw two evaluations at one step, and ReduceLROnPlateau stepped twice).
    net = Net()
    x, y = streams(2, 24, 3, 2)
    plateau = torch.optim.SGD(net.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(plateau)
    trainer = TBPTTTrainer(net, plateau, nn.MSELoss(), k1=4, validate_every=3, scheduler=scheduler)
    history = trainer.fit((x, y), epochs=2, val_data=(x, y))
    assert [(e["step"], e.get("epoch")) for e in history.evals] == [(2, None), (5, 1), (8, None), (11, 2)]
    assert scheduler.last_epoch == 4
    with pytest.raises(ValueError, match="empty dict"):
        trainer.validate({})


def test_a_model_that_returns_no_state_is_refused():
    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = Net()

        def forward(self, x, state):
            return self.net(x, state)[0]

    model = Bare()
    trainer = TBPTTTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(), k1=4)
    with pytest.raises(TypeError, match=r"must return \(outputs, state\).*a tensor of shape \(2, 4, 2\)"):
        trainer.fit(streams(2, 12, 3, 2))


def test_data_without_streams_or_steps_is_refused():
    net = Net()
    trainer = TBPTTTrainer(net, torch.optim.SGD(net.parameters(), lr=0.1), nn.MSELoss(), k1=4)
    for rows, steps in ((0, 10), (3, 0)):
        with pytest.raises(ValueError, match="no streams or no steps"):
            trainer.fit(streams(rows, steps, 3, 2))


def _bad_fit_calls(x, y):
    """(fit's data, fit's keywords, error, match) that must be refused before any chunk is trained."""
    return [
        ((x, y), {"epochs": 1.5}, TypeError, "epochs must be an int"),  # was two epochs (cursor.epoch < 1.5)
        ((x, y), {"epochs": -1}, ValueError, "epochs must be >= 0"),
        ((x, y), {"max_chunks": -3}, ValueError, "max_chunks must be >= 0"),
        ((x, y, [12, 7.5]), {}, ValueError, "whole numbers of steps"),  # was cut to 7
        ((x, y, [12, 7], 1), {}, TypeError, r"got a tuple of 4 \(Tensor, Tensor, list, int\)"),
        (x, {}, TypeError, "got one tensor"),
        ([(x, y), x], {}, TypeError, "got a Tensor"),
    ]


def test_bad_fit_arguments_are_refused_before_training():
    net = Net()
    trainer = TBPTTTrainer(net, torch.optim.SGD(net.parameters(), lr=0.1), nn.MSELoss(), k1=4)
    x, y = streams(2, 12, 3, 2)
    before = copy.deepcopy(net.state_dict())
    for data, keywords, error, match in _bad_fit_calls(x, y):
        with pytest.raises(error, match=match):
            trainer.fit(data, **keywords)
    assert trainer.chunks == 0
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), before.values()))
    trainer.fit((x, y, torch.tensor([12.0, 7.0])), max_chunks=1)  # whole numbers in a float tensor are steps
    assert trainer.chunks == 1


@pytest.mark.parametrize("kill_after", [4, 13, 21])
def test_kill_and_resume_is_bit_identical(tmp_path, kill_after):
    data, val = _resume_data()
    net, opt, sched = _resume_setup(0)
    full = _make_trainer(net, opt, sched, str(tmp_path / "full.pt"))
    full.fit(data, epochs=2, val_data=val)
    history = full.history

    net_b, opt_b, sched_b = _resume_setup(0)
    _make_trainer(net_b, opt_b, sched_b, str(tmp_path / "run.pt")).fit(
        data, epochs=2, val_data=val, max_chunks=kill_after
    )
    del net_b, opt_b, sched_b  # the process dies; the last checkpoint survives
    torch.manual_seed(12345)  # a restarted process has another RNG state and another initialisation
    net_c, opt_c, sched_c = _resume_setup(99)
    resumed = _make_trainer(net_c, opt_c, sched_c, str(tmp_path / "run.pt"))
    resumed.load_checkpoint()
    assert resumed.chunks == kill_after // 3 * 3
    resumed.fit(data, epochs=2, val_data=val)

    for p, q in zip(net.parameters(), net_c.parameters()):
        assert torch.equal(p, q)
    assert resumed.chunks == full.chunks
    assert opt_c.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for a, b in zip(opt.state_dict()["state"].values(), opt_c.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    resumed_history = resumed.history
    assert resumed_history.losses() == history.losses()
    assert [e["val_loss"] for e in resumed_history.evals] == [e["val_loss"] for e in history.evals]
    assert set(history.evals[0]["subset_losses"]) == {"long", "short"}
    k2_path = [e["detail"]["k2"] for e in history.events_of("truncation")]
    # The adaptive state mattered: the truncation went down, then up again.
    first_drop = next(i for i in range(1, len(k2_path)) if k2_path[i] < k2_path[i - 1])
    assert any(k2_path[i] > k2_path[i - 1] for i in range(first_drop + 1, len(k2_path))), k2_path
    assert resumed_history.events_of("resume")
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


# ---- padding past a stream's end ----


class InputLayerNet(nn.Module):
    """A model whose LSTM sees a learned projection of the inputs: padding content would reach that layer's weight
    gradient (0 × NaN) unless the trainer removes it before the model is called."""

    def __init__(self, inputs=3, hidden=6, outputs=2, dtype=torch.float32):
        super().__init__()
        self.embed = nn.Linear(inputs, 4, dtype=dtype)
        self.lstm = fastlstm.LSTM(4, hidden, batch_first=True, dtype=dtype, backend="reference")
        self.head = nn.Linear(hidden, outputs, dtype=dtype)

    def forward(self, x, state=None):
        out, state = self.lstm(torch.tanh(self.embed(x)), state)
        return self.head(out), state


PADDING = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "finite": 1e6, "zero": 0.0}


def _train_with_padding(fill, seed=0):
    torch.manual_seed(seed)
    net = InputLayerNet()
    x, y = streams(5, 60, 3, 2, dtype=torch.float32, seed=20 + seed)
    lengths = [60, 21, 38, 60, 3]  # ends inside chunks, on a chunk boundary, and inside the first chunk
    for b, n in enumerate(lengths):
        x[b, n:], y[b, n:] = fill, fill
    trainer = TBPTTTrainer(
        net,
        torch.optim.Adam(net.parameters(), lr=1e-2),
        nn.MSELoss(),
        k1=4,
        adaptive=True,
        k_max=12,
        smoothing=0.3,
        telemetry_every=2,
        read_every=4,
        validate_every=3,
    )
    val = (x[:3], y[:3], lengths[:3])
    history = trainer.fit((x, y, lengths), epochs=2, val_data=val)
    return net, trainer, history


@pytest.mark.parametrize("seed", [0, 1])
def test_padding_content_leaves_training_bit_identical(seed):
    """NaN, ±inf and finite padding past each stream's length: the same weights, optimizer state, losses,
    validation losses, truncation decisions, telemetry and input statistics, bit for bit, and no skipped step."""
    runs = {name: _train_with_padding(fill, seed) for name, fill in PADDING.items()}
    net, trainer, history = runs["zero"]
    assert all(torch.isfinite(p).all() for p in net.parameters())
    for name, (other, other_trainer, other_history) in runs.items():
        for p, q in zip(net.parameters(), other.parameters()):
            assert torch.equal(p, q), name
        for a, b in zip(trainer.optimizer.state.values(), other_trainer.optimizer.state.values()):
            assert all(torch.equal(a[k], b[k]) for k in a), name
        assert other_history.to_dict() == history.to_dict(), name  # every recorded number, events included
    assert not history.events_of("nonfinite_step_skipped") and not any(e["skipped"] for e in history.steps)
    assert len(history.events_of("truncation")) > 1  # the adaptive controller was part of what stayed identical


def test_padding_is_excluded_from_the_recurrence_not_only_from_the_loss():
    """The LSTM runs each stream only over its real steps: the telemetry counts exactly the (stream, step) pairs of
    the windows that lie inside the streams, and the input statistics exactly those inputs."""
    torch.manual_seed(2)
    net = Net(dtype=torch.float32)
    x, y = streams(4, 22, 3, 2, dtype=torch.float32, seed=21)
    lengths = [22, 7, 13, 18]
    for b, n in enumerate(lengths):
        x[b, n:] = float("nan")
    k1, k2 = 4, 7
    trainer = TBPTTTrainer(
        net, torch.optim.SGD(net.parameters(), lr=0.05), nn.MSELoss(), k1=k1, k2=k2, telemetry_every=1, read_every=1
    )
    history = trainer.fit((x, y, lengths))
    real = []  # per chunk: real steps of the window, summed over the streams alive in it
    for s in range(0, max(lengths), k1):
        w = max(0, s - (k2 - k1))
        real.append(sum(min(n, s + k1) - w for n in lengths if n > s))
    elements = [e["snapshot"]["layers"][0]["elements"] for e in history.telemetry]
    assert elements == [r * net.lstm.hidden_size for r in real]
    assert [e["count"] for e in history.inputs] == real
    assert all(math.isfinite(v) for e in history.inputs for v in e["mean"])
    assert all(e["snapshot"]["first_nonfinite"] is None for e in history.telemetry)


def test_models_that_do_not_take_packed_input_see_zeros():
    """A model without a recurrent module of the window's shape still never sees the padding: the inputs it gets
    are zero there."""
    seen = []

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3, 2))

        def forward(self, x, state=None):
            seen.append(x.detach().clone())
            return x @ self.w, state

    model = Recorder()
    x, y = streams(3, 10, 3, 2, dtype=torch.float32, seed=22)
    lengths = [10, 5, 7]
    for b, n in enumerate(lengths):
        x[b, n:] = float("nan")
    trainer = TBPTTTrainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(), k1=4, k2=6, batch_first=True
    )
    trainer.fit((x, y, lengths))
    assert seen and all(torch.isfinite(v).all() for v in seen)
    assert torch.isfinite(model.w).all()


# ---- validation ----


def test_validation_loss_matches_a_full_sequence_reference():
    torch.manual_seed(6)
    net = Net()
    lstm, head = reference_of(net)
    x, y = streams(3, 14, 3, 2, seed=13)
    lengths = [14, 5, 9]
    trainer = TBPTTTrainer(net, torch.optim.SGD(net.parameters(), lr=0.1), nn.MSELoss(), k1=4)
    loss, subsets = trainer.validate({"all": (x, y, lengths), "first": (x[:1], y[:1])})
    sq, count = [], 0
    for b, n in enumerate(lengths):
        out, _ = lstm(x[b : b + 1, :n])
        sq.append((head(out) - y[b : b + 1, :n]).square().sum())
        count += n * 2
    want_all = torch.stack(sq).sum() / count
    want_first = sq[0] / (14 * 2)
    assert rel_err(subsets["all"], want_all) < 1e-12 and rel_err(subsets["first"], want_first) < 1e-12
    assert rel_err(loss, (want_all * count + want_first * 28) / (count + 28)) < 1e-12


# ---- adaptive truncation on a task with a known lag ----


def copy_net(hidden=32) -> Forecaster:
    return Forecaster(1, 1, hidden)


def delayed_copy(lag, rows=16, steps=600, seed=0):
    """y_t = x_{t-lag}: the output at t depends on the input exactly `lag` steps earlier."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, steps, 1, generator=g)
    y = torch.zeros_like(x)
    y[:, lag:] = x[:, :-lag]
    return x, y


def _train_copy(lag, **options):
    torch.manual_seed(0)
    net = copy_net()
    trainer = TBPTTTrainer(
        net, torch.optim.Adam(net.parameters(), lr=1e-2), nn.MSELoss(), telemetry_every=5, read_every=25, **options
    )
    trainer.fit(delayed_copy(lag))
    return trainer, trainer.history


def test_adaptive_truncation_tracks_the_dependency_length():
    short, long_ = 3, 12
    (t_short, h_short), (t_long, h_long) = (_train_copy(lag, k1=4, adaptive=True, k_max=32) for lag in (short, long_))
    for trainer, history, lag in ((t_short, h_short, short), (t_long, h_long, long_)):
        events = history.events_of("truncation")
        assert events[0]["detail"]["k2"] == 4 + 32 and len(events) > 1  # it moved, and logged each move
        assert all(e["detail"]["adaptive"] for e in events)
        assert trainer.k2 == events[-1]["detail"]["k2"]
        assert trainer.k2 - trainer.k1 >= lag  # every loss of a chunk reaches the input it needs
        assert history.extra["truncation_estimates"]
    assert t_short.k2 < t_long.k2
    assert t_short.k2 - t_short.k1 < 16  # shrank well below k_max once the short dependency was learned
    assert h_short.steps[-1]["loss"] < 0.1  # and it was learned


def test_fixed_truncation_shorter_than_the_lag_is_reported():
    _, too_short = _train_copy(12, k1=4, k2=8)
    evidence = truncation_evidence(too_short)
    assert evidence is not None
    assert evidence["k"] == 8 and evidence["estimated_dependency"] == 12 and evidence["lstm"] == "lstm"
    assert evidence["source"] == "residual_correlation"
    _, long_enough = _train_copy(3, k1=4, k2=8)
    assert truncation_evidence(long_enough) is None
    assert truncation_evidence(long_enough.to_dict()) is None  # the JSON form is accepted too


# ---- no host reads in the loop ----


def test_training_loop_reads_nothing_back_between_batched_reads(monkeypatch):
    torch.manual_seed(8)
    net = Net(layers=2, dtype=torch.float32)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)  # Adam's default path reads `step`
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3)
    x, y = streams(4, 30, 3, 2, dtype=torch.float32, seed=14)
    trainer = TBPTTTrainer(
        net,
        opt,
        nn.MSELoss(),
        k1=3,
        adaptive=True,
        k_max=6,
        scheduler=sched,
        clip_grad_norm=1.0,
        telemetry_every=1000,
        read_every=1000,
    )
    packs = []
    pack = RecurrentLengths._pack

    def recording_pack(self, *args):
        packed = pack(self, *args)
        packs.append(packed)
        guard.allow(packed.batch_sizes)  # host metadata by PyTorch's contract, read by nn.LSTM's checks
        return packed

    monkeypatch.setattr(RecurrentLengths, "_pack", recording_pack)
    with HostReadGuard() as guard:
        trainer.fit((x, y, [30, 30, 17, 8]), max_chunks=9)
    assert packs  # streams ended inside chunks: their windows were packed
    assert guard.reads == []
    monkeypatch.undo()
    history = trainer.history  # the batched read
    assert len(history.losses()) == 9 and history.telemetry and history.inputs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_loop_does_not_synchronise_on_cuda():
    torch.manual_seed(9)
    net = Net(layers=2, dtype=torch.float32).cuda()
    x, y = (t.cuda() for t in streams(8, 40, 3, 2, dtype=torch.float32, seed=15))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    trainer = TBPTTTrainer(
        net, opt, nn.MSELoss(), k1=4, k2=6, clip_grad_norm=1.0, telemetry_every=1000, read_every=1000
    )
    trainer.fit((x, y, [40, 40, 33, 40, 12, 40, 40, 40]), max_chunks=2)  # allocations on first use
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.fit((x, y, [40, 40, 33, 40, 12, 40, 40, 40]), max_chunks=6)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(trainer.history.losses()) == 8
