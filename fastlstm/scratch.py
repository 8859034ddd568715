"""Temporaries of the CPU passes, kept from one pass to the next.

A CPU pass of the reference backend or of native-recorded allocates tensors the size of its gates that it discards
before it returns: the input projection, pre-activations, the backward's gate derivatives, scaled copies for
the norms. Allocations that
large come straight from the operating system (glibc serves them with mmap and gives them back on free), so each
one is faulted in again, page by page, on every pass, unless glibc happens to recycle it: measured with torch 2.13
on a 2-core machine, one thread, at input 8, hidden 64, batch 64, 500 steps, a training step of native-recorded
took 3 400-11 600 page faults from run to run, and about 20 000 with fewer, larger temporaries; 8-24% of its time
went to them (against the same runs with glibc told to keep freed memory). Here those
temporaries are views of buffers that stay allocated, one per role and dtype and thread, each as large as the
largest pass has asked for.

The rule for a caller: a tensor from `scratch` is dead before the function that took it returns. It is never saved
for a backward, returned, or returned through a custom op (outputs of an op must not share memory with each other
or with later calls); two live tensors never share a role. `release()` frees the buffers.

What they hold: a forward's roles share the buffers of backward roles (_SHARED), since a forward and a backward never
run at once in one thread, so the buffers come to about what one backward's temporaries take, some 13 values per
element of [T, B, H] in the compute dtype: the peak a pass reached before, now kept between passes.
"""

from __future__ import annotations

import math
import threading

import torch


class _Buffers(threading.local):
    def __init__(self):
        self.by_role: dict = {}


_BUFFERS = _Buffers()

# forward role -> the backward role whose buffer it takes (the same size: [T·B, 4H] and [T·B, H]).
_SHARED = {"pre": "grad_gates", "cell_input": "tanh_c"}


def scratch(role: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor. On the CPU it is a view of the calling thread's buffer for `role`, which the next
    request for the same role overwrites; elsewhere (where the device's caching allocator already keeps memory) a
    fresh tensor."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    key = (_SHARED.get(role, role), dtype)
    buffer = _BUFFERS.by_role.get(key)
    if buffer is None or buffer.numel() < numel:
        # Never an inference tensor: one allocated under torch.inference_mode would refuse every later write from
        # a pass outside it, in every module of the thread.
        with torch.inference_mode(False):
            buffer = _BUFFERS.by_role[key] = torch.empty(numel, dtype=dtype)
    return buffer[:numel].view(shape)


def release() -> None:
    """Free the calling thread's buffers (the next pass allocates them again)."""
    _BUFFERS.by_role.clear()
