"""fastlstm: a drop-in torch.nn.LSTM with fused Triton kernels and in-kernel training telemetry."""

from . import init
from .conversion import convert, revert
from .deploy import safe_globals
from .doctor import Finding, diagnose
from .module import LSTM
from .monitor import History, Monitor
from .tbptt import NonFiniteError, TBPTTTrainer, truncation_evidence
from .telemetry import LayerTelemetry, NonFinite, Snapshot, Telemetry

__all__ = ["LSTM", "LayerTelemetry", "NonFinite", "Snapshot", "Telemetry", "convert", "revert", "safe_globals"]
__all__ += ["History", "Monitor", "NonFiniteError", "TBPTTTrainer", "truncation_evidence"]
__all__ += ["Finding", "diagnose", "init"]
__version__ = "0.1.0"
