"""Skipping a non-finite optimizer step on the device, without reading the flag on the host (docs/training.md)."""

from __future__ import annotations

import warnings

import torch

# Optimizers whose state, created at their first step, starts as zeros (moments, squared averages, the step
# count), so that resetting what a skipped first step created to zeros is exact (checked against an unskipped
# twin with torch 2.13; SGD only without dampening, whose first momentum is the undampened gradient).
ZERO_STARTED = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Adadelta,
    torch.optim.Adagrad,
    torch.optim.SGD,
)


class StepGuard:
    """`optimizer.step()` that becomes a no-op when a device flag is set, without reading the flag on the host.

    Fused Adam/AdamW take the flag natively (`found_inf`, as under GradScaler). Any other optimizer steps as usual
    and then every parameter and state tensor is put back with `torch.where(skip, before, after)`, which restores
    the exact bits. State created by a skipped first step is reset to zeros, the state the ZERO_STARTED
    optimizers start from; any other optimizer gets a warning the first time that can happen, since its next real
    step would start from wrong state (NAdam's mu_product, ASGD's eta and mu, a dampened SGD momentum).
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.native = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and all(
            g.get("fused") for g in optimizer.param_groups
        )
        self._warned = False
        self._zero_started = isinstance(optimizer, ZERO_STARTED) and not (
            isinstance(optimizer, torch.optim.SGD) and any(g.get("dampening", 0) for g in optimizer.param_groups)
        )
        self._warned_fresh = False

    def step(self, skip: torch.Tensor) -> None:
        if self.native:
            self.optimizer.found_inf = skip.to(torch.float32)
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
            return
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        with torch.no_grad():
            before = [p.detach().clone() for p in params]
            state_before = [_tensor_state(self.optimizer.state.get(p), clone=True) for p in params]
        self.optimizer.step()
        with torch.no_grad():
            for p, old in zip(params, before):
                p.copy_(torch.where(skip, old, p))
            for p, old_state in zip(params, state_before):
                state = self.optimizer.state.get(p) or {}
                if state and not old_state and not self._zero_started and not self._warned_fresh:
                    warnings.warn(
                        f"{type(self.optimizer).__name__} creates its state at its first step: if that step is "
                        "skipped, the state is reset to zeros, which is not the state it starts from (exact for "
                        f"{', '.join(t.__name__ for t in ZERO_STARTED)}, SGD without dampening)",
                        stacklevel=3,
                    )
                    self._warned_fresh = True
                for key, value in state.items():
                    self._restore(skip, key, value, old_state.get(key))

    def _restore(self, skip, key, value, old) -> None:
        if not isinstance(value, torch.Tensor) or value.device != skip.device:
            # A host value (Adam's `step` without capturable=True on a GPU) cannot follow a device flag without
            # a synchronisation; the parameters are still restored exactly.
            if not self._warned:
                warnings.warn(
                    f"optimizer state {key!r} is not a tensor on {skip.device}: it advances on skipped "
                    "steps (use fused=True or capturable=True for exact skips)",
                    stacklevel=3,
                )
                self._warned = True
            return
        value.copy_(torch.where(skip, torch.zeros_like(value) if old is None else old, value))


def _tensor_state(state, clone: bool) -> dict:
    if not state:
        return {}
    return {k: (v.clone() if clone else v) for k, v in state.items() if isinstance(v, torch.Tensor)}
