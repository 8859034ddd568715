"""What `fastlstm bench` runs: the LSTM implementations (providers), their inputs, the step each mode times, and
the correctness gate every provider must pass before it is timed.

Every provider is built from the same nn.LSTM-layout weights and is called like nn.LSTM (`module(x) -> out,
(h_n, c_n)`), so one step function and one check serve them all. The check compares each provider in the case's
dtype with nn.LSTM run in float64 on the same (rounded) weights and inputs.
"""

from __future__ import annotations

import functools
import importlib.util
import zlib
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from ..testing import TOLERANCES, rel_err
from .cases import Problem

STORAGE = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The correctness gate's budgets are the test suite's (fastlstm/testing.py), for the precisions a case can ask for.
THRESHOLDS = {key: TOLERANCES[key] for key in STORAGE}
BASELINE = "nn.LSTM"
POOL = 4  # input buffers rotated between calls, so no call finds its input still in L2 from the one before


@contextmanager
def precision(dtype_key: str):
    """TF32 on for "tf32" and off otherwise, for cuBLAS, cuDNN and the kernels (kernels/launch.py reads the cuBLAS
    flag); restored afterwards. Off for "fp32" means cuDNN too, whose own default would allow TF32."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    allow = dtype_key == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


# ---------------------------------------------------------------------------------------------------- providers


def _named_grads(module: nn.Module) -> dict:
    return {name: p.grad for name, p in module.named_parameters()}


@dataclass(frozen=True)
class Provider:
    """One LSTM implementation. build(problem, weights, device) returns a module in the problem's storage dtype
    holding `weights` (nn.LSTM state_dict layout); unsupported(problem, device) returns why it cannot run a problem
    (or None); native_grads(module) returns its parameter gradients under nn.LSTM's names; environment() is a
    context manager the runner enters around the provider's check and timing."""

    name: str
    description: str
    build: Callable
    unsupported: Callable = lambda problem, device: None
    native_grads: Callable = _named_grads
    installed: Callable = lambda: True
    default: bool = True
    environment: Callable = nullcontext


def _lstm_kwargs(problem: Problem, device) -> dict:
    return {
        "num_layers": problem.layers,
        "bidirectional": problem.bidirectional,
        "proj_size": problem.proj_size,
        "device": device,
        "dtype": STORAGE[problem.dtype],
    }


def _build_fastlstm(telemetry: bool):
    def build(problem, weights, device):
        import fastlstm

        # The kernels only run on CUDA; on the CPU the reference backend stands in (smoke runs, not speed).
        backend = "triton" if device.type == "cuda" else "reference"
        module = fastlstm.LSTM(
            problem.inputs, problem.hidden, **_lstm_kwargs(problem, device), backend=backend, telemetry=telemetry
        )
        module.load_state_dict(weights)
        # "Telemetry on" in every mode: the forward mode runs under no_grad, where a module records nothing unless
        # told to (docs/telemetry.md, "Inference").
        module.telemetry.record_inference = telemetry
        return module

    return build


def _build_nn_lstm(problem, weights, device):
    module = nn.LSTM(problem.inputs, problem.hidden, **_lstm_kwargs(problem, device))
    module.load_state_dict(weights)
    return module


class _NativeLSTM(nn.Module):
    """nn.LSTM with cuDNN switched off: PyTorch's own (per-step ATen) implementation."""

    def __init__(self, lstm: nn.LSTM):
        super().__init__()
        self.lstm = lstm

    def forward(self, x):
        with torch.backends.cudnn.flags(enabled=False):
            return self.lstm(x)


def _build_native(problem, weights, device):
    return _NativeLSTM(_build_nn_lstm(problem, weights, device))


def _native_unsupported(problem, device):
    return None if device.type == "cuda" else "the same code as nn.LSTM off CUDA"


def _streaming_kernels():
    from fastlstm.kernels import planning

    return planning.kernels("streaming")


def _streaming_unsupported(problem, device):
    return None if device.type == "cuda" else "the streaming kernels run on CUDA only"


# haste_pytorch (github.com/lmnt-com/haste): one layer, one direction, fp32/fp16, gate order i,g,f,o, weights
# stored transposed, one bias. Not installed where this suite was written: the correctness gate is what vouches for
# the mapping below on a machine that has it.
def _haste_installed() -> bool:
    return importlib.util.find_spec("haste_pytorch") is not None


def _haste_unsupported(problem, device):
    if device.type != "cuda":
        return "haste_pytorch runs on CUDA only"
    if problem.layers != 1 or problem.bidirectional or problem.proj_size or problem.packed:
        return "haste_pytorch.LSTM is one layer, one direction, without projection or packed input"
    if problem.dtype == "bf16":
        return "haste_pytorch has no bfloat16 kernels"
    return None


def _build_haste(problem, weights, device):
    import haste_pytorch

    module = haste_pytorch.LSTM(problem.inputs, problem.hidden, forget_bias=0.0).to(device)
    w = {k: v.float() for k, v in weights.items()}
    module.from_native_weights(w["weight_ih_l0"], w["weight_hh_l0"], w["bias_ih_l0"], w["bias_hh_l0"])
    return module.to(device=device, dtype=STORAGE[problem.dtype])


def _haste_grads(module) -> dict:
    def to_native(grad):  # [in, 4H] in i,g,f,o -> [4H, in] in i,f,g,o
        i, g, f, o = grad.chunk(4, dim=-1)
        return torch.cat([i, f, g, o], dim=-1).transpose(0, -1) if grad.dim() == 2 else torch.cat([i, f, g, o])

    bias = to_native(module.bias.grad)  # the one bias is b_ih + b_hh: both receive its gradient
    return {
        "weight_ih_l0": to_native(module.kernel.grad),
        "weight_hh_l0": to_native(module.recurrent_kernel.grad),
        "bias_ih_l0": bias,
        "bias_hh_l0": bias,
    }


PROVIDERS = {
    p.name: p
    for p in (
        Provider(
            "fastlstm",
            "fastlstm.LSTM, telemetry on (Triton kernels on CUDA, reference backend on CPU)",
            _build_fastlstm(True),
        ),
        Provider("fastlstm-notelemetry", "fastlstm.LSTM(telemetry=False)", _build_fastlstm(False)),
        Provider(
            "fastlstm-streaming",
            "fastlstm.LSTM, telemetry on, streaming kernels for every layer "
            "(FASTLSTM_KERNELS=streaming): the baseline the resident kernels replace",
            _build_fastlstm(True),
            unsupported=_streaming_unsupported,
            environment=_streaming_kernels,
        ),
        Provider(BASELINE, "torch.nn.LSTM (cuDNN on CUDA)", _build_nn_lstm),
        Provider(
            "nn.LSTM-native",
            "torch.nn.LSTM with cuDNN disabled (ATen's per-step kernels)",
            _build_native,
            unsupported=_native_unsupported,
            native_grads=lambda m: _named_grads(m.lstm),
            default=False,
        ),
        Provider(
            "haste",
            "haste_pytorch.LSTM, where installed",
            _build_haste,
            unsupported=_haste_unsupported,
            native_grads=_haste_grads,
            installed=_haste_installed,
        ),
    )
}


def default_providers() -> list[str]:
    return [name for name, p in PROVIDERS.items() if p.default and p.installed()]


# ------------------------------------------------------------------------------------------------ weights, inputs


def problem_seed(problem, seed: int) -> int:
    """Distinct weights per problem, identical for every provider of it, reproducible across runs."""
    return (zlib.crc32(problem.name.encode()) + 7919 * seed) % 2**31


@functools.lru_cache(maxsize=2)
def make_weights(problem: Problem, seed: int) -> dict:
    """nn.LSTM's initialisation for the problem, rounded to its storage dtype, on the CPU (moved by load_state_dict).
    The global random state is left as it was. Cached: every provider and mode of a problem loads the same weights
    (load_state_dict copies, so nobody mutates them), and initialising the largest problems takes a while."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        template = nn.LSTM(
            problem.inputs,
            problem.hidden,
            problem.layers,
            bidirectional=problem.bidirectional,
            proj_size=problem.proj_size,
        )
    return {k: v.to(STORAGE[problem.dtype]) for k, v in template.state_dict().items()}


def mixed_lengths(seq: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Lengths uniform in [1, seq] with one sequence at full length, in no particular order (mean about seq/2)."""
    lengths = torch.randint(1, seq + 1, (batch,), generator=generator)
    lengths[int(torch.randint(0, batch, (1,), generator=generator))] = seq
    return lengths


@dataclass
class Inputs:
    """A pool of inputs (tensors or PackedSequences) and matching output gradients, rotated call by call."""

    xs: list
    grad_outs: list
    lengths: torch.Tensor | None = None
    leaves: list = field(default_factory=list)  # the tensors whose .grad a backward fills

    def __len__(self) -> int:
        return len(self.xs)


def _out_features(problem: Problem) -> int:
    return (problem.proj_size or problem.hidden) * (2 if problem.bidirectional else 1)


def make_inputs(problem: Problem, device, pool: int, requires_grad: bool, seed: int) -> Inputs:
    """`pool` inputs and output gradients, drawn on the device itself (drawing gigabytes on the host and copying
    them would dominate the largest cases); lengths come from a CPU generator, as pack_padded_sequence wants."""
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    dtype = STORAGE[problem.dtype]
    lengths = mixed_lengths(problem.seq, problem.batch, torch.Generator().manual_seed(seed)) if problem.packed else None
    rows = int(lengths.sum()) if lengths is not None else problem.seq * problem.batch
    xs, grads, leaves = [], [], []
    for _ in range(pool):
        x = torch.randn(problem.seq, problem.batch, problem.inputs, generator=generator, device=device, dtype=dtype)
        if lengths is not None:
            p = pack_padded_sequence(x, lengths, enforce_sorted=False)
            # A leaf of its own, so a backward stops at the LSTM instead of timing the packing's backward too.
            x = PackedSequence(
                p.data.detach().requires_grad_(requires_grad), p.batch_sizes, p.sorted_indices, p.unsorted_indices
            )
            leaves.append(x.data)
        else:
            leaves.append(x.requires_grad_(requires_grad))
        xs.append(x)
        grad_shape = (rows, _out_features(problem)) if lengths is not None else (*x.shape[:2], _out_features(problem))
        grads.append(torch.randn(grad_shape, generator=generator, device=device, dtype=dtype))
    return Inputs(xs, grads, lengths, leaves)


def output_data(out):
    return out.data if isinstance(out, PackedSequence) else out


# ------------------------------------------------------------------------------------------------------- steps


def make_step(mode: str, module: nn.Module, inputs: Inputs) -> Callable[[int], None]:
    """The callable one timed iteration runs: step(i) uses input i mod pool size.

    forward: inference (eval mode, no_grad). forward_backward: forward with gradients for the input and every
    parameter (as inside a model), then backward of the output with a fixed random gradient. train_step: the same
    plus Adam's step (grads set to None each time, as `zero_grad` does by default).
    """
    params = [p for p in module.parameters() if p.requires_grad]
    k = len(inputs)
    if mode == "forward":
        module.eval()

        def forward(i: int) -> None:
            with torch.no_grad():
                module(inputs.xs[i % k])

        return forward

    module.train()
    optimizer = torch.optim.Adam(params, lr=1e-6) if mode == "train_step" else None

    def backward(i: int) -> None:
        for p in params:
            p.grad = None
        inputs.leaves[i % k].grad = None
        out, _ = module(inputs.xs[i % k])
        output_data(out).backward(inputs.grad_outs[i % k])
        if optimizer is not None:
            optimizer.step()

    return backward


# ------------------------------------------------------------------------------------------------- correctness


def _run_with_grads(module, x, leaf, grads, native_grads):
    """Forward + backward through output and both final states; returns the tensors the check compares."""
    out, (h_n, c_n) = module(x)
    g_out, g_h, g_c = grads
    torch.autograd.backward([output_data(out), h_n, c_n], [g_out.to(h_n.dtype), g_h.to(h_n.dtype), g_c.to(c_n.dtype)])
    result = {"output": output_data(out), "h_n": h_n, "c_n": c_n, "grad_input": leaf.grad}
    result.update({f"grad_{name}": g for name, g in native_grads(module).items()})
    return result


def _as_float64(inputs: Inputs):
    x = inputs.xs[0]
    if isinstance(x, PackedSequence):
        x64 = PackedSequence(
            x.data.detach().double().requires_grad_(), x.batch_sizes, x.sorted_indices, x.unsorted_indices
        )
        return x64, x64.data
    x64 = x.detach().double().requires_grad_()
    return x64, x64


def check_correctness(problem: Problem, provider: Provider, device, seed: int) -> dict:
    """Run `provider` and float64 nn.LSTM on the same weights and inputs (gradients of output and final states,
    plus an inference forward) and compare every tensor. Returns {"passed", "threshold", "max_error", "worst",
    "errors"}; passed only if every relative error is finite and within the dtype's threshold."""
    weights = make_weights(problem, seed)
    reference = nn.LSTM(problem.inputs, problem.hidden, **{**_lstm_kwargs(problem, device), "dtype": torch.float64})
    reference.load_state_dict({k: v.double() for k, v in weights.items()})
    inputs = make_inputs(problem, device, pool=1, requires_grad=True, seed=seed + 1)
    state_shape = (problem.layers * (2 if problem.bidirectional else 1), problem.batch)
    g = torch.Generator().manual_seed(seed + 2)
    grads = (
        inputs.grad_outs[0],
        torch.randn(*state_shape, problem.proj_size or problem.hidden, generator=g).to(device),
        torch.randn(*state_shape, problem.hidden, generator=g).to(device),
    )

    # The provider gets the state seeds in its dtype: the reference gets those same values, exactly.
    grads = (grads[0], *(t.to(inputs.grad_outs[0].dtype) for t in grads[1:]))
    x64, leaf64 = _as_float64(inputs)
    expected = _run_with_grads(reference, x64, leaf64, [t.double() for t in grads], _named_grads)
    module = provider.build(problem, weights, device)
    with precision(problem.dtype):
        actual = _run_with_grads(module, inputs.xs[0], inputs.leaves[0], grads, provider.native_grads)
        module.eval()
        with torch.no_grad():
            actual["output_inference"] = output_data(module(inputs.xs[0])[0])
    expected["output_inference"] = expected["output"]

    errors = {name: rel_err(actual.get(name), ref) for name, ref in expected.items()}
    worst = max(errors, key=errors.get)
    threshold = THRESHOLDS[problem.dtype]
    return {
        "passed": errors[worst] <= threshold,
        "threshold": threshold,
        "max_error": errors[worst],
        "worst": worst,
        "errors": errors,
    }
