"""Eager vs torch.compile DP step on CPU (issue 11, item 3) or a GPU (issue 21, item 4).

    nice python -m benchmarks.bench_compile                       # transformer workload, full CPU size
    nice python -m benchmarks.bench_compile --size tiny --steps 5 # quick look
    python -m benchmarks.bench_compile --device cuda --model ldm  # the fmnist preset's DP-LDM step on a GPU

Variants, each on a fresh copy of the same workload (benchmarks/models.py) and the same fixed batch:
  ours_eager      dpkernels step, model run eagerly
  ours_compiled   dpkernels step, model + loss under torch.compile with the options dpkernels.compile sets
                  (the private layers' tap as opaque ops, dpkernels/layers/tap_ops.py); backward and
                  optimizer.step() as usual (the step is eager)
  plain_eager / plain_compiled   the non-private step, for scale (--no-plain to skip)
A step is zero_grad, forward, backward, optimizer.step(). After --warmup steps (compilation happens there),
the variants' steps are timed round-robin (one step of each in turn, so load from other processes spreads
over all of them); the median is reported. Noise is on (sigma = 1) in both private variants.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.conftest import cpu_model_name
from benchmarks.models import MODELS, PerSampleMSE, Workload, build


def make_step(w: Workload, private: bool, compiled: bool, backend: str) -> Callable[[], float]:
    optimizer = torch.optim.SGD(w.trainable(), lr=1e-3)
    model = w.model
    if private:
        from dpkernels import PrivacyEngine

        loader = DataLoader(TensorDataset(*w.inputs, w.target), batch_size=w.batch_size)
        model, optimizer, _ = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
            poisson_sampling=False, seed=0)
    criterion = PerSampleMSE()

    def loss_fn(*inputs: torch.Tensor) -> torch.Tensor:
        return criterion(model(*inputs), w.target)

    if compiled:
        # the loss is compiled with the model in it, so dpkernels.compile (which takes the module) is not used
        # here; its inductor options are (a correct private UNet step needs them: dpkernels/torch_compile.py)
        from dpkernels.torch_compile import INDUCTOR_OPTIONS

        options = dict(INDUCTOR_OPTIONS) if private and backend == "inductor" else None
        loss_fn = torch.compile(loss_fn, backend=backend, options=options)

    sync = torch.cuda.synchronize if w.target.is_cuda else (lambda: None)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(*w.inputs)
        loss.backward()
        optimizer.step()
        sync()  # the step's device work is done before the clock stops
        return float(loss.detach())

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="transformer", choices=MODELS)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--size", default="full", choices=("tiny", "full"))
    ap.add_argument("--steps", type=int, default=15, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (compilation included)")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend")
    ap.add_argument("--no-plain", action="store_true", help="skip the non-private variants")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    variants = [("ours_eager", True, False), ("ours_compiled", True, True)]
    if not args.no_plain:
        variants += [("plain_eager", False, False), ("plain_compiled", False, True)]
    steps, shape = {}, ""
    for name, private, compiled in variants:
        w = build(args.model, args.size, args.device)
        shape = w.shape
        steps[name] = make_step(w, private, compiled, args.backend)
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            steps[name]()
        print(f"{name}: warm-up ({args.warmup} steps, compilation included) {time.perf_counter() - t0:.1f} s",
              flush=True)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)

    where = torch.cuda.get_device_name(0) if args.device == "cuda" else cpu_model_name()
    print(f"\n{args.model} {shape}; torch {torch.__version__}, backend {args.backend}, "
          f"{torch.get_num_threads()} threads, {where}")
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"  {name:15s} median {med[name] * 1e3:8.1f} ms  (min {min(t) * 1e3:.1f}, max {max(t) * 1e3:.1f}, "
              f"{len(t)} steps)")
    best = {name: min(t) for name, t in times.items()}
    print(f"  speed-up of the compiled DP step: {med['ours_eager'] / med['ours_compiled']:.2f}x by the medians, "
          f"{best['ours_eager'] / best['ours_compiled']:.2f}x by the fastest steps")
    if "plain_eager" in med:
        print(f"  compiled DP step / compiled non-private step: {med['ours_compiled'] / med['plain_compiled']:.2f}x;"
              f" eager: {med['ours_eager'] / med['plain_eager']:.2f}x")


if __name__ == "__main__":
    main()
