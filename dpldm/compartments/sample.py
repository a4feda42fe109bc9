"""`sample`: draw from the mixture of the compartments a user may access, with per-sample attribution.

Only the compartments named by --shards (or by the user's entry in a rights file) are read from disk: the output
depends on them and the public base alone. The mixture prior lambda_{i,c}: with a class key, 1 for the shards that
hold class c (public: it follows from the key), so a class no accessible shard holds cannot be sampled and is
reported; with other keys, uniform over the accessible shards. Per sample, the weights w_i are saved (their average
over the sampling steps and their final value) with the images, and attribution.png plots the mean w_i of each
class against the sampling step (CDM's Figure 1).

The base model's files are hashed again before anything is loaded (a changed base is refused, not used). The
samples folder is recorded in the lineage, with the shards it derives from, before anything is written into it. A
name already used is refused: its folder may hold files of an earlier request (attribution, evaluation, log lines)
derived from other shards; --overwrite deletes that folder first.

    python -m dpldm.compartments sample --run runs/mnist/cdm-class2 --shards 0,1 --rule density
    python -m dpldm.compartments sample --run RUN --rights rights.json --user alice
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpldm.common import seed_all
from dpldm.compartments import registry
from dpldm.compartments.compose import compose_sample
from dpldm.compartments.pipeline_base import CLASS_NAMES
from dpldm.compartments.router import RouterWeights, load_router
from dpldm.compartments.rules import composition_rule, rule_names, rules_help
from dpldm.compartments.store import base_vae, check_base, load_compartment
from dpldm.data import from_model_tensor
from dpldm.diffusion import decode_latents
from dpldm.models import CheckpointError
from dpldm.runlog import RunLog, progress
from dpldm.sample import save_grid

RIGHTS_HELP = "JSON {user: [shard names]}: who may sample from which compartments"
SAMPLES_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # one folder under samples/, never a path


def parser() -> argparse.ArgumentParser:
    """The command line of `python -m dpldm.compartments sample`.

    Returns:
        The parser.
    """
    p = argparse.ArgumentParser(prog="python -m dpldm.compartments sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="compartments run folder")
    p.add_argument("--shards", help="comma-separated shard names (default: all of the run's)")
    p.add_argument("--rights", type=Path, help=RIGHTS_HELP)
    p.add_argument("--user", help="with --rights: sample from this user's shards")
    p.add_argument("--rule", choices=rule_names(), default="density", help=f"mixture weights: {rules_help()}")
    p.add_argument("--name", help="samples/<name>/ (default: <rule>-<shards>)")
    p.add_argument("--overwrite", action="store_true", help="replace samples/<name>/ if it exists (deleted first, "
                                                            "with its attribution and evaluation)")
    p.add_argument("--per-class", type=int)
    p.add_argument("--classes", help="comma-separated classes to sample (default: all the shards can give)")
    p.add_argument("--ddim-steps", type=int)
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def allowed_shards(args: argparse.Namespace, reg: dict[str, Any]) -> list[str]:
    """The shards a request may use: --shards, or the user's in --rights; by default every trained shard.

    Args:
        args: the parsed command line.
        reg: the run's registry.

    Returns:
        Their names, in the order given, each once.

    Raises:
        RunError: conflicting options, no shard, or a shard unknown or not trained.
    """
    if args.rights or args.user:
        if not (args.rights and args.user) or args.shards:
            raise registry.RunError("pass --rights FILE with --user NAME (and no --shards)")
        names = registry.rights_shards(args.rights, args.user)
    else:
        names = args.shards.split(",") if args.shards else registry.trained(reg)
    if not names:
        raise registry.RunError("no shards to sample from")
    return registry.check_shards(reg, sorted(set(names), key=names.index))


def class_prior(reg: dict[str, Any], names: list[str], num_classes: int) -> torch.Tensor:
    """The mixture prior of each class.

    Args:
        reg: the run's registry (a class key records each shard's classes).
        names: the shards sampled from.
        num_classes: the number of classes.

    Returns:
        lambda [num_classes, n]: with a class key, 1 for the shards that hold each class, else 0; otherwise
        uniform.
    """
    prior = torch.ones(num_classes, len(names))
    for i, name in enumerate(names):
        classes = reg["shards"][name].get("classes")
        if classes is not None:
            prior[:, i] = 0.0
            prior[classes, i] = 1.0
    return prior


def attribution_plot(weights: np.ndarray, labels: np.ndarray, names: list[str], path: Path) -> None:
    """One panel per class: mean w_i against the sampling step, a line per compartment (PIL, no plotting stack).

    Args:
        weights: [S, B, n], the weights of every sample at every step.
        labels: [B].
        names: the shards, in the weights' order.
        path: the PNG to write.
    """
    from PIL import Image, ImageDraw, ImageFont

    classes = list(np.unique(labels))
    w, h, pad = 220, 140, 28
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
    img = Image.new("RGB", (w * min(5, len(classes)), (h + pad) * ((len(classes) + 4) // 5) + 20), "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default(size=11)
    steps = weights.shape[0]
    for k, c in enumerate(classes):
        x0, y0 = (k % 5) * w + pad, (k // 5) * (h + pad) + pad
        pw, ph = w - pad - 8, h - 20
        draw.rectangle([x0, y0, x0 + pw, y0 + ph], outline="black")
        draw.text((x0, y0 - 14), f"class {c}: mean w vs step", fill="black", font=font)
        mean = weights[:, labels == c].mean(1)  # [S, n]
        for i in range(mean.shape[1]):
            pts = [(x0 + pw * s / max(1, steps - 1), y0 + ph * (1 - mean[s, i])) for s in range(steps)]
            draw.line(pts, fill=colours[i % len(colours)], width=2)
    legend = "  ".join(f"shard {n}" for n in names)
    draw.text((pad, img.height - 16), legend, fill="black", font=font)
    for i, n in enumerate(names):  # colour swatches under the legend's names
        x = pad + font.getlength("  ".join(f"shard {m}" for m in names[:i]) + ("  " if i else ""))
        draw.line([(x, img.height - 3), (x + font.getlength(f"shard {n}"), img.height - 3)],
                  fill=colours[i % len(colours)], width=3)
    img.save(path)


def requested_classes(option: str | None, prior: torch.Tensor, names: list[str]) -> tuple[list[int], list[int]]:
    """The classes a request asks for, split by whether the accessible shards can give them.

    Args:
        option: --classes (comma-separated), or None for every class.
        prior: class_prior's lambda [num_classes, n].
        names: the accessible shards, for the message.

    Returns:
        (the classes to sample, those asked for that no accessible shard holds).

    Raises:
        RunError: a class out of range, or none that can be sampled.
    """
    num_classes = len(prior)
    wanted = [int(c) for c in option.split(",")] if option else list(range(num_classes))
    bad = [c for c in wanted if not 0 <= c < num_classes]
    if bad:
        raise registry.RunError(f"--classes: {bad} outside 0..{num_classes - 1}")
    missing = [c for c in wanted if prior[c].sum() == 0]
    classes = [c for c in wanted if c not in missing]
    if not classes:
        raise registry.RunError(f"shards {', '.join(names)} hold none of the classes asked for")
    return classes, missing


def load_run_router(run: Path, names: list[str], device: str) -> tuple[RouterWeights, list[str]]:
    """The run's router, restricted to `names`. Refused unless the user may access every shard it was trained on:
    its weights carry information from all of them, and the output must depend on the accessible shards only.

    Args:
        run: the run folder.
        names: the shards of the request.
        device: where to run the router.

    Returns:
        (its weights for `names`, the shards it was trained on).

    Raises:
        RunError: no router, a corrupt one, or one trained on a shard outside `names`.
    """
    if not (run / "router" / "router.json").is_file():
        raise registry.RunError(f"{run} has no router: train the run with --router, or sample with --rule density")
    try:
        model, meta = load_router(run / "router")
    except CheckpointError as e:
        raise registry.RunError(str(e)) from e
    outside = [s for s in meta["shards"] if s not in names]
    if outside:
        raise registry.RunError(f"--rule router: the router was trained on shards {', '.join(outside)} too, which "
                                "this request may not use; --rule density needs nothing but the accessible shards")
    return RouterWeights(model.to(device), meta["shards"], meta["shares"], names), list(meta["shards"])


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Sample from the composed compartments a request may use, and save images, weights, grid and attribution.

    Args:
        args: the parsed command line.

    Returns:
        result.json's content.

    Raises:
        RunError: a request the run cannot serve (see the module docstring).
    """
    t0 = time.time()
    reg, lineage = registry.load(args.run)
    cfg = registry.config_of(reg)
    names = allowed_shards(args, reg)
    hp = cfg["sample"]
    per_class = args.per_class or hp["per_class"]
    steps = args.ddim_steps or hp["ddim_steps"]
    guidance = hp["guidance_scale"] if args.guidance_scale is None else args.guidance_scale
    batch_size = args.batch_size or hp["batch_size"]
    prior = class_prior(reg, names, cfg["data"]["num_classes"])
    classes, missing = requested_classes(args.classes, prior, names)
    name = args.name or f"{args.rule}-{'_'.join(names)}"
    if not SAMPLES_NAME.fullmatch(name):
        raise registry.RunError(f"--name {name!r}: use letters, digits, '.', '_' or '-' (not starting with '.')")
    artifact, out = f"samples/{name}", Path(args.run) / "samples" / name
    if (registry.artifact_paths(args.run, artifact) or artifact in lineage["artifacts"]) and not args.overwrite:
        raise registry.RunError(f"samples {name!r} exist in {args.run}: pass another --name, or --overwrite to "
                                "replace them (their folder, attribution and evaluation included, is deleted first)")
    base = reg["base"]
    try:
        check_base(base)  # every compartment is a difference to this base: a changed one is never used silently
        models = [load_compartment(Path(args.run) / "compartments" / n, base, cfg).to(args.device) for n in names]
        vae = base_vae(base, cfg).to(args.device)
    except CheckpointError as e:
        raise registry.RunError(str(e)) from e
    router, router_shards = None, []
    if composition_rule(args.rule).needs_router:
        router, router_shards = load_run_router(Path(args.run), names, args.device)
    used = sorted({n for i, n in enumerate(names) if prior[classes, i].sum() > 0} | set(router_shards))
    registry.remove_artifact(args.run, lineage, artifact)  # --overwrite: nothing of the earlier request survives
    # recorded before anything is written: a kill while sampling leaves files that forget can trace
    registry.record(lineage, artifact, used, "sample", rule=args.rule)
    registry.save(args.run, reg, lineage)
    log = RunLog(out, "compartments-sample")
    if missing:
        log.print(f"classes {missing}: no accessible shard holds them, not sampled")
    gen = seed_all(args.seed)
    labels = torch.tensor(classes).repeat_interleave(per_class)
    images, w_steps = [], []
    bar = progress(len(labels), f"sample ({args.rule}, shards {','.join(names)})")
    # batches of one class: the compartments with lambda 0 for it are not run
    chunks = [(c, i) for c in classes for i in range(0, per_class, batch_size)]
    for c, i in chunks:
        y = torch.full((min(batch_size, per_class - i),), c)
        comp = compose_sample(models, cfg, y, prior[y], args.rule, steps, guidance, generator=gen, router=router)
        x = decode_latents(vae, comp.latents)
        images.append(from_model_tensor(x, cfg["data"]["image_size"]))
        w_steps.append(comp.weights.numpy())
        bar.update(len(y))
    bar.close()
    imgs, labs, weights = np.concatenate(images), labels.numpy(), np.concatenate(w_steps, axis=1)  # [S, B, n]
    np.savez_compressed(out / "samples.npz", images=imgs, labels=labs, shards=np.array(names),
                        weights=weights.astype(np.float16), weights_mean=weights.mean(0), weights_final=weights[-1])
    save_grid(imgs, labs, out / "grid.png", hp.get("grid_per_row", 10), hp.get("grid_scale", 4),
              names=cfg["data"].get(CLASS_NAMES))  # a pipeline's rows named by class (public: they fill the prompt)
    attribution_plot(weights, labs, names, out / "attribution.png")
    result = {"shards": names, "trained_on": used, "rule": args.rule, "classes": classes, "not_sampled": missing,
              "per_class": per_class, "ddim_steps": steps, "guidance_scale": guidance,
              "mean_weight_per_shard": dict(zip(names, weights.mean((0, 1)).tolist(), strict=True)),
              "samples": str(out / "samples.npz"), "wall_s": time.time() - t0}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    log.print(f"{len(labs)} samples from shards {', '.join(names)} ({args.rule}) -> {out}")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """The command line: errors become one line and an exit status.

    Args:
        argv: the arguments (default sys.argv[1:]).

    Returns:
        run's result.
    """
    return registry.cli(parser(), run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
