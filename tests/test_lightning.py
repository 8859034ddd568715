"""The Lightning callback: a tiny CPU training logs telemetry through the logger, records a history the doctor and
`fastlstm doctor` read, and stops an induced failure with its location (seconds on one thread)."""

from __future__ import annotations

import csv
import math
import os

import pytest
import torch

lightning = pytest.importorskip("lightning")

import failure_suite as suite
from lightning.pytorch.loggers import CSVLogger
from support import one_cpu_thread

import fastlstm
from fastlstm import cli
from fastlstm.integrations.lightning import DoctorCallback


class Forecaster(lightning.LightningModule):
    def __init__(self, lr: float, nan_at_step: int | None = None):
        super().__init__()
        self.net = suite.Net(3)
        self.lr, self.nan_at_step = lr, nan_at_step

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.global_step == self.nan_at_step:
            x = x.clone()
            x[2, 5, 1] = math.nan  # one corrupted reading
        pred, _ = self.net(x)
        return (pred - y).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", (self.net(x)[0] - y).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def _loaders(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x, y = suite.sines(gen, 96, 24)
    xv, yv = suite.sines(gen, 32, 24)
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=False)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xv, yv), batch_size=32)
    return train, val


def _fit(tmp_path, module, callback, epochs):
    trainer = lightning.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(str(tmp_path)),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    with one_cpu_thread():
        trainer.fit(module, *_loaders())
    return trainer


class _Scheduled(Forecaster):
    """Halves the learning rate every optimizer step, and keeps what each training_step computed and used."""

    def __init__(self):
        super().__init__(lr=1e-2)
        self.seen = []  # (loss, lr) per training_step call

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.seen.append((loss.item(), self.trainer.optimizers[0].param_groups[0]["lr"]))
        return loss

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        step = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": step, "interval": "step"}}


def test_each_step_records_the_lr_it_used_and_its_micro_batches_mean_loss(tmp_path):
    # Lightning steps the scheduler, and hands over the loss divided by accumulate_grad_batches, before the
    # callback records the step.
    module, callback = _Scheduled(), DoctorCallback(stop_on=None, every=2)
    trainer = lightning.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accumulate_grad_batches=2,
        num_sanity_val_steps=0,
    )
    with one_cpu_thread():
        trainer.fit(module, *_loaders())
    steps = callback.monitor.history.steps
    pairs = [module.seen[i : i + 2] for i in range(0, len(module.seen), 2)]  # 6 batches: 3 steps of 2
    assert len(steps) == len(pairs) == 3
    for step, pair in zip(steps, pairs):
        assert step["loss"] == pytest.approx(sum(loss for loss, _ in pair) / 2, rel=1e-6)
        assert step["lr"] == pytest.approx(pair[-1][1], rel=1e-12)  # the lr in use when the step ran
    assert [s["lr"] for s in steps] == pytest.approx([1e-2, 5e-3, 2.5e-3])


def _logged_columns(trainer) -> set:
    with open(os.path.join(trainer.logger.log_dir, "metrics.csv"), encoding="utf-8") as handle:
        return set(next(csv.reader(handle)))


def test_callback_logs_telemetry_and_records_a_history(tmp_path, capsys):
    torch.manual_seed(0)
    path = str(tmp_path / "history.json")
    callback = DoctorCallback(every=3, history_path=path, targets=lambda batch: batch[1])
    trainer = _fit(tmp_path, Forecaster(lr=1e-2), callback, epochs=3)
    assert trainer.current_epoch == 3 and callback.stopped_by is None
    columns = _logged_columns(trainer)
    assert {"fastlstm/net.lstm/layer0/saturation_f", "fastlstm/net.lstm/layer0/grad_norm_last_step"} <= columns
    assert "fastlstm/doctor/error" in columns
    history = fastlstm.History.load(path)
    assert len(history.steps) == 3 * 6  # one entry per optimizer step: 96 / 16 batches × 3 epochs
    assert all(s["lr"] == 1e-2 and s["grad_norm"] > 0 and "grad_norm_applied" in s for s in history.steps)
    assert [e["epoch"] for e in history.evals] == [0, 1, 2] and history.telemetry and history.targets
    # Validation passes stayed out of the input statistics: only training batches were counted.
    assert sum(e["count"] for e in history.inputs) == 3 * 96 * 24
    assert not [f for f in fastlstm.diagnose(history) if f.severity != "info"]
    assert cli.main(["doctor", path, "--fail-on", "warning"]) == 0
    capsys.readouterr()


def test_callback_stops_on_an_error_and_names_where_it_arose(tmp_path):
    torch.manual_seed(0)
    printed = []
    callback = DoctorCallback(every=2, read_every=2, printer=printed.append)
    trainer = _fit(tmp_path, Forecaster(lr=1e-2, nan_at_step=4), callback, epochs=5)
    assert trainer.current_epoch < 4  # stopped long before max_epochs
    assert callback.stopped_by is not None and callback.stopped_by.code == "non_finite"
    where = callback.stopped_by.evidence["first_location"]
    assert (where["stage"], where["tensor"], where["timestep"]) == ("forward", "input", 5)
    text = "\n".join(printed)
    assert "stopping training on non_finite" in text and "timestep 5" in text
    assert "[ERROR] non_finite" in text
