"""`train`: split the private data into shards and DP-train one compartment per shard on the shared public base;
`add`: DP-train a compartment for new data, without touching the others.

Each compartment is a `dpldm.train` run on its shard alone (same options: epsilon, delta, batch size, noise
multiplicity, backend, ...), through dpkernels.PrivacyEngine, storing only what it trained (LoRA adapters by
default). All compartments start from the same base, recorded by hash; delta is one for the whole run (default
1/N of the whole private training set, rounded down to a power of ten, at most 1e-5); the expected batch size of a
shard is the batch size of one model on all the data (--batch-size, default the config's) scaled by the shard's
share of the data, so every compartment has the sampling rate, and so the noise multiplier and epsilon, that one
model on all the data would have. A shard added later is scaled the same way, against the run's original N.

    python -m dpldm.compartments train --shard-by class --num-shards 2 --out runs/mnist/cdm-class2
    python -m dpldm.compartments add --run runs/mnist/cdm-class2 --name extra --data new_digits.npz
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpldm import data as data_mod
from dpldm import train as train_stage
from dpldm.common import add_config_args, config_from, images_tensor, private_classes
from dpldm.compartments import registry
from dpldm.compartments.accounting import composed_epsilon, privacy_report
from dpldm.compartments.public import train_public
from dpldm.compartments.router import router_hp, router_sigma, save_router, train_router
from dpldm.compartments.shards import KEYS, Shard, ShardError, check_name, load_sharded, run_data
from dpldm.compartments.store import ldm_id, read_meta, save_compartment
from dpldm.diffusion import encode, train_scheduler
from dpldm.models import load_autoencoder
from dpldm.runlog import RunLog

# dpldm.train options a compartment passes through unchanged (same meaning, per shard)
PASS_THROUGH = ("target_epsilon", "epochs", "max_physical_batch_size", "max_grad_norm", "noise_multiplicity",
                "trainable", "ablation", "lora_rank", "lr", "accountant", "backend")
FLAGS = ("secure_mode", "deterministic_noise")


def add_train_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    g = p.add_argument_group("DP training of each compartment (as in python -m dpldm.train)")
    g.add_argument("--target-epsilon", type=float)
    g.add_argument("--delta", type=float, help="one delta for every shard (default: from the whole private set)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="expected batch size of one model on all the data (default: the "
                                                  "config's); each shard gets it scaled by its share of the data")
    g.add_argument("--max-physical-batch-size", type=int)
    g.add_argument("--max-grad-norm", type=float)
    g.add_argument("--noise-multiplicity", type=int)
    g.add_argument("--trainable", choices=("lora", "attention"),
                   help="what a compartment trains (default lora: small, cheap to store and drop; add: the run's)")
    g.add_argument("--ablation", type=int)
    g.add_argument("--lora-rank", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--accountant", choices=("prv", "rdp", "gdp"), help="default prv (add: the run's)")
    g.add_argument("--backend", default="auto")
    g.add_argument("--secure-mode", action="store_true")
    g.add_argument("--deterministic-noise", action="store_true", help="NOT private: tests only (see dpldm.train)")
    g.add_argument("--base", help="shipped base model (default: the config's)")
    g.add_argument("--pretrained", type=Path, help="base LDM folder instead of a shipped base")
    g.add_argument("--autoencoder", type=Path, help="autoencoder folder instead of a shipped base's")
    g.add_argument("--no-dp", action="store_true", help="non-private compartments, for shards of PUBLIC data only: "
                                                        "plain training, no privacy claim, not in the accounting")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dpldm.compartments train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="private data (default: the config's): .npz or a folder of class folders")
    p.add_argument("--shard-by", choices=KEYS, default="class")
    p.add_argument("--num-shards", type=int, help="class: default one per class; random: required")
    p.add_argument("--shard-seed", type=int, default=0, help="random key: the permutation's seed")
    p.add_argument("--manifest", type=Path, help="manifest key: JSON {shard: [image paths or rows]} or CSV "
                                                   "`entry,shard` lines (dpldm/compartments/shards.py)")
    p.add_argument("--out", type=Path, help="run folder (default <runs>/<config>/compartments-<key><n>)")
    p.add_argument("--router", action="store_true", help="also DP-train a router (shard classifier on noisy "
                                                         "latents) for --rule router; its epsilon composes with every "
                                                         "compartment's")
    p.add_argument("--router-epsilon", type=float, help="the router's budget (default: the config's router.epsilon, "
                                                        "else 1)")
    add_train_args(p)
    return p


def add_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dpldm.compartments add",
                                description="DP-train a compartment for a new shard (new data), leaving the others "
                                            "untouched. Options default to the run's.")
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--name", required=True, help="the new shard's name")
    p.add_argument("--data", required=True, help="the new shard's data: .npz or a folder of class folders; all of it "
                                                 "is training data")
    add_train_args(p)
    return p


def shard_argv(args: argparse.Namespace, out: Path, batch_size: int, delta: float, ae_dir: Path, ldm_dir: Path
               ) -> list[str]:
    """dpldm.train arguments for one compartment: the options above plus the run's base, delta, batch size."""
    argv = ["--config", str(args.config), "--runs", str(args.runs), "--seed", str(args.seed), "--device", args.device,
            "--out", str(out), "--no-sample", "--fresh", "--batch-size", str(batch_size), "--delta", repr(delta),
            "--autoencoder", str(ae_dir), "--pretrained", str(ldm_dir)]
    for s in args.set:
        argv += ["--set", s]
    for key in PASS_THROUGH:
        if getattr(args, key) is not None:
            argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return argv + [f"--{f.replace('_', '-')}" for f in FLAGS if getattr(args, f)]


def train_compartment(cfg: dict[str, Any], args: argparse.Namespace, run: Path, shard: Shard, data: data_mod.DataSet,
                      batch_size: int, delta: float, base: dict[str, Any], log: RunLog) -> dict[str, Any]:
    """One DP fine-tuning on the shard alone (--no-dp: plain training, for public shards); keeps the trained
    tensors and the accountant history."""
    if args.no_dp:
        return public_compartment(cfg, args, run, shard, data, batch_size, base, log)
    work = run / "work" / shard.name
    targs = train_stage.parser().parse_args(shard_argv(args, work, batch_size, delta, Path(base["autoencoder"]),
                                                       Path(base["ldm"])))
    train_stage.fill_defaults(targs, cfg)
    log.print(f"compartment {shard.name}: {len(data.train.labels)} examples, expected batch {batch_size}")
    result, model = train_stage.run(cfg, targs, private=data)
    meta = {"shard": shard.name, "classes": shard.classes, "mode": targs.trainable, "lora_rank": targs.lora_rank,
            "ablation": targs.ablation, "base_id": base["id"], "accountant": targs.accountant, "delta": delta,
            "accountant_history": result["accountant_history"], "epsilon": result["epsilon"],
            "sigma": result["sigma"], "steps": result["steps"], "noise_seeding": result["noise_seeding"]}
    save_compartment(run / "compartments" / shard.name, model, meta)
    # the training log (per-step losses: not covered by the DP guarantee) stays apart from the releasable weights
    logs = run / "logs" / f"compartment-{shard.name}"
    logs.mkdir(parents=True, exist_ok=True)
    shutil.copy(work / "log.jsonl", logs / "log.jsonl")
    shutil.rmtree(work)  # its merged full-size copy (ldm/): the compartment keeps only what was trained
    if not any((run / "work").iterdir()):
        (run / "work").rmdir()
    return meta


def public_compartment(cfg: dict[str, Any], args: argparse.Namespace, run: Path, shard: Shard,
                       data: data_mod.DataSet, batch_size: int, base: dict[str, Any], log: RunLog) -> dict[str, Any]:
    hp = {k: getattr(args, k) if getattr(args, k, None) is not None else cfg["train"][k]
          for k in ("trainable", "ablation", "lora_rank", "epochs", "lr")}
    hp["batch_size"] = batch_size
    log.print(f"compartment {shard.name}: {len(data.train.labels)} PUBLIC examples, non-private (--no-dp)")
    model, steps = train_public(cfg, data, base, hp, args.seed, args.device)
    meta = {"shard": shard.name, "classes": shard.classes, "mode": hp["trainable"], "lora_rank": hp["lora_rank"],
            "ablation": hp["ablation"], "base_id": base["id"], "public": True, "steps": steps}
    save_compartment(run / "compartments" / shard.name, model, meta)
    return meta


def resolve_base(cfg: dict[str, Any], args: argparse.Namespace, log: RunLog) -> dict[str, Any]:
    targs = train_stage.parser().parse_args(["--config", str(args.config), "--runs", str(args.runs)]
                                            + (["--base", args.base] if args.base else [])
                                            + (["--pretrained", str(args.pretrained)] if args.pretrained else [])
                                            + (["--autoencoder", str(args.autoencoder)] if args.autoencoder else []))
    targs.set = args.set
    ae_dir, ldm_dir = train_stage.ensure_pretrained(targs, cfg, log)
    return {"autoencoder": str(ae_dir), "ldm": str(ldm_dir), "id": ldm_id(ldm_dir)}


def absolute(path: str | Path | None) -> str | None:
    """A path as recorded in the run: absolute when it exists (forget and evaluate read it again, maybe from
    another directory); a built-in data set's name as is."""
    return None if path is None else str(Path(path).resolve()) if Path(path).exists() else str(path)


def check_config(cfg: dict[str, Any]) -> None:
    if private_classes(cfg) != cfg["data"]["num_classes"]:
        raise SystemExit("error: compartments share the base's class embedder: the private label set must be the "
                         "base's (data.private_num_classes is set)")


def run(cfg: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Train every shard's compartment; returns the run's privacy report."""
    check_config(cfg)
    args.trainable, args.accountant = args.trainable or "lora", args.accountant or "prv"
    if args.no_dp and not args.data:
        raise SystemExit("error: --no-dp trains without privacy: it needs --data naming PUBLIC data (the config's "
                         "private data is never trained non-privately)")
    out: Path = args.out or Path(args.runs) / cfg["name"] / f"compartments-{args.shard_by}{args.num_shards or ''}"
    if (out / registry.REGISTRY).exists():
        raise SystemExit(f"error: {out} already holds a compartments run: use `add` for new shards, `forget` to drop "
                         "one, or another --out")
    try:
        private, shards, held_out = load_sharded(args.shard_by, args.data, cfg, args.num_shards, args.shard_seed,
                                                 args.manifest)
    except (data_mod.DataError, ShardError) as e:
        raise SystemExit(f"error: {e}") from e
    n = len(private.train.labels)
    delta = args.delta or train_stage.default_delta(n)
    full_batch = args.batch_size or cfg["train"]["batch_size"]
    log = RunLog(out / "logs" / "train", "compartments-train")  # an artifact: it describes every shard
    if any(held_out.values()):
        log.print("left out, in the held-out test split: " + ", ".join(f"shard {k}: {v}" for k, v in held_out.items()
                                                                      if v))
    base = resolve_base(cfg, args, log)
    reg = {"config": str(args.config), "set": args.set, "data": absolute(args.data),
           "key": args.shard_by, "num_shards": len(shards), "shard_seed": args.shard_seed, "base": base,
           "n_train": n, "batch_size": full_batch, "delta": delta, "accountant": args.accountant, "trainable": args.trainable,
           "shards": {s.name: {"classes": s.classes} for s in shards}, "forgotten": [],
           "manifest": absolute(args.manifest),
           "router": {"epsilon": args.router_epsilon or router_hp(cfg)["epsilon"], "backend": args.backend,
                      # the seed is kept only when the noise is deterministic anyway (tests): never for a private run
                      "noise_seed": args.seed if args.deterministic_noise else None} if args.router else None}
    lineage = registry.new_lineage()
    registry.record(lineage, "logs/train", [s.name for s in shards], "train")
    registry.save(out, reg, lineage)
    metas = {}
    for shard in shards:
        size = len(shard.index)
        batch = max(1, round(full_batch * size / n))
        metas[shard.name] = train_compartment(cfg, args, out, shard, shard.data(private), batch, delta, base, log)
        registry.record(lineage, f"compartments/{shard.name}", [shard.name], "train",
                        epsilon=metas[shard.name].get("epsilon"))
        registry.record(lineage, f"logs/compartment-{shard.name}", [shard.name], "train")
        registry.save(out, reg, lineage)
    if args.router:
        fit_router(cfg, out, reg, lineage, {s.name: s.data(private) for s in shards}, log)
        registry.save(out, reg, lineage)
    report = report_of(out)
    log.print(f"{len(shards)} compartments in {out}: epsilon per shard "
              + ", ".join(f"{k} {v:.3f}" for k, v in report["epsilon_per_shard"].items())
              + f"; overall (parallel composition) {report['epsilon']:.3f} at delta {delta:g}", **report)
    return report


def new_shard_data(path: str, cfg: dict[str, Any]) -> data_mod.DataSet:
    d = cfg["data"]
    p = Path(path)
    if not p.exists():
        raise data_mod.DataError(f"{p}: no such file or folder")
    split = (data_mod.from_npz(p, private_classes(cfg)) if p.is_file()
             else data_mod.from_folder(p, d["channels"], private_classes(cfg), d["image_size"])[0])
    empty = data_mod.Split(split.images[:0], split.labels[:0])  # all of it trains; nothing is evaluated here
    return data_mod.DataSet(split, empty, private_classes(cfg), str(p))


def add(args: argparse.Namespace) -> dict[str, Any]:
    """Train the compartment of a new shard with the run's config, base, delta, accountant and mode."""
    try:
        reg, lineage = registry.load(args.run)
    except registry.RunError as e:
        raise SystemExit(f"error: {e}") from e
    args.config, args.set = reg["config"], reg["set"]
    cfg = config_from(args)
    check_config(cfg)
    try:
        name = check_name(args.name)
        if name in reg["shards"]:
            raise ShardError(f"shard {name!r} already exists in {args.run}")
        data = new_shard_data(args.data, cfg)
    except (data_mod.DataError, ShardError) as e:
        raise SystemExit(f"error: {e}") from e
    base = reg["base"]
    if ldm_id(Path(base["ldm"])) != base["id"]:
        raise SystemExit(f"error: the base LDM {base['ldm']} changed since the run was created")
    if args.accountant not in (None, reg["accountant"]):
        raise SystemExit(f"error: --accountant {args.accountant}: the run accounts with {reg['accountant']}")
    args.accountant, args.trainable = reg["accountant"], args.trainable or reg["trainable"]
    log = RunLog(Path(args.run) / "logs" / f"add-{name}", "compartments-add")
    registry.record(lineage, f"logs/add-{name}", [name], "add")
    full_batch = args.batch_size or reg["batch_size"]
    batch = max(1, min(len(data.train.labels), round(full_batch * len(data.train.labels) / reg["n_train"])))
    meta = train_compartment(cfg, args, Path(args.run), Shard(name, np.arange(len(data.train.labels))), data,
                             batch, reg["delta"], base, log)
    reg["shards"][name] = {"classes": None, "data": absolute(args.data)}
    registry.record(lineage, f"compartments/{name}", [name], "add", epsilon=meta.get("epsilon"), data=str(args.data))
    registry.record(lineage, f"logs/compartment-{name}", [name], "add")
    if reg.get("router"):  # the router must know the new shard: trained again on all of them
        fit_router(cfg, Path(args.run), reg, lineage, shard_data(reg, cfg), log)
    registry.save(args.run, reg, lineage)
    return report_of(args.run)


def report_of(run: Path) -> dict[str, Any]:
    """Per-shard and overall epsilon: each compartment's history, composed with every router training its shard
    took part in (a router trained again after add/forget spends again: the old one may have been seen)."""
    reg, _ = registry.load(run)
    metas = {name: read_meta(Path(run) / "compartments" / name) for name in reg["shards"]}
    return privacy_report(metas, reg["delta"], reg["accountant"], reg.get("router_runs", []))


def shard_data(reg: dict[str, Any], cfg: dict[str, Any]) -> dict[str, data_mod.DataSet]:
    """The training data of the run's current shards, rebuilt from the key (same data, key, seed, manifest) and,
    for shards added later, from their own data."""
    private, keyed, _ = run_data(reg, cfg)
    out = {s.name: s.data(private) for s in keyed if s.name in reg["shards"]}
    for name, info in reg["shards"].items():
        if info.get("data"):
            out[name] = new_shard_data(info["data"], cfg)
    return out


def fit_router(cfg: dict[str, Any], run: Path, reg: dict[str, Any], lineage: dict[str, Any],
               data: dict[str, data_mod.DataSet], log: RunLog) -> dict[str, Any]:
    """DP-train the router on the private latents of `data`'s shards; saved in <run>/router, lineage: all of them."""
    hp, names = {**router_hp(cfg), "epsilon": reg["router"]["epsilon"]}, list(data)
    vae = load_autoencoder(Path(reg["base"]["autoencoder"]), cfg)
    zs = [encode(vae, images_tensor(d.train, cfg)) * vae.config.scaling_factor for d in data.values()]
    z = torch.cat(zs).contiguous()
    shard = torch.cat([torch.full((len(x),), i) for i, x in enumerate(zs)])
    sigma = router_sigma(hp["epsilon"], reg["delta"], len(z), hp, reg["accountant"])
    model, history = train_router(z, shard, len(names), train_scheduler(cfg), hp, sigma, reg["accountant"],
                                  noise_seed=reg["router"]["noise_seed"], backend=reg["router"]["backend"])
    epsilon = composed_epsilon([history], reg["delta"], reg["accountant"])
    meta = {"shards": names, "shares": [len(x) / len(z) for x in zs], "accountant_history": history,
            "epsilon": epsilon, "sigma": sigma}
    save_router(run / "router", model, meta)
    reg.setdefault("router_runs", []).append({"shards": names, "accountant_history": history})
    registry.record(lineage, "router", names, "router", epsilon=epsilon)
    log.print(f"router over shards {', '.join(names)}: sigma {sigma:.3f}, epsilon {epsilon:.3f}")
    return meta


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    return run(config_from(args), args)


def main_add(argv: list[str] | None = None) -> dict[str, Any]:
    return add(add_parser().parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
