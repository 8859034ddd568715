"""`fastlstm.LSTM`: torch.nn.LSTM's contract, each pass run by the implementation that routing.py picks.

Construction, parameters, initialisation, state_dict keys, extra_repr and the shape checks are inherited from
`nn.RNNBase` or borrowed from `nn.LSTM`, so they are nn.LSTM's by construction. This class adds the forward pass in
two forms: native (one aten::lstm call on the flat weights, as nn.LSTM makes it; also the only form TorchScript
compiles) and fused (inputs normalised to time-major padded tensors plus lengths, then one autograd op per
layer-direction, function.py), the telemetry window, and the conversions from and back to nn.LSTM.

No `from __future__ import annotations` here: TorchScript reads the annotations of the native path as objects.
"""

import warnings
import weakref
from collections import OrderedDict
from contextlib import nullcontext
from typing import overload

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import native, native_recorded
from .function import lstm_layer
from .input_checks import (
    InputTypeError,
    autocast_dtype_of,
    autocast_operand,
    check_autocast_dtypes,
    check_batch_sizes,
    check_hx_form,
    check_hx_rank,
    check_packed_dtype,
    widened_cell_state,
)
from .padding import dropout_between_layers
from .resets import direction_restarts, time_major_resets
from .routing import NATIVE_RECORDED, PassShape, check_backend_name, choose
from .telemetry import Telemetry


class LSTM(nn.RNNBase):
    """Drop-in replacement for `torch.nn.LSTM`; see its documentation for the arguments.

    Extra keyword-only arguments:
      backend:   "auto" (passes that record telemetry: Triton kernels on CUDA, PyTorch's op with the telemetry
                 rebuilt from its outputs on the CPU (native_recorded.py), the reference elsewhere; passes that
                 record none: PyTorch's own LSTM op, as nn.LSTM), "reference", "triton", or "native" (PyTorch's
                 own LSTM op, which records no telemetry). Exporting, tracing and torch.func always run the native
                 op (docs/deploy.md); fastlstm/routing.py decides.
      telemetry: record gate saturation, gradient norms through time and the first non-finite value into
                 `self.telemetry` (docs/telemetry.md) on every pass that autograd records. False removes that
                 work entirely; `self.telemetry.enabled` switches it at run time.

    `forward(input, hx=None, *, resets=None)` takes one extra keyword-only argument, which nn.LSTM does not have:
    `resets`, a bool (or integer, nonzero meaning True) tensor [T, B] ([B, T] when batch_first, [T] for unbatched
    input) on the input's device, True where a step starts a new episode: the state entering it is hx (or zeros)
    instead of the state carried from the step before. docs/resets.md has the rules (directions, lengths, gradients,
    telemetry); PyTorch's LSTM op has no such argument, so a pass with resets always runs fastlstm's own ops.
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
            "LSTM",
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            proj_size,
            device=device,
            dtype=dtype,
        )
        self.telemetry = Telemetry(num_layers, 2 if bidirectional else 1, enabled=bool(telemetry))
        self.telemetry.allocate(self.weight_ih_l0.device)

    # ---- where the telemetry lives: always with the parameters ----

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        telemetry = self.__dict__.get("telemetry")  # absent while nn.RNNBase.__init__ runs
        if telemetry is not None:
            telemetry.allocate(self.weight_ih_l0.device)
        return result

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.telemetry.allocate(self.weight_ih_l0.device)  # load_state_dict(assign=True) may have moved them

    # Pickles (torch.save of a whole model, deepcopy) carry the telemetry as plain tensors and numbers, so that
    # torch.load(weights_only=True) needs only this class allow-listed (fastlstm.safe_globals). A hook that marks
    # itself `belongs_to_a_run` (the Monitor's) is left out: a Monitor does not travel with the model.
    def __getstate__(self):
        state = super().__getstate__()
        state["telemetry"] = self.telemetry.__getstate__()
        hooks = state["_forward_pre_hooks"]
        kept = OrderedDict((k, h) for k, h in hooks.items() if not getattr(h, "belongs_to_a_run", False))
        if len(kept) != len(hooks):
            with_kwargs = state["_forward_pre_hooks_with_kwargs"]
            state["_forward_pre_hooks"] = kept
            state["_forward_pre_hooks_with_kwargs"] = OrderedDict((k, v) for k, v in with_kwargs.items() if k in kept)
        return state

    def __setstate__(self, state):
        state = dict(state)
        telemetry_state = state.pop("telemetry")
        super().__setstate__(state)
        self.telemetry = Telemetry.__new__(Telemetry)
        self.telemetry.__setstate__(telemetry_state)

    def __delattr__(self, name):
        # Every quantization pass deletes the qconfig of the modules it did not swap (torch.ao.quantization.convert).
        if name == "qconfig":
            warnings.warn(
                "fastlstm.LSTM stays in floating point: quantization passes match module types exactly. Name "
                "fastlstm.LSTM in the quantization spec (quantize_dynamic(model, {fastlstm.LSTM, nn.Linear})) to "
                "get PyTorch's dynamic quantized LSTM, or call fastlstm.revert(model) first (docs/deploy.md)",
                stacklevel=2,
            )
        super().__delattr__(name)

    # ---- conversion from and back to nn.LSTM ----

    @classmethod
    def from_torch(cls, module: nn.LSTM, *, backend: str = "auto", telemetry: bool = True) -> "LSTM":
        """A fastlstm.LSTM with `module`'s configuration and training mode, sharing its Parameter objects (as
        SyncBatchNorm.convert_sync_batchnorm does), so optimizers built on `module` keep working."""
        if not isinstance(module, nn.LSTM):
            raise TypeError(f"from_torch expects a torch.nn.LSTM, got {type(module).__name__}")
        new = cls(*_configuration(module), device="meta", backend=backend, telemetry=telemetry)
        _share_parameters(module, new)
        new.telemetry.allocate(new.weight_ih_l0.device)
        return new.train(module.training)

    def to_torch(self) -> nn.LSTM:
        """A torch.nn.LSTM with this module's configuration and training mode, sharing its Parameter objects."""
        new = nn.LSTM(*_configuration(self), device="meta")
        _share_parameters(self, new)
        return new.train(self.training)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        if not self.telemetry.enabled:
            s += ", telemetry=False"
        return s

    # ---- forward ----

    @overload
    @torch._jit_internal._overload_method
    def forward(
        self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None, *, resets: Tensor | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]: ...

    @overload
    @torch._jit_internal._overload_method
    def forward(
        self, input: PackedSequence, hx: tuple[Tensor, Tensor] | None = None, *, resets: Tensor | None = None
    ) -> tuple[PackedSequence, tuple[Tensor, Tensor]]: ...

    def forward(self, input, hx=None, *, resets=None):
        # TorchScript compiles only what follows this block (it folds is_scripting() to True), so a scripted
        # module is the native path alone.
        if not torch.jit.is_scripting():
            records = self.telemetry.records()
            implementation = self._implementation(input, records, resets is not None)
            self._update_flat_weights()  # functional_call, parametrizations and reassigned weights: checks read them
            if implementation != "native":
                return self._fused_forward(input, hx, implementation, records, resets)
            check_hx_form(hx)
        if isinstance(input, PackedSequence):
            return self._native_packed(input, hx)
        return self._native_padded(input, hx)

    def _implementation(self, input, records_telemetry: bool, resets: bool = False) -> str:
        if isinstance(input, PackedSequence):
            data = input.data
        elif isinstance(input, torch.Tensor):
            data = input
        elif isinstance(input, torch.fx.Proxy):
            raise TypeError(
                "torch.fx.symbolic_trace treats only torch.nn's own modules as leaves and cannot trace into "
                "fastlstm.LSTM; call fastlstm.revert(model) first, or use torch.export (docs/deploy.md)"
            )
        else:
            raise InputTypeError(f"LSTM: expected a Tensor or PackedSequence as input, got {type(input).__name__}")
        return choose(
            self.backend,
            data.device,
            data.dtype,
            records_telemetry=records_telemetry,
            shape=lambda: self._shape(input),
            resets=resets,
        )

    def _shape(self, input) -> PassShape:
        """What routing's measured table looks up. A PackedSequence's batch sizes live on the CPU: no device sync."""
        if isinstance(input, PackedSequence):
            batch, steps = (
                (int(input.batch_sizes[0]), input.batch_sizes.numel()) if input.batch_sizes.numel() else (0, 0)
            )
        elif input.dim() == 3:
            batch, steps = (input.shape[0], input.shape[1]) if self.batch_first else (input.shape[1], input.shape[0])
        else:
            batch, steps = 1, input.shape[0]
        return PassShape(
            self.hidden_size,
            self.proj_size,
            self.num_layers,
            self.bidirectional,
            isinstance(input, PackedSequence),
            batch,
            steps,
        )

    def __prepare_scriptable__(self):
        """What torch.jit.script compiles: this module under _ScriptableLSTM, whose forward has nn.LSTM's signature
        (TorchScript rejects keyword-only arguments, resets; a scripted module runs the native path, which cannot
        take them anyway). torch.jit.script puts what this returns in the parent module's place, so it is this
        module itself with its class changed for the compiler; its next use from Python changes it back, to the
        class it had (a subclass stays one). A subclass with its own forward is refused: compiling the native
        path in its place would drop that forward."""
        cls = type(self)
        if cls is _ScriptableLSTM:
            return self
        if cls.forward is not LSTM.forward:
            raise RuntimeError(
                f"torch.jit.script cannot compile {cls.__name__}, a subclass of fastlstm.LSTM with its own forward: "
                "a scripted fastlstm.LSTM runs nn.LSTM's forward, which would drop it. Use torch.jit.trace or "
                "torch.export, or subclass torch.nn.LSTM (fastlstm.revert) to script it"
            )
        _CLASS_BEFORE_SCRIPT[self] = cls
        self.__class__ = _ScriptableLSTM
        return self

    # ---- native: nn.LSTM's own forward, TorchScript-compatible ----

    def _native_padded(self, input: Tensor, hx: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        if input.dim() not in (2, 3):
            raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
        batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not batched:
            input = input.unsqueeze(batch_dim)
        if hx is None:
            state = self._zero_state(input, input.size(batch_dim))
        else:
            check_hx_rank(hx[0], hx[1], batched)
            state = hx if batched else (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        self.check_forward_args(input, state, None)
        state = (state[0], widened_cell_state(state[1], input.dtype))
        out, h_n, c_n = native.lstm(
            input,
            state,
            self._flat_weights,
            self.bias,
            self.num_layers,
            float(self.dropout),
            self.training,
            self.bidirectional,
            self.batch_first,
        )
        if not batched:
            return out.squeeze(batch_dim), (h_n.squeeze(1), c_n.squeeze(1))
        return out, (h_n, c_n)

    def _native_packed(
        self, input: PackedSequence, hx: tuple[Tensor, Tensor] | None
    ) -> tuple[PackedSequence, tuple[Tensor, Tensor]]:
        data, batch_sizes, sorted_indices, unsorted_indices = input
        check_batch_sizes(batch_sizes)
        if not torch.jit.is_scripting():
            check_packed_dtype(data, self._flat_weights[0].dtype)
        if hx is not None:
            check_hx_rank(hx[0], hx[1], True)
        state = self._zero_state(data, int(batch_sizes[0])) if hx is None else hx
        # Checked before the permutation (nn.LSTM checks after it), which would drop the surplus rows of an hx batch
        # too large without a word, or fail on one too small with an index error.
        self.check_forward_args(data, state, batch_sizes)
        if hx is not None:
            state = self.permute_hidden(hx, sorted_indices)
        state = (state[0], widened_cell_state(state[1], data.dtype))
        out, h_n, c_n = native.lstm_packed(
            data,
            batch_sizes,
            state,
            self._flat_weights,
            self.bias,
            self.num_layers,
            float(self.dropout),
            self.training,
            self.bidirectional,
        )
        packed = PackedSequence(out, batch_sizes, sorted_indices, unsorted_indices)
        return packed, self.permute_hidden((h_n, c_n), unsorted_indices)

    def _zero_state(self, input: Tensor, batch: int) -> tuple[Tensor, Tensor]:
        slots = self.num_layers * (2 if self.bidirectional else 1)
        real_hidden = self.proj_size if self.proj_size > 0 else self.hidden_size
        h0 = torch.zeros(slots, batch, real_hidden, dtype=input.dtype, device=input.device)
        c0 = torch.zeros(slots, batch, self.hidden_size, dtype=input.dtype, device=input.device)
        return h0, c0

    # ---- fused: fastlstm's own ops, layer by layer, with telemetry ----

    def _fused_forward(self, input, hx, implementation: str, records: bool, resets=None):
        packed = isinstance(input, PackedSequence)
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            check_batch_sizes(batch_sizes)
            check_packed_dtype(data, self._flat_weights[0].dtype)
            self.check_input(data, batch_sizes)
            x, lengths = pad_packed_sequence(PackedSequence(data, batch_sizes))
            batched, reference_input = True, data
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            batch_sizes = sorted_indices = unsorted_indices = lengths = None
            batched = input.dim() == 3
            reference_input = input if batched else input.unsqueeze(0 if self.batch_first else 1)
            x = reference_input.transpose(0, 1) if self.batch_first else reference_input
        h0, c0 = self._initial_state(hx, reference_input, batch_sizes, batched)
        if packed and hx is not None:  # a zero state is the same in any order
            h0, c0 = self.permute_hidden((h0, c0), sorted_indices)
        if x.shape[0] == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        if resets is not None:
            resets = time_major_resets(resets, x, batched, self.batch_first, sorted_indices if packed else None)

        weights = self._weights()
        autocast_dtype = autocast_dtype_of(x.device)
        if autocast_dtype is not None:
            x, h0, c0 = (autocast_operand(t, autocast_dtype) for t in (x, h0, c0))
            weights = [tuple(None if w is None else autocast_operand(w, autocast_dtype) for w in ws) for ws in weights]
            check_autocast_dtypes(x, h0, c0, weights[0][0])
        device_lengths = None if lengths is None else lengths.to(x.device, non_blocking=True)
        with torch.autocast(x.device.type, enabled=False) if autocast_dtype is not None else nullcontext():
            out, h_n, c_n = self._run_layers(
                x, h0, c0, weights, (lengths, device_lengths), implementation, records, resets
            )

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

    def _run_layers(self, x, h0, c0, weights, lengths: tuple, implementation: str, records: bool, resets=None):
        """lengths: (on the host, on x's device), both None for a padded input."""
        host_lengths, lengths = lengths
        num_directions = 2 if self.bidirectional else 1
        restarts = direction_restarts(resets, num_directions)
        # docs/telemetry.md: nothing is recorded when the pass does not record (Telemetry.records) or the batch is
        # empty.
        record = records and x.shape[1] > 0
        seq = self.telemetry.begin_pass(x.device) if record else None
        if implementation == NATIVE_RECORDED:  # never with resets (routing.choose)
            probes = [
                self.telemetry.pass_probe(layer, direction, seq) if record else None
                for layer in range(self.num_layers)
                for direction in range(num_directions)
            ]
            dropout = float(self.dropout) if self.training else 0.0
            return native_recorded.run_layers(
                x,
                h0,
                c0,
                weights,
                lengths,
                bias=self.bias,
                batch_first=self.batch_first,
                dropout=dropout,
                num_directions=num_directions,
                probes=probes,
            )
        h_n, c_n = [], []
        layer_input = x
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(num_directions):
                slot = layer * num_directions + direction
                probe = self.telemetry.pass_probe(layer, direction, seq) if record else None
                out, h, c = lstm_layer(
                    layer_input,
                    h0[slot],
                    c0[slot],
                    weights[slot],
                    lengths,
                    direction == 1,
                    implementation,
                    probe,
                    restarts[direction],
                )
                outputs.append(out)
                h_n.append(h)
                c_n.append(c)
            layer_input = outputs[0] if num_directions == 1 else torch.cat(outputs, dim=2)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = dropout_between_layers(layer_input, self.dropout, host_lengths)
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
            batch = int(batch_sizes[0]) if batch_sizes is not None else input.size(0 if self.batch_first else 1)
            hx = self._zero_state(input, batch)
            self.check_forward_args(input, hx, batch_sizes)
            return hx
        check_hx_form(hx)
        h0, c0 = hx
        check_hx_rank(h0, c0, batched)
        if not batched:
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        self.check_forward_args(input, (h0, c0), batch_sizes)
        c0 = widened_cell_state(c0, input.dtype)
        for name, state in (("hx", h0), ("cx", c0)):
            if state.dtype != input.dtype and autocast_dtype_of(input.device) is None:
                raise RuntimeError(f"{name} dtype ({state.dtype}) does not match input dtype ({input.dtype})")
            if state.device != input.device:
                raise RuntimeError(f"{name} is on {state.device} but input is on {input.device}")
        return h0, c0


class _ScriptableLSTM(LSTM):
    """LSTM as torch.jit.script sees it (LSTM.__prepare_scriptable__): the native forward, without resets. From
    Python, a call, a forward or a pickle (torch.save, deepcopy) turns the module back into an LSTM first, so that
    scripting a model leaves the model as it was."""

    def __call__(self, *args, **kwargs):
        _restore_class(self)
        return self(*args, **kwargs)

    def __reduce_ex__(self, protocol):
        _restore_class(self)
        return self.__reduce_ex__(protocol)

    @overload
    @torch._jit_internal._overload_method
    def forward(
        self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]: ...

    @overload
    @torch._jit_internal._overload_method
    def forward(
        self, input: PackedSequence, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[PackedSequence, tuple[Tensor, Tensor]]: ...

    def forward(self, input, hx=None):
        if not torch.jit.is_scripting():  # TorchScript compiles only what follows (LSTM.forward says why)
            _restore_class(self)
            return LSTM.forward(self, input, hx)
        if isinstance(input, PackedSequence):
            return self._native_packed(input, hx)
        return self._native_padded(input, hx)


# The class each module had when torch.jit.script swapped it (LSTM.__prepare_scriptable__), until it is restored.
_CLASS_BEFORE_SCRIPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _restore_class(module: LSTM) -> None:
    module.__class__ = _CLASS_BEFORE_SCRIPT.pop(module, LSTM)


def _configuration(module: nn.RNNBase) -> tuple:
    return (
        module.input_size,
        module.hidden_size,
        module.num_layers,
        module.bias,
        module.batch_first,
        module.dropout,
        module.bidirectional,
        module.proj_size,
    )


def _share_parameters(source: nn.RNNBase, target: nn.RNNBase) -> None:
    """Make `target` (built on the meta device) hold `source`'s Parameter objects."""
    for name in source._flat_weights_names:
        param = source._parameters.get(name)
        if not isinstance(param, nn.Parameter):  # the module's setup is wrong, not an argument's type
            raise ValueError(  # noqa: TRY004
                f"{name} of the {type(source).__name__} is not a plain Parameter (a parametrization or weight "
                "norm?); remove it before converting and apply it to the converted module instead"
            )
        setattr(target, name, param)
    target._init_flat_weights()
