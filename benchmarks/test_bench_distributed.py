"""DP-SGD step throughput on 1 and 2 processes (gloo, CPU), same logical batch (issue 11, item 6).

    pytest benchmarks/test_bench_distributed.py --benchmark-disable            # CI smoke run, tiny sizes
    nice pytest benchmarks/test_bench_distributed.py --bench-size full \\
        --benchmark-json dist.json && python -m benchmarks.report dist.json

Each variant starts its processes once (a worker pool on pipes); a timed round sends "step" to every rank and
waits for all of them, so the time is the slowest rank's step plus a pipe round trip (~0.1 ms). The cores are
split between the ranks (2 cores: 1 process x 2 threads vs 2 processes x 1 thread), so the comparison is of the
same machine used two ways. Logical batch B: one process takes all B rows, each of 2 ranks its B/2.
  nonprivate  plain SGD; on 2 ranks wrapped in DistributedDataParallel (its bucketed gradient all-reduce)
  ours        dpkernels.PrivacyEngine; on 2 ranks its one all-reduce of the clipped sums, noise on rank 0
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import tempfile
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.models import PerSampleMSE, build_transformer

VARIANTS = ("nonprivate", "ours")
WORLDS = (1, 2)
FULL_ROUNDS = 15
LR, NOISE_MULTIPLIER, MAX_GRAD_NORM = 1e-3, 1.0, 1.0


def _rank_step(variant: str, size: str, rank: int, world: int):
    w = build_transformer(size, "cpu", seed=0)  # every rank the same model and the same logical batch
    rows = slice(rank, None, world)
    x, target = w.inputs[0][rows], w.target[rows]
    model, params = w.model, w.trainable()
    optimizer = torch.optim.SGD(params, lr=LR)
    if variant == "ours":
        from dpkernels import PrivacyEngine

        n = len(w.target)  # only the loader's size and batch size matter: q = B / n = 1, E = B
        loader = DataLoader(TensorDataset(w.inputs[0], w.target), batch_size=n)
        model, optimizer, _ = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=NOISE_MULTIPLIER,
            max_grad_norm=MAX_GRAD_NORM)
    elif world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    criterion = PerSampleMSE()  # the engine and DDP both turn each rank's mean into the logical batch's

    def step() -> None:
        criterion(model(x), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _worker(rank: int, world: int, variant: str, size: str, threads: int, rendezvous: str, conn: Connection) -> None:
    torch.set_num_threads(threads)
    try:
        if world > 1:
            dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=120))
        step = _rank_step(variant, size, rank, world)
        conn.send("ready")
        while conn.recv() == "step":
            step()
            conn.send("done")
    except BaseException as e:  # the parent sees the failure instead of a hang
        conn.send(f"error: {type(e).__name__}: {e}")
        raise
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


class Pool:
    """`world` ranks of one variant, each waiting for "step"."""

    def __init__(self, variant: str, size: str, world: int) -> None:
        ctx = mp.get_context("spawn")
        self.tmp = tempfile.TemporaryDirectory()
        threads = max(1, (os.cpu_count() or 1) // world)
        self.conns, self.procs = [], []
        for rank in range(world):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(rank, world, variant, size, threads,
                                                  str(Path(self.tmp.name) / "rendezvous"), child), daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)
        self._wait("ready")

    def _wait(self, expected: str) -> None:
        for c in self.conns:
            if not c.poll(300):
                raise RuntimeError("a rank did not answer within 300 s")
            msg = c.recv()
            if msg != expected:
                raise RuntimeError(msg)

    def step(self) -> None:
        for c in self.conns:
            c.send("step")
        self._wait("done")

    def close(self) -> None:
        for c in self.conns:
            c.send("stop")
        for p in self.procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
        self.tmp.cleanup()


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_step_distributed_cpu(benchmark, variant: str, world: int, bench_size: str, bench_rounds) -> None:
    pool = Pool(variant, bench_size, world)
    try:
        pool.step()  # warm-up: first-call allocations, DDP's bucket rebuild
        threads = max(1, (os.cpu_count() or 1) // world)
        benchmark.extra_info.update(variant=variant, processes=world, threads_per_process=threads)
        benchmark.pedantic(pool.step, rounds=bench_rounds(FULL_ROUNDS), iterations=1, warmup_rounds=1)
    finally:
        pool.close()
