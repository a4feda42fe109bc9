"""Shared pytest setup: the Triton interpreter on machines without CUDA, and the `gpu` marker."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# Must happen before anything defines Triton kernels: without CUDA they run on CPU tensors.
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU, tests check numerics, not speed: one config per Triton kernel instead of compiling and timing
# every autotune config per shape and dtype (the benchmarks autotune). Set it to 1 to test every config.
os.environ.setdefault("DPK_TRITON_AUTOTUNE", "0")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
