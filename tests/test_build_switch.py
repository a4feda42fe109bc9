"""The setup.py switch that decides whether the CUDA kernels are built."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_module():
    # loaded under another name, so its `if __name__ == "__main__": setup(...)` does not run
    spec = importlib.util.spec_from_file_location("dpkernels_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


CU = ["csrc/cuda/linear_norms.cu"]


def test_cuda_on_when_everything_is_there(setup_module):
    plan = setup_module.cuda_plan("12.4", "/usr/local/cuda", True, CU, {})
    assert plan.with_cuda
    assert "12.4" in plan.reason


@pytest.mark.parametrize(
    "torch_cuda, cuda_home, nvcc, sources, env, why",
    [
        (None, "/usr/local/cuda", True, CU, {}, "no CUDA"),
        ("12.4", None, False, CU, {}, "nvcc"),
        ("12.4", "/usr/local/cuda", False, CU, {}, "nvcc"),
        ("12.4", "/usr/local/cuda", True, [], {}, "no CUDA sources"),
        ("12.4", "/usr/local/cuda", True, CU, {"DPKERNELS_NO_CUDA": "1"}, "DPKERNELS_NO_CUDA"),
    ],
)
def test_cuda_off(setup_module, torch_cuda, cuda_home, nvcc, sources, env, why):
    plan = setup_module.cuda_plan(torch_cuda, cuda_home, nvcc, sources, env)
    assert not plan.with_cuda
    assert why in plan.reason


def test_no_cuda_env_zero_means_unset(setup_module):
    assert setup_module.cuda_plan("12.4", "/usr/local/cuda", True, CU, {"DPKERNELS_NO_CUDA": "0"}).with_cuda


def test_extensions_cpu_only_here(setup_module, monkeypatch):
    """With DPKERNELS_NO_CUDA=1 the extension is a CppExtension over csrc/*.cpp and csrc/cpu/*.cpp."""
    monkeypatch.setenv("DPKERNELS_NO_CUDA", "1")
    (ext,) = setup_module.extensions()
    assert ext.name == "dpkernels._C"
    assert "csrc/ops.cpp" in ext.sources
    assert any(s.startswith("csrc/cpu/") for s in ext.sources)
    assert not any(s.endswith(".cu") for s in ext.sources)
    assert ("DPKERNELS_WITH_CUDA", None) not in ext.define_macros


def test_extensions_cuda_sources_when_plan_says_so(setup_module, monkeypatch, tmp_path):
    """When the plan is ON, the .cu files join the sources and the macro is defined for both compilers."""
    monkeypatch.setattr(setup_module, "cuda_plan", lambda *a: setup_module.CudaPlan(True, "forced by test"))
    monkeypatch.setattr(setup_module, "_sources", lambda pat: ["csrc/cuda/x.cu"] if pat.endswith(".cu") else
                        ["csrc/ops.cpp"])
    monkeypatch.setattr(setup_module.cpp_extension, "CUDA_HOME", str(tmp_path))  # CUDAExtension joins paths to it
    (ext,) = setup_module.extensions()
    assert "csrc/cuda/x.cu" in ext.sources
    assert ("DPKERNELS_WITH_CUDA", None) in ext.define_macros
    nvcc = ext.extra_compile_args["nvcc"]
    assert "-gencode=arch=compute_80,code=sm_80" in nvcc and "-gencode=arch=compute_90,code=sm_90" in nvcc


def test_cuda_archs_default_and_override(setup_module):
    assert setup_module.cuda_archs({}) == ["-gencode=arch=compute_80,code=sm_80",
                                           "-gencode=arch=compute_90,code=sm_90"]
    assert setup_module.cuda_archs({"DPKERNELS_CUDA_ARCHS": "90"}) == ["-gencode=arch=compute_90,code=sm_90"]
    assert len(setup_module.cuda_archs({"DPKERNELS_CUDA_ARCHS": "80, 86,90"})) == 3


@pytest.mark.parametrize("bad", ["", "sm_90", "9.0", ";"])
def test_cuda_archs_refuses_what_nvcc_would_not_take(setup_module, bad):
    with pytest.raises(ValueError, match="DPKERNELS_CUDA_ARCHS"):
        setup_module.cuda_archs({"DPKERNELS_CUDA_ARCHS": bad})
