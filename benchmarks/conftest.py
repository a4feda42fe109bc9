"""Options and fixtures shared by the benchmark suites.

Sizes: tiny by default (CI runs `pytest benchmarks --benchmark-disable` once, quickly); the sizes the
issues ask for with `--bench-size full` or DPK_BENCH_SIZE=full. Rounds are fixed per size (pedantic
mode) so a full run has a known cost; `--bench-rounds N` overrides.
"""

from __future__ import annotations

import os
import platform
import subprocess

import pytest
import torch

SIZES = ("tiny", "full")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dpkernels benchmarks")
    group.addoption("--bench-size", choices=SIZES, default=None,
                    help="workload size: tiny (default, CI smoke run) or full (issue sizes); env DPK_BENCH_SIZE")
    group.addoption("--bench-rounds", type=int, default=None, help="timed rounds per benchmark (default by size)")
    group.addoption("--bench-autocast", choices=("none", "bf16", "fp16"), default="none",
                    help="run every step benchmark's forward under torch.autocast with this dtype (GPU training)")
    group.addoption("--no-bench-memory", action="store_true",
                    help="skip the peak-memory measurement (CPU: one fresh subprocess per variant)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped cleanly without one")


@pytest.fixture(scope="session")
def bench_size(pytestconfig: pytest.Config) -> str:
    size = pytestconfig.getoption("--bench-size") or os.environ.get("DPK_BENCH_SIZE", "tiny")
    if size not in SIZES:
        raise pytest.UsageError(f"DPK_BENCH_SIZE={size!r}: expected one of {SIZES}")
    return size


@pytest.fixture(scope="session")
def bench_rounds(pytestconfig: pytest.Config, bench_size: str):
    """rounds(default_full) -> timed rounds: the option if given, else 3 at tiny size, else default_full."""
    override = pytestconfig.getoption("--bench-rounds")

    def rounds(default_full: int) -> int:
        if override is not None:
            return max(1, override)
        return 3 if bench_size == "tiny" else default_full

    return rounds


@pytest.fixture(scope="session")
def bench_autocast(pytestconfig: pytest.Config) -> torch.dtype | None:
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[pytestconfig.getoption("--bench-autocast")]


@pytest.fixture(scope="session")
def bench_memory(pytestconfig: pytest.Config) -> bool:
    return not pytestconfig.getoption("--no-bench-memory")


def cpu_model_name() -> str:
    """The CPU as lscpu names it (platform.processor() is often empty on Linux)."""
    try:
        out = subprocess.run(["lscpu"], check=False, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    name = fields.get("Model name", platform.machine()).strip()
    return f"{name}, {fields.get('CPU(s)', '?').strip()} CPUs"


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info["cpu_model"] = cpu_model_name()
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        machine_info["gpu"] = torch.cuda.get_device_name(0)
        machine_info["cuda"] = torch.version.cuda
    for name in ("opacus", "diffusers", "triton"):
        try:
            machine_info[name] = __import__(name).__version__
        except ImportError:
            machine_info[name] = None
