"""What a launch tells a kernel: the storage dtypes the Triton backend takes, the tl.dot operand type and precision,
and each family's constexprs and launch options for a plan, written once for the forward and backward passes."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import planning

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 follows torch's matmul setting, as nn.LSTM's cuBLAS/cuDNN GEMMs do: TF32 only when allowed."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def dot_dtype(dtype: torch.dtype):
    """The tl.dot operand type: the storage type, except bf16 under the interpreter, whose bf16 dot returns garbage
    (triton 3.6), so those tests run the dot in fp32 while every load, store and conversion stays bf16."""
    if dtype == torch.bfloat16 and planning.interpreting():
        return tl.float32
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def check_supported(xw: torch.Tensor) -> None:
    if xw.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"the triton backend supports float32, float16 and bfloat16, got {xw.dtype}; "
            "use backend='reference' (or 'auto', which falls back to it)"
        )
    if xw.device.type != "cuda" and not planning.interpreting():
        raise RuntimeError("the triton backend needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1")


# ---------------------------------------------------------------------------------------------------------------
# The keywords of each family's launch: the constexprs and options a plan sets, written once for both passes
# ---------------------------------------------------------------------------------------------------------------


def single_keywords(cfg: planning.SingleConfig, reverse: bool, dtype: torch.dtype) -> dict:
    return {
        "REVERSE": reverse,
        "BLOCK_B": cfg.block_b,
        "H_PAD": cfg.h_pad,
        "P_PAD": cfg.p_pad,
        "DOT_DTYPE": dot_dtype(dtype),
        "DOT_PRECISION": dot_precision(dtype),
        "num_warps": cfg.num_warps,
        "maxnreg": cfg.maxnreg,
    }


def split_keywords(cfg: planning.SplitConfig, reverse: bool, dtype: torch.dtype, gluon_backward: bool = False) -> dict:
    """The split kernels' launch constants; the Gluon backward also takes its copy slots (planning.gluon_copy_slots)."""
    staged = {"COPY_SLOTS": cfg.copy_slots} if gluon_backward else {}
    return staged | {
        "REVERSE": reverse,
        "UNITS": cfg.units,
        "BLOCK_B": cfg.block_b,
        "K_PAD": cfg.k_pad,
        "K_SPLIT": cfg.k_split,
        "MAX_PROGRAMS": triton.next_power_of_2(cfg.unit_groups),
        "ASM_FENCE": not planning.interpreting(),
        "DOT_DTYPE": dot_dtype(dtype),
        "DOT_PRECISION": dot_precision(dtype),
        "num_warps": cfg.num_warps,
        "maxnreg": cfg.maxnreg,
    }


def streaming_keywords(cfg: planning.StreamingConfig, reverse: bool, dtype: torch.dtype) -> dict:
    return {
        "REVERSE": reverse,
        "BLOCK_B": cfg.block_b,
        "BLOCK_H": cfg.block_h,
        "BLOCK_K": cfg.block_k,
        "DOT_PRECISION": dot_precision(dtype),
        "DOT_DTYPE": dot_dtype(dtype),
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
        "maxnreg": cfg.maxnreg,
    }
