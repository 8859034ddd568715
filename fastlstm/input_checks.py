"""The checks of a forward's arguments that fastlstm.LSTM makes beyond nn.LSTM's own (check_forward_args), with
nn.LSTM's exception types: where nn.LSTM has no check and fails on the first use of a malformed argument, the
exception types of that failure, so that code written to catch nn.LSTM's errors still catches fastlstm's.

Also autocast's rule for the operands of its lower-precision ops, which the dtype checks under autocast follow.

TorchScript compiles the checks the native forward calls (module.LSTM._native_padded, _native_packed).
"""

from __future__ import annotations

import torch
from torch import Tensor


class InputTypeError(TypeError, AttributeError):
    """The input is neither a Tensor nor a PackedSequence. nn.LSTM raises AttributeError there (its first use of
    the input), so this is both: code written to catch nn.LSTM's error still catches it."""


class HiddenStateFormError(RuntimeError, TypeError, IndexError, AttributeError):
    """hx is not a pair (h_0, c_0) of tensors. nn.LSTM does not check that: a malformed hx fails at its first use
    of hx[0] and hx[1], with an IndexError, AttributeError, TypeError or RuntimeError depending on the form and on
    the input's kind. This error is each of them, so code written to catch nn.LSTM's still catches it."""


class PackedInputDtypeError(ValueError, RuntimeError):
    """A PackedSequence whose data is not of the weights' dtype. nn.LSTM checks that only when hx is given (a
    ValueError); without hx it fails in its first product, with a RuntimeError. This error is both, so code written
    to catch nn.LSTM's error in either case still catches it."""


def check_packed_dtype(data: Tensor, weight_dtype: torch.dtype) -> None:
    """nn.LSTM's dtype check of its input (RNNBase.check_input, its message), made for a packed input whatever hx."""
    if data.dtype != weight_dtype and not torch._C._is_any_autocast_enabled():
        raise PackedInputDtypeError(
            f"RNN input dtype ({data.dtype}) does not match weight dtype ({weight_dtype}). "
            f"Convert input: input.to({weight_dtype}), or convert model: model.to({data.dtype})"
        )


def check_hx_form(hx) -> None:
    if hx is None:
        return
    if not isinstance(hx, (tuple, list)) or len(hx) != 2 or not all(isinstance(t, torch.Tensor) for t in hx):
        raise HiddenStateFormError(f"lstm expects hx to be a tuple (h_0, c_0) of two tensors, got {_describe(hx)}")


def check_batch_sizes(batch_sizes: Tensor) -> None:
    """A PackedSequence without a step, which nn.LSTM fails on with an IndexError (reading its first batch size)."""
    if batch_sizes.numel() == 0:
        raise IndexError("LSTM: the PackedSequence has no steps (its batch_sizes is empty)")


def check_hx_rank(h0: Tensor, c0: Tensor, batched: bool) -> None:
    """nn.LSTM's rank check of (h_0, c_0), which it makes for padded input only (a packed input's hx of the wrong
    rank fails later there, with an IndexError: HiddenStateFormError is both)."""
    expected = 3 if batched else 2
    if h0.dim() != expected or c0.dim() != expected:
        kind = "batched 3-D" if batched else "unbatched 2-D"
        raise HiddenStateFormError(
            f"For {kind} input, hx and cx should also be {expected}-D but got ({h0.dim()}-D, {c0.dim()}-D) tensors"
        )


def widened_cell_state(c0: Tensor, dtype: torch.dtype) -> Tensor:
    """c0 in the input's dtype where nn.LSTM's arithmetic promotes it (f·c0 + i·g): a narrower float, an integer or
    a bool. Converting first gives the same values, and gives PyTorch's op one dtype where oneDNN refuses the mix."""
    if c0.dtype != dtype and torch.promote_types(c0.dtype, dtype) == dtype:
        return c0.to(dtype)
    return c0


def _describe(hx) -> str:
    if isinstance(hx, torch.Tensor):
        return f"one tensor of shape {tuple(hx.shape)}"
    if isinstance(hx, (tuple, list)):
        return f"a {type(hx).__name__} of {', '.join(_describe_item(t) for t in hx) or 'nothing'}"
    return f"a {type(hx).__name__}"


def _describe_item(item) -> str:
    return f"a tensor of shape {tuple(item.shape)}" if isinstance(item, torch.Tensor) else type(item).__name__


def autocast_dtype_of(device: torch.device):
    """The dtype autocast runs its lower-precision ops in on this device, or None outside autocast."""
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def autocast_operand(t: Tensor, dtype: torch.dtype) -> Tensor:
    """What autocast makes of an operand of its lower-precision ops: float64 tensors are left as they are."""
    return t if t.dtype == torch.float64 else t.to(dtype)


def check_autocast_dtypes(x: Tensor, h0: Tensor, c0: Tensor, weight: Tensor) -> None:
    """Under autocast nn.LSTM fails in its first product when a float64 operand meets a cast one (RuntimeError):
    fastlstm refuses the same mix, naming it, rather than run it in another precision."""
    for name, t in (("input", x), ("hx", h0), ("cx", c0)):
        if t.dtype != weight.dtype:
            raise RuntimeError(
                f"LSTM under autocast: {name} is {t.dtype} but the weights run in {weight.dtype} (autocast leaves "
                "float64 tensors as they are); give input, hx and weights one dtype, or run outside autocast"
            )
