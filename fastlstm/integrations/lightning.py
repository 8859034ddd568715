"""A Lightning callback that attaches a fastlstm.Monitor to the LightningModule being trained and runs the doctor.

    from fastlstm.integrations.lightning import DoctorCallback
    trainer = lightning.Trainer(callbacks=[DoctorCallback(history_path="history.json")])

What it does, without host synchronisation in the training step (every device value goes through the Monitor's
batched, lazy reads):
  * records each optimizer step: the loss `training_step` returned (the mean over the step's micro-batches under
    gradient accumulation), the learning rate the step used, the gradient norm before
    clipping (taken in `on_before_optimizer_step`, which Lightning calls before it clips) and the norm the step
    used, the update-to-weight ratio every `every` steps, the LSTMs' telemetry windows and input statistics;
  * logs every closed telemetry window through `LightningModule.log_dict` (host numbers, so any logger gets them:
    TensorBoard, W&B, MLflow, CSV), and the number of findings per severity at each epoch end;
  * prints the findings that are new at the end of each training epoch, root causes first;
  * stops training (`trainer.should_stop`) on a finding at `stop_on` severity or worse ("error" by default; None
    never stops), checked at every epoch end and as soon as a batched read brings back a non-finite loss (a few
    steps after it happened, never by waiting for the device), naming where the first NaN/inf arose;
  * validation passes are kept out of the telemetry and input statistics; the validation loss logged under
    `val_loss_key` is recorded as an evaluation.

Needs `lightning` (or the older `pytorch_lightning`); the history is written with `History.save`, so
`fastlstm doctor history.json` reads it.
"""

from __future__ import annotations

import math

import torch

from ..doctor import SEVERITIES, format_report
from ..monitor import Monitor

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the package before its rename
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError as exc:
        raise ImportError('fastlstm.integrations.lightning needs Lightning: pip install "fastlstm[lightning]"') from exc


class DoctorCallback(Callback):
    """Monitor + doctor for a Lightning training run (see the module docstring).

    Args:
      every, read_every: the Monitor's telemetry window and read periods, in optimizer steps.
      instrument_every: record telemetry on every this many optimizer steps only (the Monitor's option).
      stop_on:        stop training on a finding of this severity or worse ("error", "warning"), or None.
      val_loss_key:   the logged metric recorded as the validation loss.
      targets:        optional `batch -> target tensor`, for the target statistics of the data rules.
      history_path:   write the history there when fit ends (and when training is stopped by a finding).
      log_telemetry:  log each telemetry window through log_dict.
      prefix:         of the logged metric names.
      printer:        called with each report text (default: print, on global rank 0 only).
    """

    def __init__(
        self,
        *,
        every: int = 10,
        read_every: int | None = None,
        instrument_every: int = 1,
        stop_on: str | None = "error",
        val_loss_key: str = "val_loss",
        targets=None,
        history_path: str | None = None,
        log_telemetry: bool = True,
        prefix: str = "fastlstm",
        printer=None,
    ):
        if stop_on is not None and stop_on not in SEVERITIES:
            raise ValueError(f"stop_on must be one of {SEVERITIES} or None, got {stop_on!r}")
        self.every, self.read_every, self.instrument_every = every, read_every, instrument_every
        self.stop_on = stop_on
        self.val_loss_key = val_loss_key
        self.targets = targets
        self.history_path = history_path
        self.log_telemetry = log_telemetry
        self.prefix = prefix
        self.printer = printer
        self.monitor: Monitor | None = None
        self.reported: set = set()  # (code, severity) already printed
        self.stopped_by = None  # the finding that stopped training, if any
        self._grad_norm = None  # before clipping, for the step about to be recorded
        self._lr = None  # the learning rate that step uses (a scheduler may change it before the step is recorded)
        self._losses = []  # training_step's losses of the step's micro-batches (gradient accumulation)
        self._stepped = False
        self._to_log: dict = {}
        self._checked = 0  # steps entries already scanned for a non-finite loss
        self._validation_state = None
        self._pending_state = None

    # ---- set-up ----

    def on_fit_start(self, trainer, pl_module) -> None:
        # Here the optimizers exist; a restored checkpoint's state (load_state_dict runs earlier) is continued.
        state, self._pending_state = self._pending_state, None
        self._attach(trainer, pl_module, state=state)

    def _attach(self, trainer, pl_module, state: dict | None = None) -> None:
        optimizer = trainer.optimizers[0] if getattr(trainer, "optimizers", None) else None
        optimizer = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer wraps the torch one
        if self.monitor is not None:
            self.monitor.close()
        # grad_hooks off: Lightning hands us the gradient before clipping (and after AMP unscaling) itself.
        self.monitor = Monitor(
            pl_module,
            optimizer=optimizer,
            every=self.every,
            read_every=self.read_every,
            instrument_every=self.instrument_every,
            grad_hooks=False,
        )
        if state is not None:
            self.monitor.load_state_dict(state)
        self.monitor.listeners.append(self._on_windows)

    # ---- training steps ----

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for p in self.monitor._params if p.grad is not None]
        self._grad_norm = torch.nn.utils.get_total_norm(grads) if grads else None
        # Lightning steps its schedulers before on_train_batch_end: the lr this step uses is the one read now.
        lr = optimizer.param_groups[0]["lr"]
        self._lr = lr.detach().clone() if isinstance(lr, torch.Tensor) else lr
        self._stepped = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            # Lightning hands over the loss divided by accumulate_grad_batches (what it backpropagates).
            scale = getattr(trainer, "accumulate_grad_batches", 1) if pl_module.automatic_optimization else 1
            self._losses.append(loss.detach() * scale if isinstance(loss, torch.Tensor) else float(loss) * scale)
        if not self._stepped:  # gradient accumulation: no optimizer step on this batch
            return
        self._stepped = False
        losses, self._losses = self._losses, []
        targets = self.targets(batch) if self.targets is not None else None
        self.monitor.step(
            loss=_mean(losses),
            lr=self._lr,
            grad_norm=self._grad_norm,
            targets=targets.detach() if isinstance(targets, torch.Tensor) else targets,
        )
        self._grad_norm = self._lr = None
        if self._to_log and self.log_telemetry:
            logged, self._to_log = self._to_log, {}
            pl_module.log_dict(logged, on_step=True, on_epoch=False)
        if self.stop_on is not None and self._nonfinite_since_last_check():
            self._check(trainer, pl_module, reason="a non-finite loss came back")

    def _on_windows(self, windows: list) -> None:
        """Monitor listener: one closed telemetry window per LSTM, as host numbers to log."""
        for name, _first, _last, snap in windows:
            for layer in snap.layers:
                tag = f"{self.prefix}/{name}/layer{layer.layer}{'_reverse' if layer.direction else ''}"
                for gate, value in layer.gate_saturation.items():
                    self._to_log[f"{tag}/saturation_{gate}"] = float(value)
                self._to_log[f"{tag}/forget_gate_mean"] = float(layer.forget_gate_mean)
                self._to_log[f"{tag}/cell_absmax"] = float(layer.cell_absmax)
                norms = layer.grad_norm_per_step
                if norms.size:
                    self._to_log[f"{tag}/grad_norm_first_step"] = float(norms[0])
                    self._to_log[f"{tag}/grad_norm_last_step"] = float(norms[-1])
        self._to_log = {k: v for k, v in self._to_log.items() if math.isfinite(v)}

    def _nonfinite_since_last_check(self) -> bool:
        """Scan the step entries read back since the last call (host numbers) for a non-finite loss."""
        steps = self.monitor.live_history.steps
        found = False
        while self._checked < len(steps) and steps[self._checked].get("loss") is not None:
            loss = steps[self._checked]["loss"]
            found = found or not math.isfinite(loss)
            self._checked += 1
        return found

    # ---- validation ----

    def on_validation_start(self, trainer, pl_module) -> None:
        if self.monitor is None:
            return
        lstms = list(self.monitor.lstms.values())
        self._validation_state = [(lstm, lstm.telemetry.enabled) for lstm in lstms]
        for lstm in lstms:
            lstm.telemetry.enabled = False
        self.monitor._paused += 1

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._validation_state is None or self.monitor is None:
            return
        for lstm, enabled in self._validation_state:
            lstm.telemetry.enabled = enabled
        self._validation_state = None
        self.monitor._paused -= 1
        value = trainer.callback_metrics.get(self.val_loss_key)
        if value is not None and not trainer.sanity_checking and self.monitor.step_count:
            self.monitor.evaluate(
                value.detach() if isinstance(value, torch.Tensor) else value, epoch=trainer.current_epoch
            )

    # ---- epochs and the end ----

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        findings = self._check(trainer, pl_module, reason=None)
        counts = {f"{self.prefix}/doctor/{sev}": float(sum(f.severity == sev for f in findings)) for sev in SEVERITIES}
        pl_module.log_dict(counts, on_step=False, on_epoch=True)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.monitor is not None and self.history_path and trainer.is_global_zero:
            self.monitor.flush().save(self.history_path)

    @property
    def history(self):
        """The recorded history (reads what is still on the device)."""
        return self.monitor.flush() if self.monitor is not None else None

    def findings(self) -> list:
        return self.monitor.findings() if self.monitor is not None else []

    def _check(self, trainer, pl_module, reason: str | None) -> list:
        """Print the new findings; stop training on one at stop_on severity or worse."""
        findings = self.monitor.findings()
        new = [f for f in findings if (f.code, f.severity) not in self.reported and f.severity != "info"]
        self.reported.update((f.code, f.severity) for f in new)
        if new and trainer.is_global_zero:
            title = f"fastlstm doctor, epoch {trainer.current_epoch}, step {self.monitor.step_count}"
            self._print(format_report(new, title=title + (f" ({reason})" if reason else "")))
        if self.stop_on is not None and not trainer.should_stop:
            floor = SEVERITIES.index(self.stop_on)
            worst = [f for f in findings if SEVERITIES.index(f.severity) >= floor]
            if worst:
                self.stopped_by = worst[0]
                trainer.should_stop = True
                where = worst[0].evidence.get("first_location")
                at = f" (first non-finite value: {_where(where)})" if where else ""
                if trainer.is_global_zero:
                    self._print(f"fastlstm doctor: stopping training on {worst[0].code}{at}: {worst[0].message}")
                if self.history_path and trainer.is_global_zero:
                    self.monitor.flush().save(self.history_path)
        return findings

    def _print(self, text: str) -> None:
        (self.printer or print)(text)

    # ---- checkpoints ----

    def state_dict(self) -> dict:
        return {
            "monitor": self.monitor.state_dict() if self.monitor is not None else None,
            "reported": sorted(self.reported),
        }

    def load_state_dict(self, state: dict) -> None:
        self.reported = {tuple(r) for r in state.get("reported", [])}
        if state.get("monitor") is not None:
            if self.monitor is not None:
                self.monitor.load_state_dict(state["monitor"])
            else:
                self._pending_state = state["monitor"]


def _where(loc: dict) -> str:
    return (
        f"{loc.get('stage')} pass of {loc.get('lstm', 'the LSTM')!r} layer {loc.get('layer')}, timestep "
        f"{loc.get('timestep')}, tensor {loc.get('tensor')!r}, step {loc.get('step')}"
    )


def _mean(losses: list):
    """The step's loss: the mean of its micro-batches' losses, on the device when they are tensors (None: none)."""
    if not losses:
        return None
    if len(losses) == 1:
        return losses[0]
    device = next((v.device for v in losses if isinstance(v, torch.Tensor)), None)
    if device is not None:
        return torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in losses]).mean()
    return sum(losses) / len(losses)


__all__ = ["DoctorCallback"]
