"""`train`: split the private data into shards and DP-train one compartment per shard on the shared public base;
`add`: DP-train a compartment for new data, without touching the others.

Each compartment is a `dpldm.train` run on its shard alone (same options: epsilon, delta, batch size, noise
multiplicity, backend, ...), through dpkernels.PrivacyEngine, storing only what it trained (LoRA adapters by
default). All compartments start from the same base, recorded by hash; delta is one for the whole run (default
1/N of the whole private training set, rounded down to a power of ten, at most 1e-5); the expected batch size of a
shard is the batch size of one model on all the data (--batch-size, default the config's) scaled by the shard's
share of the data, so that every compartment has the sampling rate one model on all the data would have,
q = 1/ceil(N/B), and so its noise multiplier. dpldm.train samples a shard of n_shard examples with batch b at rate
1/ceil(n_shard/b), so b is chosen to make that exactly q (batch_for); a shard too small for any b to give it
cannot: one of at most ceil(N/B) examples is sampled at 1/n_shard (a shard of one example is in every batch,
q = 1). Its noise multiplier is calibrated for its own rate, so it still spends exactly the target epsilon, in
fewer and noisier steps; each shard's rate is recorded (compartments.json) and a rate more than 10% off the whole
data's is reported before training. A shard added later is scaled the same way, against the run's original N.

Before anything is trained, every shard is checked (empty shards, batch sizes, reachable epsilon) and registered
with the options it is trained with, and every folder it will write is recorded in the lineage. A run killed while
training (power loss, SIGKILL) is continued with `train --resume --out RUN`: finished shards are kept, the shard
that was training continues from its last checkpoint (dpldm.train --resume: the same private noise and sampling
streams, the accountant history continued), the others start. Until then `sample` serves the trained shards and
`forget` can drop any shard, trained or not, with its private checkpoint.

`add` refuses data that holds an example already in one of the run's shards (same image content): an example in
two compartments pays twice, and forgetting one shard would not forget it.

    python -m dpldm.compartments train --shard-by class --num-shards 2 --out runs/mnist/cdm-class2
    python -m dpldm.compartments train --resume --out runs/mnist/cdm-class2       # after a kill
    python -m dpldm.compartments add --run runs/mnist/cdm-class2 --name extra --data new_digits.npz
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from dpldm import data as data_mod
from dpldm import train as train_stage
from dpldm import warmup
from dpldm.calibration import batches_per_epoch, noise_multiplier, sample_rate
from dpldm.checkpoint import checkpoint_dir, latest_checkpoint
from dpldm.common import add_config_args, config_from, images_tensor, private_classes
from dpldm.compartments import pipeline_base, registry
from dpldm.compartments.accounting import composed_epsilon, privacy_report
from dpldm.compartments.public import train_public
from dpldm.compartments.registry import RunError
from dpldm.compartments.router import router_hp, router_sigma, save_router, train_router
from dpldm.compartments.shards import (
    KEYS,
    Shard,
    ShardError,
    check_name,
    example_hashes,
    load_sharded,
    overlap,
    run_data,
)
from dpldm.compartments.store import (
    autoencoder_id,
    base_vae,
    check_base,
    ldm_id,
    read_meta,
    save_compartment,
    stored,
)
from dpldm.diffusion import encode_latents, train_scheduler
from dpldm.runlog import RunLog

# dpldm.train options a compartment passes through unchanged (same meaning, per shard)
PASS_THROUGH = ("target_epsilon", "epochs", "max_physical_batch_size", "max_grad_norm", "noise_multiplicity",
                "trainable", "ablation", "lora_rank", "lr", "accountant", "backend", "checkpoint_every")
FLAGS = ("secure_mode", "deterministic_noise")
# what a shard is trained with, recorded when it is registered: `train --resume` trains it with exactly these
OPTIONS = ("config", "set", "runs", "seed", *PASS_THROUGH, *FLAGS, "no_dp")
RATE_TOLERANCE = 0.1  # a shard's sampling rate this far (relative) from the whole data's is reported


def add_train_args(p: argparse.ArgumentParser) -> None:
    """The options `train` and `add` share: the config, and how each compartment is DP-trained.

    Args:
        p: the parser to add them to.
    """
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
    g.add_argument("--checkpoint-every", type=int, help="logical steps between a compartment's checkpoints, what a "
                                                        "resumed run continues from (default: dpldm.train's)")
    g.add_argument("--secure-mode", action="store_true")
    g.add_argument("--deterministic-noise", action="store_true", help="NOT private: tests only (see dpldm.train)")
    g.add_argument("--base", help="shipped base model (default: the config's)")
    g.add_argument("--pretrained", type=Path, help="base LDM folder instead of a shipped base")
    g.add_argument("--autoencoder", type=Path, help="autoencoder folder instead of a shipped base's")
    g.add_argument("--no-dp", action="store_true", help="non-private compartments, for shards of PUBLIC data only: "
                                                        "plain training, no privacy claim, not in the accounting")


def parser() -> argparse.ArgumentParser:
    """The command line of `python -m dpldm.compartments train`.

    Returns:
        The parser.
    """
    p = argparse.ArgumentParser(prog="python -m dpldm.compartments train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="private data (default: the config's): .npz or a folder of class folders")
    p.add_argument("--shard-by", choices=KEYS, default="class")
    p.add_argument("--num-shards", type=int, help="class: default one per class; random: required")
    p.add_argument("--shard-seed", type=int, default=0, help="random key: the permutation's seed")
    p.add_argument("--manifest", type=Path, help="manifest key: JSON {shard: [image paths or rows]} or CSV "
                                                   "`entry,shard` lines (dpldm/compartments/shards.py)")
    p.add_argument("--out", type=Path, help="run folder (default <runs>/<config>/compartments-<key><n>)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out with the settings "
                                                         "it was started with (pass only --out, and --device)")
    p.add_argument("--router", action="store_true", help="also DP-train a router (shard classifier on noisy "
                                                         "latents) for --rule router; its epsilon composes with every "
                                                         "compartment's")
    p.add_argument("--router-epsilon", type=float, help="the router's budget (default: the config's router.epsilon, "
                                                        "else 1)")
    text = p.add_argument_group("compartments of a diffusers pipeline (dpldm/compartments/pipeline_base.py)")
    text.add_argument("--pipeline", help="a local text-conditioned diffusers pipeline folder, or the name of a shipped "
                                         "pipeline base: the base of every compartment (with --data FOLDER of class "
                                         "sub-folders and --prompt)")
    text.add_argument("--prompt", help="with --pipeline: class c's condition, e.g. 'a photo of a {label}' ({label}: "
                                       "its folder's name)")
    add_train_args(p)
    return p


def add_parser() -> argparse.ArgumentParser:
    """The command line of `python -m dpldm.compartments add`.

    Returns:
        The parser.
    """
    p = argparse.ArgumentParser(prog="python -m dpldm.compartments add",
                                description="DP-train a compartment for a new shard (new data), leaving the others "
                                            "untouched. Options default to the run's. Data already in one of the "
                                            "run's shards (the same image) is refused.")
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--name", required=True, help="the new shard's name")
    p.add_argument("--data", required=True, help="the new shard's data: .npz or a folder of class folders; all of it "
                                                 "is training data")
    add_train_args(p)
    return p


class HeldLog(RunLog):
    """A log kept in memory until the run folder may be written: nothing is written before the registry and the
    lineage that account for it."""

    def __init__(self, stage: str) -> None:  # no folder, no file (yet)
        self.stage, self.t0, self.records = stage, time.time(), []

    def log(self, **fields: Any) -> None:
        """Keep a record until into() writes it."""
        self.records.append(fields)

    def into(self, log: RunLog) -> RunLog:
        """Write the records kept so far to `log`.

        Args:
            log: the run's log, now that its folder may be written.

        Returns:
            `log`, to log on.
        """
        for fields in self.records:
            log.log(**fields)
        return log


def shard_options(args: argparse.Namespace, out: Path, batch_size: int, delta: float, base: dict[str, Any],
                  resume: bool = False) -> train_stage.TrainOptions:
    """dpldm.train options for one compartment: the options above plus the run's base, delta, batch size.

    Args:
        args: the shard's options (shard_args).
        out: the shard's dpldm.train run folder (<run>/work/<shard>).
        batch_size: the shard's expected batch size (batch_for).
        delta: the run's delta.
        base: the run's base (resolve_base, or a pipeline's: pipeline_base.start).
        resume: continue the checkpoint in `out`; else discard whatever a killed run left there (--fresh).

    Returns:
        The options (unset ones are the config's: dpldm.train fills them).
    """
    given = {key: getattr(args, key) for key in PASS_THROUGH if getattr(args, key) is not None}
    where = ({"pipeline": Path(base["pipeline"]), "prompt": base["prompt"]} if base.get("pipeline")
             else {"autoencoder": Path(base["autoencoder"]), "pretrained": Path(base["ldm"])})
    return train_stage.TrainOptions(
        config=str(args.config), set=list(args.set), runs=Path(args.runs), seed=args.seed, device=args.device,
        out=out, no_sample=True, resume=resume, fresh=not resume, batch_size=batch_size, delta=delta,
        **where, **given, **{f: True for f in FLAGS if getattr(args, f)})


def options_of(args: argparse.Namespace) -> dict[str, Any]:
    """The options a shard is trained with, as recorded for --resume (paths absolute).

    Args:
        args: parser() or add_parser() arguments.

    Returns:
        {option: value} for OPTIONS.
    """
    opts = {k: getattr(args, k, None) for k in OPTIONS}
    opts["config"], opts["runs"] = absolute(opts["config"]), absolute(opts["runs"])
    return opts


def shard_args(options: dict[str, Any], device: str) -> argparse.Namespace:
    """The arguments a shard is trained with, from the options it was registered with.

    Args:
        options: the registered options (options_of); those missing are None.
        device: where to train.

    Returns:
        The arguments shard_options and public_compartment read.
    """
    return argparse.Namespace(**{**{k: None for k in OPTIONS}, **options, "device": device})


def batch_for(size: int, full_batch: int, n: int) -> int:
    """A shard's batch size b for dpldm.train, whose sampling rate is then 1/ceil(size/b): chosen so that this is
    the rate of one model on all the data, 1/m with m = ceil(n/full_batch) batches per epoch, whenever some b gives
    it (always when size >= m(m-1)); else the nearest rate. Among those, the b closest to the whole data's batch
    scaled by the shard's share. A shard of at most m examples gets b = 1 (rate 1/size: one example, q = 1).

    Args:
        size: the shard's number of training examples.
        full_batch: the expected batch of one model on all the data (--batch-size).
        n: the number of training examples of all the data (the run's N).

    Returns:
        b.
    """
    m = batches_per_epoch(n, full_batch)
    if size <= m:
        return 1
    # ceil(size/b) == m exactly for size/m <= b < size/(m-1): search around that interval
    lo, hi = max(1, size // m - 1), min(size, size // max(1, m - 1) + 2)
    return min(range(lo, hi + 1),
               key=lambda b: (abs(sample_rate(size, b) - 1 / m), abs(b - full_batch * size / n)))


def data_digest(data: data_mod.DataSet) -> str:
    """sha256 over a shard's training examples (images and labels, in order): the same data, or not.

    Args:
        data: the shard's data.

    Returns:
        The hex digest.
    """
    h = hashlib.sha256()
    for e, y in zip(example_hashes(data.train), data.train.labels.tolist(), strict=True):
        h.update(f"{e}:{y};".encode())
    return h.hexdigest()


def stored_compartment(folder: Path) -> dict[str, Any] | None:
    """The meta of a complete compartment in `folder` (weights matching their sha256), else None.

    Args:
        folder: <run>/compartments/<shard>.

    Returns:
        Its compartment.json, or None.
    """
    return read_meta(folder) if stored(folder) else None


def train_compartment(cfg: dict[str, Any], args: argparse.Namespace, run: Path, name: str,
                      classes: list[int] | None, data: data_mod.DataSet, batch_size: int, delta: float,
                      base: dict[str, Any], log: RunLog) -> dict[str, Any]:
    """One DP fine-tuning on the shard alone (--no-dp: plain training, for public shards); keeps the trained
    tensors and the accountant history. Continues what a killed run left in <run>/work/<name>: its checkpoint
    (resumed), or a compartment already stored (kept).

    Args:
        cfg: the config.
        args: the shard's options (shard_args).
        run: the run folder.
        name: the shard.
        classes: the shard's classes (class key), else None.
        data: the shard's data.
        batch_size: its expected batch size (batch_for).
        delta: the run's delta.
        base: the run's base (resolve_base).
        log: the run's log.

    Returns:
        The stored compartment's meta (its accounting included).

    Raises:
        RunError: the shard's data changed since its training started.
        dpldm.train.TrainError: dpldm.train refused the shard's training.
    """
    folder, work = run / "compartments" / name, run / "work" / name
    done = stored_compartment(folder)
    if done is not None:  # killed after storing it, before the registry said so
        log.print(f"compartment {name}: already stored, kept")
        if (work / "log.jsonl").is_file():
            (run / "logs" / f"compartment-{name}").mkdir(parents=True, exist_ok=True)
            shutil.copy(work / "log.jsonl", run / "logs" / f"compartment-{name}" / "log.jsonl")
        return done
    if args.no_dp:
        return public_compartment(cfg, args, run, name, classes, data, batch_size, base, log)
    work.mkdir(parents=True, exist_ok=True)
    digest, seen = data_digest(data), work / "shard.json"  # private (in work/): deleted with it
    if seen.is_file() and json.loads(seen.read_text()).get("sha256") != digest:
        raise RunError(f"the data of shard {name} changed since its training started (its examples' sha256 "
                       f"differs): restore it, or forget the shard (python -m dpldm.compartments forget --run {run} "
                       f"--shard {name}) and add the new data as a new shard")
    seen.write_text(json.dumps({"sha256": digest, "n": len(data.train.labels)}))
    found, ckpt, _ = latest_checkpoint(checkpoint_dir(work, 0))
    resume = found is not None and not ckpt.get("finished")
    # trained to the end but killed before its compartment was stored: that model is discarded, its spending is not
    earlier = []
    if not resume and (work / "result.json").is_file():
        earlier = json.loads((work / "result.json").read_text()).get("accountant_history") or []
    targs = shard_options(args, work, batch_size, delta, base, resume).resolved(cfg)
    log.print(f"compartment {name}: {len(data.train.labels)} examples, expected batch {batch_size}"
              + (f", resumed from {found.name} at step {ckpt['step']}" if resume else "")
              + (", trained again: the killed run's spending is kept in its accounting" if earlier else ""))
    text = pipeline_base.shard_text_run(base, data) if base.get("pipeline") else None
    result, model = train_stage.run(cfg, targs, private=data, text=text)
    history = [*earlier, *result["accountant_history"]]
    meta = {"shard": name, "classes": classes, "mode": targs.trainable, "lora_rank": targs.lora_rank,
            "ablation": targs.ablation, "base_id": base["id"], "accountant": targs.accountant, "delta": delta,
            "accountant_history": history,
            "epsilon": composed_epsilon([history], delta, targs.accountant) if earlier else result["epsilon"],
            "sigma": result["sigma"], "steps": result["steps"], "noise_seeding": result["noise_seeding"]}
    save_compartment(folder, model, meta)
    # the training log (per-step losses: not covered by the DP guarantee) stays apart from the releasable weights
    logs = run / "logs" / f"compartment-{name}"
    logs.mkdir(parents=True, exist_ok=True)
    shutil.copy(work / "log.jsonl", logs / "log.jsonl")
    return meta


def public_compartment(cfg: dict[str, Any], args: argparse.Namespace, run: Path, name: str,
                       classes: list[int] | None, data: data_mod.DataSet, batch_size: int, base: dict[str, Any],
                       log: RunLog) -> dict[str, Any]:
    """A non-private compartment (--no-dp), for a shard of PUBLIC data: plain training, no accounting.

    Args:
        cfg: the config.
        args: the shard's options.
        run: the run folder.
        name: the shard.
        classes: the shard's classes, else None.
        data: the shard's (public) data.
        batch_size: its batch size.
        base: the run's base.
        log: the run's log.

    Returns:
        The stored compartment's meta.
    """
    hp = {k: getattr(args, k) if getattr(args, k, None) is not None else cfg["train"][k]
          for k in ("trainable", "ablation", "lora_rank", "epochs", "lr")}
    hp["batch_size"] = batch_size
    log.print(f"compartment {name}: {len(data.train.labels)} PUBLIC examples, non-private (--no-dp)")
    model, steps = train_public(cfg, data, base, hp, args.seed, args.device)
    meta = {"shard": name, "classes": classes, "mode": hp["trainable"], "lora_rank": hp["lora_rank"],
            "ablation": hp["ablation"], "base_id": base["id"], "public": True, "steps": steps}
    save_compartment(run / "compartments" / name, model, meta)
    return meta


def resolve_base(cfg: dict[str, Any], args: argparse.Namespace, log: RunLog) -> dict[str, Any]:
    """The base every compartment starts from, as dpldm.train chooses it (dpldm.train.ensure_pretrained), recorded
    by path and hash.

    Args:
        cfg: the config.
        args: parser() arguments (config, set, runs, base, pretrained, autoencoder).
        log: where to say what was chosen.

    Returns:
        {"autoencoder", "ldm": absolute folders, "id", "autoencoder_id": their hashes}.
    """
    # dpldm.train's own choice of base folders (a cache is pre-trained with dpldm.train's default seed and device)
    targs = train_stage.TrainOptions(config=str(args.config), runs=Path(args.runs), set=args.set,
                                     base=args.base or None, pretrained=args.pretrained or None,
                                     autoencoder=args.autoencoder or None)
    ae_dir, ldm_dir = train_stage.ensure_pretrained(targs, cfg, log)
    return {"autoencoder": str(Path(ae_dir).resolve()), "ldm": str(Path(ldm_dir).resolve()), "id": ldm_id(ldm_dir),
            "autoencoder_id": autoencoder_id(ae_dir)}


def absolute(path: str | Path | None) -> str | None:
    """A path as recorded in the run: absolute when it exists (forget and evaluate read it again, maybe from
    another directory); a built-in data set's name as is.

    Args:
        path: a path or a data set's name, or None.

    Returns:
        The string recorded, or None.
    """
    return None if path is None else str(Path(path).resolve()) if Path(path).exists() else str(path)


def check_config(cfg: dict[str, Any], pipeline: bool = False) -> None:
    """Refuse a config whose private label set is not the base's (compartments share its class embedder), one that
    adapts the autoencoder per shard, and a pipeline preset without a pipeline.

    Args:
        cfg: the config.
        pipeline: the run's base is a diffusers pipeline (--pipeline).
    """
    if cfg.get("requires_pipeline") and not pipeline:
        raise RunError(f"config {cfg['name']} fine-tunes a diffusers pipeline: pass --pipeline DIR (with --data "
                       "FOLDER of class sub-folders and --prompt TEMPLATE)")
    if private_classes(cfg) != cfg["data"]["num_classes"]:
        raise RunError("compartments share the base's class embedder: the private label set must be the base's "
                       "(data.private_num_classes is set)")
    try:
        settings = warmup.Settings.of(cfg)
    except warmup.WarmupError as e:
        raise RunError(str(e)) from e
    if settings is not None and settings.autoencoder_steps:
        raise RunError("compartments share the base's autoencoder (their samples are decoded by it together): "
                       "warmup.autoencoder_steps would give each shard its own; pass --set warmup.autoencoder_steps=0")


def plan_shard(cfg: dict[str, Any], args: argparse.Namespace, name: str, size: int, full_batch: int, n: int,
               delta: float, checked: set[float] | None = None) -> dict[str, Any]:
    """A shard's batch size and sampling rate, checked before anything is trained: the target epsilon must be
    reachable at the shard's own rate (sigma is calibrated for it). `checked`: rates already found reachable
    (a calibration takes seconds; shards mostly share one rate).

    Args:
        cfg: the config.
        args: the run's arguments (target_epsilon, epochs, accountant, no_dp).
        name: the shard.
        size: its number of training examples.
        full_batch: the expected batch of one model on all the data.
        n: the number of training examples of all the data.
        delta: the run's delta.
        checked: rates found reachable so far (added to).

    Returns:
        {"n", "batch_size", "sample_rate"}.
    """
    batch = batch_for(size, full_batch, n)
    rate = sample_rate(size, batch)  # what dpldm.train's loader gives (1 / len(loader))
    checked = set() if checked is None else checked
    if not args.no_dp and rate not in checked:
        eps = args.target_epsilon or cfg["train"]["target_epsilon"]
        epochs = args.epochs or cfg["train"]["epochs"]
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="divide by zero", category=RuntimeWarning)  # PRV, q = 1
                settings = warmup.Settings.of(cfg, eps)  # each compartment's own release, composed before its DP-SGD
                noise_multiplier(eps, delta, size, batch, epochs, args.accountant, quiet=True,
                                 prior=settings.history() if settings else [])
        except ValueError as e:
            raise RunError(f"shard {name} ({size} examples, sampling rate {rate:.4g}): target epsilon {eps} is "
                           f"unreachable at delta {delta:g} in {epochs} epochs ({e}); nothing was trained. Raise "
                           "--target-epsilon or lower --epochs") from e
        checked.add(rate)
    return {"n": size, "batch_size": batch, "sample_rate": rate}


def rate_notes(plans: dict[str, dict[str, Any]], full_batch: int, n: int) -> list[str]:
    """The shards whose sampling rate is more than RATE_TOLERANCE off one model's on all the data, and why.

    Args:
        plans: plan_shard's answer for each shard.
        full_batch: the expected batch of one model on all the data.
        n: the number of training examples of all the data.

    Returns:
        One note per such shard.
    """
    whole = sample_rate(n, full_batch)
    return [f"shard {name}: {p['n']} examples, sampling rate {p['sample_rate']:.4g} instead of the whole data's "
            f"{whole:.4g} (no batch size gives a shard this small that rate): its noise is calibrated for its own "
            "rate, so it spends the same epsilon in fewer, noisier steps"
            for name, p in plans.items() if abs(p["sample_rate"] / whole - 1) > RATE_TOLERANCE]


def run(cfg: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Register every shard (checked first), then train each one's compartment; returns the privacy report.

    Args:
        cfg: the config (dpldm.config.load_config).
        args: parser() arguments (args.resume is not handled here: see resume()).

    Returns:
        The privacy report (report_of).
    """
    pipeline_base.check_options(args)
    base = None
    if args.pipeline is not None:
        cfg, base = pipeline_base.start(cfg, args)
    check_config(cfg, pipeline=base is not None)
    args.trainable, args.accountant = args.trainable or "lora", args.accountant or "prv"
    if args.no_dp and not args.data:
        raise RunError("--no-dp trains without privacy: it needs --data naming PUBLIC data (the config's private "
                       "data is never trained non-privately)")
    out: Path = args.out or Path(args.runs) / cfg["name"] / f"compartments-{args.shard_by}{args.num_shards or ''}"
    with registry.locked(out, create=True):  # held already where --out named it (dpldm.compartments.registry.cli)
        return start(cfg, args, out, base)


def start(cfg: dict[str, Any], args: argparse.Namespace, out: Path, base: dict[str, Any] | None = None
          ) -> dict[str, Any]:
    """run()'s work, with the new run folder locked.

    Args:
        cfg: the config (on a pipeline: the run config pipeline_base.start derived).
        args: parser() arguments.
        out: the run folder.
        base: a pipeline's base record (pipeline_base.start), else None (resolve_base chooses the base).

    Returns:
        The privacy report (report_of).
    """
    if (out / registry.REGISTRY).exists():
        reg, _ = registry.load(out)
        if not registry.complete(reg):
            raise RunError(f"{out} holds an unfinished compartments run (to train: shards "
                           f"{', '.join(registry.pending(reg)) or 'none'}"
                           + (", the router" if registry.router_pending(reg) else "") + "): continue it with "
                           f"python -m dpldm.compartments train --resume --out {out}, or forget those shards")
        raise RunError(f"{out} already holds a compartments run: use `add` for new shards, `forget` to drop one, or "
                       "another --out")
    private, shards, held_out = load_sharded(args.shard_by, args.data, cfg, args.num_shards, args.shard_seed,
                                             args.manifest)
    n = len(private.train.labels)
    delta = args.delta or train_stage.default_delta(n)
    full_batch = args.batch_size or cfg["train"]["batch_size"]
    if full_batch > n:
        raise RunError(f"--batch-size {full_batch} is larger than the private training set ({n} examples)")
    checked: set[float] = set()
    plans = {s.name: plan_shard(cfg, args, s.name, len(s.index), full_batch, n, delta, checked) for s in shards}
    held = HeldLog("compartments-train")
    if base is None:
        base = resolve_base(cfg, args, held)
    else:
        held.print(f"base pipeline {base['pipeline']} (sha256 {base['id'][:16]}), class prompts "
                   + ", ".join(repr(p) for p in base["prompts"]))
    options = options_of(args)
    reg = {"config": options["config"], "set": args.set, "data": absolute(args.data),
           "key": args.shard_by, "num_shards": len(shards), "shard_seed": args.shard_seed, "base": base,
           "n_train": n, "batch_size": full_batch, "delta": delta, "accountant": args.accountant,
           "trainable": args.trainable,
           "shards": {s.name: {"classes": s.classes, "trained": False, **plans[s.name], "options": options}
                      for s in shards},
           "forgotten": [], "manifest": absolute(args.manifest),
           "run_config": cfg if base.get("pipeline") else None,
           "router": {"epsilon": args.router_epsilon or router_hp(cfg)["epsilon"], "backend": args.backend,
                      # the seed is kept only when the noise is deterministic anyway (tests): never for a private run
                      "noise_seed": args.seed if args.deterministic_noise else None} if args.router else None}
    lineage = registry.new_lineage()
    registry.record(lineage, "logs/train", [s.name for s in shards], "train")  # an artifact: it describes every shard
    for s in shards:
        register_folders(lineage, s.name, "train")
    registry.save(out, reg, lineage)
    log = held.into(RunLog(out / "logs" / "train", "compartments-train"))
    if any(held_out.values()):
        log.print("left out, in the held-out test split: " + ", ".join(f"shard {k}: {v}" for k, v in held_out.items()
                                                                      if v))
    for note in rate_notes(plans, full_batch, n):
        log.print(note)
    return train_pending(cfg, out, reg, lineage, log, args.device, (private, shards))


def register_folders(lineage: dict[str, Any], name: str, event: str) -> None:
    """Every folder a shard's training writes, recorded before it is written: a kill at any point leaves nothing
    that `forget` cannot trace (work/ holds the private checkpoint).

    Args:
        lineage: the run's lineage.
        name: the shard.
        event: what registers it ("train", "add").
    """
    for folder in (f"work/{name}", f"compartments/{name}", f"logs/compartment-{name}"):
        registry.record(lineage, folder, [name], event)


def train_pending(cfg: dict[str, Any], run: Path, reg: dict[str, Any], lineage: dict[str, Any], log: RunLog,
                  device: str, keyed: tuple[data_mod.DataSet, list[Shard]] | None = None) -> dict[str, Any]:
    """Train every registered shard not trained yet, in order, then the router if the run has one and it is not
    trained on exactly the current shards; the registry is saved after each.

    Args:
        cfg: the config.
        run: the run folder.
        reg: the registry.
        lineage: the lineage.
        log: the run's log.
        device: where to train.
        keyed: the private data and its shards, when the caller has them (else rebuilt from the registry).

    Returns:
        The privacy report (report_of).
    """
    for name in registry.pending(reg):
        info = reg["shards"][name]
        if info.get("data"):  # added later: its own data, all of it training data
            data = new_shard_data(info["data"], cfg)
        else:
            if keyed is None:
                private, shards, _ = run_data(reg, cfg)
                keyed = private, shards
            found = [s for s in keyed[1] if s.name == name]
            if not found:
                raise RunError(f"shard {name}: the run's data and key ({reg['key']}) no longer give it: restore the "
                               f"data the run was created with, or forget the shard")
            data = found[0].data(keyed[0])
        if len(data.train.labels) != info["n"]:
            raise RunError(f"the data of shard {name} changed since the run was created ({info['n']} examples then, "
                           f"{len(data.train.labels)} now): restore it, or forget the shard")
        args = shard_args(info["options"], device)
        meta = train_compartment(cfg, args, run, name, info.get("classes"), data, info["batch_size"], reg["delta"],
                                 reg["base"], log)
        info["trained"] = True
        registry.remove_artifact(run, lineage, f"work/{name}")  # its checkpoint and merged copy: private, done
        if (run / "work").is_dir() and not any((run / "work").iterdir()):
            (run / "work").rmdir()
        registry.record(lineage, f"compartments/{name}", [name], "trained", epsilon=meta.get("epsilon"))
        registry.save(run, reg, lineage)
    if registry.router_pending(reg, run):
        fit_router(cfg, run, reg, lineage, shard_data(reg, cfg), log)
    report = report_of(run)
    log.print(f"{len(report['epsilon_per_shard']) + len(report['public_shards'])} compartments in {run}: epsilon "
              "per shard " + ", ".join(f"{k} {v:.3f}" for k, v in report["epsilon_per_shard"].items())
              + f"; overall (parallel composition) {report['epsilon']:.3f} at delta {reg['delta']:g}", **report)
    return report


def resume(out: Path, device: str) -> dict[str, Any]:
    """Continue an interrupted `train` (or `add`): train the shards not trained yet, with the options each was
    registered with, and the router; returns the privacy report.

    Args:
        out: the run folder.
        device: where to train (the one setting a resumed run may change).

    Returns:
        The privacy report (report_of).
    """
    reg, lineage = registry.load(out)
    if registry.complete(reg, out):
        raise RunError(f"{out}: every shard is trained, nothing to resume (add new data with `add`)")
    old = [n for n in registry.pending(reg) if "options" not in reg["shards"][n]]
    if old:
        raise RunError(f"shards {', '.join(old)} were registered by an older version, without their options: "
                       "forget them and add their data again")
    cfg = registry.config_of(reg)
    check_config(cfg, pipeline=bool(reg["base"].get("pipeline")))
    check_base(reg["base"])
    registry.record(lineage, "logs/train", list(reg["shards"]), "resume")
    registry.save(out, reg, lineage)
    log = RunLog(Path(out) / "logs" / "train", "compartments-train")
    log.print(f"resuming {out}: to train, shards {', '.join(registry.pending(reg)) or 'none'}"
              + (", the router" if registry.router_pending(reg, out) else ""))
    return train_pending(cfg, Path(out), reg, lineage, log, device)


def new_shard_data(path: str, cfg: dict[str, Any]) -> data_mod.DataSet:
    """The data of a shard added later: all of it training data. On a pipeline, a folder's class sub-folders
    are named among the run's classes (any of them), and each takes its label from the run's order.

    Args:
        path: an .npz or a folder of class folders.
        cfg: the config.

    Returns:
        The data set (an empty test split).
    """
    d = cfg["data"]
    p = Path(path)
    if not p.exists():
        raise data_mod.DataError(f"{p}: no such file or folder")
    split = (data_mod.from_npz(p, private_classes(cfg)) if p.is_file()
             else data_mod.from_folder(p, d["channels"], private_classes(cfg), d["image_size"],
                                       d.get(pipeline_base.CLASS_NAMES))[0])
    empty = data_mod.Split(split.images[:0], split.labels[:0])  # all of it trains; nothing is evaluated here
    return data_mod.DataSet(split, empty, private_classes(cfg), str(p))


def add(args: argparse.Namespace) -> dict[str, Any]:
    """Train the compartment of a new shard with the run's config, base, delta, accountant and mode, and the options
its shards were trained with for those not given (run_options).

    Args:
        args: add_parser() arguments.

    Returns:
        The privacy report (report_of).
    """
    reg, lineage = registry.load(args.run)
    if not registry.complete(reg, args.run):
        raise RunError(f"{args.run} is an unfinished run: finish it first (python -m dpldm.compartments train "
                       f"--resume --out {args.run}), or forget its untrained shards")
    args.config, args.set = reg["config"], reg["set"]
    cfg = config_from(args)
    if reg.get("run_config"):  # a pipeline's: the config derived from it when the run was created
        cfg = registry.config_of(reg)
    check_config(cfg, pipeline=bool(reg["base"].get("pipeline")))
    name = check_name(args.name)
    if name in reg["shards"]:
        raise ShardError(f"shard {name!r} already exists in {args.run}")
    data = new_shard_data(args.data, cfg)
    base = reg["base"]
    check_base(base)
    if args.accountant not in (None, reg["accountant"]):
        raise RunError(f"--accountant {args.accountant}: the run accounts with {reg['accountant']}")
    args.accountant, args.trainable = reg["accountant"], args.trainable or reg["trainable"]
    for key, value in run_options(reg).items():  # unset: as the run's shards were trained (epsilon, epochs, ...)
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    try:
        existing = shard_data(reg, cfg)
    except data_mod.DataError as e:
        raise RunError(f"cannot check the new data against the run's shards, whose data cannot be read ({e}): "
                       "restore it") from e
    shared = overlap(data.train, existing)
    if shared:
        raise RunError(f"{args.data}: examples already in this run (same image): "
                       + ", ".join(f"{k} of shard {s}" for s, k in shared.items())
                       + ". An example in two compartments pays twice (its epsilon is the composition of both), and "
                       "forgetting one shard would not forget it: remove them from the new data")
    size = len(data.train.labels)
    plan = plan_shard(cfg, args, name, size, args.batch_size or reg["batch_size"], reg["n_train"], reg["delta"])
    reg["shards"][name] = {"classes": None, "data": absolute(args.data), "trained": False, **plan,
                           "options": options_of(args)}
    registry.record(lineage, f"logs/add-{name}", [name], "add", data=str(args.data))
    register_folders(lineage, name, "add")
    registry.save(args.run, reg, lineage)
    log = RunLog(Path(args.run) / "logs" / f"add-{name}", "compartments-add")
    for note in rate_notes({name: plan}, args.batch_size or reg["batch_size"], reg["n_train"]):
        log.print(note)
    return train_pending(cfg, Path(args.run), reg, lineage, log, args.device)


def run_options(reg: dict[str, Any]) -> dict[str, Any]:
    """The dpldm.train options every registered shard of the run was trained with (PASS_THROUGH, where they all
    agree and were set): what `add` takes for those it is not given.

    Args:
        reg: the registry.

    Returns:
        {option: value}.
    """
    registered = [info["options"] for info in reg["shards"].values() if info.get("options")]
    return {k: registered[0][k] for k in PASS_THROUGH if registered and registered[0].get(k) is not None
            and all(o.get(k) == registered[0][k] for o in registered)}


def report_of(run: Path) -> dict[str, Any]:
    """Per-shard and overall epsilon of the trained shards: each compartment's history, composed with every
    router training its shard took part in (a router trained again after add/forget spends again: the old one may
    have been seen).

    Args:
        run: the run folder.

    Returns:
        dpldm.compartments.accounting.privacy_report's answer, with each shard's sampling rate.
    """
    reg, _ = registry.load(run)
    metas = {name: read_meta(Path(run) / "compartments" / name) for name in registry.trained(reg)}
    report = privacy_report(metas, reg["delta"], reg["accountant"], reg.get("router_runs", []))
    report["sample_rate_per_shard"] = {name: reg["shards"][name].get("sample_rate") for name in metas}
    return report


def shard_data(reg: dict[str, Any], cfg: dict[str, Any], names: list[str] | None = None
               ) -> dict[str, data_mod.DataSet]:
    """The training data of the run's shards `names` (default: the trained ones), rebuilt from the key (same data,
    key, seed, manifest) and, for shards added later, from their own data. Forgotten shards are never read.

    Args:
        reg: the registry.
        cfg: the config.
        names: the shards (default: the trained ones).

    Returns:
        {shard: its training data}.
    """
    names = registry.trained(reg) if names is None else names
    out: dict[str, data_mod.DataSet] = {}
    if any(not reg["shards"][n].get("data") for n in names):
        private, keyed, _ = run_data(reg, cfg)
        out.update({s.name: s.data(private) for s in keyed if s.name in names})
    for name in names:
        if reg["shards"][name].get("data"):
            out[name] = new_shard_data(reg["shards"][name]["data"], cfg)
    return {n: out[n] for n in names if n in out}


def fit_router(cfg: dict[str, Any], run: Path, reg: dict[str, Any], lineage: dict[str, Any],
               data: dict[str, data_mod.DataSet], log: RunLog) -> dict[str, Any]:
    """DP-train the router on the private latents of `data`'s shards; saved in <run>/router, lineage: all of them.
    Its spending is recorded (and the registry saved) before the router is written: a kill in between can only
    over-count.

    Args:
        cfg: the config.
        run: the run folder.
        reg: the registry.
        lineage: the lineage.
        data: {shard: its training data}.
        log: the run's log.

    Returns:
        The router's meta (its shards, shares, accounting, sigma).
    """
    hp, names = {**router_hp(cfg), "epsilon": reg["router"]["epsilon"]}, list(data)
    vae = base_vae(reg["base"], cfg)
    zs = [encode_latents(vae, images_tensor(d.train, cfg)) for d in data.values()]
    z = torch.cat(zs).contiguous()
    shard = torch.cat([torch.full((len(x),), i) for i, x in enumerate(zs)])
    sigma = router_sigma(hp["epsilon"], reg["delta"], len(z), hp, reg["accountant"])
    model, history = train_router(z, shard, len(names), train_scheduler(cfg), hp, sigma, reg["accountant"],
                                  noise_seed=reg["router"]["noise_seed"], backend=reg["router"]["backend"])
    epsilon = composed_epsilon([history], reg["delta"], reg["accountant"])
    meta = {"shards": names, "shares": [len(x) / len(z) for x in zs], "accountant_history": history,
            "epsilon": epsilon, "sigma": sigma}
    reg.setdefault("router_runs", []).append({"shards": names, "accountant_history": history})
    registry.record(lineage, "router", names, "router", epsilon=epsilon)
    registry.save(run, reg, lineage)
    save_router(run / "router", model, meta)
    log.print(f"router over shards {', '.join(names)}: sigma {sigma:.3f}, epsilon {epsilon:.3f}")
    return meta


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """`python -m dpldm.compartments train`: a refusal exits with `error: ...`.

    Args:
        argv: the arguments (default: sys.argv[1:]).

    Returns:
        The privacy report.
    """
    args = parser().parse_args(argv)
    if args.resume:
        if args.out is None:
            raise SystemExit("error: --resume needs --out, the run folder to continue")
        given = {k: v for k, v in vars(args).items() if k not in ("out", "resume", "device")
                 and v != parser().get_default(k)}
        if given:
            raise SystemExit(f"error: --resume continues the run with the settings it was started with; drop "
                             f"{', '.join('--' + k.replace('_', '-') for k in given)}")
        return registry.cli(parser(), lambda a: resume(a.out, a.device), argv)
    return registry.cli(parser(), lambda a: run(config_from(a), a), argv)


def main_add(argv: list[str] | None = None) -> dict[str, Any]:
    """`python -m dpldm.compartments add`: a refusal exits with `error: ...`.

    Args:
        argv: the arguments (default: sys.argv[1:]).

    Returns:
        The privacy report.
    """
    return registry.cli(add_parser(), add, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
