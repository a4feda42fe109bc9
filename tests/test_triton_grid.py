"""Launch grids of the Triton norm kernels stay within CUDA's limits (axis x < 2^31, axes y, z <= 65535).

The interpreter does not check grid limits, so the launch is intercepted: the kernel is replaced by a
recorder and the grid the op asks for is checked against the limits, for a layer with millions of
(p, d) tiles and for a batch of more samples than axis y allows. The numerical test forces a tiny axis
y limit so the kernel's loop over the samples beyond it runs under the interpreter.
"""

from __future__ import annotations

import os

import pytest
import torch

from dpkernels import reference

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="interpreter tests run without CUDA; the GPU tests cover CUDA machines")

linear_norms = pytest.importorskip("dpkernels.triton.linear_norms")

MAX_X, MAX_YZ = 2**31 - 1, 65535


class GridRecorder:
    """Stands in for a Triton kernel: `kernel[grid](*args)` records the grid and launches nothing."""

    def __init__(self) -> None:
        self.grids: list[tuple[int, ...]] = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs) -> None:
            self.grids.append(tuple(grid(kwargs) if callable(grid) else grid))
        return launch


def direct_grid_of(monkeypatch: pytest.MonkeyPatch, B: int, T: int, d: int, p: int) -> tuple[int, ...]:
    rec = GridRecorder()
    monkeypatch.setattr(linear_norms, "_direct_norm_kernel", rec)
    linear_norms.direct_norm(torch.zeros(B, T, d), torch.zeros(B, T, p), True)
    assert len(rec.grids) == 1
    return rec.grids[0]


def within_limits(grid: tuple[int, ...]) -> bool:
    limits = (MAX_X, MAX_YZ, MAX_YZ)
    return all(0 < n <= lim for n, lim in zip(grid, limits))


def test_direct_norm_grid_of_a_huge_layer_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    # 20000 x 20000 weight: 1.56M tiles of the smallest block (16 under the interpreter; with 64 on a GPU
    # the same happens past p = d = 16384), far beyond axis y's 65535
    grid = direct_grid_of(monkeypatch, 3, 1, 20_000, 20_000)
    n_tiles = (-(-20_000 // linear_norms.MIN_BLOCK)) ** 2
    assert grid == (n_tiles, 3) and within_limits(grid)


def test_direct_norm_grid_of_a_huge_batch_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    grid = direct_grid_of(monkeypatch, 70_000, 1, 4, 5)
    assert within_limits(grid) and grid == (1, MAX_YZ)  # the kernel loops over samples past 65535


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_direct_norm_loops_over_samples_beyond_axis_y(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    monkeypatch.setattr(linear_norms, "MAX_GRID_Y", 2)  # 7 samples on 2 programs per tile: 4 and 3 each
    g = torch.Generator().manual_seed(3)
    A = torch.randn(7, 5, 37, generator=g).to(dtype)
    G = torch.randn(7, 5, 21, generator=g).to(dtype)
    w, b = linear_norms.direct_norm(A, G, True)
    ref_w, ref_b = reference.direct_norm(A.double(), G.double(), True)
    torch.testing.assert_close(w.double(), ref_w, rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(b.double(), ref_b, rtol=2e-5, atol=1e-5)
