"""Log fastlstm telemetry, training histories and doctor findings to TensorBoard.

    from torch.utils.tensorboard import SummaryWriter      # or tensorboardX; tensorboard itself is optional
    logger = fastlstm.tensorboard.TelemetryLogger(SummaryWriter("runs/x"))
    logger.attach(monitor)            # live: every telemetry window the Monitor closes
    logger.log_history(history)       # or afterwards, from a History / its dict / a saved JSON
    logger.log_findings(fastlstm.diagnose(history))

The writer is anything with `add_scalar(tag, value, global_step)` and `add_histogram(tag, values, global_step)`
(and optionally `add_text`), so this module imports nothing from tensorboard. Tags:

    {prefix}/train/loss, /train/lr, /train/grad_norm, /val/loss, /val/subset/{name}
    {prefix}/{lstm}/layer{L}[_reverse]/saturation/{i,f,g,o}, /forget_gate_mean, /cell_absmax,
        /grad_norm/last_step, /grad_norm/first_step, /grad_norm/first_over_last   (scalars)
        /grad_norm_per_step                                                        (histogram over timesteps)
    {prefix}/{lstm}/nonfinite                         1 in a window with a NaN/inf (its location as text)
    {prefix}/{lstm}/inputs/mean, /inputs/std          (histograms over features)
    {prefix}/doctor                                   the findings report (text)
"""

from __future__ import annotations

import numpy as np

from .history_view import HistoryView, float_array, to_float


class TelemetryLogger:
    def __init__(self, writer, prefix: str = "fastlstm"):
        for method in ("add_scalar", "add_histogram"):
            if not callable(getattr(writer, method, None)):
                raise TypeError(f"the writer needs a {method} method (a torch.utils.tensorboard SummaryWriter)")
        self.writer = writer
        self.prefix = prefix

    # ---- telemetry ----

    def log_snapshot(self, snapshot, step: int, lstm: str = "lstm") -> None:
        """One telemetry window: a `Snapshot` or its `to_dict()`."""
        data = snapshot.to_dict() if hasattr(snapshot, "to_dict") else snapshot
        for k, layer in enumerate(data.get("layers") or []):
            self._log_layer(f"{self.prefix}/{lstm}/{_layer_tag(layer, k)}", layer, step)
        where = data.get("first_nonfinite")
        self._scalar(f"{self.prefix}/{lstm}/nonfinite", 1.0 if where else 0.0, step)
        if where and callable(getattr(self.writer, "add_text", None)):
            self.writer.add_text(f"{self.prefix}/{lstm}/nonfinite", _describe(where), step)

    def _log_layer(self, tag: str, layer: dict, step: int) -> None:
        for gate, value in (layer.get("gate_saturation") or {}).items():
            self._scalar(f"{tag}/saturation/{gate}", value, step)
        self._scalar(f"{tag}/forget_gate_mean", layer.get("forget_gate_mean"), step)
        self._scalar(f"{tag}/cell_absmax", layer.get("cell_absmax"), step)
        norms = float_array(layer.get("grad_norm_per_step"))
        if layer.get("direction") == 1:
            norms = norms[::-1]  # own time order: the last entry is where backpropagation starts
        finite = norms[np.isfinite(norms)]
        if finite.size:
            self._scalar(f"{tag}/grad_norm/last_step", finite[-1], step)
            self._scalar(f"{tag}/grad_norm/first_step", finite[0], step)
            if finite[-1] > 0:
                self._scalar(f"{tag}/grad_norm/first_over_last", finite[0] / finite[-1], step)
            self.writer.add_histogram(f"{tag}/grad_norm_per_step", finite, step)

    def attach(self, monitor) -> None:
        """Log every telemetry window a `fastlstm.Monitor` closes, as it closes it (no extra reads)."""

        def listener(windows):
            for name, _first, last, snapshot in windows:
                self.log_snapshot(snapshot, last, name)

        monitor.listeners.append(listener)

    # ---- a whole history ----

    def log_history(self, history) -> None:
        """Losses, learning rate, gradient norms, validation, telemetry and input statistics of a History."""
        view = history if isinstance(history, HistoryView) else HistoryView(history)
        for entry in view.raw.get("steps") or []:
            step = int(entry.get("step", 0))
            for key, tag in (("loss", "train/loss"), ("lr", "train/lr"), ("grad_norm", "train/grad_norm")):
                self._scalar(f"{self.prefix}/{tag}", entry.get(key), step)
        for entry in view.evals:
            self._scalar(f"{self.prefix}/val/loss", entry["val_loss"], entry["step"])
            for name, value in entry["subset_losses"].items():
                self._scalar(f"{self.prefix}/val/subset/{name}", value, entry["step"])
        for entry in view.raw.get("telemetry") or []:
            self.log_snapshot(entry.get("snapshot") or {}, int(entry.get("step", 0)), str(entry.get("lstm", "lstm")))
        for name, entries in view.inputs.items():
            for entry in entries:
                step = int(entry.get("step", 0))
                for key in ("mean", "std"):
                    values = float_array(entry.get(key))
                    values = values[np.isfinite(values)]
                    if values.size:
                        self.writer.add_histogram(f"{self.prefix}/{name}/inputs/{key}", values, step)

    def log_findings(self, findings, step: int = 0) -> None:
        """The doctor's report as text (when the writer supports text) and the number of findings per severity."""
        from .doctor import SEVERITIES, format_report

        for severity in SEVERITIES:
            self._scalar(f"{self.prefix}/doctor/{severity}", sum(f.severity == severity for f in findings), step)
        if callable(getattr(self.writer, "add_text", None)):
            # Two trailing spaces: TensorBoard renders text as markdown, where a plain newline does not break.
            self.writer.add_text(f"{self.prefix}/doctor", format_report(findings).replace("\n", "  \n"), step)

    def _scalar(self, tag: str, value, step: int) -> None:
        """Skip unmeasured values (None); TensorBoard shows NaN/inf, so those are logged as they are."""
        if value is None:
            return
        value = to_float(value)
        self.writer.add_scalar(tag, value, int(step))


def _layer_tag(layer: dict, slot: int) -> str:
    reverse = "_reverse" if layer.get("direction") == 1 else ""
    return f"layer{layer.get('layer', slot)}{reverse}"


def _describe(where: dict) -> str:
    return (
        f"first non-finite value: {where.get('stage')} pass, layer {where.get('layer')}, direction "
        f"{where.get('direction')}, timestep {where.get('timestep')}, tensor {where.get('tensor')}"
    )


__all__ = ["TelemetryLogger"]
