"""The trainer's cross-rank reductions under DistributedDataParallel (a world of one needs none of them)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist


def world_size(group=None) -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


def rank_path(path: str | None) -> str:
    """One checkpoint file per process of the default group: named by its global rank, since ranks within a
    trainer's process group repeat from one group to the next."""
    if path is None:
        raise ValueError("no checkpoint path given")
    if world_size() > 1:
        return f"{path}.rank{dist.get_rank()}"
    return str(path)


def start_flag_reduction(loss: torch.Tensor, bad: torch.Tensor, group=None) -> Callable:
    """Start the cross-rank reduction of (loss, non-finite flag); the returned function waits for it and gives
    (mean loss, any rank bad)."""
    world = world_size(group)
    if world == 1:
        return lambda: (loss, bad)
    both = torch.stack((loss.to(torch.float64), bad.to(torch.float64)))
    work = dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group, async_op=True)

    def finish():
        work.wait()  # on NCCL this orders the stream, it does not block the host
        return both[0] / world, both[1] > 0

    return finish


def all_reduce_sums(totals: dict, group=None) -> dict:
    """{name: (device total, host count)} summed over the ranks."""
    if world_size(group) == 1:
        return totals
    names = list(totals)
    packed = torch.stack(
        [
            torch.stack(
                (totals[k][0], torch.tensor(float(totals[k][1]), dtype=torch.float64, device=totals[k][0].device))
            )
            for k in names
        ]
    )
    dist.all_reduce(packed, group=group)
    return {k: (packed[i, 0], packed[i, 1]) for i, k in enumerate(names)}


def all_reduce_max(values: list, device, group=None) -> list:
    """Element-wise max of host numbers over the ranks (a periodic read, once per telemetry window)."""
    packed = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
    return packed.tolist()


def check_same_on_every_rank(values: dict, device, group=None) -> None:
    """Raise ValueError, on every rank at once, where the ranks' host integers `values` differ. The trainer runs a
    reduction per chunk, so ranks that disagree on how many chunks they train would otherwise wait for ever in a
    reduction the others never join. One reduction, once per fit call."""
    if world_size(group) == 1:
        return
    names = list(values)
    mine = [float(values[name]) for name in names]
    reduced = all_reduce_max(mine + [-v for v in mine], device, group)
    highest, lowest = reduced[: len(mine)], [-v for v in reduced[len(mine) :]]
    differ = [f"{name} from {low:g} to {high:g}" for name, high, low in zip(names, highest, lowest) if high != low]
    if differ:
        raise ValueError(
            "under DDP every rank must train the same number of chunks, but the ranks differ in "
            + ", ".join(differ)
            + ": give every rank as many batches, each with streams whose longest has the same length on every rank"
        )
