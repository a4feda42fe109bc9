"""Single-thread CPU time (time.thread_time, best of N) of the C++ linear-layer kernels vs their floors.

Wall-clock timings on a shared machine are mostly scheduler noise; thread CPU time on one thread
is stable. Run: `python benchmarks/cpu_op_times.py` (needs the built extension).
"""

from __future__ import annotations

import time

import torch

import dpkernels.ops  # noqa: F401  (registers torch.ops.dpkernels)

K = torch.ops.dpkernels


def best_ms(f, n: int = 15) -> float:
    f()
    b = float("inf")
    for _ in range(n):
        t = time.thread_time()
        f()
        b = min(b, time.thread_time() - t)
    return b * 1e3


def time_shape(B: int, T: int, d: int, p: int) -> dict[str, float]:
    A, G, c = torch.randn(B, T, d), torch.randn(B, T, p), torch.rand(B)
    return {
        "gemm G^T A": best_ms(lambda: torch.mm(G.view(-1, p).t(), A.view(-1, d))),
        "clipped_sum": best_ms(lambda: K.clipped_sum(A, G, c, c, 0.0, 0, 0)),
        "clipped_sum+noise": best_ms(lambda: K.clipped_sum(A, G, c, c, 1.0, 0, 0)),
        "ghost_norm": best_ms(lambda: K.ghost_norm(A, G, True)),
        "bmm Gram (B x T x T)": best_ms(
            lambda: (torch.bmm(A, A.transpose(1, 2)) * torch.bmm(G, G.transpose(1, 2))).sum((1, 2))),
        "direct_norm": best_ms(lambda: K.direct_norm(A, G, True), 3),
        "einsum per-sample": best_ms(lambda: torch.einsum("btp,btd->bpd", G, A).pow(2).sum((1, 2)), 3),
    }


def main() -> None:
    torch.set_num_threads(1)
    for B, T, d, p in [(32, 64, 256, 256), (32, 64, 256, 1024), (32, 64, 1024, 256), (4, 1024, 64, 64)]:
        r = time_shape(B, T, d, p)
        print(f"[B,T,d,p]={[B, T, d, p]}  " + "  ".join(f"{k} {v:.2f} ms" for k, v in r.items()), flush=True)
    x = torch.zeros(1 << 20)
    ours = best_ms(lambda: K.add_noise_(x, 1.0, 1, 0), 5) / (1 << 20) * 1e6
    randn = best_ms(lambda: torch.randn(1 << 20), 5) / (1 << 20) * 1e6
    print(f"noise: add_noise_ {ours:.2f} ns/element, torch.randn {randn:.2f} ns/element")


if __name__ == "__main__":
    main()
