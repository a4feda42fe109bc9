"""benchmarks/gpu_check.sh's decisions, checked on CPU (no GPU needed): the script runs with a fake Python.

The fake answers the script's few Python calls (torch sees a GPU, the extension has CUDA kernels or not, a
build that takes a while, pytest passes) and records its command lines; PATH holds only the tools the
script uses, so whether it finds `python` or `python3` is under the test's control. Also the test-side
rule: a visible GPU with an extension built without CUDA kernels fails the CUDA tests instead of skipping.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ALLOW_NO_CUDA_KERNELS_ENV, require_cuda_kernels

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
TOOLS = ("bash", "env", "timeout", "tail", "mkdir", "nproc", "grep", "sed", "tee", "dirname", "cat", "sleep")

FAKE_PYTHON = """#!{bash}
# Stands in for Python in benchmarks/gpu_check.sh: logs each call, answers the script's questions.
echo "$*" >> "$FAKE_LOG"
case "$1" in
  -) cat > /dev/null; echo "fake python, cuda available: True" ;;
  -c) case "$2" in *extension_has*) echo "$FAKE_EXT_CUDA" ;; esac ;;  # other -c calls succeed silently
  setup.py) echo "dpkernels: CUDA kernels $FAKE_BUILD_LINE"; exec sleep "$FAKE_BUILD_S" ;;
  -m) [ "$2" = pytest ] && echo "fake pytest, $ALLOW_ENV=${{{allow}:-unset}}" ;;
esac
exit 0
"""

needs_tools = pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS), reason="needs coreutils and bash")


def run_script(tmp_path: Path, python_name: str, ext_cuda: str, build_s: float = 0, **env: str):
    """Runs gpu_check.sh with PATH = the tools it uses + a fake `python_name`; returns (rc, output, calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        (bin_dir / tool).symlink_to(shutil.which(tool))
    fake = bin_dir / python_name
    fake.write_text(FAKE_PYTHON.format(bash=shutil.which("bash"), allow=ALLOW_NO_CUDA_KERNELS_ENV))
    fake.chmod(0o755)
    log = tmp_path / "calls.log"
    full_env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "OUT": str(tmp_path / "out"), "FAKE_LOG": str(log),
                "FAKE_EXT_CUDA": ext_cuda, "FAKE_BUILD_S": str(build_s), "ALLOW_ENV": ALLOW_NO_CUDA_KERNELS_ENV,
                "FAKE_BUILD_LINE": "ON (fake)" if ext_cuda == "True" else "OFF (nvcc not found (set CUDA_HOME))",
                **env}
    proc = subprocess.run([shutil.which("bash"), str(SCRIPT)], env=full_env, capture_output=True, text=True,
                          timeout=120, check=False)
    calls = log.read_text().splitlines() if log.exists() else []
    return proc.returncode, proc.stdout + proc.stderr, calls


@pytest.mark.parametrize("script", [SCRIPT, SCRIPT.with_name("gpu_run.sh")], ids=lambda p: p.name)
def test_script_is_valid_bash(script: Path) -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    assert subprocess.run([bash, "-n", str(script)], check=False).returncode == 0


@needs_tools
def test_finds_python3_when_python_is_missing(tmp_path: Path) -> None:
    rc, out, calls = run_script(tmp_path, "python3", ext_cuda="True")
    assert rc == 0, out
    assert any(c.startswith("-m pytest -m gpu tests") for c in calls), calls
    assert "gpu_check: OK" in out


@needs_tools
def test_fails_when_a_gpu_is_visible_but_the_extension_has_no_cuda_kernels(tmp_path: Path) -> None:
    rc, out, _ = run_script(tmp_path, "python", ext_cuda="False")
    assert rc == 1, out
    assert "built WITHOUT its CUDA kernels (dpkernels: CUDA kernels OFF (nvcc not found" in out
    assert "gpu_check: FAILED" in out
    # the tests still ran (Triton kernels), with the CUDA-extension tests told to skip rather than fail
    assert f"fake pytest, {ALLOW_NO_CUDA_KERNELS_ENV}=1" in (tmp_path / "out" / "gpu_tests.log").read_text()


@needs_tools
def test_a_slow_build_does_not_eat_the_test_budget(tmp_path: Path) -> None:
    # the whole-run budget is spent, and the build runs past its own budget: the tests still get theirs
    rc, out, calls = run_script(tmp_path, "python", ext_cuda="True", build_s=30,
                                DPK_GPU_BUDGET_S="1", DPK_GPU_BUILD_S="2", DPK_GPU_TEST_S="7")
    assert rc == 1, out  # the build did not finish
    assert "build: TIMED OUT after 2s" in out
    assert re.search(r"build took \d+s \(budget 2s\)", out), out
    assert "gpu-tests (limit 7s)" in out
    assert not any("pip install" in c for c in calls)  # no second build attempt after a timeout


def test_cuda_tests_fail_not_skip_without_cuda_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    from dpkernels import ops

    monkeypatch.setattr(ops, "extension_has", lambda device_type: False)
    monkeypatch.delenv(ALLOW_NO_CUDA_KERNELS_ENV, raising=False)
    with pytest.raises(pytest.fail.Exception, match="built without its CUDA kernels"):
        require_cuda_kernels()
    monkeypatch.setenv(ALLOW_NO_CUDA_KERNELS_ENV, "1")
    with pytest.raises(pytest.skip.Exception):
        require_cuda_kernels()
    monkeypatch.setattr(ops, "extension_has", lambda device_type: device_type == "cuda")
    require_cuda_kernels()  # with the kernels: nothing to say

