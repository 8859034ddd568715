"""Model-wide conversion: every torch.nn.LSTM inside a model swapped for a fastlstm.LSTM sharing its parameters,
and back. The per-module conversions are LSTM.from_torch and LSTM.to_torch (module.py)."""

from __future__ import annotations

import warnings

from torch import nn

from .module import LSTM, _ScriptableLSTM
from .routing import check_backend_name


def _swap_all(model: nn.Module, convert_one, kind: type, forwards: tuple) -> nn.Module:
    """`model` with every `kind` inside it (or itself) replaced by convert_one(module); a module held under two
    names (or by two parents) is converted once and stays shared. A subclass of `kind` whose forward is not one of
    `forwards` (kind's own) is left as it is, with a warning: converting it would drop its forward."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    converted: dict = {}
    kept: list = []

    def swap(module: nn.Module) -> nn.Module:
        if id(module) in converted:
            return converted[id(module)]
        if isinstance(module, kind) and type(module).forward in forwards:
            result = convert_one(module)
        else:
            if isinstance(module, kind):
                kept.append(type(module).__qualname__)
            # _modules, not named_children(): that yields a module held under two names once only.
            for name, child in list(module._modules.items()):
                if child is not None:
                    setattr(module, name, swap(child))
            result = module
        converted[id(module)] = result
        return result

    result = swap(model)
    if kept:
        warnings.warn(
            f"left as they are, since converting them would drop their own forward: {', '.join(sorted(set(kept)))} "
            f"(subclasses of {kind.__module__}.{kind.__qualname__})",
            stacklevel=3,
        )
    return result


def convert(model: nn.Module, *, backend: str = "auto", telemetry: bool = True) -> nn.Module:
    """Replace every torch.nn.LSTM inside `model` (or `model` itself) by a fastlstm.LSTM sharing its parameters.

    Returns the converted model: `model` itself, modified in place, unless `model` is an nn.LSTM.
    """
    check_backend_name(backend)

    def one(module):
        return LSTM.from_torch(module, backend=backend, telemetry=telemetry)

    return _swap_all(model, one, nn.LSTM, (nn.LSTM.forward,))


def revert(model: nn.Module) -> nn.Module:
    """Replace every fastlstm.LSTM inside `model` (or `model` itself) by a torch.nn.LSTM sharing its parameters.

    Returns the reverted model: `model` itself, modified in place, unless `model` is a fastlstm.LSTM.
    """
    return _swap_all(model, LSTM.to_torch, LSTM, (LSTM.forward, _ScriptableLSTM.forward))
