"""The test suite's shared helpers: error measures and budgets, module pairs and inputs, parity against nn.LSTM, a
guard against host reads, one CPU thread, and the small forecaster several tests train.

Every check compares fastlstm against torch.nn.LSTM (or against maths recomputed independently in the test), never
against numbers written into the tests. The relative error and the budgets are fastlstm.testing's, the same ones the
benchmark's correctness gate applies. conftest.py turns the set-ups here into fixtures.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import fastlstm
from fastlstm.bench import cpu_threads
from fastlstm.testing import TOLERANCES, rel_err, tolerance

__all__ = [
    "HOST_READS",
    "TOLERANCES",
    "Forecaster",
    "HostReadGuard",
    "assert_float32_parity",
    "assert_module_parity",
    "assert_rel",
    "assert_resets_parity",
    "fast_like",
    "float32_pair",
    "leaf",
    "lstm_cell_step",
    "make_pair",
    "mixed_lengths",
    "one_cpu_thread",
    "pack",
    "random_resets",
    "rel_err",
    "segmented_lstm",
    "tolerance",
    "weighted_loss",
]


# ---- error measures ----


def assert_rel(actual, expected, tol: float, what: str = "") -> None:
    """rel_err(actual, expected) <= tol (rel_err's conventions: zero reference -> absolute error; missing or
    non-finite -> inf)."""
    assert actual is not None, f"{what}: no tensor"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


# ---- module pairs and inputs ----


def fast_like(ref: nn.LSTM, **kwargs) -> fastlstm.LSTM:
    """A fastlstm.LSTM with ref's configuration, dtype and (copied, not shared) weights."""
    kwargs.setdefault("backend", "reference")
    weight = ref.weight_ih_l0
    m = fastlstm.LSTM(
        ref.input_size,
        ref.hidden_size,
        ref.num_layers,
        ref.bias,
        ref.batch_first,
        ref.dropout,
        ref.bidirectional,
        ref.proj_size,
        dtype=weight.dtype,
        device=weight.device,
        **kwargs,
    )
    m.load_state_dict(ref.state_dict())
    return m.train(ref.training)


def make_pair(input_size, hidden_size, num_layers=1, *, dtype=torch.float64, weight_scale=None, **kwargs):
    """(nn.LSTM, fastlstm.LSTM(backend="reference")) with identical weights. weight_scale widens the default
    uniform(±1/sqrt(H)) init to uniform(±weight_scale) so that gates saturate."""
    ref = nn.LSTM(input_size, hidden_size, num_layers, dtype=dtype, **kwargs)
    if weight_scale is not None:
        with torch.no_grad():
            for p in ref.parameters():
                p.uniform_(-weight_scale, weight_scale)
    return ref, fast_like(ref)


def mixed_lengths(steps: int, batch: int, sorted_: bool) -> list[int]:
    """Random lengths in [1, steps] with the maximum present and not all equal; descending when sorted_,
    otherwise in an order that is not sorted (so enforce_sorted=False really permutes)."""
    assert batch >= 2 and steps >= 2
    rest = torch.randint(1, steps + 1, (batch - 2,)).tolist()
    lengths = sorted([steps, 1, *rest], reverse=True)
    if not sorted_:
        lengths = lengths[1:] + lengths[:1]  # the longest last: not descending
    return lengths


def pack(x: torch.Tensor, lengths, batch_first: bool, enforce_sorted: bool) -> PackedSequence:
    return pack_padded_sequence(x, torch.as_tensor(lengths), batch_first=batch_first, enforce_sorted=enforce_sorted)


def weighted_loss(out, h_n, c_n, weights):
    """A loss that uses the output and both final states with random weights, so every gradient path matters."""
    w_out, w_h, w_c = weights
    data = out.data if isinstance(out, PackedSequence) else out
    return (data * w_out).sum() + (h_n * w_h).sum() + (c_n * w_c).sum()


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def lstm_cell_step(lstm: nn.LSTM, layer: int, x_t: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple:
    """One step of torch.nn.LSTM's equations for one layer (forward direction, no projection), written out so that
    c_t is the single tensor feeding both h_t and the next step: after `retain_grad()` its gradient is the total
    ∂L/∂c_t (nn.LSTM's own c_n output misses the path through h_t, computed inside the op). x_t [B, I], h, c [B, H]."""
    w_ih, w_hh = getattr(lstm, f"weight_ih_l{layer}"), getattr(lstm, f"weight_hh_l{layer}")
    pre = x_t @ w_ih.t() + h @ w_hh.t()
    if lstm.bias:
        pre = pre + getattr(lstm, f"bias_ih_l{layer}") + getattr(lstm, f"bias_hh_l{layer}")
    i, f, g, o = pre.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


# ---- resets: nn.LSTM run on each episode separately ----


def segmented_lstm(ref: nn.LSTM, x: torch.Tensor, hx, resets: torch.Tensor, lengths=None) -> tuple:
    """What fastlstm.LSTM(x, hx, resets=resets) must give, from `ref` (a time-major nn.LSTM) run separately on every
    episode of every sequence, each starting from hx (or zeros): a reset at step t ends one episode before t.

    x [T, B, I]; resets [T, B] bool; lengths: per-sequence lengths (resets past a sequence's end have no effect).
    Returns (out [T, B, D*P], zero past each end; h_n, c_n [layers*D, B, *]): direction 0's final state is its last
    episode's, direction 1's (which ends at t = 0) its first episode's. Autograd through the result gives every
    gradient; hx's adds up over the episodes' starts, because each episode's call takes the same hx slices."""
    assert not ref.batch_first
    steps, batch = x.shape[:2]
    directions = 2 if ref.bidirectional else 1
    if hx is None:
        proj = ref.proj_size or ref.hidden_size
        slots = ref.num_layers * directions
        hx = (x.new_zeros(slots, batch, proj), x.new_zeros(slots, batch, ref.hidden_size))
    outs, h_n, c_n = [], [], []
    for b in range(batch):
        length = steps if lengths is None else int(lengths[b])
        starts = [0] + [t for t in range(1, length) if bool(resets[t, b])]
        episodes = [
            ref(x[s:e, b : b + 1], (hx[0][:, b : b + 1], hx[1][:, b : b + 1]))
            for s, e in zip(starts, [*starts[1:], length])
        ]
        out = torch.cat([o for o, _ in episodes])
        outs.append(torch.cat((out, out.new_zeros(steps - length, 1, out.shape[-1]))))
        last, first = episodes[-1][1], episodes[0][1]
        pick = [last if slot % directions == 0 else first for slot in range(ref.num_layers * directions)]
        h_n.append(torch.stack([state[0][slot, 0] for slot, state in enumerate(pick)]))
        c_n.append(torch.stack([state[1][slot, 0] for slot, state in enumerate(pick)]))
    return torch.cat(outs, dim=1), torch.stack(h_n, dim=1), torch.stack(c_n, dim=1)


def random_resets(steps: int, batch: int, p: float = 0.3) -> torch.Tensor:
    """A random [T, B] reset mask that always holds a reset at t = 0 and two consecutive resets (T >= 3, B >= 2)."""
    resets = torch.rand(steps, batch) < p
    resets[0, 0] = True
    resets[1, 1] = resets[2, 1] = True
    return resets


def assert_resets_parity(fast, ref, x, hx, resets, tol: float, *, lengths=None, enforce_sorted=False) -> None:
    """fast(input, hx, resets=...) matches segmented_lstm(ref, ...) (a float64, time-major nn.LSTM run on every
    episode separately) in outputs, final states and, for one random loss, the gradients of the input, hx and every
    parameter. x [T, B, I] and resets [T, B] are time-major float64 / bool; fast gets them in its own dtype and layout
    (batch_first), packed when `lengths` is given. hx (float64 or None) goes to both, as leaves of their own."""
    steps = x.shape[0]
    dtype = fast.weight_ih_l0.dtype
    x_ref, x_fast = leaf(x), leaf((x.transpose(0, 1) if fast.batch_first else x).to(dtype))
    hx_ref = None if hx is None else tuple(leaf(t) for t in hx)
    hx_fast = None if hx is None else tuple(leaf(t.to(dtype)) for t in hx)
    r_out, r_h, r_c = segmented_lstm(ref, x_ref, hx_ref, resets, lengths)
    user_resets = resets.t() if fast.batch_first else resets
    if lengths is None:
        f_out, (f_h, f_c) = fast(x_fast, hx_fast, resets=user_resets)
        if fast.batch_first:
            f_out = f_out.transpose(0, 1)
    else:
        packed = pack(x_fast, lengths, fast.batch_first, enforce_sorted)
        f_out, (f_h, f_c) = fast(packed, hx_fast, resets=user_resets)
        f_out = pad_packed_sequence(f_out, total_length=steps)[0]
    weights = tuple(torch.randn_like(t) for t in (r_out, r_h, r_c))
    weighted_loss(r_out, r_h, r_c, weights).backward()
    weighted_loss(f_out, f_h, f_c, tuple(w.to(dtype) for w in weights)).backward()
    assert f_out.dtype == dtype
    assert_rel(f_out, r_out, tol, "output")
    assert_rel(f_h, r_h, tol, "h_n")
    assert_rel(f_c, r_c, tol, "c_n")
    grad_x = x_fast.grad.transpose(0, 1) if fast.batch_first else x_fast.grad
    assert_rel(grad_x, x_ref.grad, tol, "grad input")
    if hx is not None:
        assert_rel(hx_fast[0].grad, hx_ref[0].grad, tol, "grad h0")
        assert_rel(hx_fast[1].grad, hx_ref[1].grad, tol, "grad c0")
    ref_params = dict(ref.named_parameters())
    for name, param in fast.named_parameters():
        assert_rel(param.grad, ref_params[name].grad, tol, f"grad {name}")


# ---- parity with nn.LSTM ----


def run_with_grads(module, x, hx=None, weights=None, to_input=None):
    """Forward + backward of weighted_loss (fresh random weights when None). Returns (output, h_n, c_n, gradients,
    weights); the gradients are those of every parameter, of x and of hx's tensors where they require one."""
    inputs = [("input", x)] + ([] if hx is None else [("h0", hx[0]), ("c0", hx[1])])
    for _, t in inputs:
        t.grad = None
    module.zero_grad(set_to_none=True)
    out, (h_n, c_n) = module(x if to_input is None else to_input(x), hx)
    if weights is None:
        weights = tuple(torch.randn_like(t.data if isinstance(t, PackedSequence) else t) for t in (out, h_n, c_n))
    weighted_loss(out, h_n, c_n, weights).backward()
    grads = {name: t.grad for name, t in inputs if t.requires_grad}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return out, h_n, c_n, grads, weights


def float32_pair(backend: str, **options):
    """(float64 nn.LSTM, float32 fastlstm.LSTM) with the same weights: input 6, hidden 12."""
    ref = nn.LSTM(6, 12, dtype=torch.float64, **options)
    fast = fastlstm.LSTM(6, 12, dtype=torch.float32, backend=backend, **options)
    fast.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    return ref, fast


def assert_float32_parity(ref, fast, x, to_input=None):
    """Outputs, final states and every gradient of fast (float32) against ref (float64), one random loss."""
    hx = tuple(
        torch.randn(ref.num_layers * (2 if ref.bidirectional else 1), x.shape[1], size, dtype=torch.float64)
        for size in (ref.proj_size or ref.hidden_size, ref.hidden_size)
    )
    hx = tuple(t.requires_grad_() for t in hx)
    x = x.requires_grad_()
    expected = run_with_grads(ref, x, hx, None, to_input)
    x32 = x.detach().float().requires_grad_()
    hx32 = tuple(t.detach().float().requires_grad_() for t in hx)
    weights = tuple(w.float() for w in expected[4])
    got = run_with_grads(fast, x32, hx32, weights, to_input)
    for k, name in enumerate(("output", "h_n", "c_n")):
        want = expected[k].data if k == 0 and to_input is not None else expected[k]
        have = got[k].data if k == 0 and to_input is not None else got[k]
        assert_rel(have, want, tolerance(torch.float32), name)
    for name, grad in expected[3].items():
        assert_rel(got[3][name], grad, tolerance(torch.float32), f"grad {name}")


def assert_module_parity(fast, ref, x, hx=None, tol: float = TOLERANCES["fp64"], *, to_input=None, seed=None):
    """fast and ref (an nn.LSTM, or anything that should behave like one) give the same outputs, final states and
    gradients (parameters, x, hx) within `tol` for one random loss; the same dtypes and PackedSequence layout.
    to_input maps x to the module's input (packing, say); seed, when given, re-seeds the global generator before each
    module runs (dropout masks)."""
    if seed is not None:
        torch.manual_seed(seed)
    r_out, r_h, r_c, r_grads, weights = run_with_grads(ref, x, hx, None, to_input)
    if seed is not None:
        torch.manual_seed(seed)
    f_out, f_h, f_c, f_grads, _ = run_with_grads(fast, x, hx, weights, to_input)
    if isinstance(r_out, PackedSequence):
        assert isinstance(f_out, PackedSequence)
        assert torch.equal(f_out.batch_sizes, r_out.batch_sizes)
        for a, b in ((f_out.sorted_indices, r_out.sorted_indices), (f_out.unsorted_indices, r_out.unsorted_indices)):
            assert (a is None and b is None) or torch.equal(a, b)
        r_out, f_out = r_out.data, f_out.data
    assert f_out.dtype == r_out.dtype and f_h.dtype == r_h.dtype and f_c.dtype == r_c.dtype
    assert_rel(f_out, r_out, tol, "output")
    assert_rel(f_h, r_h, tol, "h_n")
    assert_rel(f_c, r_c, tol, "c_n")
    assert f_grads.keys() == r_grads.keys()
    for name, expected in r_grads.items():
        assert expected is not None, name
        assert_rel(f_grads[name], expected, tol, f"grad {name}")


# ---- host reads ----

# Every way the host reads a tensor's values; each one synchronises with a CUDA device. On the CPU nothing waits,
# so counting the calls is how a CPU test proves a GPU loop would not stall.
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


class HostReadGuard:
    """A context in which every host read (HOST_READS) of a tensor is recorded in `reads`, by method name.

    Entering proves the guard live: it reads a probe tensor every way and fails unless each read was recorded.
    `allow(t)` exempts t's storage (host metadata by PyTorch's contract, e.g. PackedSequence.batch_sizes)."""

    def __init__(self):
        self.reads: list[str] = []
        self._allowed: set[int] = set()
        self._saved: dict[str, object] = {}

    def allow(self, tensor: torch.Tensor) -> None:
        self._allowed.add(tensor.untyped_storage().data_ptr())

    def _recording(self, name: str, original):
        def read(tensor, *args, **kwargs):
            if tensor.untyped_storage().data_ptr() not in self._allowed:
                self.reads.append(name)
            return original(tensor, *args, **kwargs)

        return read

    def _install(self, names) -> None:
        for name in names:
            self._saved[name] = torch.Tensor.__dict__.get(name)
            setattr(torch.Tensor, name, self._recording(name, getattr(torch.Tensor, name)))

    def _restore(self) -> None:
        for name, original in self._saved.items():
            if original is None:
                delattr(torch.Tensor, name)  # inherited from torch._C.TensorBase: visible again
            else:
                setattr(torch.Tensor, name, original)
        self._saved.clear()

    def __enter__(self):
        self._install(HOST_READS)
        try:
            probe = torch.ones((), dtype=torch.int64)
            probe.item(), probe.tolist(), probe.cpu(), probe.numpy()
            bool(probe), int(probe), float(probe), probe.__index__()
            assert self.reads == list(HOST_READS), f"the host-read guard missed reads: saw {self.reads}"
        except BaseException:
            self._restore()
            raise
        self.reads.clear()
        return self

    def __exit__(self, *exc) -> None:
        self._restore()


# ---- a guarded training step ----


def guarded_step(model, optimizer, guard, monitor, x) -> torch.Tensor:
    """One plain training step of a bare LSTM on a squared-output loss: StepGuard skips it on the device when the
    loss is not finite, and `monitor` records it. Returns the skip flag (a device bool)."""
    loss = model(x)[0].square().mean()
    optimizer.zero_grad()
    loss.backward()
    bad = ~torch.isfinite(loss)
    guard.step(bad)
    monitor.step(loss=loss.detach(), skipped=bad)
    return bad


# ---- one CPU thread ----


def one_cpu_thread():
    """A context with one intra-op thread (restored afterwards), the same set-up as `fastlstm bench --device cpu`:
    the suite's models are tiny, so a second thread buys nothing, and on a shared machine an op whose second thread
    is descheduled stalls for a scheduler tick."""
    return cpu_threads(1)


# ---- the small forecaster ----


class Forecaster(nn.Module):
    """fastlstm.LSTM + a linear head in the TBPTT trainer's form, `model(x, state) -> (prediction, state)`.
    Batch-first by default; lstm_options go to fastlstm.LSTM (dtype also to the head)."""

    def __init__(self, inputs: int, outputs: int, hidden: int, layers: int = 1, *, backend="reference", **lstm_options):
        super().__init__()
        lstm_options.setdefault("batch_first", True)
        self.lstm = fastlstm.LSTM(inputs, hidden, layers, backend=backend, **lstm_options)
        directions = 2 if self.lstm.bidirectional else 1
        self.head = nn.Linear(hidden * directions, outputs, dtype=lstm_options.get("dtype"))

    def forward(self, x, state=None):
        out, state = self.lstm(x, state)
        return self.head(out), state
