"""Shared host-side helpers for the Triton kernels: interpreter detection, dtype checks, configs."""

from __future__ import annotations

import os

import torch
import triton

# TRITON_INTERPRET must be set before the kernels are defined (tests/conftest.py sets it without CUDA).
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _patch_interpreter_for_numpy2() -> None:
    """Triton 3.6's interpreter turns scalar args into 1-element arrays and calls int() on them
    (`range(n)` in a kernel); NumPy >= 2.4 refuses that. Re-patch `tensor.__index__` after it."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_dpkernels_patched", False):
        return

    def patched(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._dpkernels_patched = True
    interpreter._patch_lang_tensor = patched


if INTERPRET:
    _patch_interpreter_for_numpy2()

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_dtype(*tensors: torch.Tensor) -> None:
    """The Triton backend accumulates in fp32; fp64 inputs belong to the "cuda" or "torch" backends."""
    for t in tensors:
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"dpkernels.triton supports float32, float16 and bfloat16 inputs, got {t.dtype}; "
                "use backend='cuda' or backend='torch' for it"
            )


def supports(dtype: torch.dtype) -> bool:
    return dtype in SUPPORTED_DTYPES


# DPK_TRITON_AUTOTUNE=0 pins every kernel to its first (safe) config: the GPU tests use it so that
# compiling every config for every shape and dtype does not eat the GPU check's time budget.
AUTOTUNE: bool = os.environ.get("DPK_TRITON_AUTOTUNE", "1") != "0"


FP32_DOT_PRECISIONS = ("ieee", "tf32x3")


def fp32_dot_precision() -> str:
    """tl.dot's input_precision for fp32 inputs, from DPK_TRITON_FP32_DOT (read at each launch).

    "ieee" (default): fp32 FMA, exact to fp32 rounding. "tf32x3": tensor cores with each operand split into two
    TF32 parts (three products), per-product relative error ~2^-21 instead of 2^-24; faster on Ampere and Hopper
    (to be measured: benchmarks/RESULTS.md). Plain "tf32" (~1e-3 relative) is refused: a norm that far off moves
    every clipping factor. Half-precision inputs ignore it (their products are exact in fp32)."""
    value = os.environ.get("DPK_TRITON_FP32_DOT", "ieee")
    if value not in FP32_DOT_PRECISIONS:
        raise ValueError(f"DPK_TRITON_FP32_DOT={value!r}: expected one of {FP32_DOT_PRECISIONS}")
    return value


def configs(full: list[triton.Config], small: triton.Config) -> list[triton.Config]:
    """Autotuning under the interpreter is slow and meaningless: one small config there."""
    if INTERPRET:
        return [small]
    return full if AUTOTUNE else full[:1]


def seed_words(seed: int) -> tuple[int, int]:
    """64-bit seed -> (lo32, hi32) Philox key words."""
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be a non-negative 64-bit int, got {seed}")
    return seed & 0xFFFFFFFF, seed >> 32


def check_offset(offset: int) -> int:
    if offset < 0:
        raise ValueError(f"noise offset must be >= 0, got {offset}")
    return offset
