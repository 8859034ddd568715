"""fastlstm: a drop-in torch.nn.LSTM with fused Triton kernels and in-kernel training telemetry."""

from .module import LSTM, convert
from .telemetry import LayerTelemetry, NonFinite, Snapshot, Telemetry

__all__ = ["LSTM", "convert", "Telemetry", "Snapshot", "LayerTelemetry", "NonFinite"]
__version__ = "0.1.0"
