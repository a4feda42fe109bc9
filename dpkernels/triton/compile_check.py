"""Compile every Triton kernel for NVIDIA targets without a GPU (ahead of time, through ptxas).

CI has no GPU; this catches what the interpreter cannot: code that does not lower (types, tl.dot
shapes, libdevice calls, globals), for each autotune config and input dtype.
    TRITON_INTERPRET=0 python -m dpkernels.triton.compile_check [--all-configs] [--arch 90 80] [--jobs N]
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_check needs TRITON_INTERPRET unset: interpreted kernels are not compiled")
os.environ["DPK_TRITON_AUTOTUNE"] = "1"  # every config is listed; --all-configs chooses how many to compile

from dpkernels.triton import affine, embedding, linear_norms, rows
from dpkernels.triton._common import FP32_DOT_PRECISIONS
from dpkernels.triton.clipped_sum import _clipped_sum_kernel  # the package attribute clipped_sum is the op

DTYPES = ("fp32", "fp16", "bf16")


def _jobs(dt: str):
    """(kernel, signature, constexprs) per launch variant; pointers to `dt` where inputs are."""
    norm_sig = {"a_ptr": f"*{dt}", "g_ptr": f"*{dt}", "w_part_ptr": "*fp32", "b_part_ptr": "*fp32",
                "T": "i32", "d": "i32", "p": "i32", "part_stride": "i32",
                "WITH_BIAS": "constexpr", "UPCAST": "constexpr", "DOT": "constexpr"}
    direct_sig = {**norm_sig, "B": "i32"}
    dots = FP32_DOT_PRECISIONS if dt == "fp32" else FP32_DOT_PRECISIONS[:1]  # half inputs: products are exact
    for kernel, sig in ((linear_norms._ghost_norm_kernel, norm_sig), (linear_norms._direct_norm_kernel, direct_sig)):
        for bias, dot in itertools.product((True, False), dots):
            yield kernel, sig, {"WITH_BIAS": bias, "UPCAST": False, "DOT": dot}
    sum_sig = {"a_ptr": f"*{dt}", "g_ptr": f"*{dt}", "c_ptr": "*fp32", "cb_ptr": "*fp32", "w_out_ptr": "*fp32",
               "b_out_ptr": "*fp32", "K": "i32", "T": "i32", "d": "i32", "p": "i32", "k_per_split": "i32",
               "std": "fp32", "seed_lo": "i64", "seed_hi": "i32", "offset": "i64", "bias_offset": "i64",
               "HAS_BIAS": "constexpr", "HAS_NOISE": "constexpr", "PARTIAL": "constexpr", "UPCAST": "constexpr",
               "DOT": "constexpr"}
    for bias, partial, dot in itertools.product((True, False), (True, False), dots):
        yield _clipped_sum_kernel, sum_sig, {"HAS_BIAS": bias, "HAS_NOISE": True, "PARTIAL": partial,
                                             "UPCAST": False, "DOT": dot}
    for dot in dots:
        yield embedding._embedding_norm_kernel, {"ids_ptr": "*i64", "g_ptr": f"*{dt}", "part_ptr": "*fp32", "T": "i32",
                                                 "D": "i32", "part_stride": "i32", "UPCAST": "constexpr",
                                                 "DOT": "constexpr"}, {"UPCAST": False, "DOT": dot}
    yield embedding._scatter_kernel, {"ids_ptr": "*i64", "g_ptr": f"*{dt}", "c_ptr": "*fp32", "out_ptr": "*fp32",
                                      "R": "i32", "T": "i32", "D": "i32", "V": "i32", "BLOCK_R": "constexpr",
                                      "BLOCK_D": "constexpr"}, {"BLOCK_R": 32, "BLOCK_D": 128}
    yield rows._rows_sum_noise_kernel, {"x_ptr": f"*{dt}", "w_ptr": "*fp32", "out_ptr": f"*{dt}", "S": "i32",
                                        "N": "i32", "std": "fp32", "seed_lo": "i64", "seed_hi": "i32",
                                        "offset": "i64", "HAS_W": "constexpr", "HAS_NOISE": "constexpr",
                                        "BLOCK": "constexpr"}, {"HAS_W": True, "HAS_NOISE": True,
                                                                "BLOCK": rows.BLOCK_N}
    yield rows._sq_norms_kernel, {"x_ptr": f"*{dt}", "partial_ptr": "*fp32", "N": "i32", "n_chunks": "i32",
                                  "CHUNK": "constexpr", "BLOCK": "constexpr"}, {"CHUNK": rows.CHUNK_N,
                                                                                "BLOCK": rows.BLOCK_N}
    yield affine._affine_kernel, {"x_ptr": f"*{dt}", "g_ptr": f"*{dt}", "out_ptr": "*fp32", "R": "i32", "S": "i32"}, {}


def _with_t1(dt: str):
    """The jobs, plus (bf16 only) the token-free case: Triton turns an int arg equal to 1 into a constexpr,
    and T = 1 (2-D inputs, class embeddings) is common."""
    for kernel, sig, consts in _jobs(dt):
        yield kernel, sig, consts
        if dt == "bf16" and "T" in sig and consts.get("WITH_BIAS", True) and not consts.get("PARTIAL", False):
            yield kernel, sig, {**consts, "T": 1}


def _variants(archs: list[int], all_configs: bool, dtypes) -> list[tuple]:
    """(arch, kernel, signature, constexprs, options) for every variant to compile, in a fixed order."""
    out = []
    for arch, dt in itertools.product(archs, dtypes):
        for kernel, sig, consts in _with_t1(dt):
            tuned = isinstance(kernel, triton.runtime.Autotuner)
            fn = kernel.fn if tuned else kernel
            cfgs = (kernel.configs if all_configs else kernel.configs[:1]) if tuned else [None]
            for cfg in cfgs:
                c = dict(consts)
                s = dict(sig)
                opts = {}
                if cfg is not None:
                    c.update(cfg.kwargs)
                    s.update({k: "constexpr" for k in cfg.kwargs})
                    opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
                s.update({k: "constexpr" for k in c})
                out.append((arch, fn, s, c, opts))
    return out


def _compile_share(archs: list[int], all_configs: bool, dtypes, share: int, shares: int) -> int:
    """Compile every `shares`-th variant, starting at `share` (one worker's part)."""
    todo = _variants(archs, all_configs, dtypes)[share::shares]
    for arch, fn, sig, consts, opts in todo:
        triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", arch, 32), options=opts)
    return len(todo)


def compile_all(archs: list[int], all_configs: bool, dtypes=DTYPES, jobs: int = 1) -> int:
    """Compile every kernel variant ahead of time for NVIDIA targets (no GPU needed).

    Args:
        archs: compute capabilities, e.g. [90, 80].
        all_configs: every autotune config (else the first, safe one).
        dtypes: input dtypes among DTYPES.
        jobs: worker processes (each compile is single-threaded).

    Returns:
        The number of variants compiled.
    """
    if jobs <= 1:
        return _compile_share(archs, all_configs, dtypes, 0, 1)
    # forked before any compile: the workers inherit the imported kernels, nothing of LLVM's state
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        parts = [pool.submit(_compile_share, archs, all_configs, tuple(dtypes), i, jobs) for i in range(jobs)]
        return sum(f.result() for f in parts)


def main() -> None:
    """The command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", type=int, nargs="+", default=[90])
    ap.add_argument("--all-configs", action="store_true")
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES))
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes (default: every core)")
    args = ap.parse_args()
    n = compile_all(args.arch, args.all_configs, args.dtypes, args.jobs)
    print(f"compiled {n} kernel variants for sm_{args.arch}")


if __name__ == "__main__":
    main()
