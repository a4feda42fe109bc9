"""Every CUDA source in csrc/cuda compiles with nvcc for sm_80 and sm_90, without a GPU.

A CUDA source that does not compile fails here, in CI, instead of on the first GPU machine.
Each `csrc/cuda/*.cu` is compiled to an object (`nvcc -c`, both architectures in one call) with
the flags `setup.py` uses. Skipped only when nvcc is absent.

Torch headers (only `torch_ops.cu` includes them; the kernel sources need the CUDA toolkit alone):
- `DPKERNELS_CUDA_PYTHON=/path/to/python` of an environment with a CUDA build of torch: its headers
  (and the nvidia-* wheels' headers next to it), i.e. exactly what a real build sees;
- otherwise the installed torch. A CPU build of torch ships c10/cuda and ATen/cuda headers but not
  the one header CMake generates for c10_cuda (`c10/cuda/impl/cuda_cmake_macros.h`, a single
  `#define C10_CUDA_BUILD_SHARED_LIBS`); the test writes that header into its temp dir.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
CU_SOURCES = sorted(CUDA_DIR.glob("*.cu"))
ARCHS = ("80", "90")
# torch.utils.cpp_extension.COMMON_NVCC_FLAGS plus what setup.py adds.
NVCC_FLAGS = [
    "-std=c++20",
    "-O3",
    "--expt-relaxed-constexpr",
    "-Xcompiler",
    "-fPIC",
    "-DDPKERNELS_WITH_CUDA",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]
CMAKE_MACROS = "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def torch_include_dirs(python: str) -> list[str]:
    """torch's include dirs (and the nvidia wheels' headers, if any) as seen by `python`."""
    code = (
        "import json, os, torch, torch.utils.cpp_extension as ce\n"
        "inc = ce.include_paths()\n"
        "sp = os.path.dirname(os.path.dirname(torch.__file__))\n"
        "nv = os.path.join(sp, 'nvidia')\n"
        "extra = [os.path.join(nv, d, 'include') for d in sorted(os.listdir(nv))] if os.path.isdir(nv) else []\n"
        "print(json.dumps({'inc': inc, 'extra': [e for e in extra if os.path.isdir(e)],"
        " 'cuda': torch.version.cuda}))\n"
    )
    out = subprocess.run([python, "-c", code], check=True, capture_output=True, text=True, timeout=300).stdout
    info = json.loads(out.strip().splitlines()[-1])
    return info["inc"] + info["extra"]


@pytest.fixture(scope="module")
def nvcc_command(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME): cannot compile the CUDA sources")
    python = os.environ.get("DPKERNELS_CUDA_PYTHON", sys.executable)
    includes = [str(ROOT / "csrc" / "include")] + torch_include_dirs(python)
    if not any((Path(d) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists() for d in includes):
        stub = tmp_path_factory.mktemp("cmake_macros")
        (stub / "c10" / "cuda" / "impl").mkdir(parents=True)
        (stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text(CMAKE_MACROS)
        includes.append(str(stub))
    cmd = [nvcc, *NVCC_FLAGS, "--threads", "2"]
    cmd += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    cmd += [f"-I{d}" for d in includes]
    return (["nice", "-n", "5"] if shutil.which("nice") else []) + cmd


def test_cuda_sources_exist() -> None:
    assert CU_SOURCES, f"no CUDA sources in {CUDA_DIR}"


def test_every_op_has_a_cuda_kernel() -> None:
    """Each op of the contract is registered for the CUDA dispatch key (a missing one would fall
    through to 'no kernel for CUDA' at run time, which no compile would catch)."""
    from dpkernels.ops import OP_NAMES

    text = "\n".join(p.read_text() for p in CU_SOURCES)
    block = re.search(r"TORCH_LIBRARY_IMPL\(dpkernels,\s*CUDA,\s*m\)\s*\{(.*?)\n\}", text, re.DOTALL)
    assert block, "no TORCH_LIBRARY_IMPL(dpkernels, CUDA, m) in csrc/cuda"
    registered = set(re.findall(r'm\.impl\("(\w+)"', block.group(1)))
    assert registered == set(OP_NAMES), f"missing: {set(OP_NAMES) - registered}, extra: {registered - set(OP_NAMES)}"


@pytest.mark.parametrize("source", CU_SOURCES, ids=[p.name for p in CU_SOURCES])
def test_cu_compiles_for_sm80_and_sm90(source: Path, nvcc_command: list[str], tmp_path: Path) -> None:
    obj = tmp_path / (source.stem + ".o")
    proc = subprocess.run(
        [*nvcc_command, "-c", str(source), "-o", str(obj)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, f"nvcc failed on {source.name}:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    assert obj.stat().st_size > 0
