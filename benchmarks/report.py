"""Turn pytest-benchmark JSON files into the markdown tables of benchmarks/RESULTS.md.

    python -m benchmarks.report step_cpu.json [more.json ...]

Step benchmarks (extra_info has model/variant): one table per group with the median step time,
throughput (examples/s = batch / median), peak memory, and ratios vs the non-private step and vs Opacus;
then the issue goals measured against those ratios (reported, never asserted). Every other benchmark
(e.g. the kernel suites) is listed in a plain table with its scalar extra_info.
The machine comes from the JSON (conftest.py adds the lscpu model name, GPU, torch version, threads).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

VARIANT_ORDER = ("nonprivate", "opacus_hooks", "opacus_ghost", "ours", "ours_triton", "ours_cuda", "ours_tf32x3")
MIB = 2**20

# (device, model) -> [(description, ratio key, comparison, threshold)]; ratio keys are computed in _ratios.
GOALS: dict[tuple[str, str], list[tuple[str, str, str, float]]] = {
    ("cpu", "transformer"): [
        ("issue 2: ours step time / non-private", "time_vs_nonprivate", "<=", 1.3),
        ("issue 2: Opacus ghost step time / ours", "speedup_vs_opacus_ghost", ">=", 1.5),
        ("issue 2: ours peak memory / non-private", "mem_vs_nonprivate", "<=", 1.2),
    ],
    **{
        ("cuda", model): [
            (f"issue {issue}: ours throughput / non-private", "throughput_vs_nonprivate", ">=", throughput),
            (f"issue {issue}: ours throughput / Opacus ghost", "speedup_vs_opacus_ghost", ">=", 2.0),
            (f"issue {issue}: ours throughput / Opacus hooks", "speedup_vs_opacus_hooks", ">=", 3.0),
            (f"issue {issue}: ours peak memory / non-private", "mem_vs_nonprivate", "<=", 1.1),
        ]
        for model, issue, throughput in (("transformer", 21, 0.85), ("unet", 3, 0.9), ("ldm", 21, 0.95))
    },
}


def load(paths: list[str]) -> tuple[list[dict], list[dict]]:
    """All benchmarks of all files, and each file's machine_info."""
    benches, machines = [], []
    for path in paths:
        data = json.loads(Path(path).read_text())
        machines.append(data.get("machine_info", {}))
        for b in data.get("benchmarks", []):
            b["_datetime"] = data.get("datetime", "")
            benches.append(b)
    return benches, machines


def machine_line(m: dict) -> str:
    parts = [m.get("cpu_model") or m.get("cpu", {}).get("brand_raw") or m.get("processor") or "unknown CPU"]
    if m.get("gpu"):
        parts.insert(0, f"GPU {m['gpu']} (CUDA {m.get('cuda')})")
    parts.append(f"torch {m.get('torch', '?')} ({m.get('torch_threads', '?')} threads)")
    for lib in ("opacus", "diffusers", "triton"):
        if m.get(lib):
            parts.append(f"{lib} {m[lib]}")
    parts.append(f"python {m.get('python_version', '?')}")
    return "; ".join(parts)


# (label, _ratios key) of the ratio line under each step table
RATIO_NAMES = (
    ("time x non-private", "time_vs_nonprivate"),
    ("speedup vs Opacus ghost", "speedup_vs_opacus_ghost"),
    ("speedup vs Opacus hooks", "speedup_vs_opacus_hooks"),
    ("memory x non-private", "mem_vs_nonprivate"),
    ("memory x Opacus ghost", "mem_vs_opacus_ghost"),
    ("memory x Opacus hooks", "mem_vs_opacus_hooks"),
)


def _fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def _peak(b: dict) -> float | None:
    v = b["extra_info"].get("peak_mem_bytes")
    return None if v is None else float(v)


def _ratios(rows: dict[str, dict], ours_variant: str = "ours") -> dict[str, float | None]:
    """One of our variants against the others: the quantities the goals are stated in."""
    ours, base = rows.get(ours_variant), rows.get("nonprivate")
    r: dict[str, float | None] = {}
    if ours is None:
        return r
    t_ours = ours["stats"]["median"]
    if base is not None:
        r["time_vs_nonprivate"] = t_ours / base["stats"]["median"]
        r["throughput_vs_nonprivate"] = base["stats"]["median"] / t_ours
        p_ours, p_base = _peak(ours), _peak(base)
        r["mem_vs_nonprivate"] = p_ours / p_base if p_ours is not None and p_base else None
    for other in ("opacus_ghost", "opacus_hooks"):
        if other in rows:
            r[f"speedup_vs_{other}"] = rows[other]["stats"]["median"] / t_ours
            p_ours, p_other = _peak(ours), _peak(rows[other])
            r[f"mem_vs_{other}"] = p_ours / p_other if p_ours is not None and p_other else None
    return r


def step_table(group: str, benches: list[dict]) -> list[str]:
    rows = {b["extra_info"]["variant"]: b for b in benches}
    first = benches[0]["extra_info"]
    base = rows.get("nonprivate")
    t_base = base["stats"]["median"] if base else None
    p_base = _peak(base) if base else None
    method = next((b["extra_info"].get("method") for b in benches if b["extra_info"].get("method")), None)
    workload = f"Workload: {first.get('shape', '?')}; batch {first.get('batch_size')}; peak memory: {method or 'none'}"
    out = [f"### {group}", "", workload, ""]
    out.append("| variant | median step (ms) | IQR (ms) | rounds | examples/s | time x non-private "
               "| peak mem (MiB) | mem x non-private | aten GFLOP/step |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for variant in VARIANT_ORDER:
        b = rows.get(variant)
        if b is None:
            out.append(f"| {variant} | not run | | | | | | | |")
            continue
        s, batch, peak = b["stats"], b["extra_info"]["batch_size"], _peak(b)
        time_ratio = s["median"] / t_base if t_base else None
        peak_mib = peak / MIB if peak is not None else None
        mem_ratio = peak / p_base if peak is not None and p_base else None
        out.append(
            f"| {variant} | {s['median'] * 1e3:.1f} | {s['iqr'] * 1e3:.1f} | {s['rounds']} | {batch / s['median']:.1f} "
            f"| {_fmt(time_ratio)} | {_fmt(peak_mib, '.1f')} | {_fmt(mem_ratio)} "
            f"| {_fmt(b['extra_info'].get('aten_gflop'), '.4g')} |"
        )
    out.append("")
    out.append("aten GFLOP/step: FLOPs of one step in aten ops (torch.utils.flop_counter); dpkernels ops not counted.")
    for ours_variant in (v for v in VARIANT_ORDER if v.startswith("ours") and v in rows):
        ratios = _ratios(rows, ours_variant)
        out += ["", f"{ours_variant}: " + ", ".join(f"{name} {_fmt(ratios.get(key))}" for name, key in RATIO_NAMES)]
    r = _ratios(rows)
    goals = GOALS.get((first.get("device"), first.get("model")), [])
    if goals and first.get("size") == "full":
        out += ["", "Goals (measured, not asserted):", ""]
        for desc, key, op, threshold in goals:
            value = r.get(key)
            met = "n/a" if value is None else ("met" if (value <= threshold if op == "<=" else value >= threshold)
                                                 else "NOT met")
            out.append(f"- {desc}: {_fmt(value)} (goal {op} {threshold}): {met}")
    return out + [""]


def other_table(group: str, benches: list[dict]) -> list[str]:
    out = [f"### {group}", "", "| benchmark | median (ms) | rounds | extra |", "|---|---:|---:|---|"]
    for b in sorted(benches, key=lambda b: b["name"]):
        extra = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in b.get("extra_info", {}).items() if isinstance(v, (int, float, str)) and len(str(v)) < 40
        )
        out.append(f"| {b['name']} | {b['stats']['median'] * 1e3:.3f} | {b['stats']['rounds']} | {extra} |")
    return out + [""]


def render(paths: list[str]) -> str:
    benches, machines = load(paths)
    lines = ["## Machine", ""]
    for m in {machine_line(m) for m in machines}:
        lines.append(f"- {m}")
    lines.append("")
    groups: dict[str, list[dict]] = defaultdict(list)
    for b in benches:
        groups[b.get("group") or b["name"]].append(b)
    step_groups = {g: bs for g, bs in groups.items() if all("variant" in b.get("extra_info", {}) for b in bs)}
    for group in sorted(groups, key=lambda g: (g not in step_groups, g)):
        lines += (step_table if group in step_groups else other_table)(group, groups[group])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="pytest-benchmark JSON -> markdown tables")
    parser.add_argument("json", nargs="+", help="files written by pytest --benchmark-json")
    args = parser.parse_args(argv)
    print(render(args.json))


if __name__ == "__main__":
    main()
