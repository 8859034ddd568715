"""What the Monitor records for the doctor's optimisation rules, against values the test computes itself: the
gradient norm before clipping (what clip_grad_norm_ returns) and the norm the step used, the update-to-weight
ratio of the sampled steps, the carried-state counts, and that none of it reads the device in the step."""

from __future__ import annotations

import failure_suite as suite
import numpy as np
import pytest
import torch
from support import HostReadGuard

import fastlstm

pytestmark = pytest.mark.usefixtures("single_cpu_thread")


def _params_flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def test_norms_before_and_after_clipping_and_the_update_ratio():
    torch.manual_seed(0)
    model = suite.Net(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    monitor = fastlstm.Monitor(model, optimizer=opt, every=3)
    gen = torch.Generator().manual_seed(0)
    expected_before, expected_after, expected_ratio = [], [], {}
    for step in range(7):
        x, y = suite.sines(gen, 8, 12)
        loss = (model(x)[0] - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        clip = 0.05 if step % 2 else 100.0  # clipped on odd steps only
        expected_before.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        expected_after.append(
            float(torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in model.parameters()])))
        )
        before = _params_flat(model)
        opt.step()
        if step % 3 == 0:
            expected_ratio[step] = float((_params_flat(model) - before).norm() / before.norm())
        monitor.step(loss=loss.detach())
    steps = monitor.history.steps
    np.testing.assert_allclose([s["grad_norm"] for s in steps], expected_before, rtol=1e-5)
    np.testing.assert_allclose([s["grad_norm_applied"] for s in steps], expected_after, rtol=1e-5)
    assert all(s["grad_norm_applied"] < s["grad_norm"] for s in steps[1::2])  # clipping shows where it acted
    ratios = {s["step"]: s["update_ratio"] for s in steps if "update_ratio" in s}
    assert ratios.keys() == expected_ratio.keys()
    for step, value in expected_ratio.items():
        assert ratios[step] == pytest.approx(value, rel=1e-4)


def test_carried_state_is_counted_per_window():
    """Chunks of a stream: the first from no state, then carried and detached; one chunk given fresh zeros and one
    that keeps the graph of the previous chunk. Validation (no grad) passes are not training passes."""
    torch.manual_seed(0)
    model = suite.Net(2)
    monitor = fastlstm.Monitor(model, every=6, grad_norm=False)
    x = torch.randn(4, 36, 2)
    state = None
    for k in range(6):
        chunk = x[:, 6 * k : 6 * (k + 1)]
        if k == 3:
            state = tuple(torch.zeros_like(t) for t in state)
        pred, new = model(chunk, state)
        pred.pow(2).mean().backward(retain_graph=True)
        state = new if k == 4 else tuple(t.detach() for t in new)  # chunk 5 gets an attached state
        monitor.step(loss=1.0)
    with torch.no_grad():
        model(x, state)
    entries = monitor.history.to_dict()["states"]
    assert entries == [
        {
            "step": 5,
            "first_step": 0,
            "lstm": "lstm",
            "passes": 6,
            "with_state": 5,
            "attached_state": 1,
            "timesteps": 6,
            "nonzero_state": 4,
        },
    ]


def test_the_step_and_findings_never_read_the_device():
    torch.manual_seed(0)
    model = suite.Net(3)
    # SGD: torch's CPU Adam reads its step counter with .item() itself, which is not the Monitor's doing.
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    monitor = fastlstm.Monitor(model, optimizer=opt, every=1000, read_every=1000)
    gen = torch.Generator().manual_seed(0)
    x, y = suite.sines(gen, 8, 12)
    state = None

    def one_step():
        nonlocal state
        pred, new = model(x, state)
        state = tuple(t.detach() for t in new)
        loss = (pred - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1, foreach=True)
        opt.step()
        monitor.step(loss=loss.detach(), targets=y)

    one_step()  # first use allocates
    with HostReadGuard() as guard:
        for _ in range(3):
            one_step()
        steps_reads = list(guard.reads)
        findings = monitor.findings()
    assert steps_reads == [], f"host reads in the training step: {steps_reads}"
    assert guard.reads == [], f"monitor.findings() read the device: {guard.reads}"
    assert findings == fastlstm.diagnose(monitor.live_history)
    # Once read, the values are there: the same steps, now with their losses and norms.
    assert all(s["loss"] is not None and s["grad_norm_applied"] <= 0.1 + 1e-6 for s in monitor.history.steps)
