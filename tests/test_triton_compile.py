"""Every Triton kernel compiles for the GPU (sm_90, through Triton's bundled ptxas), without a GPU.

The interpreter runs the kernels' Python, not their lowering: this catches what only the compiler
sees (types, tl.dot shapes, libdevice calls, non-constexpr globals, T = 1 specialised). One config per kernel and dtype
here; `python -m dpkernels.triton.compile_check --all-configs --arch 90 80` does every config.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "dpkernels.triton.compile_check", "--arch", "90"],
                          check=False, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # 13 per dtype + 6 with T = 1 (bf16) + 9 with tf32x3 dots (fp32)
    assert "compiled 54 kernel variants" in proc.stdout
