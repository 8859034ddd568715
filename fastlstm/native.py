"""The native implementation: PyTorch's own LSTM op, called exactly as torch.nn.LSTM calls it.

One call runs every layer and direction (aten::lstm: cuDNN on CUDA, PyTorch's own kernels on the CPU) on the
module's flat weight list, so results, gradients, higher derivatives, torch.func support and error behaviour are
nn.LSTM's, and an exported, traced or scripted program holds aten::lstm, which ONNX, ExecuTorch and TensorRT lower.
It records no telemetry: the op has nowhere to put it.

Both functions are TorchScript-compatible: the scripted module (module.py) calls them too.
"""

from torch import _VF, Tensor


def lstm(
    input: Tensor,
    hx: tuple[Tensor, Tensor],
    weights: list[Tensor],
    has_biases: bool,
    num_layers: int,
    dropout: float,
    train: bool,
    bidirectional: bool,
    batch_first: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(output, h_n, c_n) for a padded 3-D input in the module's layout; hx: ([L*D, B, P], [L*D, B, H])."""
    result = _VF.lstm(input, hx, weights, has_biases, num_layers, dropout, train, bidirectional, batch_first)
    return result[0], result[1], result[2]


def lstm_packed(
    data: Tensor,
    batch_sizes: Tensor,
    hx: tuple[Tensor, Tensor],
    weights: list[Tensor],
    has_biases: bool,
    num_layers: int,
    dropout: float,
    train: bool,
    bidirectional: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(output data, h_n, c_n) for a PackedSequence's data and batch sizes; hx in the sorted batch order."""
    result = _VF.lstm(data, batch_sizes, hx, weights, has_biases, num_layers, dropout, train, bidirectional)
    return result[0], result[1], result[2]
