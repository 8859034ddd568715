"""TBPTTTrainer under DistributedDataParallel: two gloo processes on the CPU, each with half of the streams, must
train exactly like one process with all of them, skip the same poisoned steps, and take the same adaptive
truncation decisions."""

from __future__ import annotations

import math
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from support import Forecaster, rel_err
from torch import nn

from fastlstm.tbptt import TBPTTTrainer

WORLD = 2
ROWS_PER_RANK = 2
STEPS = 15


def _model() -> Forecaster:
    return Forecaster(3, 2, 6, 2, dtype=torch.float64)


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(WORLD * ROWS_PER_RANK, STEPS, 3, generator=g, dtype=torch.float64)
    y = torch.randn(WORLD * ROWS_PER_RANK, STEPS, 2, generator=g, dtype=torch.float64)
    x[3, 8, 0] = float("nan")  # a stream of rank 1 only, in chunk 2 (and the next window's overlap)
    return x, y


def _train(model, rows, adaptive, checkpoint=None):
    torch.manual_seed(0)  # identical initial weights everywhere (DDP also broadcasts rank 0's)
    net = _model()
    wrapped = model(net)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.2, momentum=0.9)
    # k_init=2: the cell's gradient on these weights asks for more, so the ranks must agree on moving up.
    options = {"adaptive": True, "k_min": 2, "k_max": 6, "k_init": 2, "smoothing": 0.2} if adaptive else {"k2": 5}
    trainer = TBPTTTrainer(
        wrapped,
        opt,
        nn.MSELoss(),
        k1=3,
        clip_grad_norm=1.0,
        telemetry_every=1,
        read_every=2,
        checkpoint_path=checkpoint,
        **options,
    )
    x, y = _data()
    trainer.fit((x[rows], y[rows]), epochs=2)
    history = trainer.history
    return {
        "params": [p.detach().clone() for p in net.parameters()],
        "losses": history.losses(),
        "skipped": [e["step"] for e in history.steps if e["skipped"]],
        "truncation": [(e["step"], e["detail"]["k2"]) for e in history.events_of("truncation")],
        "names": list(history.lstms),
    }


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)  # a spawned process of its own: nothing to restore
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
        results = {
            adaptive: _train(
                nn.parallel.DistributedDataParallel,
                rows,
                adaptive,
                checkpoint=os.path.join(out_dir, "ckpt.pt") if adaptive else None,
            )
            for adaptive in (False, True)
        }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_ddp_matches_one_process_with_all_streams(ranks, single_cpu_thread):
    _, (rank0, rank1) = ranks
    single = _train(lambda net: net, slice(None), adaptive=False)
    ddp = rank0[False]
    assert ddp["names"] == ["lstm"]  # DDP's "module." prefix is not part of the names
    for a, b, c in zip(ddp["params"], rank1[False]["params"], single["params"]):
        assert torch.equal(a, b)  # replicas stay identical
        assert rel_err(a, c) < 1e-10
    assert ddp["skipped"] == rank1[False]["skipped"] == single["skipped"] and ddp["skipped"]
    assert len(ddp["losses"]) == len(single["losses"]) == 2 * 5
    for (s1, l1), (s2, l2) in zip(ddp["losses"], single["losses"]):
        assert s1 == s2 and (math.isnan(l1) == math.isnan(l2))
        assert math.isnan(l1) or abs(l1 - l2) <= 1e-10 * abs(l2)


def test_ddp_ranks_agree_on_adaptive_truncation(ranks):
    out, (rank0, rank1) = ranks
    a, b = rank0[True], rank1[True]
    assert a["truncation"] == b["truncation"] and len(a["truncation"]) >= 2
    for p, q in zip(a["params"], b["params"]):
        assert torch.equal(p, q)
    assert a["skipped"] == b["skipped"]
    assert sorted(f for f in os.listdir(out) if f.startswith("ckpt")) == ["ckpt.pt.rank0", "ckpt.pt.rank1"]


def test_checkpoint_files_are_named_by_global_rank_under_process_subgroups(monkeypatch, tmp_path):
    """Two trainers on subgroups [0, 1] and [2, 3] of a world of 4: ranks within each group repeat, so the files
    take the global rank, or global ranks 0 and 2 would write the same file."""
    subgroup = object()  # what the trainer hands to torch.distributed as its process group
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4 if group is None else 2)
    written = set()
    for global_rank in range(4):
        monkeypatch.setattr(dist, "get_rank", lambda group=None, r=global_rank: r if group is None else r % 2)
        net = _model()
        trainer = TBPTTTrainer(
            net, torch.optim.SGD(net.parameters(), lr=0.1), nn.MSELoss(), k1=4, process_group=subgroup
        )
        written.add(trainer.save_checkpoint(str(tmp_path / "ckpt.pt")))
    assert written == {str(tmp_path / f"ckpt.pt.rank{r}") for r in range(4)}
    assert sorted(os.listdir(tmp_path)) == [f"ckpt.pt.rank{r}" for r in range(4)]


def _mismatched_worker(rank, init_file, out_dir):
    """Rank 1's streams are longer (one chunk more per epoch): both ranks must fail at once, before any chunk."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        net = nn.parallel.DistributedDataParallel(_model())
        trainer = TBPTTTrainer(net, torch.optim.SGD(net.parameters(), lr=0.1), nn.MSELoss(), k1=3, k2=5)
        x, y = _data()
        steps = STEPS if rank == 0 else STEPS + 2  # 5 chunks of 3 steps against 6
        x, y = torch.nan_to_num(x)[:ROWS_PER_RANK], y[:ROWS_PER_RANK]
        if steps > STEPS:
            x, y = torch.cat([x, x[:, :2]], dim=1), torch.cat([y, y[:, :2]], dim=1)
        try:
            trainer.fit((x, y), epochs=1)
            outcome = ("trained", trainer.chunks)
        except ValueError as error:
            outcome = ("refused", str(error), trainer.chunks)
        torch.save(outcome, os.path.join(out_dir, f"mismatch{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ranks_with_different_chunk_counts_fail_together_before_training(tmp_path):
    """Without the check, the rank with more chunks waits in a reduction nobody joins: here it failed once rank 0
    had finished and closed its connection, and a rank 0 with more to do (another epoch, a validation) would hang."""
    context = mp.spawn(_mismatched_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 120
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the ranks hung in a reduction")
    for rank in range(WORLD):
        outcome = torch.load(tmp_path / f"mismatch{rank}.pt", weights_only=False)
        assert outcome[0] == "refused", outcome
        assert "chunks per epoch from 5 to 6" in outcome[1] and outcome[2] == 0
