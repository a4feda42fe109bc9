"""DP fine-tuning of a latent diffusion model on PRIVATE data (DP-LDM / DP-LoRA), then sampling and evaluation.

With no arguments this runs the embedded default end to end, offline: start from the shipped base the mnist
config names (dpldm/bases/mnist-fontdigits/, pre-trained on PUBLIC font-rendered digits; its files checked
against its SHA256SUMS), DP fine-tune the attention blocks at epsilon=10 on PRIVATE MNIST-5k (4k train / 1k
test), sample, evaluate beside the baselines, print epsilon, the table and the grid. A config without a base
(or --no-base) uses <runs>/<config>/public/, pre-training it on the config's public data if empty.

Every private step goes through dpkernels.PrivacyEngine (Poisson sampling, per-example clipping, Gaussian
noise, PRV accountant). With --noise-multiplicity k each image is used with k diffusion noises; its k rows
share one example id, so the k losses are averaged BEFORE clipping: the sensitivity stays C.

The DP noise and the Poisson sampling are seeded from the OS by default: their seeds are never logged or written
anywhere but the private checkpoint (deleted when training finishes). --seed controls everything else: model
init, diffusion timesteps/noise, sampling, evaluation. --deterministic-noise seeds them from --seed (tests only).

    python -m dpldm.train                                   # embedded default
    python -m dpldm.train --preset fmnist --target-epsilon 1
    python -m dpldm.train --data my_images/ --trainable lora --lora-rank 8
    python -m dpldm.train --resume                          # continue a killed run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from dpldm import data as data_mod
from dpldm import evaluate as evaluate_stage
from dpldm import parallel
from dpldm import pretrain as pretrain_stage
from dpldm import pretrain_autoencoder as ae_stage
from dpldm import sample as sample_stage
from dpldm.base_models import BaseNotFound, base_record, check_layout, verified_base
from dpldm.baselines import DPTarget
from dpldm.baselines import table as baselines_table
from dpldm.checkpoint import (
    at_step,
    discard_interrupted_writes,
    discard_train_state,
    intact_checkpoints,
    latest_checkpoint,
    load_train_state,
    save_train_state,
)
from dpldm.common import add_config_args, config_from, images_tensor, load_private, load_public, public_dir, seed_all
from dpldm.diffusion import diffusion_loss, encode, train_scheduler
from dpldm.export import plain_copy
from dpldm.models import (
    CheckpointError,
    ClassEmbedder,
    ConditionalUNet,
    load_autoencoder,
    load_ldm,
    save_ldm,
    trained_on,
)
from dpldm.runlog import RunLog, progress
from dpldm.trainable import select_trainable

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# Arguments that define the private computation: a resumed run must use the same ones.
RESUME_KEYS = ("data", "target_epsilon", "delta", "epochs", "batch_size", "max_grad_norm", "noise_multiplicity",
               "trainable", "ablation", "lora_rank", "accountant", "lr", "config", "set", "secure_mode",
               "deterministic_noise")

DETERMINISTIC_NOISE_WARNING = (
    "--deterministic-noise: the DP noise and the Poisson sampling are seeded from --seed. Anyone who knows the "
    "seed can regenerate the noise and subtract it, and reruns with the same seed share it: this run has NO "
    "privacy guarantee. Use it for tests only.")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dpldm.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--data", help="private data: an .npz (images, labels) or a folder with one sub-folder per class "
                                  "(default: the preset's, MNIST-5k for mnist, Fashion-MNIST for fmnist)")
    p.add_argument("--pretrained", type=Path, help="pre-trained LDM folder (default: the shipped base the config "
                                                   "names, else <runs>/<config>/public/ldm, built from public data "
                                                   "if missing)")
    p.add_argument("--autoencoder", type=Path, help="autoencoder folder (default: the base's, else "
                                                    "<runs>/<config>/public/autoencoder)")
    p.add_argument("--base", help="shipped base model, a name or a folder (default: the config's `base`, if any); "
                                  "its files are checked against its SHA256SUMS")
    p.add_argument("--no-base", action="store_true", help="ignore the config's base: use, or pre-train into, "
                                                          "<runs>/<config>/public")
    p.add_argument("--out", type=Path, help="run folder (default <runs>/<config>/dp-<trainable>-eps<epsilon>)")
    p.add_argument("--target-epsilon", type=float)
    p.add_argument("--delta", type=float, help="default: 1/N rounded down to a power of ten, at most 1e-5")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="expected logical (Poisson) batch size")
    p.add_argument("--max-physical-batch-size", type=int, help="examples per forward/backward chunk")
    p.add_argument("--max-grad-norm", type=float)
    p.add_argument("--noise-multiplicity", type=int, help="k diffusion noises per image, clipped as one example")
    p.add_argument("--trainable", choices=("attention", "lora", "all"))
    p.add_argument("--ablation", type=int, help="i: freeze the first i-1 transformer blocks (attention mode)")
    p.add_argument("--lora-rank", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--accountant", default="prv", choices=("prv", "rdp", "gdp"))
    p.add_argument("--backend", default="auto", help="dpkernels backend: auto, cpu, cuda, triton, torch")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32",
                   help="autocast dtype of the forward pass (bf16, fp16) or none (fp32); the engine accumulates "
                        "per-sample norms and clipped sums in fp32 and writes fp32 gradients either way")
    p.add_argument("--secure-mode", action="store_true",
                   help="a fresh OS seed for the noise at every step; nothing of it is kept for --resume")
    p.add_argument("--deterministic-noise", action="store_true",
                   help="seed the DP noise and the Poisson sampling from --seed (default: from the OS). Reproducible "
                        "but NOT private: whoever knows the seed can subtract the noise. For tests only")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--fresh", action="store_true", help="discard an unfinished checkpoint in --out and start over")
    p.add_argument("--checkpoint-every", type=int, default=20, help="logical steps between checkpoints")
    p.add_argument("--max-steps", type=int, help="stop (checkpointed, resumable) once this many logical steps are "
                                                 "done in total; for tests and time-boxed jobs")
    p.add_argument("--no-sample", action="store_true", help="stop after training (no sampling, no evaluation)")
    p.add_argument("--no-eval", action="store_true", help="sample but do not evaluate")
    p.add_argument("--no-baselines", action="store_true", help="evaluate without the baselines (public-only, "
                                                               "DP-SGD and non-private CNNs)")
    p.add_argument("--per-class", type=int, help="synthetic images per class")
    return p


def default_delta(n: int) -> float:
    """1/N rounded down to a power of ten, at most 1e-5."""
    return min(1e-5, 10.0 ** math.floor(math.log10(1.0 / n)))


def fill_defaults(args: argparse.Namespace, cfg: dict[str, Any]) -> None:
    for key, value in cfg["train"].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = Path(args.runs) / cfg["name"] / f"dp-{args.trainable}-eps{args.target_epsilon:g}"


def fail(msg: str) -> None:
    raise SystemExit(f"error: {msg}")


# How a run starts, decided on every rank and agreed on by all (the smallest wins: one refusal stops every rank).
REFUSE, RESTART, RESUME, NEW = 0, 1, 2, 3


def unwritable(out: Path) -> str | None:
    """Why the run folder cannot be written (None: it can): it, or its nearest existing parent, must be a folder in
    which a file can be created. Nothing is left behind by the check."""
    at = Path(out).absolute()
    while not at.exists() and at != at.parent:
        at = at.parent
    if not at.is_dir():
        return f"the run folder {out} cannot be created: {at} is not a folder (pass --out to a writable folder)"
    try:
        fd, probe = tempfile.mkstemp(prefix=".dpldm-write-check-", dir=at)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"the run folder {out} cannot be written: {at}: {e.strerror or e} (pass --out to a writable folder)"
    return None


def started_run_args(out: Path) -> dict[str, Any] | None:
    """The settings of a DP fine-tuning that was started in `out` and never finished (it left a train log but no
    model): what its log's first train record holds; None when `out` holds no such run."""
    log = out / "log.jsonl"
    if (out / "ldm").exists() or (out / "result.json").exists() or not log.is_file():
        return None
    for line in log.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        if isinstance(rec, dict) and rec.get("stage") == "train" and "target_epsilon" in rec:
            return {k: rec.get(k) for k in RESUME_KEYS}
    return None


def start_mode(args: argparse.Namespace, out: Path, rank: int, world: int, run_args: dict[str, Any],
               found: Path | None, meta: dict[str, Any] | None, refused: list[str]) -> tuple[int, str | None]:
    """How this rank would start the run in `out` (REFUSE, RESTART, RESUME or NEW) and, for REFUSE, why.

    RESTART: --resume of a run killed before its first checkpoint. Nothing of it was kept (no model, no noise
    seed; its training losses are not covered by DP anyway), so it starts again from step 0.

    Args:
        args: the run's arguments. out: the run folder. rank, world: this process's rank and the job's size.
        run_args: the settings a resume must share (RESUME_KEYS). found, meta, refused: latest_checkpoint's answer
            for this rank's checkpoint folder.
    """
    unfinished = meta is not None and not meta.get("finished")
    if not args.resume:
        if unfinished and not args.fresh:
            return REFUSE, (f"{out} holds an unfinished run (step {meta['step']}); pass --resume to continue it or "
                            "--fresh to discard it")
        return NEW, None
    if found is None and refused:
        return REFUSE, f"--resume: no intact checkpoint in {out}: " + "; ".join(refused)
    ranks = parallel.checkpoint_ranks(out)
    if found is None:
        if ranks:
            return REFUSE, (f"--resume: rank {rank} holds no checkpoint in {out}, but rank(s) {ranks} do: it was written "
                            "by a job with another number of ranks (resume with that job), or pass --fresh")
        started = started_run_args(out)
        if started is None:
            return REFUSE, f"--resume: no unfinished checkpoint in {out}"
        diff = {k: (started.get(k), v) for k, v in run_args.items() if started.get(k) != v}
        if diff:
            return REFUSE, (f"--resume: the run in {out} was started with other settings: "
                            + "; ".join(f"{k}: then {a!r}, now {b!r}" for k, (a, b) in diff.items()))
        return RESTART, None
    if not unfinished:
        return REFUSE, f"--resume: no unfinished checkpoint in {out}"
    diff = {k: (meta["args"].get(k), v) for k, v in run_args.items() if meta["args"].get(k) != v}
    if diff:
        return REFUSE, (f"--resume: the checkpoint in {found} was made with other settings: "
                        + "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items()))
    # each rank's sampler and RNG streams live in its own checkpoint: another number of ranks cannot continue them
    written_by = meta.get("world") or max(ranks) + 1  # older checkpoints did not record it
    how = "plain `python -m dpldm.train" if written_by == 1 else f"`torchrun --nproc_per_node {written_by} -m dpldm.train"
    if written_by != world:
        return REFUSE, (f"--resume: the checkpoint in {out} was written by a job of {written_by} rank(s), and this "
                        f"job has {world}: each rank's noise and sampling streams continue only on as many ranks. "
                        f"Resume with {how} ... --resume`, or pass --fresh to discard it")
    extra = [r for r in ranks if r >= world]
    if rank == 0 and extra:
        return REFUSE, (f"--resume: {out} holds the private checkpoints of rank(s) {extra}, which a job of {world} "
                        "rank(s) does not have (an earlier job with more ranks wrote them): pass --fresh to discard "
                        "every rank's checkpoint and start over")
    return RESUME, None


def noise_seeding(args: argparse.Namespace) -> str:
    """How the private streams are seeded, for logs and results (never the seed itself)."""
    if args.deterministic_noise:
        return "deterministic (--seed, not private)"
    return "os, fresh every step (secure mode)" if args.secure_mode else "os"


def engine_seed(args: argparse.Namespace) -> int | None:
    """The seed make_private gets for the noise and the Poisson sampler: None = drawn from the OS by the engine."""
    if not args.deterministic_noise:
        return None
    warnings.warn(DETERMINISTIC_NOISE_WARNING, UserWarning, stacklevel=2)
    return args.seed


def accounted_steps(engine: Any) -> int:
    return int(sum(h[2] for h in engine.accountant.history))


def base_parts(args: argparse.Namespace, cfg: dict[str, Any], name: str, log: RunLog) -> tuple[Path, Path]:
    """The shipped base's autoencoder and LDM folders, verified against its SHA256SUMS; --autoencoder or
    --pretrained, when given, replaces its part. Never pre-trains: a base that is not installed is an error."""
    try:
        folder = verified_base(name)
    except BaseNotFound as e:
        named_by = "--base" if args.base else f"config {cfg['name']}"
        fail(f"{named_by}: {e} Or pass --no-base to use (or pre-train into) {public_dir(args, cfg)}, or "
             "--autoencoder/--pretrained folders.")
    if args.pretrained is None:
        check_layout(folder, cfg)  # its architecture is checked when loaded
    ae_dir, ldm_dir = args.autoencoder or folder / "autoencoder", args.pretrained or folder / "ldm"
    for flag, given in (("--autoencoder", args.autoencoder), ("--pretrained", args.pretrained)):
        if given is not None and not given.exists():
            fail(f"{flag} {given}: no such folder")
    public = base_record(folder).get("public", {})
    log.print(f"base model {name} ({folder}, files verified against its SHA256SUMS; pre-trained on public data "
              f"{public.get('ldm')!r})", base=str(folder))
    return ae_dir, ldm_dir


def ensure_pretrained(args: argparse.Namespace, cfg: dict[str, Any], log: RunLog) -> tuple[Path, Path]:
    base = None if args.no_base else (args.base or cfg.get("base"))
    if base and not (args.autoencoder and args.pretrained):
        return base_parts(args, cfg, str(base), log)
    pub = public_dir(args, cfg)
    ae_dir = args.autoencoder or pub / "autoencoder"
    ldm_dir = args.pretrained or pub / "ldm"
    if args.pretrained is not None and not ldm_dir.exists():
        fail(f"--pretrained {ldm_dir}: no such folder")
    if not (ae_dir.exists() and ldm_dir.exists()) and not cfg["data"].get("public"):
        fail(f"no pre-trained model at {ldm_dir} and config {cfg['name']} names no public data to build one: pass "
             "--pretrained/--autoencoder folders, or public data with --set data.public=PATH")
    # a cache pre-trained on other public data (e.g. before the preset changed) is refused, never reused or erased
    public = cfg["data"].get("public")
    for folder, given in ((ae_dir, args.autoencoder), (ldm_dir, args.pretrained)):
        source = trained_on(folder) if given is None else None
        if public and source is not None and source != str(Path(public)):
            fail(f"the cached model {folder} was pre-trained on public data {source!r}, but config {cfg['name']} names "
                 f"{public!r}: move {pub} away to pre-train again, or pass --autoencoder/--pretrained "
                 "to use it anyway")
    if not ae_dir.exists():
        if args.autoencoder is not None:
            fail(f"--autoencoder {ae_dir}: no such folder")
        log.print(f"no cached autoencoder at {ae_dir}: pre-training one on public data ({cfg['data']['public']})")
        ae_stage.run(cfg, ae_dir, args.seed, args.device)
    if not ldm_dir.exists():
        log.print(f"no cached LDM at {ldm_dir}: pre-training one on public data ({cfg['data']['public']})")
        pretrain_stage.run(cfg, ae_dir, ldm_dir, args.seed, args.device)
    return ae_dir, ldm_dir


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    try:
        cfg = config_from(args)
    except ValueError as e:
        fail(str(e))
    fill_defaults(args, cfg)
    try:
        return run(cfg, args)[0]
    finally:
        parallel.teardown()


def run(cfg: dict[str, Any], args: argparse.Namespace, private: data_mod.DataSet | None = None
        ) -> tuple[dict[str, Any], ConditionalUNet]:
    """DP fine-tune, then (unless args say not to) sample and evaluate; returns result.json's content and the
    fine-tuned model as trained (LoRA adapters still separate).

    Args:
        cfg: the config (dpldm.config.load_config).
        args: parser() arguments with fill_defaults applied.
        private: the private data set, already loaded (dpldm.compartments passes one shard); default: args.data,
            else the config's private data.
    """
    t_start = time.time()
    rank, world = parallel.setup(args)
    lead = rank == 0
    if args.secure_mode and args.deterministic_noise:
        fail("--secure-mode and --deterministic-noise contradict each other: pass one of them")
    if args.base and args.no_base:
        fail("--base and --no-base contradict each other: pass one of them")
    out: Path = args.out
    ckpt = parallel.checkpoint_dir(out, rank)  # every rank keeps its own sampler and RNG state

    # --- refuse early: bad data, unreachable epsilon, inconsistent resume ---------------------------------------
    if private is None and not (args.data or cfg["data"].get("private")):
        fail(f"config {cfg['name']} names no private data set: pass --data PATH (.npz or folder of class folders)")
    try:
        if private is None:
            private = load_private(args.data or cfg["data"]["private"], cfg)
    except data_mod.DataError as e:
        fail(str(e))
    n = len(private.train.labels)  # the one thing read off the private data: N (sampling rate, default delta)
    if args.delta is None:
        args.delta = default_delta(n)
    if args.batch_size > n:
        fail(f"--batch-size {args.batch_size} is larger than the private training set ({n} examples)")
    sample_rate = 1.0 / math.ceil(n / args.batch_size)  # what the engine reads off the loader (1 / len(loader))
    from dpkernels import PrivacyEngine
    from dpkernels.privacy import get_noise_multiplier

    if not args.target_epsilon > 0:
        fail(f"--target-epsilon must be positive, got {args.target_epsilon}")
    try:
        sigma = get_noise_multiplier(target_epsilon=args.target_epsilon, target_delta=args.delta,
                                     sample_rate=sample_rate, epochs=args.epochs, accountant=args.accountant)
    except ValueError as e:
        fail(f"target epsilon {args.target_epsilon} is unreachable with delta {args.delta:g}, {args.epochs} epochs "
             f"and sampling rate {sample_rate:.4g} ({e}). Raise --target-epsilon, or lower --epochs or --batch-size.")
    run_args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k in RESUME_KEYS}
    # every other input the run needs, checked now (seconds) rather than when it is reached (minutes later)
    public, missing = None, unwritable(out)
    if missing is None and lead and not (args.no_sample or args.no_eval) and cfg["data"].get("public"):
        try:  # the evaluation's baseline (a) and Frechet features; loaded once, here
            public = load_public(cfg)
        except data_mod.DataError as e:
            missing = (f"the evaluation needs the public data {cfg['data']['public']!r} (baseline (a), Frechet "
                       f"features), which cannot be loaded: {e} (checked before training; --no-eval skips it)")
    discard_interrupted_writes(ckpt)  # a killed writer's temporary folder: private, and never used again
    found, meta, refused = latest_checkpoint(ckpt)
    mode, why = (REFUSE, missing) if missing else start_mode(args, out, rank, world, run_args, found, meta, refused)
    lo, hi = parallel.min_max_int(mode, world)  # every rank takes the same road, or all refuse
    if lo == REFUSE:
        fail(why or f"{'--resume' if args.resume else 'the run'} was refused on another rank (its error says why); "
             f"nothing in {out} was changed")
    if lo != hi:
        fail(f"--resume: the ranks found different states in {out} (some hold a checkpoint, some none): it was "
             "written by a job with another number of ranks, or a rank's checkpoint was removed; resume with the "
             "job that wrote it, or pass --fresh")
    resuming = mode == RESUME
    if resuming and not parallel.same_on_all_ranks(meta["step"], world):
        # a job killed while its ranks were checkpointing: resume them all at the newest step every rank holds
        common = parallel.oldest(meta["step"], world)
        held = [m["step"] for _, m in intact_checkpoints(ckpt)[0]]
        found, meta = at_step(ckpt, common)
        if not parallel.on_all_ranks(found is not None, world):
            fail(f"--resume: the ranks' checkpoints have no step in common (this rank holds steps {held}, the "
                 f"furthest behind is at step {common}): pass --fresh")
        for path, m in intact_checkpoints(ckpt)[0]:  # the newer ones belong to a timeline no rank continues
            if m["step"] > common:
                shutil.rmtree(path)
    if not resuming and out.exists():
        discard_train_state(ckpt)
        if lead:  # ranks this job does not have: an earlier job's private state, of no use to a new run
            parallel.discard_private_checkpoints(out, from_rank=world)
        for stale in ("ldm", "log.jsonl") if lead else ():
            p = out / stale
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    parallel.barrier(world)

    log = RunLog(out, "train") if lead else parallel.SilentLog(out, "train")
    if mode == RESTART:
        log.print(f"--resume: the run in {out} was stopped before its first checkpoint, so nothing of it was kept: "
                  "starting again from step 0")
    log.print(f"private data: {private.source}, {n} train / {len(private.test.labels)} test examples; "
              f"run folder {out}", **{k: v for k, v in run_args.items()})
    try:
        if not lead:  # rank 0 pre-trains a missing cache first; the others then find it
            parallel.barrier(world)
        ae_dir, ldm_dir = ensure_pretrained(args, cfg, log)
        if lead:
            parallel.barrier(world)
        vae = load_autoencoder(ae_dir, cfg)
        model, _ = load_ldm(ldm_dir, cfg)
    except CheckpointError as e:
        fail(str(e))
    seed_all(args.seed)  # before any initialisation: --seed controls everything but the private streams
    if private.num_classes != model.class_embedder.num_classes:
        # a configured label set other than the public one (data.private_num_classes): a fresh class embedder
        # (trained privately in attention/all modes)
        model.class_embedder = ClassEmbedder(private.num_classes, cfg["unet"]["cross_attention_dim"])
        log.print(f"the config gives the private data {private.num_classes} classes: new class embedder")

    # --- private latents: the frozen public autoencoder is a fixed per-example map --------------------------------
    z = (encode(vae, images_tensor(private.train, cfg)) * vae.config.scaling_factor).contiguous()
    y = torch.from_numpy(private.train.labels)
    try:
        n_trainable = select_trainable(model, args.trainable, args.ablation, args.lora_rank)
    except ValueError as e:
        fail(str(e))
    model.to(args.device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    loader = DataLoader(TensorDataset(z, y), batch_size=args.batch_size)
    engine = PrivacyEngine(accountant=args.accountant, secure_mode=args.secure_mode)
    try:
        model, opt, loader = engine.make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=sigma, max_grad_norm=args.max_grad_norm,
            poisson_sampling=True, backend=args.backend, seed=engine_seed(args))
    except ValueError as e:  # unknown backend, non-positive clipping norm, unsupported trainable module
        fail(str(e))
    total_steps = args.epochs * len(loader)
    log.print(f"trainable parameters: {n_trainable:,} ({args.trainable}"
              + (f", ablation {args.ablation}" if args.trainable == "attention" else "")
              + (f", rank {args.lora_rank}" if args.trainable == "lora" else "") + ")", trainable_params=n_trainable)
    log.print(f"sigma (noise multiplier) {opt.noise_multiplier:.4f}, sample rate {engine.sample_rate:.5f}, "
              f"{total_steps} steps, target epsilon {args.target_epsilon} at delta {args.delta:g}, "
              f"C {opt.max_grad_norm}, k {args.noise_multiplicity}", sigma=opt.noise_multiplier,
              sample_rate=engine.sample_rate, total_steps=total_steps, delta=args.delta,
              max_grad_norm=opt.max_grad_norm, expected_batch_size=opt.expected_batch_size)
    log.print(f"DP noise and Poisson sampling seeded: {noise_seeding(args)}", noise_seeding=noise_seeding(args))
    if args.deterministic_noise:
        log.print("WARNING " + DETERMINISTIC_NOISE_WARNING)
    step = 0
    if resuming:
        for why in refused:
            log.print(f"WARNING checkpoint refused, {why}: falling back to {found}")
        try:
            step = load_train_state(found, model, opt, engine)
        except ValueError as e:
            fail(str(e))
        if accounted_steps(engine) != step:
            fail(f"{found}: accountant history has {accounted_steps(engine)} steps but the checkpoint says {step}")
        log.print(f"resumed from {found} at step {step}, epsilon so far {engine.get_epsilon(args.delta):.4f}",
                  resumed_step=step)
    meta = {"args": run_args, "sigma": opt.noise_multiplier, "total_steps": total_steps, "finished": False,
            "world": world}  # a resume needs the same number of ranks
    if world > 1 and not resuming:  # each rank its own diffusion timesteps and noise (the model init was shared)
        torch.manual_seed(args.seed * 1_000_003 + rank)

    # --- DP training loop -------------------------------------------------------------------------------------
    sched = train_scheduler(cfg)
    k = args.noise_multiplicity
    stop_at = total_steps if args.max_steps is None else min(total_steps, args.max_steps)
    bar = progress(total_steps, "DP fine-tune", initial=step, disable=not lead)
    losses: list[float] = []
    while step < stop_at:
        for zb, yb in engine.virtual_batches(loader, args.max_physical_batch_size):
            opt.zero_grad(set_to_none=True)
            if len(zb):
                rows_z, rows_y = zb.repeat_interleave(k, 0).to(args.device), yb.repeat_interleave(k, 0).to(args.device)
                with torch.autocast(torch.device(args.device).type, dtype=PRECISIONS[args.precision] or torch.bfloat16,
                                    enabled=args.precision != "fp32"):
                    loss = diffusion_loss(model, sched, rows_z, rows_y, cfg["train"].get("label_dropout", 0.0))
                opt.set_example_ids(torch.arange(len(zb), device=args.device).repeat_interleave(k))
                loss.backward()
                losses.append(loss.item())
            opt.step()  # an empty Poisson batch still steps: the update is pure noise
            if accounted_steps(engine) == step:
                continue  # a physical chunk inside a logical batch
            step = accounted_steps(engine)
            bar.update()
            if losses:
                log.log(step=step, loss=float(np.mean(losses)))
                bar.set_postfix(loss=f"{np.mean(losses):.4f}")
                losses = []
            if step < total_steps and (step % args.checkpoint_every == 0 or step >= stop_at):
                save_train_state(ckpt, model, opt, engine, step, meta)
            if step >= stop_at:
                break
    bar.close()
    epsilon = engine.get_epsilon(args.delta)
    log.print(f"epsilon spent: {epsilon:.4f} (delta {args.delta:g}, {step}/{total_steps} steps, accountant "
              f"{args.accountant})", epsilon=epsilon, steps=step)
    result: dict[str, Any] = {"epsilon": epsilon, "delta": args.delta, "sigma": opt.noise_multiplier, "steps": step,
                              "total_steps": total_steps, "trainable_params": n_trainable,
                              "noise_seeding": noise_seeding(args), "run": str(out),
                              # (sigma, sample rate, steps): what composes this run with others on the same data
                              "accountant_history": [list(h) for h in engine.accountant.history]}
    if step < total_steps:
        log.print(f"stopped at step {step} of {total_steps} (--max-steps): continue with --resume --out {out}")
        return result, model
    if not lead:  # rank 0 saves, samples and evaluates
        discard_train_state(ckpt)
        return result, model

    plain = plain_copy(model, cfg)
    save_ldm(plain, out / "ldm", {"stage": "train", "epsilon": epsilon, "delta": args.delta,
                                  "autoencoder": str(ae_dir), "pretrained": str(ldm_dir)})
    discard_train_state(ckpt)  # only for resuming: a finished run keeps no noise seeds
    parallel.discard_private_checkpoints(out)  # nor any rank's (each deletes its own too; whoever is first wins)
    log.print(f"fine-tuned LDM saved to {out / 'ldm'}")
    if not args.no_sample:
        npz, grid = sample_stage.run(cfg, plain, vae, out, args.per_class, seed=args.seed, device=args.device)
        result.update(samples=str(npz), grid=str(grid))
        if not args.no_eval:
            synthetic = data_mod.from_npz(npz, plain.class_embedder.num_classes)
            # the DP-SGD baselines spend the same (epsilon, delta) again, separately: comparison only, never released
            target = DPTarget(args.target_epsilon, args.delta, args.accountant)
            ev = evaluate_stage.run(cfg, synthetic, private, public, out, seed=args.seed,
                                    baselines_on=not args.no_baselines, target=target, backend=args.backend,
                                    noise_seed=args.seed if args.deterministic_noise else None)
            result.update(ev)
    result["wall_s"] = time.time() - t_start
    (out / "result.json").write_text(json.dumps(result, indent=1))
    summary = f"done in {result['wall_s'] / 60:.1f} min: epsilon {epsilon:.3f} (delta {args.delta:g})"
    if "cnn_test_acc" in result:
        summary += f", CNN accuracy on real test data {result['cnn_test_acc']:.4f}"
    if "grid" in result:
        summary += f", grid: {result['grid']}"
    log.print(summary, **{k: v for k, v in result.items() if not isinstance(v, str)})
    if any(k.startswith("baseline_") for k in result):
        log.print(baselines_table(result))
    return result, model


if __name__ == "__main__":
    main(sys.argv[1:])
