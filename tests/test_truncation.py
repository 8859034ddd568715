"""Adaptive truncation (fastlstm/truncation.py and its use by TBPTTTrainer): the estimates against profiles whose
answer is known in closed form, the loss guard, and marker recall, where the window must keep a memory the model
has learned while a one-step dependency still lets it shrink."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fastlstm.tbptt import TBPTTTrainer
from fastlstm.truncation import (
    GUARD_CHUNKS,
    USED_GRADIENT,
    AdaptiveTruncation,
    ResidualProbe,
    estimate_dependency,
    estimate_state_dependency,
    loss_rose,
)

try:
    import truncation_suite as suite
except ImportError:  # tests/ turned into a package
    from tests import truncation_suite as suite


pytestmark = pytest.mark.usefixtures("single_cpu_thread")


# ---- the estimates ----


def test_reach_of_a_geometric_profile_is_where_it_falls_below_the_fraction():
    """g_k = β^k: inside the window the reach is the last lag with β^k >= ρ; past it, the extrapolated tail gives
    ln ρ / ln β exactly."""
    for beta, measured in ((0.5, 12), (0.8, 40), (0.8, 10), (0.95, 20)):
        est = estimate_dependency(2.0 * beta ** np.arange(measured + 1), 0.1)
        exact = math.log(USED_GRADIENT) / math.log(beta)
        if exact <= measured:
            assert est.reach == math.floor(exact + 1e-9)
        else:
            assert est.reach == pytest.approx(exact, rel=1e-9)


def test_a_gradient_that_stops_is_not_mistaken_for_one_that_never_decays():
    """Exact zeros past some lag (nothing reached there) mean no tail, not a flat one."""
    est = estimate_dependency([2.0, 0.5, 0.0, 0.0, 0.0, 0.0], 0.1)
    assert (est.rate, est.dependency, est.bias, est.reach) == (0.0, 1.0, 0.0, 1.0)
    assert estimate_dependency([1.0, 0.0, 0.0], 0.1).dependency == 0.0


def test_a_held_memory_is_kept_whole_although_its_gradient_mass_is_small():
    """A profile that is flat up to lag D (a memory held at constant strength, its write at D) and then falls off:
    the mass criterion cuts it short (at about 0.9·D for a target of 0.1), the reach keeps all of it."""
    for held in (12, 20, 30):
        g = np.concatenate([np.ones(held + 1), 1e-4 * 0.5 ** np.arange(40 - held)])
        est = estimate_dependency(g, 0.1)
        assert est.dependency < held  # what the mass criterion alone would keep
        assert est.reach == held
        assert max(est.dependency, est.reach) == held


def test_the_cell_profile_counts_where_the_hidden_one_has_decayed():
    """The numbers of a learned marker-recall model: ‖∂L/∂h‖ decays fast, ‖∂L/∂c‖ holds to the marker's lag."""
    lags = np.arange(33)
    hidden = 0.6**lags
    cell = np.where(lags <= 12, 0.07 + 0.93 * 0.5**lags, 1e-4 * 0.5 ** (lags - 12))
    alone = estimate_dependency(hidden, 0.1)
    both = estimate_state_dependency(hidden, cell, 0.1)
    assert max(alone.dependency, alone.reach) < 12
    assert both.dependency == 12
    assert estimate_state_dependency(hidden, None, 0.1).dependency == max(alone.dependency, alone.reach)


# ---- the controller and its loss guard ----


def _losses(first, last, mean, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    return [(n, float(mean + noise * rng.standard_normal())) for n in range(first, last)]


def test_a_decrease_that_makes_the_loss_rise_is_undone_and_not_retried():
    a = AdaptiveTruncation(2, 32, smoothing=0.0)
    assert a.observe(6.0, 0.5) and a.lag == 6
    a.decreased(step=100, previous_lag=32)
    assert not a.observe(3.0, 0.5) and a.lag == 6  # no further decrease while the verdict is pending
    losses = _losses(80, 100, 1.0) + _losses(100, 120, 1.3, seed=1)
    assert a.check_loss(losses, horizon=100 + GUARD_CHUNKS - 1) is None  # not all of the losses after it are in
    assert a.check_loss(losses, horizon=100 + GUARD_CHUNKS) is True
    assert a.lag == 32 and a.loss_floor == 32 and a.guard is None
    assert not a.observe(3.0, 0.5) and a.lag == 32  # the floor holds


def test_a_decrease_that_leaves_the_loss_unchanged_stays():
    a = AdaptiveTruncation(2, 32, smoothing=0.0)
    a.observe(10.0, 0.5)
    a.decreased(step=100, previous_lag=32)
    losses = _losses(80, 100, 1.0) + _losses(100, 120, 1.005, seed=1)  # within the noise
    assert a.check_loss(losses, horizon=200) is False
    assert a.lag == 10 and a.loss_floor == 0
    assert a.observe(5.0, 0.5) and a.lag == 5  # the next decrease may come


def test_controller_state_round_trips_with_a_pending_check():
    a = AdaptiveTruncation(2, 32, smoothing=0.3, reach_fraction=0.02)
    a.observe(7.0, 0.4, floor=3)
    a.decreased(step=40, previous_lag=32)
    b = AdaptiveTruncation(2, 32, smoothing=0.3, reach_fraction=0.02)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict() and b.guard == a.guard


def test_trainer_restores_the_lag_when_the_loss_rises_after_a_decrease():
    """A loss that triples whenever k2 < 20 (a task that needs 20 steps): the window shrinks on the gradient
    estimates, the guard sees the rise, restores the previous k2 and logs why."""
    torch.manual_seed(0)
    net = suite.RecallNet(8)
    gen = torch.Generator().manual_seed(1)
    x, y = suite.marker_recall(gen, 8, 600, lag=2)

    def loss_fn(pred, target):
        return suite.query_mse(pred, target) * (3.0 if trainer.k2 < 20 else 1.0)

    trainer = TBPTTTrainer(
        net,
        torch.optim.SGD(net.parameters(), lr=0.0),  # frozen: only the truncation moves the loss
        loss_fn,
        k1=4,
        adaptive=True,
        k_max=24,
        smoothing=0.0,
        telemetry_every=5,
        read_every=5,
        dependency_lags=0,
    )
    trainer.fit((x, y))
    events = trainer.history.events_of("truncation")
    reasons = [e["detail"].get("reason") for e in events]
    assert "loss_rose" in reasons
    rose = events[reasons.index("loss_rose")]["detail"]
    assert rose["k2"] >= 20 and rose["loss_floor"] == rose["lag"]
    assert events[reasons.index("loss_rose") - 1]["detail"]["k2"] < 20  # the decrease it undid
    assert trainer.k2 >= 20  # and it was not retried


# ---- a memory held in the cell alone ----


def _cell_memory_net(hidden: int = 4) -> suite.RecallNet:
    """Weights that solve marker recall with one cell unit and nothing else: unit 0 opens its input gate and closes
    its forget gate at a marker (writing tanh(2·value)), holds it with forget gate σ(10) in between, and the head
    reads h_0 = σ(0)·tanh(c_0). W_hh = 0, so no gradient reaches h before the loss step through the recurrence:
    ‖∂L/∂h‖ is zero at every lag > 0, while ‖∂L/∂c‖ stays up to the marker and stops there."""
    net = suite.RecallNet(hidden)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        w, b = net.lstm.weight_ih_l0, net.lstm.bias_ih_l0
        i, f, g = 0, hidden, 2 * hidden  # unit 0's rows in the gate blocks i, f, g, o
        w[i, suite.MARKER], b[i] = 20.0, -10.0
        w[f, suite.MARKER], b[f] = -20.0, 10.0
        w[g, suite.VALUE] = 2.0
        net.head.weight[0, 0] = 2.0  # answers ±0.74 for ±1: a residual remains, so gradients flow
    return net


def test_a_memory_held_in_the_cell_alone_keeps_the_window():
    """Frozen weights whose only memory is one cell unit holding the marked value for `lag` steps: the window must
    not shrink below the lag, although ‖∂L/∂h‖ says nothing reaches past the loss step (an estimate from ‖∂L/∂h‖
    alone takes the window down to k_min). The float64 full-BPTT profile of the same weights is the independent
    reference."""
    lag, k1, k_max = 12, 4, 24
    net = _cell_memory_net()
    gen = torch.Generator().manual_seed(5)
    assert suite.held_out(net, gen, lag)["flip_follows"] == 1.0  # it is a memory of the marked value
    reference = suite.reference_profiles(net, gen, lag, k1, lags=20)
    cell, hidden = np.asarray(reference["cell"]), np.asarray(reference["hidden"])
    assert cell[lag] >= USED_GRADIENT * cell.max() and np.all(cell[lag + 1 :] < 1e-3 * cell.max())
    assert np.all(hidden[1:] < 1e-12 * hidden.max())
    x, y = suite.marker_recall(gen, 16, 400, lag)
    trainer = TBPTTTrainer(
        net,
        torch.optim.SGD(net.parameters(), lr=0.0),
        suite.query_mse,
        k1=k1,
        adaptive=True,
        k_max=k_max,
        telemetry_every=5,
        read_every=10,
        dependency_lags=0,  # the residual probe would see the lag too: only the gradients are tested here
    )
    trainer.fit((x, y))
    path = [e["detail"]["lag"] for e in trainer.history.events_of("truncation")]
    assert len(path) > 1 and path[-1] < k_max  # it shrank towards the memory's length
    assert min(path) >= lag  # and never below it
    estimates = trainer.history.extra["truncation_estimates"]
    assert all(e["hidden_reach"] == 0 for e in estimates if "hidden_reach" in e)
    assert all(e["cell_reach"] == min(lag, e["lag"]) for e in estimates)


# ---- marker recall: the memory the model learned is kept, a one-step dependency still shrinks ----

# A few seconds per run; tests/truncation_suite.py runs the full-size acceptance (lag 12, six seeds).
SMALL = {"hidden": 16, "rows": 16, "steps": 500, "epochs": 2, "lr": 1e-2}


@pytest.mark.parametrize("seed", [21, 23])
def test_marker_recall_keeps_the_learned_memory(seed):
    lag = 6
    trainer, net, gen = suite.train(seed, lag, **SMALL, k_max=16)
    assert suite.held_out(net, gen, lag)["query_error"] < 0.1  # it learned the task (guessing: 1)
    path = [e["detail"]["k2"] for e in trainer.history.events_of("truncation")]
    assert path[0] == 4 + 16 and len(path) > 1  # it moved
    assert all(k2 - 4 >= lag for k2 in path[1:])  # every loss of a chunk reached its marker, at every moment
    # the float64 full-BPTT profile of the trained weights: the window covers the lag the cell gradient reaches
    profiles = suite.reference_profiles(net, gen, lag, 4, lags=24)
    reach = max(estimate_dependency(p, 0.1).reach for p in profiles.values())
    assert trainer.k2 - 4 >= min(reach, 16) - 2


def test_one_step_dependency_still_shrinks():
    trainer, net, gen = suite.train(22, 1, **SMALL, k_max=24)
    assert suite.held_out(net, gen, 1)["query_error"] < 0.1
    assert trainer.k2 - 4 <= 24 // 2  # from k_max to half of it or less


def test_marker_recall_asks_for_the_marked_value_lag_steps_later():
    gen = torch.Generator().manual_seed(0)
    x, y = suite.marker_recall(gen, 3, 60, lag=5)
    markers = torch.nonzero(x[..., suite.MARKER])
    queries = torch.nonzero(x[..., suite.QUERY])
    assert len(markers) > 6 and torch.equal(queries, markers + torch.tensor([0, 5]))  # one pending at a time
    assert torch.equal(y[queries[:, 0], queries[:, 1], suite.ANSWER], x[markers[:, 0], markers[:, 1], suite.VALUE])
    assert torch.equal(y[..., suite.IS_QUERY], x[..., suite.QUERY])
    pred, flat = torch.randn(3 * 60, 1), y.reshape(-1, 2)
    asked = flat[:, suite.IS_QUERY] > 0
    want = nn.functional.mse_loss(pred[asked, 0], flat[asked, suite.ANSWER])
    assert float(suite.query_mse(pred, flat)) == pytest.approx(float(want), rel=1e-6)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_the_loss_guard_needs_a_rise_of_its_minimum_share_whatever_the_losses_sign(sign):
    """A 1% rise with no noise is significant but under the 5% minimum, for a loss of -10 as for one of 10 (a
    Gaussian negative log-likelihood is often below zero); a 10% rise is one."""
    before = (10.0 * sign, 0.0, 50)
    assert not loss_rose(before, (10.0 * sign + 0.1, 0.0, 50))
    assert loss_rose(before, (10.0 * sign + 1.0, 0.0, 50))


def test_a_chunk_with_a_nonfinite_residual_or_input_adds_nothing_to_the_residual_probe():
    """The trainer skips such a chunk's step; in the probe's sums one NaN made every correlation of the period 0."""
    rows, steps, lags, features = 2, 5, 3, 2
    g = torch.Generator().manual_seed(0)

    def chunk(poison: str | None):
        x = torch.randn(rows, lags + steps, features, generator=g)
        pred = torch.randn(rows * steps, 1, generator=g, requires_grad=True)
        target = torch.randn(rows * steps, 1, generator=g)
        if poison == "input":
            x[1, lags + 2, 0] = float("nan")
        if poison == "target":
            target[3, 0] = float("inf")
        return x, pred, target

    def run(poisons):
        probe = ResidualProbe(lags)
        for poison in poisons:
            x, pred, target = chunk(poison)
            probe.watch(pred, x, steps, None, True)
            ((pred - target) ** 2).sum().backward()
        return probe.take()[1]

    clean = run([None, None])
    for poison in ("input", "target"):
        g.manual_seed(0)
        poisoned = run([None, poison])
        g.manual_seed(0)
        first_only = run([None])
        for a, b in zip(poisoned, first_only):
            assert torch.isfinite(a).all() and torch.equal(a, b), poison
    assert not torch.equal(clean[0], first_only[0])  # the second clean chunk does add
