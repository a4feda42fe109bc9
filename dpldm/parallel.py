"""`torchrun --nproc_per_node N -m dpldm.train ...`: one process per rank, on PyTorch's own distributed stack.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `setup` joins the process group (NCCL on
GPUs, each rank on cuda:LOCAL_RANK; gloo on CPUs). The engine then clips on each rank, adds the noise once on rank
0 and all-reduces once per step (dpkernels.distributed). Rank 0 alone writes the run folder (log, model, samples,
evaluation); every rank checkpoints its own Poisson sampler and RNG state, so that a resume continues all streams.
A checkpoint records the number of ranks that wrote it: a resume needs the same number (private_checkpoints finds
every rank's private folders in a run folder, so that none is missed when refusing or cleaning up).
"""

from __future__ import annotations

import argparse
import gc
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dpkernels.distributed import min_max
from dpldm.checkpoint import remove_private
from dpldm.runlog import RunLog

# The private folders of one rank's checkpoint in a run folder: checkpoint (rank 0) or checkpoint-rank<r>, each with
# its `.prev`, a `.old` twin and killed writes' `.tmp-*` folders (dpldm.checkpoint.private_paths).
_PRIVATE = re.compile(r"\.?checkpoint(?:-rank(\d+))?(?:\.prev|\.old|\.tmp-.+)?")

_owned = False  # whether setup() started the process group, so that teardown() ends it


def setup(args: argparse.Namespace) -> tuple[int, int]:
    """Join the process group torchrun describes (once); returns (rank, world size), (0, 1) alone."""
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
    if world > 1:
        dist.barrier()


def same_on_all_ranks(value: int, world: int) -> bool:
    return world <= 1 or min_max(value) == (value, value)


def min_max_int(value: int, world: int) -> tuple[int, int]:
    """The smallest and the largest of `value` over all ranks (each rank gets the same answer)."""
    if world <= 1:
        return value, value
    lo, hi = min_max(float(value))
    return int(lo), int(hi)


def oldest(step: int, world: int) -> int:
    """The smallest of `step` over all ranks."""
    return step if world <= 1 else int(min_max(step)[0])


def on_all_ranks(flag: bool, world: int) -> bool:
    """Whether `flag` holds on every rank (each rank gets the same answer)."""
    return flag if world <= 1 else min_max(float(flag))[0] == 1.0


def checkpoint_dir(out: Path, rank: int) -> Path:
    return out / "checkpoint" if rank == 0 else out / f"checkpoint-rank{rank}"


def private_checkpoints(out: Path) -> dict[int, list[Path]]:
    """Every rank's private checkpoint paths in a run folder, by rank (whichever job wrote them).

    Args:
        out: the run folder.
    """
    found: dict[int, list[Path]] = {}
    for path in sorted(Path(out).iterdir()) if Path(out).is_dir() else ():
        m = _PRIVATE.fullmatch(path.name)
        if m:
            found.setdefault(int(m.group(1) or 0), []).append(path)
    return found


def checkpoint_ranks(out: Path) -> list[int]:
    """The ranks that hold a checkpoint folder (or its `.prev`, `.old`) in a run folder, whichever job wrote it;
    killed writes' temporary folders do not count (they are never resumed from).

    Args:
        out: the run folder.
    """
    return sorted(r for r, paths in private_checkpoints(out).items() if any(".tmp-" not in p.name for p in paths))


def discard_private_checkpoints(out: Path, from_rank: int = 0) -> None:
    """Delete the private checkpoint paths of every rank >= from_rank in a run folder.

    Args:
        out: the run folder.
        from_rank: 0 deletes every rank's; a job's world size deletes those of ranks no rank of it owns.
    """
    for rank, paths in private_checkpoints(out).items():
        if rank >= from_rank:
            for path in paths:
                remove_private(path)


class SilentLog(RunLog):
    """The log of a rank other than 0: nothing printed or written (rank 0 logs the run)."""

    def __init__(self, run_dir: Path, stage: str) -> None:  # no folder, no file
        self.dir, self.stage = Path(run_dir), stage

    def log(self, **fields: Any) -> None:
        pass

    def print(self, msg: str, **fields: Any) -> None:
        pass
