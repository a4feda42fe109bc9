"""The largest batch each DP-SGD variant fits on one GPU, and its throughput there (issue 21, item 2c).

    python -m benchmarks.gpu_scale --json scale.json             # width 1024, T 256, depth 2, TF32 matmuls
    python -m benchmarks.gpu_scale --dim 256 --tokens 16 --batches 2 4 --device cpu   # a smoke run

For each variant (non-private, Opacus hooks, Opacus ghost, ours) and each batch size in turn (doubling), build
the all-trainable transformer stack of benchmarks/models.py, run --warmup steps then time --steps steps
(synchronised, median), and record examples/s and peak memory; a variant stops at its first out-of-memory
batch (recorded as such), or once a step takes longer than --max-step-s (recorded: not tried further), or
when --budget-s runs out. TF32 matmuls are on for every variant alike (--no-tf32 to turn them off): a
transformer at this width is trained that way on a GPU, and fp32 would make each step 4-8x longer.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch

from benchmarks.models import TransformerSize, build_transformer
from benchmarks.step_variants import VARIANTS, make_step, missing_requirement


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def try_batch(variant: str, size: TransformerSize, device: str, warmup: int, steps: int) -> dict:
    """One (variant, batch) trial: its median step time and peak memory, or oom=True."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    try:
        w = build_transformer(size, device)
        if device == "cuda":
            sync()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        step = make_step(variant, w)
        for _ in range(warmup):
            step()
        times = []
        for _ in range(steps):
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else None
    except torch.cuda.OutOfMemoryError as e:
        return {"variant": variant, "batch": size.batch, "oom": True, "error": str(e).splitlines()[0]}
    finally:
        step = w = None  # the model, hooks and activations go before the next trial
        _release()
    median = statistics.median(times)
    return {"variant": variant, "batch": size.batch, "oom": False, "median_step_s": median,
            "examples_per_s": size.batch / median, "peak_mem_bytes": peak}


def sweep(variants: list[str], batches: list[int], dim: int, tokens: int, depth: int, heads: int, device: str,
          warmup: int, steps: int, max_step_s: float, budget_s: float) -> list[dict]:
    t_end = time.monotonic() + budget_s
    rows = []
    for variant in variants:
        reason = missing_requirement(variant)
        if reason is not None:
            rows.append({"variant": variant, "skipped": reason})
            print(f"{variant}: skipped ({reason})", flush=True)
            continue
        for batch in batches:
            if time.monotonic() > t_end:
                rows.append({"variant": variant, "batch": batch, "stopped": "time budget spent"})
                print(f"{variant} B={batch}: time budget spent", flush=True)
                break
            row = try_batch(variant, TransformerSize(batch, tokens, dim, depth, heads), device, warmup, steps)
            rows.append(row)
            if row["oom"]:
                print(f"{variant} B={batch}: out of memory", flush=True)
                break
            peak = "n/a" if row["peak_mem_bytes"] is None else f"{row['peak_mem_bytes'] / 2**30:.1f} GiB"
            print(f"{variant} B={batch}: {row['median_step_s'] * 1e3:.1f} ms/step, {row['examples_per_s']:.0f} ex/s, "
                  f"peak {peak}", flush=True)
            if row["median_step_s"] > max_step_s:
                rows.append({"variant": variant, "batch": batch * 2, "stopped": f"step > {max_step_s} s"})
                break
    return rows


def table(rows: list[dict]) -> str:
    """Per variant: the largest batch that fitted, its throughput and memory, and where it stopped."""
    out = ["| variant | largest batch run | examples/s there | peak GiB there | stopped at |",
           "|---|---:|---:|---:|---|"]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        ok = [r for r in mine if r.get("oom") is False]
        end = next((r for r in mine if r.get("oom") or "stopped" in r or "skipped" in r), None)
        why = ("skipped: " + end["skipped"] if end and "skipped" in end else
               f"B={end['batch']}: " + ("out of memory" if end.get("oom") else end["stopped"]) if end else "end of list")
        if ok:
            best = ok[-1]
            peak = best["peak_mem_bytes"]
            out.append(f"| {variant} | {best['batch']} | {best['examples_per_s']:.0f} | "
                       f"{'n/a' if peak is None else f'{peak / 2**30:.1f}'} | {why} |")
        else:
            out.append(f"| {variant} | none | | | {why} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--batches", nargs="+", type=int, default=[64, 128, 256, 512, 1024, 2048, 4096])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--max-step-s", type=float, default=2.0)
    ap.add_argument("--budget-s", type=float, default=300.0, help="stop starting new trials after this long")
    ap.add_argument("--no-tf32", action="store_true")
    ap.add_argument("--json", help="write the rows and the setting here")
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = not args.no_tf32
    torch.backends.cudnn.allow_tf32 = not args.no_tf32
    rows = sweep(args.variants, args.batches, args.dim, args.tokens, args.depth, args.heads, args.device,
                 args.warmup, args.steps, args.max_step_s, args.budget_s)
    setting = {k: v for k, v in vars(args).items() if k != "json"}
    if args.device == "cuda":
        setting["gpu"] = torch.cuda.get_device_name(0)
    setting["torch"] = torch.__version__
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setting": setting, "rows": rows}, f, indent=1)
    print(f"\ntransformer stack, all trainable: width {args.dim}, {args.tokens} tokens, depth {args.depth}; "
          f"TF32 {'off' if args.no_tf32 else 'on'}; {setting.get('gpu', args.device)}, torch {torch.__version__}")
    print(table(rows))


if __name__ == "__main__":
    main()
