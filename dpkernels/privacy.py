"""Accounting, noise calibration and Poisson sampling: all Opacus', none written here."""

from __future__ import annotations

import hashlib
import secrets
from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader

__all__ = ["create_accountant", "get_noise_multiplier", "poisson_loader", "sample_rate_of", "sampler_generator",
           "split_batch"]


def sample_rate_of(data_loader: DataLoader) -> float:
    """As Opacus: one logical batch per loader step, q = 1 / len(loader).

    Args:
        data_loader: the user's loader.

    Returns:
        The sampling rate q.
    """
    n = len(data_loader)
    if n == 0:
        raise ValueError("the data loader is empty")
    return 1.0 / n


def sampler_generator(seed: int | None, rank: int = 0) -> torch.Generator:
    """The Poisson sampler's own generator: seeded from the OS unless a (test) seed is given.

    Never torch's global generator, nor the loader's: those are seeded from public values. torch's
    generator is not a CSPRNG (Opacus uses torchcsprng for that, which has no build for current torch).
    Each rank of a distributed run has its own stream (independent inclusions across ranks).

    Args:
        seed: None (OS seeding), or a test seed.
        rank: this process's rank in a distributed run.

    Returns:
        A CPU torch.Generator.
    """
    if seed is None:
        start = secrets.randbits(63)
    else:  # a different stream from the noise's, derived from the same test seed
        tag = f"dpkernels-poisson-{int(seed)}" + (f"-rank{rank}" if rank else "")
        start = int.from_bytes(hashlib.sha256(tag.encode()).digest()[:8], "little") >> 1
    return torch.Generator().manual_seed(start)


class _Recording:
    """A batch sampler that appends the size of each index list it yields to `sizes`."""

    def __init__(self, inner: Any, sizes: deque[int]):
        self.inner, self.sizes = inner, sizes

    def __iter__(self) -> Iterator[Any]:
        for indices in self.inner:
            self.sizes.append(len(indices))
            yield indices

    def __len__(self) -> int:
        return len(self.inner)


class Counting:
    """A loader that tells the engine's recorder how many examples each batch it yields holds: the private layers'
    rows are checked against it at the step (bookkeeping.check_attribution). The count is the number of indices the
    sampler drew, never a size read off the collated batch (a collate_fn that returns [T, B] tensors, as
    pad_sequence does, or packs the tokens of all examples into one dimension, would make T look like B), and a
    batch whose tensors do not all have that many rows first is refused: the engine attributes rows to examples by
    the first dimension."""

    recorder: Any = None
    _sizes: deque[int] | None = None

    @property
    def _index_sampler(self) -> Any:  # what DataLoader's iterators draw index lists from
        inner = super()._index_sampler
        return inner if self._sizes is None or self.batch_sampler is None else _Recording(inner, self._sizes)

    def __iter__(self) -> Iterator[Any]:
        self._sizes = deque()  # index lists drawn ahead (prefetching) wait here, in order
        for batch in super().__iter__():
            n = self._sizes.popleft() if self._sizes else _rows(batch)
            check_batch_first(batch, n)
            if self.recorder is not None:
                self.recorder.batch_examples = n
            yield batch


def check_batch_first(batch: Any, n: int) -> None:
    """Refuse a collated batch in which some tensor (of at least one dimension) does not have the `n` examples
    the sampler drew as its first dimension.

    Args:
        batch: what the loader yields (tensors, nested in tuples, lists or mappings).
        n: the examples in it.
    """
    firsts = sorted({t.shape[0] for t in _tensors(batch) if t.dim() > 0})
    if firsts and firsts != [n]:
        raise ValueError(
            f"the private data loader drew {n} examples, but its collated batch holds tensors whose first dimensions "
            f"are {firsts}: the engine takes the first dimension of every input as the examples, so a time-first "
            "([T, B, ...], e.g. pad_sequence's default) or packed batch would have each row clipped as an example. "
            "Collate batch first ([B, ...], e.g. pad_sequence(..., batch_first=True))")


class CountingDPDataLoader(Counting, DPDataLoader):
    """Opacus' Poisson loader, counting."""


class CountingDataLoader(Counting, DataLoader):
    """A DataLoader, counting."""


def poisson_loader(data_loader: DataLoader, generator: torch.Generator) -> DPDataLoader:
    """Opacus' uniform-with-replacement (Poisson) sampler over the same dataset, drawing from `generator`.

    Opacus also hands `generator` to the DataLoader, which draws a worker base seed from it whenever an iterator
    starts: the batches would then depend on where epochs begin, and a resumed run (which starts an iterator
    mid-epoch) would sample other batches than an uninterrupted one. The base seeds come from a generator of
    their own instead (public, fixed: they only seed worker processes), so only the masks draw from `generator`.

    Args:
        data_loader: the user's loader (its dataset, batch size, collate function, workers).
        generator: the sampler's generator (`sampler_generator`).

    Returns:
        The Poisson loader (it reports each batch's size to the engine's recorder).
    """
    loader = CountingDPDataLoader.from_data_loader(data_loader, generator=generator)
    loader.generator = torch.Generator().manual_seed(0)
    return loader


def split_batch(batch: Any, size: int) -> list[Any]:
    """Split every tensor of a (nested) batch into chunks of at most `size` rows; at least one chunk.

    Args:
        batch: a tensor, or lists, tuples, named tuples and mappings of them.
        size: the most rows per chunk.

    Returns:
        The chunks, each shaped like `batch`.
    """
    n = _rows(batch)
    if n is None:
        raise ValueError("cannot split a batch that holds no tensor")
    starts = list(range(0, n, size)) or [0]
    return [_slice(batch, s, s + size) for s in starts]


def _tensors(batch: Any) -> Iterator[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for b in batch.values():
            yield from _tensors(b)
    elif isinstance(batch, (list, tuple)):
        for b in batch:
            yield from _tensors(b)


def _rows(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for b in batch:
            n = _rows(b)
            if n is not None:
                return n
    return None


def _slice(batch: Any, a: int, b: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[a:b]
    if isinstance(batch, Mapping):
        return type(batch)({k: _slice(v, a, b) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_slice(v, a, b) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_slice(v, a, b) for v in batch)
    return batch


def iterate_chunks(loader, max_physical_batch_size: int, optimizer) -> Iterator[Any]:
    """Yield physical chunks; tell the optimizer which step() calls only accumulate.

    Args:
        loader: the private (Poisson) loader.
        max_physical_batch_size: the most rows per chunk.
        optimizer: the DPOptimizer (its skip signal and its recorder).
    """
    if max_physical_batch_size < 1:
        raise ValueError(f"max_physical_batch_size must be >= 1, got {max_physical_batch_size}")
    for batch in loader:
        chunks = split_batch(batch, max_physical_batch_size)
        for i, chunk in enumerate(chunks):
            optimizer.signal_skip_step(i < len(chunks) - 1)
            optimizer.recorder.batch_examples = _rows(chunk)  # what this chunk's rows are checked against
            yield chunk
