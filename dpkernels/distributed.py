"""Data-parallel DP-SGD on torch.distributed (NCCL on GPUs, gloo on CPUs).

Every rank builds its loader over the WHOLE data set (same batch size, so the same q = 1 / len(loader)) and
calls make_private; the engine then
- samples each rank's share of the data, examples [rank::world], each independently with probability q at every
  step (the union is one Poisson batch of rate q over all N examples). Unlike Opacus' distributed sampler, an
  empty local batch is still yielded: every rank takes every logical step, so none waits for one that skipped;
- clips each example on the rank that holds it and sums locally, without noise;
- adds the Gaussian noise N(0, sigma^2 C^2) once, on rank 0, into its local sum, and all-reduces (sums) the
  gradients of all ranks in one flat buffer per dtype: one all-reduce per logical step carrying exactly what
  non-private DDP's gradient all-reduce carries (every trainable parameter, once);
- divides by the GLOBAL expected batch size q N, so the update equals one process's on the union of the batches.
Each rank keeps the same accountant (same sigma, q, steps); dpldm.train checkpoints rank 0's.
A module wrapped in DistributedDataParallel is accepted: its own gradient synchronisation is switched off (the
engine's all-reduce replaces it; DDP still broadcasts parameters at construction and buffers at forward).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty
from torch import nn
from torch.utils.data import DataLoader, Sampler

from dpkernels.privacy import CountingDataLoader


def world() -> tuple[int, int]:
    """This process's place in the torch.distributed process group.

    Returns:
        (rank, world size); (0, 1) without an initialised process group.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper, whose gradient synchronisation is switched off.

    Args:
        module: the model, wrapped in DDP or not.

    Returns:
        The wrapped module, or `module` itself.
    """
    if isinstance(module, nn.parallel.DistributedDataParallel):
        module.require_backward_grad_sync = False  # what no_sync() sets, for good: the engine reduces
        return module.module
    return module


class RankPoissonSampler(Sampler[list[int]]):
    """This rank's share of a Poisson batch: examples rank, rank + world, ... each drawn with probability q.

    Args:
        total_size: examples in the whole data set.
        sample_rate: q.
        rank, world_size: this process's place in the group.
        generator: this rank's sampler generator.
    """

    def __init__(self, total_size: int, sample_rate: float, rank: int, world_size: int,
                 generator: torch.Generator) -> None:
        self.indices = torch.arange(rank, total_size, world_size)
        self.sample_rate = sample_rate
        self.generator = generator
        self.steps = int(1 / sample_rate)  # as the single-process sampler

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            mask = torch.rand(len(self.indices), generator=self.generator) < self.sample_rate
            yield self.indices[mask].tolist()  # possibly empty: the rank still takes the step


def rank_poisson_loader(data_loader: DataLoader, generator: torch.Generator, rank: int, world_size: int
                        ) -> DataLoader:
    """A loader yielding this rank's share of each Poisson batch (an empty one too: every rank takes every step).

    Args:
        data_loader: the user's loader over the whole data set.
        generator: this rank's sampler generator.
        rank, world_size: this process's place in the group.

    Returns:
        The loader (it reports each batch's size to the engine's recorder).
    """
    dataset = data_loader.dataset
    sampler = RankPoissonSampler(len(dataset), 1 / len(data_loader), rank, world_size, generator)
    first = dataset[0]
    collate = wrap_collate_with_empty(collate_fn=data_loader.collate_fn,
                                      sample_empty_shapes=[(0, *shape_safe(x)) for x in first],
                                      dtypes=[dtype_safe(x) for x in first])
    return CountingDataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                              num_workers=data_loader.num_workers, pin_memory=data_loader.pin_memory,
                              generator=torch.Generator().manual_seed(0))


def min_max(value: float) -> tuple[float, float]:
    """The smallest and the largest of `value` over all ranks (one all-reduce).

    Args:
        value: this rank's value.

    Returns:
        (min, max) over the ranks.
    """
    t = torch.tensor([value, -value], dtype=torch.float64)
    t = t.to("cuda") if dist.get_backend() == "nccl" else t
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return -t[1].item(), t[0].item()


def dataset_fingerprint(dataset: Any, probes: int = 8) -> str:
    """A hash of a few items of `dataset` (spread over its indices, always the same ones for one size): ranks that
    hold other data, or the same data in another order, get other fingerprints. Each rank's Poisson sampler draws
    indices into its own copy: the same index must be the same example everywhere, or an example can be in a step
    twice (2 C).

    Args:
        dataset: a map-style data set (len and getitem); its items are tensors, numbers, or (nested) tuples of them.
        probes: how many items are hashed.

    Returns:
        A hex digest.
    """
    n = len(dataset)
    h = hashlib.sha256(str(n).encode())
    for i in sorted({(k * (n - 1)) // max(probes - 1, 1) for k in range(probes)} if n else ()):
        for leaf in _leaves(dataset[i]):
            h.update(leaf.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                     if isinstance(leaf, torch.Tensor) else repr(leaf).encode())
    return h.hexdigest()


def _leaves(item: Any) -> list[Any]:
    if isinstance(item, (tuple, list)):
        return [x for sub in item for x in _leaves(sub)]
    if isinstance(item, dict):
        return [x for k in sorted(item) for x in _leaves(item[k])]
    return [item]


def _fingerprint(value: Any) -> float:
    """A setting as a float64 that all-reduces exactly (48 bits of a hash of its repr)."""
    digest = hashlib.sha256(repr(value).encode()).digest()
    return float(int.from_bytes(digest[:6], "little"))


def check_same_settings(settings: dict[str, Any]) -> None:
    """Refuse settings that differ between ranks, naming them, on every rank (one all-reduce).

    Args:
        settings: what must be equal everywhere, by a name for the error message; values of any type whose repr
            is deterministic (numbers, strings, lists, tuples).
    """
    names = list(settings)
    here = [_fingerprint(settings[n]) for n in names]
    t = torch.tensor(here + [-v for v in here], dtype=torch.float64)
    t = t.to("cuda") if dist.get_backend() == "nccl" else t
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    hi, lo = t[: len(names)].tolist(), (-t[len(names):]).tolist()
    differ = [n for n, h, a, b in zip(names, here, lo, hi, strict=True) if not a == b == h]
    if differ:
        shown = "; ".join(f"{n} (here {settings[n]!r})" for n in differ)
        raise ValueError(
            f"settings differ between ranks: {shown}. Every rank must make the model private with the same "
            "settings (the noise, the clipping, the sampling rate and the accounting are one mechanism, and each "
            "rank reports its epsilon): same data set size and batch size, noise_multiplier, max_grad_norm, "
            "clipping, loss_reduction, accountant, seeding and trainable parameters")


def all_reduce_sum(tensors: list[torch.Tensor]) -> int:
    """Sum `tensors` over all ranks in place, one flat all-reduce per (dtype, device).

    Args:
        tensors: this rank's tensors, the same list (shapes, dtypes) on every rank.

    Returns:
        The bytes this rank sends into the all-reduce (its buffer sizes).
    """
    groups: dict[tuple[Any, Any], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    sent = 0
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        try:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        except (RuntimeError, dist.DistBackendError) as e:
            raise RuntimeError(f"dpkernels: the gradient all-reduce failed on rank {dist.get_rank()}, most likely "
                               f"because another rank died or left: no parameter was changed ({e})") from e
        sent += flat.numel() * flat.element_size()
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
    return sent
