"""What fastlstm adds for saving and quantizing models that hold a fastlstm.LSTM (docs/deploy.md).

Export, tracing and scripting need nothing from here: routing.py sends those passes to PyTorch's own LSTM op.
"""

from __future__ import annotations

import torch

from .module import LSTM


def safe_globals(extra=()):
    """A context manager under which torch.load(weights_only=True) accepts fastlstm's module class (the one class a
    pickled fastlstm.LSTM names), plus `extra` (the model's own classes, as for any whole-model load)::

        with fastlstm.safe_globals([MyModel, torch.nn.Linear]):
            model = torch.load(path)
    """
    return torch.serialization.safe_globals([LSTM, *extra])


class DynamicQuantizedLSTM:
    """The conversion quantize_dynamic applies to a fastlstm.LSTM that its spec names: PyTorch's own dynamic
    quantized LSTM, built from an nn.LSTM with the same weights (quantized copies; the float module is left as is)."""

    @staticmethod
    def from_float(module: LSTM, use_precomputed_fake_quant: bool = False):
        from torch.ao.nn.quantized.dynamic import LSTM as QuantizedLSTM

        float_module = module.to_torch()
        float_module.qconfig = module.qconfig
        return QuantizedLSTM.from_float(float_module, use_precomputed_fake_quant=use_precomputed_fake_quant)


def _register_dynamic_quantization() -> None:
    """Let quantize_dynamic's default mapping quantize fastlstm.LSTM wherever a spec selects it."""
    from torch.ao.quantization import quantization_mappings

    quantization_mappings.DEFAULT_DYNAMIC_QUANT_MODULE_MAPPINGS.setdefault(LSTM, DynamicQuantizedLSTM)


_register_dynamic_quantization()
