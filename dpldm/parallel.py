"""`torchrun --nproc_per_node N -m dpldm.train ...`: one process per rank, on PyTorch's own distributed stack.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `setup` joins the process group (NCCL on
GPUs, each rank on cuda:LOCAL_RANK; gloo on CPUs). The engine then clips on each rank, adds the noise once on rank
0 and all-reduces once per step (dpkernels.distributed). Rank 0 alone writes the run folder (log, model, samples,
evaluation); every rank checkpoints its own Poisson sampler and RNG state, so that a resume continues all streams.
A checkpoint records the number of ranks that wrote it: a resume needs the same number (dpldm.checkpoint finds
every rank's private folders in a run folder, so that none is missed when refusing or cleaning up, and start_run
agrees on how a run starts through the collectives below).
"""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dpkernels.distributed import min_max
from dpldm.runlog import RunLog

_owned = False  # whether setup() started the process group, so that teardown() ends it


def setup(args: Any) -> tuple[int, int]:
    """Join the process group torchrun describes (once).

    Args:
        args: the run's options (dpldm.train.TrainOptions): their `device`, made this rank's own GPU on CUDA.

    Returns:
        (rank, world size); (0, 1) alone.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        cuda = str(args.device).startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
        global _owned
        _owned = True
    if str(args.device).startswith("cuda"):
        args.device = f"cuda:{torch.cuda.current_device()}"
    return dist.get_rank(), dist.get_world_size()


def teardown() -> None:
    """End the process group setup() started; DDP wrappers and engine hooks that still hold it go first, as a
    group destroyed under them can abort the process at exit."""
    global _owned
    if _owned and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
    _owned = False


def barrier(world: int) -> None:
    """Wait for every rank (nothing to wait for alone).

    Args:
        world: the job's number of ranks.
    """
    if world > 1:
        dist.barrier()


def same_on_all_ranks(value: int, world: int) -> bool:
    """Whether every rank holds the same `value` (each rank gets the same answer).

    Args:
        value: this rank's value.
        world: the job's number of ranks.

    Returns:
        True when they agree.
    """
    return world <= 1 or min_max(value) == (value, value)


def min_max_int(value: int, world: int) -> tuple[int, int]:
    """The smallest and the largest of `value` over all ranks (each rank gets the same answer).

    Args:
        value: this rank's value.
        world: the job's number of ranks.

    Returns:
        (smallest, largest).
    """
    if world <= 1:
        return value, value
    lo, hi = min_max(float(value))
    return int(lo), int(hi)


def oldest(step: int, world: int) -> int:
    """The smallest of `step` over all ranks.

    Args:
        step: this rank's step.
        world: the job's number of ranks.

    Returns:
        The smallest step.
    """
    return step if world <= 1 else int(min_max(step)[0])


def on_all_ranks(flag: bool, world: int) -> bool:
    """Whether `flag` holds on every rank (each rank gets the same answer).

    Args:
        flag: this rank's flag.
        world: the job's number of ranks.

    Returns:
        True when it holds on all of them.
    """
    return flag if world <= 1 else min_max(float(flag))[0] == 1.0


class SilentLog(RunLog):
    """The log of a rank other than 0: nothing printed or written (rank 0 logs the run)."""

    def __init__(self, run_dir: Path, stage: str) -> None:  # no folder, no file
        self.dir, self.stage = Path(run_dir), stage

    def log(self, **fields: Any) -> None:
        """Nothing: rank 0 logs."""

    def print(self, msg: str, **fields: Any) -> None:
        """Nothing: rank 0 prints."""
