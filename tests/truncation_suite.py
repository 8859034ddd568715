"""Adaptive truncation on marker recall: does the window keep the memory the model has learned?

A stream shows a random ±1 value at every step; a marker flag picks one of them, and `lag` steps later a query flag
asks for it (the loss counts the queries only). Markers are spaced so that one value is pending at a time. The model
must learn to write the marked value into its cell state and hold it for exactly `lag` steps: a dependency of
`lag` steps that, once learned, the residual probe no longer sees and ‖∂L/∂h‖ alone under-reports.

For each seed the run trains fastlstm.LSTM + a linear head with TBPTTTrainer(adaptive=True) and reports the final
k2, the truncation events, the held-out query error (guessing scores 1), how often flipping the marked value flips
the answer, and, from a float64 torch.nn.LSTM with the trained weights, the full-BPTT profile of ‖∂L/∂h‖ and
‖∂L/∂c‖ by lag (the independent reference for what the telemetry measured).

Used by tests/test_truncation.py (one small run) and runnable on its own for the acceptance figures of
docs/training.md:

    python tests/truncation_suite.py --seeds 0 1 2 3 4 5 --lag 12
    python tests/truncation_suite.py --seeds 0 1 2 3 4 5 --lag 1
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np
import torch
from torch import nn

from fastlstm.tbptt import TBPTTTrainer

try:
    from support import Forecaster, lstm_cell_step, one_cpu_thread
except ImportError:  # imported as tests.truncation_suite
    from tests.support import Forecaster, lstm_cell_step, one_cpu_thread

VALUE, MARKER, QUERY = 0, 1, 2  # input channels
ANSWER, IS_QUERY = 0, 1  # target channels


def marker_recall(gen: torch.Generator, rows: int, steps: int, lag: int, spacing: int = 6):
    """(inputs [rows, steps, 3], targets [rows, steps, 2]); after each query the next marker comes 1..spacing steps
    later, so that exactly one value is pending at any time."""
    x = torch.zeros(rows, steps, 3)
    y = torch.zeros(rows, steps, 2)
    x[..., VALUE] = torch.randint(0, 2, (rows, steps), generator=gen).float() * 2 - 1
    for b in range(rows):
        t = int(torch.randint(0, spacing, (1,), generator=gen))
        while t + lag < steps:
            query = t + lag
            x[b, t, MARKER] = 1.0
            x[b, query, QUERY] = 1.0
            y[b, query, ANSWER] = x[b, t, VALUE]
            y[b, query, IS_QUERY] = 1.0
            t = query + 1 + int(torch.randint(0, spacing, (1,), generator=gen))
    return x, y


def query_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the query positions (zero for a chunk without a query)."""
    weight = target[:, IS_QUERY]
    err = (pred[:, 0] - target[:, ANSWER]).square() * weight
    return err.sum() / weight.sum().clamp_min(1.0)


class RecallNet(Forecaster):
    """The shared Forecaster on the recall task's three input channels and one output."""

    def __init__(self, hidden: int):
        super().__init__(3, 1, hidden)


# ---- one run ----

DEFAULTS = {"hidden": 32, "rows": 32, "steps": 1000, "epochs": 6, "lr": 3e-3, "k1": 4, "k_max": 32}


def train(seed: int, lag: int, **options) -> tuple:
    """(trainer, model, data generator) after training with adaptive truncation."""
    cfg = {**DEFAULTS, **options}
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(10_000 + seed)
    data = marker_recall(gen, cfg["rows"], cfg["steps"], lag)
    net = RecallNet(cfg["hidden"])
    trainer = TBPTTTrainer(
        net,
        torch.optim.Adam(net.parameters(), lr=cfg["lr"]),
        query_mse,
        k1=cfg["k1"],
        adaptive=True,
        k_max=cfg["k_max"],
        telemetry_every=cfg.get("telemetry_every", 10),
        read_every=cfg.get("read_every", 50),
    )
    trainer.fit(data, epochs=cfg["epochs"])
    return trainer, net, gen


def held_out(net: RecallNet, gen: torch.Generator, lag: int, rows: int = 64, steps: int = 300) -> dict:
    """Query error on fresh streams (full sequences, no truncation), and the fraction of queries whose answer
    changes sign when the marked value is flipped."""
    x, y = marker_recall(gen, rows, steps, lag)
    with torch.no_grad():
        pred = net(x)[0][..., 0]
        queries = y[..., IS_QUERY] > 0
        error = float((pred - y[..., ANSWER])[queries].square().mean())
        flipped = x.clone()
        markers = x[..., MARKER] > 0
        flipped[..., VALUE] = torch.where(markers, -x[..., VALUE], x[..., VALUE])
        pred_flipped = net(flipped)[0][..., 0]
        follows = float((torch.sign(pred_flipped[queries]) == -torch.sign(pred[queries])).float().mean())
    return {"query_error": error, "flip_follows": follows}


def reference_profiles(net: RecallNet, gen: torch.Generator, lag: int, k1: int, lags: int = 40) -> dict:
    """Full BPTT in float64 on torch.nn.LSTM with the trained weights: RMS over windows of ‖∂L/∂h_{s-k}‖ and
    ‖∂L/∂c_{s-k}‖, where L is the query loss of the k1 steps [s, s+k1), one step at a time from the stream start."""
    lstm = nn.LSTM(3, net.lstm.hidden_size, batch_first=True, dtype=torch.float64)
    lstm.load_state_dict(net.lstm.state_dict())
    head = nn.Linear(net.lstm.hidden_size, 1, dtype=torch.float64)
    head.load_state_dict(net.head.state_dict())
    rows, steps = 32, lags + 8 * k1
    x, y = (t.double() for t in marker_recall(gen, rows, steps, lag))
    h_sq, c_sq, windows = np.zeros(lags + 1), np.zeros(lags + 1), 0
    for s in range(lags, steps - k1 + 1, k1):
        h = c = torch.zeros(rows, net.lstm.hidden_size, dtype=torch.float64)
        hs, cs, preds = [], [], []
        for t in range(s + k1):
            h, c = lstm_cell_step(lstm, 0, x[:, t], h, c)
            h.retain_grad()
            c.retain_grad()
            hs.append(h)
            cs.append(c)
            if t >= s:
                preds.append(head(h))
        pred = torch.stack(preds, dim=1).reshape(-1, 1)
        query_mse(pred, y[:, s : s + k1].reshape(-1, 2)).backward()
        for k in range(lags + 1):
            h_sq[k] += float(hs[s - k].grad.square().sum())
            c_sq[k] += float(cs[s - k].grad.square().sum())
        windows += 1
    return {"hidden": np.sqrt(h_sq / windows).tolist(), "cell": np.sqrt(c_sq / windows).tolist()}


def run(seed: int, lag: int, **options) -> dict:
    start = time.time()
    trainer, net, gen = train(seed, lag, **options)
    events = trainer.history.events_of("truncation")
    profiles = reference_profiles(net, gen, lag, trainer.k1)
    ratio = {part: values[lag] / max(values) for part, values in profiles.items()}
    return {
        "seed": seed,
        "lag": lag,
        "k1": trainer.k1,
        "k2": trainer.k2,
        "k2_path": [e["detail"]["k2"] for e in events],
        "reasons": [e["detail"].get("reason") for e in events],
        **held_out(net, gen, lag),
        "reference_ratio_at_lag": ratio,
        "seconds": round(time.time() - start, 1),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--lag", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    results = []
    for seed in args.seeds:
        with one_cpu_thread():
            r = run(seed, args.lag, epochs=args.epochs)
        results.append(r)
        print(
            f"seed {seed}: k2 {r['k2']} (path {r['k2_path']}), query error {r['query_error']:.2e}, "
            f"flip follows {r['flip_follows']:.2f}, reference |dL/dh|, |dL/dc| at lag {args.lag} / peak: "
            f"{r['reference_ratio_at_lag']['hidden']:.3f}, {r['reference_ratio_at_lag']['cell']:.3f} "
            f"({r['seconds']} s)",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    k2 = [r["k2"] for r in results]
    print(f"k2 over seeds: min {min(k2)}, max {max(k2)}; every k2 > {args.lag}: {all(v > args.lag for v in k2)}")
    return 0 if math.isfinite(sum(k2)) else 1


if __name__ == "__main__":
    sys.exit(main())
