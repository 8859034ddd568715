"""Model-wide conversion: every torch.nn.LSTM inside a model swapped for a fastlstm.LSTM sharing its parameters,
and back. The per-module conversions are LSTM.from_torch and LSTM.to_torch (module.py)."""

from __future__ import annotations

from torch import nn

from .module import LSTM
from .routing import check_backend_name


def _swap_all(model: nn.Module, convert_one, kind: type) -> nn.Module:
    """`model` with every `kind` inside it (or itself) replaced by convert_one(module); shared modules stay shared."""
    converted: dict = {}

    def swap(module: nn.Module) -> nn.Module:
        if id(module) in converted:
            return converted[id(module)]
        if isinstance(module, kind):
            result = convert_one(module)
        else:
            for name, child in list(module.named_children()):
                setattr(module, name, swap(child))
            result = module
        converted[id(module)] = result
        return result

    return swap(model)


def convert(model: nn.Module, *, backend: str = "auto", telemetry: bool = True) -> nn.Module:
    """Replace every torch.nn.LSTM inside `model` (or `model` itself) by a fastlstm.LSTM sharing its parameters.

    Returns the converted model: `model` itself, modified in place, unless `model` is an nn.LSTM.
    """
    check_backend_name(backend)

    def one(module):
        return LSTM.from_torch(module, backend=backend, telemetry=telemetry)

    return _swap_all(model, one, nn.LSTM)


def revert(model: nn.Module) -> nn.Module:
    """Replace every fastlstm.LSTM inside `model` (or `model` itself) by a torch.nn.LSTM sharing its parameters.

    Returns the reverted model: `model` itself, modified in place, unless `model` is a fastlstm.LSTM.
    """
    return _swap_all(model, LSTM.to_torch, LSTM)
