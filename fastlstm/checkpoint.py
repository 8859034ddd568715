"""The TBPTT trainer's checkpoint file: its format tag, the RNG states it carries, and the atomic write.

What a checkpoint holds beyond these is each part's own `state_dict()` (the model, the optimizer, the scheduler, the
stream position, the truncation state, the probe, the Monitor); tbptt.py assembles them.
"""

from __future__ import annotations

import io
import random

import numpy as np
import torch

from .jsonio import atomic_write

CHECKPOINT_FORMAT = "fastlstm.tbptt/1"


def write_checkpoint(path: str, state: dict) -> None:
    """torch.save `state` to `path` atomically (temporary file, fsync, rename)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, buffer.getvalue())


def rng_state() -> dict:
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": n["key"].cpu().numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
