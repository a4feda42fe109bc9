"""Triton kernels for every op of the `dpkernels.ops` contract, same signatures as `dpkernels.reference`.

One file per op family, named as in csrc/cpu and csrc/cuda (the table in `dpkernels.ops`); `_common.py` holds the
host-side helpers and `philox.py` the device-side noise stream.

Inputs fp32 / fp16 / bf16 (fp32 accumulation, fp32 outputs); fp64 raises TypeError (use the "cuda"
or "torch" backend). Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (set it
before this package is imported).
"""

from dpkernels.triton._common import SUPPORTED_DTYPES, supports
from dpkernels.triton.affine import affine_grad_sample
from dpkernels.triton.clipped_sum import clipped_sum
from dpkernels.triton.embedding import embedding_clipped_sum, embedding_norm
from dpkernels.triton.linear_norms import direct_norm, ghost_norm
from dpkernels.triton.noise import add_noise_
from dpkernels.triton.rows import clipped_rows_sum, sq_norms

__all__ = [
    "SUPPORTED_DTYPES",
    "add_noise_",
    "affine_grad_sample",
    "clipped_rows_sum",
    "clipped_sum",
    "direct_norm",
    "embedding_clipped_sum",
    "embedding_norm",
    "ghost_norm",
    "sq_norms",
    "supports",
]
