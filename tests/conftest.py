"""Shared pytest setup: the Triton interpreter on machines without CUDA, and the `gpu` marker."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# Must happen before anything defines Triton kernels: without CUDA they run on CPU tensors.
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU, tests check numerics, not speed: one config per Triton kernel instead of compiling and timing
# every autotune config per shape and dtype (the benchmarks autotune; tests/test_triton_configs.py pins
# each config in turn). Set it to 1 to autotune in every test.
os.environ.setdefault("DPK_TRITON_AUTOTUNE", "0")

# Set to 1 on a GPU machine whose extension was built without CUDA kernels on purpose (DPKERNELS_NO_CUDA=1,
# no nvcc): the CUDA-extension tests then skip instead of failing.
ALLOW_NO_CUDA_KERNELS_ENV = "DPK_ALLOW_NO_CUDA_KERNELS"


def require_cuda_kernels() -> None:
    """Fail, not skip, when a GPU is visible but the extension has no CUDA kernels: a build that silently
    dropped them (no nvcc, wrong CUDA_HOME) must not pass the GPU tests by skipping all of them."""
    from dpkernels import ops

    if ops.extension_has("cuda"):
        return
    if os.environ.get(ALLOW_NO_CUDA_KERNELS_ENV, "0") not in ("", "0"):
        pytest.skip(f"the dpkernels extension was built without CUDA kernels ({ALLOW_NO_CUDA_KERNELS_ENV} is set)")
    pytest.fail(f"a CUDA GPU is visible but the dpkernels extension was built without its CUDA kernels; rebuild "
                f"with nvcc found (`python setup.py build_ext --inplace` prints 'dpkernels: CUDA kernels ON'), or "
                f"set {ALLOW_NO_CUDA_KERNELS_ENV}=1 to skip these tests", pytrace=False)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
