"""Failure reproductions in the user's own training loops (tests/failure_suite.py collects them): a stream cut into
chunks with the state carried over, a classifier whose loss converges to zero, learning rates that make the loss
diverge (constant, or a warm-up that peaks too high), and a converging run whose gradient is clipped at every step.

Each runner trains a small fastlstm.LSTM on the CPU with a plain loop and a fastlstm.Monitor given the optimizer,
and returns the History dict.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from failure_suite import Net, _s, make_monitor, sines, single_threaded


def stream_task(gen: torch.Generator, batch: int, length: int, kind: str, span: int):
    """Long streams x [B, length, 2] with y [B, length, 1]: kind "lag" is y_t = x_(t-span) (feature 0); kind
    "mean" is the running sum of feature 0 over the last `span` steps, scaled to unit variance, which a network
    learns as a leaky integrator whose memory reaches `span` steps back."""
    x = torch.randn(batch, length, 2, generator=gen)
    y = torch.zeros(batch, length, 1)
    if kind == "lag":
        y[:, span:, 0] = x[:, :-span, 0]
    else:
        total = torch.cumsum(x[:, :, 0], dim=1)
        window = total.clone()
        window[:, span:] = total[:, span:] - total[:, :-span]
        y[:, :, 0] = window / math.sqrt(span)
    return x, y


def chunked_stream(kind: str, span: int, chunk: int, steps: int = 150, length: int = 256):
    """The loop people write for long streams: cut each batch of streams into chunks, carry the LSTM state from
    one chunk to the next, detached (so backpropagation stops at each chunk's start), one step per chunk."""

    @single_threaded
    def runner(seed: int) -> dict:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        model = Net(2)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        monitor = make_monitor(model, optimizer=opt, every=5)
        while monitor.step_count < steps:
            x, y = stream_task(gen, 16, length, kind, span)
            state = None
            for start in range(0, length, chunk):
                if monitor.step_count >= steps:
                    break
                pred, state = model(x[:, start : start + chunk], state)
                state = tuple(t.detach() for t in state)
                loss = (pred - y[:, start : start + chunk]).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                monitor.step(loss=loss.detach(), targets=y[:, start : start + chunk])
        return monitor.history.to_dict()

    return runner


@single_threaded
def classifier_to_zero(seed: int, steps: int = 300) -> dict:
    """A classifier on well separated classes (32 fixed sequences): cross-entropy converges towards zero and the
    gradient norm collapses by orders of magnitude with it, as on a small real training set."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 20, 2, generator=gen)
    y = (torch.rand(32, generator=gen) < 0.5).long()
    x = x + 2.0 * (2.0 * y[:, None, None].float() - 1.0)
    model = Net(2, outputs=2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    monitor = make_monitor(model, optimizer=opt, every=5)
    for _ in range(steps):
        pred, _ = model(x)
        loss = F.cross_entropy(pred[:, -1], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        monitor.step(loss=loss.detach())
    return monitor.history.to_dict()


def forecaster(optimizer: str, lr: float, *, clip: float | None = None, warmup: tuple | None = None, steps=120):
    """The 1-layer sine forecaster of the synthetic scenarios, with the optimiser, clipping and learning-rate
    schedule given: warmup = (steps, peak) raises the rate linearly from lr to peak over that many steps."""

    @single_threaded
    def runner(seed: int) -> dict:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        val = sines(torch.Generator().manual_seed(seed + 1), 64, 32)
        model = Net(3)
        opt = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[optimizer](model.parameters(), lr=lr)
        monitor = make_monitor(model, optimizer=opt, every=5)
        for step in range(steps):
            if warmup is not None:
                length, peak = warmup
                for group in opt.param_groups:
                    group["lr"] = lr + (peak - lr) * min(1.0, step / length)
            x, y = sines(gen, 16, 32)
            pred, _ = model(x)
            loss = (pred - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            monitor.step(loss=loss.detach(), targets=y)
            if (step + 1) % 10 == 0:
                with torch.no_grad(), monitor.paused():
                    model.lstm.telemetry.enabled = False
                    monitor.evaluate(float((model(val[0])[0] - val[1]).pow(2).mean()), epoch=(step + 1) // 10)
                    model.lstm.telemetry.enabled = True
        return monitor.history.to_dict()

    return runner


SCENARIOS = [
    _s(
        "healthy_chunked_loop",
        None,
        runner=chunked_stream("lag", 3, chunk=16),
        group="loops",
        what="user loop: streams in chunks of 16, state carried and detached; y_t = x_(t-3)",
    ),
    _s(
        "truncation_chunked_loop",
        None,
        runner=chunked_stream("mean", 24, chunk=8),
        group="loops",
        expected={"truncation_too_short"},
        allowed={"loss_stagnant"},
        what="user loop: chunks of 8, state carried and detached; y = running sum of the last 24 inputs",
    ),
    _s(
        "healthy_classifier_to_zero",
        None,
        runner=classifier_to_zero,
        group="loops",
        what="classifier on well separated classes: cross-entropy and gradient norm fall by orders of magnitude",
    ),
    _s(
        "healthy_clipped_every_step",
        None,
        runner=forecaster("sgd", 0.5, clip=0.05),
        group="loops",
        what="SGD lr=0.5 with the gradient clipped to 0.05 at every step, converging",
    ),
    _s(
        "diverging_lr",
        None,
        runner=forecaster("sgd", 1.0),
        group="loops",
        expected={"loss_diverging"},
        allowed={"gate_saturation", "exploding_gradients", "val_oscillation", "train_val_divergence", "non_finite"},
        what="SGD at lr=1, no clipping: the loss climbs by ten orders of magnitude and stays finite",
    ),
    _s(
        "diverging_warmup",
        None,
        runner=forecaster("sgd", 0.05, warmup=(60, 20.0)),
        group="loops",
        expected={"loss_diverging"},
        allowed={"gate_saturation", "exploding_gradients", "val_oscillation", "train_val_divergence", "non_finite"},
        what="SGD warmed up linearly from 0.05 to 20 over 60 steps",
    ),
]
