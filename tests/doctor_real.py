"""The doctor on real public datasets (tests/data/README.md; tests/failure_suite.py collects the scenarios).

Each dataset is trained healthy (features and, for forecasting, targets standardised with training statistics),
then pushed into the failures practitioners meet: features left in raw units, a learning rate that is too high,
windows shorter than the dependency, a NaN reading. BasicMotions and sunspots were used while the rules were
written; ItalyPowerDemand, co2 and elnino are held out (`held_out=True`): run only to measure.
"""

from __future__ import annotations

import csv
import gzip
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from failure_suite import Net, _s, make_monitor, make_trainer, single_threaded

DATA = os.path.join(os.path.dirname(__file__), "data")


# ---- loaders ----


def load_ts(name: str, split: str) -> tuple:
    """(x [N, T, C] float32, labels [N] int64) from tests/data/<name>_<split>.ts.gz (the aeon / UCR .ts format:
    one series per line after @data, channels separated by ':', the class label last)."""
    rows, labels = [], []
    with gzip.open(os.path.join(DATA, f"{name}_{split}.ts.gz"), "rt", encoding="utf-8") as handle:
        in_data = False
        for line in handle:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.lower() == "@data":
                in_data = True
                continue
            if in_data:
                *channels, label = line.split(":")
                rows.append([[float(v) for v in c.split(",")] for c in channels])
                labels.append(label)
    classes = sorted(set(labels))
    x = torch.tensor(np.array(rows, dtype=np.float32)).transpose(1, 2).contiguous()
    return x, torch.tensor([classes.index(c) for c in labels])


def load_series(name: str) -> np.ndarray:
    """One univariate series from the statsmodels CSVs: sunspots (yearly), co2 (weekly, NaN where missing), elnino
    (monthly, the year's twelve columns in order)."""
    with open(os.path.join(DATA, f"{name}.csv"), encoding="utf-8") as handle:
        rows = list(csv.reader(handle))[1:]
    if name == "elnino":
        values = [float(v) for row in rows for v in row[1:13]]
    else:
        values = [float(row[1]) if row[1] else math.nan for row in rows]
    return np.array(values, dtype=np.float64)


# ---- classification ----


def classify(name: str, *, lr=1e-2, optimizer="adam", raw_units=None, nan_at=None, steps=120, batch=20):
    """An LSTM classifier (cross-entropy on the last step) on an aeon dataset; validation on its TEST split.
    raw_units: (scale, offset) per channel turning the archive's values into raw sensor units; nan_at: the step
    whose batch gets one NaN reading."""

    @single_threaded
    def runner(seed: int) -> dict:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        x, y = load_ts(name, "TRAIN")
        xv, yv = load_ts(name, "TEST")
        if raw_units is not None:
            scale, offset = (torch.tensor(v, dtype=torch.float32) for v in raw_units)
            x, xv = x * scale + offset, xv * scale + offset
        else:
            mean, std = x.mean(dim=(0, 1)), x.std(dim=(0, 1))
            x, xv = (x - mean) / std, (xv - mean) / std
        classes = int(y.max()) + 1
        model = Net(x.shape[-1], outputs=classes)
        opt = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[optimizer](model.parameters(), lr=lr)
        monitor = make_monitor(model, optimizer=opt, every=5)
        for step in range(steps):
            rows = torch.randint(0, x.shape[0], (min(batch, x.shape[0]),), generator=gen)
            xb, yb = x[rows], y[rows]
            if step == nan_at:
                xb = xb.clone()
                xb[1, xb.shape[1] // 2, 0] = float("nan")  # one dropped sensor sample
            pred, _ = model(xb)
            loss = F.cross_entropy(pred[:, -1], yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step(loss=loss.detach())
            if (step + 1) % 10 == 0:
                monitor.evaluate(_validate(model, monitor, lambda: F.cross_entropy(model(xv)[0][:, -1], yv)))
        return monitor.history.to_dict()

    return runner


# ---- forecasting ----


def forecast(name: str, *, lr=1e-2, optimizer="adam", raw=False, nan_at=None, window=24, steps=150, fill=True):
    """Next-value forecasting of a statsmodels series from windows of `window` steps (loss at every step), the
    first 80% of the series for training, the rest for validation. raw: leave the series in its units (inputs and
    targets); nan_at: one reading of the training series replaced by NaN; fill: interpolate missing readings."""

    @single_threaded
    def runner(seed: int) -> dict:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        series = load_series(name)
        if fill:
            series = _interpolate(series)
        split = int(0.8 * series.size)
        if nan_at is not None:
            series = series.copy()
            series[nan_at] = math.nan
        train, val = series[:split], series[split - window :]
        if not raw:
            mean, std = np.nanmean(train), np.nanstd(train)
            train, val = (train - mean) / std, (val - mean) / std
        model = Net(1)
        opt = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[optimizer](model.parameters(), lr=lr)
        monitor = make_monitor(model, optimizer=opt, every=5)
        xv, yv = _windows(val, window, np.arange(val.size - window))
        for step in range(steps):
            starts = torch.randint(0, train.size - window, (16,), generator=gen).numpy()
            xb, yb = _windows(train, window, starts)
            pred, _ = model(xb)
            loss = (pred - yb).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step(loss=loss.detach(), targets=yb)
            if (step + 1) % 10 == 0:
                monitor.evaluate(_validate(model, monitor, lambda: (model(xv)[0] - yv).pow(2).mean()))
        return monitor.history.to_dict()

    return runner


def truncated_forecast(name: str, *, k: int, streams: int = 8, epochs: int = 4):
    """Next-value forecasting with fastlstm.TBPTTTrainer over `streams` overlapping streams of the training series
    (starting one step apart), truncated at k1 = k2 = k steps; validation on the rest of the series at each epoch
    end (the streams are in phase, so validating within an epoch would sample the model at different phases)."""

    @single_threaded
    def runner(seed: int) -> dict:
        torch.manual_seed(seed)
        series = _interpolate(load_series(name))
        split = int(0.8 * series.size)
        mean, std = series[:split].mean(), series[:split].std()
        series = (series - mean) / std
        train, val = series[:split], series[split:]
        span = train.size - streams
        x, y = _windows(train, span, np.arange(streams))
        xv, yv = _windows(val, val.size - 1, [0])
        model = Net(1)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        trainer = make_trainer(model, opt, torch.nn.MSELoss(), k1=k, k2=k, telemetry_every=5, read_every=10)
        return trainer.fit((x, y), epochs=epochs, val_data=(xv, yv)).to_dict()

    return runner


def _interpolate(series: np.ndarray) -> np.ndarray:
    missing = np.isnan(series)
    if not missing.any():
        return series
    index = np.arange(series.size)
    filled = series.copy()
    filled[missing] = np.interp(index[missing], index[~missing], series[~missing])
    return filled


def _windows(series: np.ndarray, window: int, starts) -> tuple:
    """x [B, window, 1] = series[s : s+window], y = series[s+1 : s+window+1]."""
    x = np.stack([series[s : s + window] for s in starts])
    y = np.stack([series[s + 1 : s + window + 1] for s in starts])
    as_tensor = lambda a: torch.tensor(a, dtype=torch.float32).unsqueeze(-1)
    return as_tensor(x), as_tensor(y)


@torch.no_grad()
def _validate(model, monitor, loss) -> float:
    """A validation loss with telemetry and input statistics off (not a training pass)."""
    model.eval()
    model.lstm.telemetry.enabled = False
    try:
        with monitor.paused():
            return float(loss())
    finally:
        model.lstm.telemetry.enabled = True
        model.train()


# ---- scenarios ----

# Raw units of BasicMotions: accelerometer counts of a ±2 g, 16-bit sensor (16384 per g), gyroscope counts at
# 131 per degree/s (the archive stores g and rad/s).
BASIC_MOTIONS_RAW = ([16384.0] * 3 + [131.0 * 180.0 / math.pi] * 3, [0.0] * 6)
ITALY_POWER_RAW = ([4500.0], [30000.0])  # megawatts: a day's demand of about 30 GW, varying by a few GW
DIVERGING_ALLOWED = {
    "gate_saturation",
    "exploding_gradients",
    "vanishing_gradients",
    "val_oscillation",
    "train_val_divergence",
    "non_finite",
}


def _dataset_scenarios(name: str, held_out: bool, runners: dict, what: str) -> list:
    expect = {
        "healthy": ((), ()),
        "raw_units": (
            {"unscaled_inputs"},
            {
                "gate_saturation",
                "loss_stagnant",
                "exploding_gradients",
                "unscaled_targets",
                "vanishing_gradients",
                "val_oscillation",
            },
        ),
        "lr_too_high": ({"loss_diverging"}, DIVERGING_ALLOWED),
        # A NaN reading in the first batch also makes the very first loss NaN.
        "nan_reading": ({"non_finite"}, {"loss_stagnant", "initial_loss_nonfinite"}),
        "windows_too_short": ({"truncation_too_short"}, {"loss_stagnant"}),
        "missing_readings": ({"non_finite"}, {"loss_stagnant", "initial_loss_nonfinite"}),
    }
    result = []
    for variant, runner in runners.items():
        expected, allowed = expect[variant]
        result.append(
            _s(
                f"{name}_{variant}",
                None,
                expected,
                allowed,
                what=f"{what}: {variant.replace('_', ' ')}",
                runner=runner,
                group="real",
                held_out=held_out,
            )
        )
    return result


SCENARIOS = (
    _dataset_scenarios(
        "basicmotions",
        False,
        {
            "healthy": classify("BasicMotions"),
            "raw_units": classify("BasicMotions", raw_units=BASIC_MOTIONS_RAW),
            "lr_too_high": classify("BasicMotions", optimizer="sgd", lr=100.0),
            "nan_reading": classify("BasicMotions", nan_at=40),
        },
        "BasicMotions (aeon), 6 channels × 100 steps, 4 classes",
    )
    + _dataset_scenarios(
        "sunspots",
        False,
        {
            "healthy": forecast("sunspots"),
            "raw_units": forecast("sunspots", raw=True),
            "lr_too_high": forecast("sunspots", optimizer="sgd", lr=5.0),
            "nan_reading": forecast("sunspots", nan_at=100),
            "windows_too_short": truncated_forecast("sunspots", k=3),
        },
        "sunspots (statsmodels), yearly",
    )
    + _dataset_scenarios(
        "italypower",
        True,
        {
            "healthy": classify("ItalyPowerDemand"),
            "raw_units": classify("ItalyPowerDemand", raw_units=ITALY_POWER_RAW),
            "lr_too_high": classify("ItalyPowerDemand", optimizer="sgd", lr=100.0),
            "nan_reading": classify("ItalyPowerDemand", nan_at=40),
        },
        "ItalyPowerDemand (aeon), 24 hourly values, 2 classes",
    )
    + _dataset_scenarios(
        "co2",
        True,
        {
            "healthy": forecast("co2", window=52),
            "raw_units": forecast("co2", window=52, raw=True),
            "lr_too_high": forecast("co2", window=52, optimizer="sgd", lr=5.0),
            "missing_readings": forecast("co2", window=52, fill=False),
            "windows_too_short": truncated_forecast("co2", k=4, epochs=1, streams=4),
        },
        "co2 (statsmodels), weekly, 59 readings missing",
    )
    + _dataset_scenarios(
        "elnino",
        True,
        {
            "healthy": forecast("elnino"),
            "raw_units": forecast("elnino", raw=True),
            "lr_too_high": forecast("elnino", optimizer="sgd", lr=5.0),
            "nan_reading": forecast("elnino", nan_at=200),
            "windows_too_short": truncated_forecast("elnino", k=3),
        },
        "elnino (statsmodels), monthly sea surface temperature",
    )
)
