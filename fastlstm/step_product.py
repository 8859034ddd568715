"""The matrix products inside the CPU step loops: the same weight times a few rows, once per time step.

reference.py's PyTorch-op loops (every loop the compiled ones of fused_step.py do not cover: lengths, restarts, a
projection, float64, no C compiler) multiply h_{t-1} by W_hhᵀ (forward) and the gate gradients by W_hh (backward) at
every step, and with a projection h by W_hrᵀ / dh by W_hr. With a small batch each product is a matrix-vector-like
GEMM whose cost is reading the weight. torch.mm hands it to the BLAS (MKL in PyTorch's CPU wheels), which reads the
weight in its plain row-major layout every time. oneDNN, which PyTorch also ships for its own CPU LSTM, can reorder
the weight once per loop into its blocked layout and then run each step's product from that, reading the weight in
the order its kernel wants it.

Measured with torch 2.13.0+cpu on a 2-core AMD EPYC machine (AVX-512), two threads, best of three runs of 100
products, rows [B, 4H] times [4H, H] (the backward's shape; the forward's [B, H] times [H, 4H] showed the same
picture), µs per product, torch.addmm against the reordered weight:

    H      B = 1       B = 8       B = 16      B = 64
    128    10 / 35     17 / 37     23 / 38     60 / 60
    256    26 / 29     59 / 44     85 / 64     241 / 227
    512    91 / 70     275 / 120   402 / 230   1218 / 698
    1024   848 / 270   1935 / 556  2316 / 831  5035 / 2932

oneDNN's call costs some 20-30 µs more than the BLAS's whatever the size, so it pays only once the weight is large,
and its reorder only over enough steps: for the forward's W_hh it took 0.17, 0.33 and 2.9 ms at 256, 512 and 1024
units, for the backward's (the transpose of W_hh, whose copy is most of the cost) 1.3, 5.4-6.2 and 16-21 ms. At 256
units that ate the gain: a training pass at input 64, 2 layers, batch 16, 200 steps ran as fast either way (ratio
0.98, range 0.86-1.09 over 7 alternated rounds), while at input 128, hidden 512, batch 8, 100 steps the reordered
weight made the pass 1.20x faster (1.11-1.23) and at input 256, hidden 1024, batch 16, 100 steps 1.42x (1.15-1.53):
both above the thresholds below, which keep 256 units on the BLAS. The two differ only in the order the products
add up in (float rounding), and which one runs depends only on the shapes, so a given machine gives the same bits
from run to run.
"""

from __future__ import annotations

import functools

import torch

# A weight of at least this many elements (2 MiB in float32: W_hh of 363 units or more) is multiplied through
# oneDNN's reordered layout; below it the BLAS wins or the reorder eats the gain (the measurements above).
PACKED_MIN_WEIGHT = 2**19
# Fewer steps than this may not earn the reorder back: at 512 units it saves 0.02-0.5 ms a step (batch 1-64) against
# up to 6 ms for the backward's reorder, at 1024 units 0.6-2.1 ms a step against up to 21 ms.
PACKED_MIN_STEPS = 64


@functools.cache
def _packed_ops_available() -> bool:
    """Whether this PyTorch build has oneDNN and the two ops used here, which Inductor's CPU code calls for linear
    layers (checked with torch 2.13): they are not a public API, so they are looked up rather than assumed."""
    if not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    return hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")


def packed_pays(matrix: torch.Tensor, steps: int) -> bool:
    """Whether `steps` products with `matrix` run faster through oneDNN's reordered weight (float32 on the CPU)."""
    return (
        matrix.device.type == "cpu"
        and matrix.dtype == torch.float32
        and matrix.numel() >= PACKED_MIN_WEIGHT
        and steps >= PACKED_MIN_STEPS
        and _packed_ops_available()
    )


class StepProduct:
    """rows ↦ addend + rows @ matrix for one matrix [K, N] and many rows [B, K], as torch.addmm computes it (up to
    the order of the sums), through oneDNN's reordered weight where packed_pays says so."""

    def __init__(self, matrix: torch.Tensor, batch: int, steps: int):
        self.matrix = matrix
        self.packed = None
        if packed_pays(matrix, steps):
            # linear(rows, W) is rows @ Wᵀ, so the weight oneDNN reorders is matrixᵀ; batch is only a layout hint.
            self.packed = torch.ops.mkldnn._reorder_linear_weight(matrix.t(), batch)

    def __call__(self, rows: torch.Tensor, addend: torch.Tensor | None = None, out: torch.Tensor | None = None):
        """addend + rows @ matrix (rows @ matrix without an addend), into out if given (out may be addend)."""
        if self.packed is None:
            if addend is None:
                return torch.mm(rows, self.matrix, out=out)
            if out is addend:
                return addend.addmm_(rows, self.matrix)
            return torch.addmm(addend, rows, self.matrix, out=out)
        if addend is None:
            product = torch.ops.mkldnn._linear_pointwise(rows, self.packed, None, "none", [None], "")
        else:
            product = torch.ops.mkldnn._linear_pointwise.binary(rows, addend.contiguous(), self.packed, None, "add")
        return product if out is None else out.copy_(product)
