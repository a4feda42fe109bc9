"""Builds the compiled extension `dpkernels._C` (C++ CPU kernels; CUDA kernels when possible).

Install with `pip install --no-build-isolation -e .` so the installed torch is used.
Environment: DPKERNELS_NO_CUDA=1 builds the CPU kernels only; DPKERNELS_CUDA_ARCHS="90" (";"- or
","-separated compute capabilities without the dot, default "80;90") picks the GPU architectures compiled for.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as e:  # pragma: no cover - the message is the point
    sys.exit(
        "dpkernels: building the extension needs PyTorch (>= 2.4) importable in this Python "
        f"({sys.executable}): {e}.\nInstall torch first, then run `pip install --no-build-isolation -e .` "
        "(an isolated build would download a multi-GB CUDA torch)."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class CudaPlan:
    with_cuda: bool
    reason: str


def cuda_plan(torch_cuda: str | None, cuda_home: str | None, nvcc_exists: bool, cu_sources: list[str],
              env: Mapping[str, str]) -> CudaPlan:
    """Decide whether the CUDA kernels are built. Pure: every input is passed in."""
    if env.get("DPKERNELS_NO_CUDA", "0") not in ("", "0"):
        return CudaPlan(False, "DPKERNELS_NO_CUDA is set")
    if not torch_cuda:
        return CudaPlan(False, "this torch has no CUDA")
    if not cuda_home or not nvcc_exists:
        return CudaPlan(False, "nvcc not found (set CUDA_HOME)")
    if not cu_sources:
        return CudaPlan(False, "no CUDA sources in csrc/cuda")
    return CudaPlan(True, f"torch CUDA {torch_cuda}, nvcc in {cuda_home}")


def cuda_archs(env: Mapping[str, str]) -> list[str]:
    """nvcc -gencode flags for DPKERNELS_CUDA_ARCHS (default sm_80 and sm_90: A100 and H100/H200)."""
    archs = [a.strip() for a in env.get("DPKERNELS_CUDA_ARCHS", "80;90").replace(",", ";").split(";") if a.strip()]
    if not archs or not all(a.isdigit() for a in archs):
        raise ValueError(f"DPKERNELS_CUDA_ARCHS={env.get('DPKERNELS_CUDA_ARCHS')!r}: expected compute capabilities "
                         "like '80;90'")
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extensions() -> list:
    cpp = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    cu = _sources("csrc/cuda/*.cu")
    cuda_home = cpp_extension.CUDA_HOME
    nvcc = bool(cuda_home) and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
    plan = cuda_plan(torch.version.cuda, cuda_home, nvcc, cu, os.environ)
    print(f"dpkernels: CUDA kernels {'ON' if plan.with_cuda else 'OFF'} ({plan.reason})")
    cxx = ["-O3", "-fopenmp", "-fno-math-errno"]
    macros = [("DPKERNELS_PYTHON_MODULE", None)]
    kwargs = {"include_dirs": [os.path.join(ROOT, "csrc", "include")], "extra_link_args": ["-fopenmp"]}
    if plan.with_cuda:
        nvcc_flags = ["-O3", "-DDPKERNELS_WITH_CUDA", "--expt-relaxed-constexpr", *cuda_archs(os.environ)]
        return [cpp_extension.CUDAExtension(
            "dpkernels._C", cpp + cu, define_macros=macros + [("DPKERNELS_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc_flags}, **kwargs)]
    return [cpp_extension.CppExtension("dpkernels._C", cpp, define_macros=macros,
                                       extra_compile_args={"cxx": cxx}, **kwargs)]


if __name__ == "__main__":
    from setuptools import setup

    setup(ext_modules=extensions(), cmdclass={"build_ext": cpp_extension.BuildExtension})
