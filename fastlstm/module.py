"""`fastlstm.LSTM`: torch.nn.LSTM's contract, run layer by layer through fastlstm's backends.

Construction, parameters, initialisation, state_dict keys, extra_repr and the shape checks are inherited from
`nn.RNNBase` or borrowed from `nn.LSTM`, so they are nn.LSTM's by construction. This class only adds the forward
pass (inputs normalised to time-major padded tensors plus lengths, then one autograd op per layer-direction) and
the telemetry window.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .backends import check_backend_name, resolve
from .ops import lstm_layer
from .telemetry import Telemetry


class LSTM(nn.RNNBase):
    """Drop-in replacement for `torch.nn.LSTM`; see its documentation for the arguments.

    Extra keyword-only arguments:
      backend:   "auto" (Triton kernels on CUDA, reference elsewhere), "reference" or "triton".
      telemetry: record gate saturation, gradient norms through time and the first non-finite value into
                 `self.telemetry` (docs/telemetry.md). False removes that work entirely; `self.telemetry.enabled`
                 switches it at run time.
    """

    # nn.LSTM's own shape checks, so the error messages are the same.
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
        telemetry: bool = True,
    ) -> None:
        self.backend = check_backend_name(backend)
        super().__init__(
            "LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, proj_size,
            device=device, dtype=dtype,
        )  # fmt: skip
        self.telemetry = Telemetry(num_layers, 2 if bidirectional else 1, enabled=bool(telemetry))
        self.telemetry.allocate(self.weight_ih_l0.device)

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        telemetry = self.__dict__.get("telemetry")  # absent while nn.RNNBase.__init__ runs
        if telemetry is not None:
            telemetry.allocate(self.weight_ih_l0.device)
        return result

    @classmethod
    def from_torch(cls, module: nn.LSTM, *, backend: str = "auto", telemetry: bool = True) -> LSTM:
        """A fastlstm.LSTM with `module`'s configuration and training mode, sharing its Parameter objects (as
        SyncBatchNorm.convert_sync_batchnorm does), so optimizers built on `module` keep working."""
        if not isinstance(module, nn.LSTM):
            raise TypeError(f"from_torch expects a torch.nn.LSTM, got {type(module).__name__}")
        new = cls(
            module.input_size, module.hidden_size, module.num_layers, module.bias, module.batch_first,
            module.dropout, module.bidirectional, module.proj_size, device="meta",
            backend=backend, telemetry=telemetry,
        )  # fmt: skip
        for name in module._flat_weights_names:
            param = module._parameters.get(name)
            if not isinstance(param, nn.Parameter):
                raise ValueError(
                    f"{name} of the nn.LSTM is not a plain Parameter (a parametrization or weight norm?); "
                    "remove it before converting and apply it to the fastlstm.LSTM instead"
                )
            setattr(new, name, param)
        new._init_flat_weights()
        return new.train(module.training)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        if not self.telemetry.enabled:
            s += ", telemetry=False"
        return s

    def forward(self, input, hx=None):
        packed = isinstance(input, PackedSequence)
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            self.check_input(data, batch_sizes)
            x, lengths = pad_packed_sequence(PackedSequence(data, batch_sizes))
            batched, reference_input = True, data
        else:
            if not isinstance(input, torch.Tensor):
                raise TypeError(f"LSTM: expected a Tensor or PackedSequence as input, got {type(input).__name__}")
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            batch_sizes = sorted_indices = unsorted_indices = lengths = None
            batched = input.dim() == 3
            reference_input = input if batched else input.unsqueeze(0 if self.batch_first else 1)
            x = reference_input.transpose(0, 1) if self.batch_first else reference_input
        h0, c0 = self._initial_state(hx, reference_input, batch_sizes, batched)
        if packed:
            h0, c0 = self.permute_hidden((h0, c0), sorted_indices)
        if x.shape[0] == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")

        weights = self._weights()
        autocast_dtype = _autocast_dtype(x.device)
        if autocast_dtype is not None:
            x, h0, c0 = (t.to(autocast_dtype) for t in (x, h0, c0))
            weights = [tuple(None if w is None else w.to(autocast_dtype) for w in ws) for ws in weights]
        device_lengths = None if lengths is None else lengths.to(x.device, non_blocking=True)
        with torch.autocast(x.device.type, enabled=False) if autocast_dtype is not None else nullcontext():
            out, h_n, c_n = self._run_layers(x, h0, c0, weights, device_lengths)

        if packed:
            out_data = pack_padded_sequence(out, lengths).data
            return PackedSequence(out_data, batch_sizes, sorted_indices, unsorted_indices), self.permute_hidden(
                (h_n, c_n), unsorted_indices
            )
        if self.batch_first:
            out = out.transpose(0, 1).contiguous()
        if not batched:
            out = out.squeeze(0 if self.batch_first else 1)
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return out, (h_n, c_n)

    def _run_layers(self, x, h0, c0, weights, lengths):
        backend = resolve(self.backend, x.device, x.dtype)
        num_directions = 2 if self.bidirectional else 1
        # docs/telemetry.md: nothing is recorded when telemetry is off or the batch is empty.
        record = self.telemetry.enabled and x.shape[1] > 0
        seq = self.telemetry.begin_pass(x.device, x.shape[0]) if record else None
        h_n, c_n = [], []
        layer_input = x
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(num_directions):
                slot = layer * num_directions + direction
                probe = self.telemetry.probe(layer, direction, seq) if record else None
                out, h, c = lstm_layer(
                    layer_input, h0[slot], c0[slot], weights[slot], lengths, direction == 1, backend, probe
                )
                outputs.append(out)
                h_n.append(h)
                c_n.append(c)
            layer_input = outputs[0] if num_directions == 1 else torch.cat(outputs, dim=2)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        return layer_input, torch.stack(h_n), torch.stack(c_n)

    def _weights(self) -> list:
        """(w_ih, w_hh, b_ih, b_hh, w_hr) per layer-direction, read through getattr on every call so that
        reassigned weights, parametrizations, weight norm and torch.func.functional_call are honoured."""
        result = []
        for names in self._all_weights:
            named = {name.split("_l")[0]: getattr(self, name) for name in names}
            result.append(tuple(named.get(k) for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")))
        return result

    def _initial_state(self, hx, input, batch_sizes, batched):
        """Validated (h0, c0) of shape [layers * directions, B, *], with nn.LSTM's error messages."""
        if hx is None:
            num_directions = 2 if self.bidirectional else 1
            batch = int(batch_sizes[0]) if batch_sizes is not None else input.size(0 if self.batch_first else 1)
            real_hidden = self.proj_size if self.proj_size > 0 else self.hidden_size
            zeros = dict(dtype=input.dtype, device=input.device)
            hx = (
                torch.zeros(self.num_layers * num_directions, batch, real_hidden, **zeros),
                torch.zeros(self.num_layers * num_directions, batch, self.hidden_size, **zeros),
            )
            self.check_forward_args(input, hx, batch_sizes)
            return hx
        if not isinstance(hx, (tuple, list)) or len(hx) != 2 or not all(isinstance(t, torch.Tensor) for t in hx):
            raise RuntimeError("lstm expects hx to be a tuple (h_0, c_0) of two tensors")
        h0, c0 = hx
        expected = 3 if batched else 2
        if h0.dim() != expected or c0.dim() != expected:
            kind = "batched 3-D" if batched else "unbatched 2-D"
            raise RuntimeError(
                f"For {kind} input, hx and cx should also be {expected}-D but got ({h0.dim()}-D, {c0.dim()}-D) tensors"
            )
        if not batched:
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        self.check_forward_args(input, (h0, c0), batch_sizes)
        for name, state in (("hx", h0), ("cx", c0)):
            if state.dtype != input.dtype and _autocast_dtype(input.device) is None:
                raise RuntimeError(f"{name} dtype ({state.dtype}) does not match input dtype ({input.dtype})")
            if state.device != input.device:
                raise RuntimeError(f"{name} is on {state.device} but input is on {input.device}")
        return h0, c0


def _autocast_dtype(device: torch.device):
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def convert(model: nn.Module, *, backend: str = "auto", telemetry: bool = True) -> nn.Module:
    """Replace every torch.nn.LSTM inside `model` (or `model` itself) by a fastlstm.LSTM sharing its parameters.

    Returns the converted model: `model` itself, modified in place, unless `model` is an nn.LSTM.
    """
    converted: dict[int, nn.Module] = {}

    def swap(module: nn.Module) -> nn.Module:
        if id(module) in converted:
            return converted[id(module)]
        if isinstance(module, nn.LSTM):
            result = LSTM.from_torch(module, backend=backend, telemetry=telemetry)
        else:
            for name, child in list(module.named_children()):
                setattr(module, name, swap(child))
            result = module
        converted[id(module)] = result
        return result

    return swap(model)
