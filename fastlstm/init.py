"""LSTM initialisers that fix the failures the doctor reports: `fastlstm.init.xavier_`, `orthogonal_`,
`forget_bias_` and `chrono_`.

Each takes a `torch.nn.LSTM`, a `fastlstm.LSTM`, or any module containing them (every LSTM inside is initialised),
modifies the parameters in place without recording autograd history, and returns its argument, so calls chain:

    fastlstm.init.orthogonal_(fastlstm.init.xavier_(model.lstm))
    fastlstm.init.forget_bias_(model.lstm, 1.0)

Parameter layout (nn.LSTM's, shared by fastlstm.LSTM): per layer and direction, `weight_ih` [4H, I], `weight_hh`
[4H, P], `bias_ih` [4H], `bias_hh` [4H], optional `weight_hr` [P, H], gate blocks in the order i, f, g, o.
"""

from __future__ import annotations

import torch
from torch import nn

GATE_INDEX = {"i": 0, "f": 1, "g": 2, "o": 3}


def xavier_(module: nn.Module, gain: float = 1.0, generator: torch.Generator | None = None) -> nn.Module:
    """Glorot/Xavier-uniform input weights, one gate block at a time (Glorot & Bengio 2010).

    Each block [H, I] is initialised as its own linear map (fan_in = I, fan_out = H): every gate's pre-activation
    then starts with the variance of a standalone Glorot layer, instead of the four blocks sharing fan_out = 4H.
    Biases are left unchanged.
    """
    for params in _layer_directions(module):
        for block in _gate_blocks(params["weight_ih"]):
            _init(nn.init.xavier_uniform_, block, generator, gain=gain)
    return module


def orthogonal_(module: nn.Module, gain: float = 1.0, generator: torch.Generator | None = None) -> nn.Module:
    """(Semi-)orthogonal recurrent weights, one gate block at a time (Saxe et al. 2014).

    An orthogonal W_hh block neither grows nor shrinks the state it multiplies, so gradients through time start
    neither exploding nor vanishing from the weights alone. With `proj_size > 0` the projection `weight_hr` is on
    the recurrent path as well and is made orthogonal too.
    """
    for params in _layer_directions(module):
        for block in _gate_blocks(params["weight_hh"]):
            _init(nn.init.orthogonal_, block, generator, gain=gain)
        if params.get("weight_hr") is not None:
            _init(nn.init.orthogonal_, params["weight_hr"], generator, gain=gain)
    return module


def forget_bias_(module: nn.Module, value: float = 1.0) -> nn.Module:
    """Set the forget-gate bias to `value` (Gers et al. 2000; Jozefowicz et al. 2015 recommend 1.0).

    The LSTM adds `bias_ih` and `bias_hh`, so the forget block of `bias_ih` is set to `value` and that of
    `bias_hh` to 0: the effective bias is exactly `value`. With σ(1) ≈ 0.73 the cell keeps most of its state
    each step, so gradients through the cell path decay slowly from the start.
    """
    for params in _layer_directions(module, need_bias=True):
        with torch.no_grad():
            _gate(params["bias_ih"], "f").fill_(value)
            _gate(params["bias_hh"], "f").zero_()
    return module


def chrono_(module: nn.Module, max_timescale: float, generator: torch.Generator | None = None) -> nn.Module:
    """Chrono initialisation (Tallec & Ollivier 2018, "Can recurrent neural networks warp time?", ICLR).

    Per unit, b_f = log(u) with u ~ Uniform(1, max_timescale - 1), and b_i = -b_f; the other biases are zero.
    The forget gate then keeps its cell for a characteristic time drawn between 1 and `max_timescale` steps, so the
    network starts out able to carry information (and gradients) across dependencies of up to that length. Choose
    `max_timescale` as the longest dependency the task is expected to have (in steps). As in forget_bias_, the
    values go into `bias_ih` and the same blocks of `bias_hh` are zeroed.
    """
    if not max_timescale >= 2:
        raise ValueError(f"chrono_ needs max_timescale >= 2 (a dependency length in steps), got {max_timescale}")
    for params in _layer_directions(module, need_bias=True):
        b_ih, b_hh = params["bias_ih"], params["bias_hh"]
        hidden = b_ih.shape[0] // 4
        u = torch.rand(hidden, generator=generator, dtype=torch.float64) * (max_timescale - 2.0) + 1.0
        log_u = torch.log(u).to(dtype=b_ih.dtype)
        with torch.no_grad():
            b_ih.zero_()
            b_hh.zero_()
            _gate(b_ih, "f").copy_(log_u)
            _gate(b_ih, "i").copy_(-log_u)
    return module


# ---- helpers ----


def find_lstms(module: nn.Module) -> list:
    """`module` itself if it is an LSTM (torch's or fastlstm's), otherwise every LSTM inside it."""
    if _is_lstm(module):
        return [module]
    return [m for m in module.modules() if _is_lstm(m)]


def _is_lstm(module: nn.Module) -> bool:
    # fastlstm.LSTM subclasses nn.RNNBase with mode "LSTM" (not nn.LSTM, which torch.compile refuses to trace).
    return isinstance(module, nn.LSTM) or (isinstance(module, nn.RNNBase) and getattr(module, "mode", "") == "LSTM")


def _layer_directions(module: nn.Module, need_bias: bool = False) -> list:
    """One dict per layer and direction: "weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr" -> Parameter."""
    lstms = find_lstms(module)
    if not lstms:
        raise TypeError(f"expected an nn.LSTM, a fastlstm.LSTM or a module containing one, got {type(module).__name__}")
    result = []
    for lstm in lstms:
        if need_bias and not lstm.bias:
            raise ValueError("this initialiser sets gate biases, but the LSTM was built with bias=False")
        for names in lstm._all_weights:
            result.append({name.split("_l")[0]: getattr(lstm, name) for name in names})
    return result


def _gate_blocks(weight: torch.Tensor) -> list:
    return list(weight.chunk(4, dim=0))


def _gate(vector: torch.Tensor, gate: str) -> torch.Tensor:
    hidden = vector.shape[0] // 4
    k = GATE_INDEX[gate]
    return vector[k * hidden : (k + 1) * hidden]


def _init(fn, tensor: torch.Tensor, generator, **kwargs) -> None:
    with torch.no_grad():
        if generator is None:
            fn(tensor, **kwargs)
        else:
            fn(tensor, generator=generator, **kwargs)


__all__ = ["chrono_", "find_lstms", "forget_bias_", "orthogonal_", "xavier_"]
