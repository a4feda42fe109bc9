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
    python -m dpldm.train --pipeline SD_FOLDER --data imgs/ --captions imgs/metadata.jsonl --trainable lora

With --pipeline DIR the model is a local diffusers pipeline folder (Stable-Diffusion style, text-conditioned;
dpldm/pipeline.py): its frozen text encoder turns each private image's caption (--captions FILE, or the class prompt
of --prompt TEMPLATE) into its cross-attention context, and the result is saved as diffusers loads it (LoRA
adapters for pipeline.load_lora_weights(run folder), or a UNet folder).
"""


# The recipe, as run() reads top to bottom:
#   prepare      options, private data, sigma, the run folder (dpldm.checkpoint.start_run: new, resume or refuse)
#                (--pipeline: the pipeline and the captioned private data first, dpldm.pipeline.text_run)
#   load_base    the public autoencoder and LDM (pre-trained if missing), the private label set; or the pipeline's
#   warm_up      (configs with a `warmup` section) one DP release of per-class statistics, the LDM trained on its
#                samples (dpldm.warmup); accounted before the DP-SGD steps
#   make_private the private latents, the trainable set, dpkernels.PrivacyEngine
#   resume       the checkpoint's model, optimizer, engine and RNG state (a resumed run)
#   dp_loop      logical Poisson steps, checkpointed
#   finish       epsilon; save, sample, evaluate, result.json (rank 0)
# A library call (dpldm.compartments) builds TrainOptions and gets TrainError; only main() exits.

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from dpldm import adapt_autoencoder, parallel
from dpldm import data as data_mod
from dpldm import evaluate as evaluate_stage
from dpldm import pipeline as pipeline_stage
from dpldm import pretrain as pretrain_stage
from dpldm import pretrain_autoencoder as ae_stage
from dpldm import sample as sample_stage
from dpldm import warmup as warmup_stage
from dpldm.base_models import BaseNotFound, base_record, check_layout, verified_base
from dpldm.baselines import DPTarget
from dpldm.baselines import table as baselines_table
from dpldm.calibration import composed_epsilon, noise_multiplier, sample_rate
from dpldm.checkpoint import (
    RESTART,
    RESUME,
    RESUME_KEYS,
    UNLOGGED_KEYS,
    Start,
    StartRefused,
    checkpoint_dir,
    discard_private_checkpoints,
    discard_train_state,
    load_train_state,
    save_train_state,
    start_run,
    unwritable,
)
from dpldm.common import (
    DEFAULT_RUNS,
    add_config_args,
    config_from,
    default_device,
    images_tensor,
    load_private,
    load_public,
    public_dir,
    seed_all,
)
from dpldm.diffusion import diffusion_loss, encode_latents, encode_split, train_scheduler
from dpldm.export import plain_copy
from dpldm.models import (
    CheckpointError,
    ClassEmbedder,
    ConditionalUNet,
    load_autoencoder,
    load_ldm,
    save_autoencoder,
    save_ldm,
    trained_on,
)
from dpldm.runlog import RunLog, progress
from dpldm.trainable import select_trainable

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

DETERMINISTIC_NOISE_WARNING = (
    "--deterministic-noise: the DP noise and the Poisson sampling are seeded from --seed. Anyone who knows the "
    "seed can regenerate the noise and subtract it, and reruns with the same seed share it: this run has NO "
    "privacy guarantee. Use it for tests only.")


class TrainError(ValueError):
    """A run refused (bad options or data, an unreachable epsilon, a run folder it cannot start in, a missing or
    mismatched base): the message says why and what to pass instead. main() prints it as `error: ...`."""


@dataclass
class TrainOptions:
    """Everything a DP fine-tuning is told: one field per command-line flag, same name, same default (None: the
    config's `train` section, filled by resolved()). Built by main() from the command line and by
    dpldm.compartments for each shard."""

    config: str = "mnist"
    set: list[str] = field(default_factory=list)
    runs: Path = DEFAULT_RUNS
    seed: int = 0
    device: str = field(default_factory=default_device)
    data: str | None = None
    pretrained: Path | None = None
    autoencoder: Path | None = None
    base: str | None = None
    no_base: bool = False
    out: Path | None = None
    target_epsilon: float | None = None
    delta: float | None = None
    epochs: int | None = None
    batch_size: int | None = None
    max_physical_batch_size: int | None = None
    max_grad_norm: float | None = None
    noise_multiplicity: int | None = None
    trainable: str | None = None
    ablation: int | None = None
    lora_rank: int | None = None
    lr: float | None = None
    accountant: str = "prv"
    backend: str = "auto"
    precision: str = "fp32"
    secure_mode: bool = False
    deterministic_noise: bool = False
    resume: bool = False
    fresh: bool = False
    checkpoint_every: int = 20
    max_steps: int | None = None
    no_sample: bool = False
    no_eval: bool = False
    no_baselines: bool = False
    per_class: int | None = None
    pipeline: Path | None = None
    captions: Path | None = None
    prompt: str | None = None
    prompts: Path | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainOptions:
        """The options of parsed command-line arguments.

        Args:
            args: parser().parse_args(...)'s answer.

        Returns:
            The same values, typed.
        """
        return cls(**vars(args))

    def resolved(self, cfg: dict[str, Any]) -> TrainOptions:
        """A copy with every unset option the config's `train` section has filled in, and the run folder's default
        (<runs>/<config>/dp-<trainable>-eps<epsilon>).

        Args:
            cfg: the config (dpldm.config.load_config).

        Returns:
            The filled copy (this one is left as it is).
        """
        names = {f.name for f in dataclasses.fields(self)}
        opts = dataclasses.replace(self, set=list(self.set), **{
            k: v for k, v in cfg["train"].items() if k in names and getattr(self, k) is None})
        if opts.out is None:
            opts.out = Path(opts.runs) / cfg["name"] / f"dp-{opts.trainable}-eps{opts.target_epsilon:g}"
        return opts

    def run_args(self) -> dict[str, Any]:
        """The settings that define the private computation (RESUME_KEYS), as logged and checkpointed: a resume
        must match them. Paths as strings.

        Returns:
            {option: value}, in the options' order.
        """
        return {f.name: (str(v) if isinstance(v, Path) else v) for f in dataclasses.fields(self)
                if f.name in RESUME_KEYS for v in [getattr(self, f.name)]}


def parser() -> argparse.ArgumentParser:
    """The command line of `python -m dpldm.train` (TrainOptions.from_args turns its answer into options).

    Returns:
        The parser.
    """
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
    text = p.add_argument_group("a diffusers pipeline (dpldm/pipeline.py)")
    text.add_argument("--pipeline", type=Path, help="a local text-conditioned diffusers pipeline folder to fine-tune "
                                                    "(unet, vae, text_encoder, tokenizer, scheduler), or the name "
                                                    "of a shipped pipeline base (e.g. mnist-fontdigits-text)")
    text.add_argument("--captions", type=Path, help="with --pipeline: the private images' captions, JSONL "
                                                    "(file_name, text) or CSV (image, caption), paths under --data")
    text.add_argument("--prompt", help="with --pipeline: --data has class sub-folders; class c's caption is "
                                       "PROMPT.format(label=c), e.g. 'a photo of a {label}'")
    text.add_argument("--prompts", type=Path, help="with --captions: public prompts to sample, one per line (the "
                                                   "private captions are never sampled)")
    return p


def default_delta(n: int) -> float:
    """1/N rounded down to a power of ten, at most 1e-5.

    Args:
        n: the number of private training examples.

    Returns:
        delta.
    """
    return min(1e-5, 10.0 ** math.floor(math.log10(1.0 / n)))


def fail(msg: str) -> NoReturn:
    """Refuse the run.

    Args:
        msg: why, and what to pass instead.

    Raises:
        TrainError: always.
    """
    raise TrainError(msg)


def noise_seeding(opts: TrainOptions) -> str:
    """How the private streams are seeded, for logs and results (never the seed itself).

    Args:
        opts: the run's options.

    Returns:
        A short description.
    """
    if opts.deterministic_noise:
        return "deterministic (--seed, not private)"
    return "os, fresh every step (secure mode)" if opts.secure_mode else "os"


def engine_seed(opts: TrainOptions) -> int | None:
    """The seed make_private gets for the noise and the Poisson sampler (warning that --deterministic-noise voids
    the guarantee).

    Args:
        opts: the run's options.

    Returns:
        --seed with --deterministic-noise; else None: drawn from the OS by the engine.
    """
    if not opts.deterministic_noise:
        return None
    warnings.warn(DETERMINISTIC_NOISE_WARNING, UserWarning, stacklevel=2)
    return opts.seed


def accounted_steps(engine: Any, prior: list[tuple[float, float, int]]) -> int:
    """The logical DP-SGD steps the engine's accountant has recorded.

    Args:
        engine: a dpkernels.PrivacyEngine.
        prior: the history entries of the releases before DP-SGD (Job.prior), not counted.

    Returns:
        The number of steps.
    """
    return int(sum(h[2] for h in engine.accountant.history)) - sum(h[2] for h in prior)


def base_parts(opts: TrainOptions, cfg: dict[str, Any], name: str, log: RunLog) -> tuple[Path, Path]:
    """The shipped base's autoencoder and LDM folders, verified against its SHA256SUMS; --autoencoder or
    --pretrained, when given, replaces its part. Never pre-trains: a base that is not installed is an error.

    Args:
        opts: the run's options.
        cfg: the config.
        name: the base, a name or a folder.
        log: where to record which base was used.

    Returns:
        (autoencoder folder, LDM folder).
    """
    try:
        folder = verified_base(name)
    except BaseNotFound as e:
        named_by = "--base" if opts.base else f"config {cfg['name']}"
        fail(f"{named_by}: {e} Or pass --no-base to use (or pre-train into) {public_dir(opts, cfg)}, or "
             "--autoencoder/--pretrained folders.")
    if opts.pretrained is None:
        check_layout(folder, cfg)  # its architecture is checked when loaded
    ae_dir, ldm_dir = opts.autoencoder or folder / "autoencoder", opts.pretrained or folder / "ldm"
    for flag, given in (("--autoencoder", opts.autoencoder), ("--pretrained", opts.pretrained)):
        if given is not None and not given.exists():
            fail(f"{flag} {given}: no such folder")
    public = base_record(folder).get("public", {})
    log.print(f"base model {name} ({folder}, files verified against its SHA256SUMS; pre-trained on public data "
              f"{public.get('ldm')!r})", base=str(folder))
    return ae_dir, ldm_dir


def ensure_pretrained(opts: TrainOptions, cfg: dict[str, Any], log: RunLog) -> tuple[Path, Path]:
    """The (autoencoder, LDM) folders a run fine-tunes from: the shipped base's (see base_parts), else the public
    cache <runs>/<config>/public, pre-trained on the config's public data if missing; --autoencoder and
    --pretrained override either.

    Args:
        opts: the run's options (base, no_base, autoencoder, pretrained, runs; seed and device to pre-train).
        cfg: the config.
        log: where to say what was chosen or pre-trained.

    Returns:
        (autoencoder folder, LDM folder).
    """
    base = None if opts.no_base else (opts.base or cfg.get("base"))
    if base and not (opts.autoencoder and opts.pretrained):
        return base_parts(opts, cfg, str(base), log)
    pub = public_dir(opts, cfg)
    ae_dir = opts.autoencoder or pub / "autoencoder"
    ldm_dir = opts.pretrained or pub / "ldm"
    if opts.pretrained is not None and not ldm_dir.exists():
        fail(f"--pretrained {ldm_dir}: no such folder")
    if not (ae_dir.exists() and ldm_dir.exists()) and not cfg["data"].get("public"):
        fail(f"no pre-trained model at {ldm_dir} and config {cfg['name']} names no public data to build one: pass "
             "--pretrained/--autoencoder folders, or public data with --set data.public=PATH")
    # a cache pre-trained on other public data (e.g. before the preset changed) is refused, never reused or erased
    public = cfg["data"].get("public")
    for folder, given in ((ae_dir, opts.autoencoder), (ldm_dir, opts.pretrained)):
        source = trained_on(folder) if given is None else None
        if public and source is not None and source != str(Path(public)):
            fail(f"the cached model {folder} was pre-trained on public data {source!r}, but config {cfg['name']} names "
                 f"{public!r}: move {pub} away to pre-train again, or pass --autoencoder/--pretrained "
                 "to use it anyway")
    if not ae_dir.exists():
        if opts.autoencoder is not None:
            fail(f"--autoencoder {ae_dir}: no such folder")
        log.print(f"no cached autoencoder at {ae_dir}: pre-training one on public data ({cfg['data']['public']})")
        ae_stage.run(cfg, ae_dir, opts.seed, opts.device)
    if not ldm_dir.exists():
        log.print(f"no cached LDM at {ldm_dir}: pre-training one on public data ({cfg['data']['public']})")
        pretrain_stage.run(cfg, ae_dir, ldm_dir, opts.seed, opts.device)
    return ae_dir, ldm_dir


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """The command line: parse, run, and turn a refusal into `error: ...` on stderr and exit status 1.

    Args:
        argv: the arguments (default: sys.argv[1:]).

    Returns:
        result.json's content.
    """
    opts = TrainOptions.from_args(parser().parse_args(argv))
    try:
        try:
            cfg = config_from(opts)
        except ValueError as e:
            fail(str(e))
        return run(cfg, opts)[0]
    except TrainError as e:
        raise SystemExit(f"error: {e}") from e
    finally:
        parallel.teardown()


def run(cfg: dict[str, Any], opts: TrainOptions, private: data_mod.DataSet | None = None,
        text: pipeline_stage.TextRun | None = None) -> tuple[dict[str, Any], ConditionalUNet]:
    """DP fine-tune, then (unless opts say not to) sample and evaluate.

    Args:
        cfg: the config (dpldm.config.load_config; with `text`, the run config of its pipeline).
        opts: the run's options; unset ones are taken from the config (TrainOptions.resolved, on a copy).
        private: the private data set, already loaded (dpldm.compartments passes one shard); default: opts.data,
            else the config's private data.
        text: a pipeline and its captioned private data, already loaded (dpldm.compartments passes one shard's,
            under the run's class prompts, in place of `private`); default: --pipeline's, loaded from opts.

    Returns:
        (result.json's content, the fine-tuned model as trained: LoRA adapters still separate).

    Raises:
        TrainError: the run was refused; nothing was trained.
    """
    t_start = time.time()
    opts = opts.resolved(cfg)
    if text is not None:
        private = text.captioned.data
    elif opts.pipeline is not None:
        if opts.prompts is not None and not Path(opts.prompts).is_file():
            fail(f"--prompts {opts.prompts}: no such file")  # read after training: checked before it
        try:
            cfg, text = pipeline_stage.text_run(cfg, opts.pipeline, opts.data, opts.captions, opts.prompt)
        except (pipeline_stage.PipelineError, data_mod.DataError) as e:
            fail(str(e))
        private = text.captioned.data
    elif opts.captions or opts.prompt or opts.prompts:
        fail("--captions, --prompt and --prompts go with --pipeline DIR")
    elif cfg.get("requires_pipeline"):
        fail(f"config {cfg['name']} fine-tunes a diffusers pipeline: pass --pipeline DIR")
    job = prepare(cfg, opts, private, text)
    vae, model, base_dirs = load_base(cfg, opts, job)
    vae, base_dirs = warm_up(cfg, opts, job, vae, model, base_dirs)
    dp = make_private(cfg, opts, job, vae, model)
    step = resume(opts, job, dp)
    step = dp_loop(cfg, opts, job, dp, step)
    return finish(cfg, opts, job, dp, vae, base_dirs, step, t_start)


# --- prepare: options, private data, sigma, the run folder ---------------------------------------------------------


@dataclass
class Job:
    """What prepare() settled before anything is loaded or trained.

    Attributes:
        out: the run folder.
        rank: this process's rank.
        world: the job's number of ranks.
        private: the private data set.
        public: the evaluation's public data (loaded up front, on rank 0, when the run evaluates), else None.
        sigma: the noise multiplier.
        warmup: the config's DP warm-up (dpldm.warmup), or None.
        run_args: the settings a resume must share (TrainOptions.run_args).
        start: how the run starts (dpldm.checkpoint.start_run).
        log: the run's log (rank 0; a silent one on the others).
        text: the pipeline and captioned data of a --pipeline run, else None.
    """

    out: Path
    rank: int
    world: int
    private: data_mod.DataSet
    public: data_mod.DataSet | None
    sigma: float
    warmup: warmup_stage.Settings | None
    run_args: dict[str, Any]
    start: Start
    log: RunLog
    text: pipeline_stage.TextRun | None = None

    @property
    def prior(self) -> list[tuple[float, float, int]]:
        """The accountant history entries of the releases before the DP-SGD steps (the warm-up's)."""
        return self.warmup.history() if self.warmup else []

    @property
    def lead(self) -> bool:
        """Rank 0: the one that logs, saves, samples and evaluates."""
        return self.rank == 0

    @property
    def ckpt(self) -> Path:
        """This rank's checkpoint folder (every rank keeps its own sampler and RNG state)."""
        return checkpoint_dir(self.out, self.rank)


def prepare(cfg: dict[str, Any], opts: TrainOptions, private: data_mod.DataSet | None,
            text: pipeline_stage.TextRun | None = None) -> Job:
    """Refuse early, before anything is loaded or trained: contradicting options, bad private data, an unreachable
    epsilon, an unwritable run folder, missing evaluation data, an inconsistent resume. Then clear or keep the run
    folder (dpldm.checkpoint.start_run) and open its log.

    Args:
        cfg: the config.
        opts: the resolved options; opts.delta is set here when None (default_delta of the private set's size).
        private: the private data set, if the caller loaded it.
        text: a --pipeline run's pipeline and captioned data.

    Returns:
        The Job.
    """
    rank, world = parallel.setup(opts)
    if opts.secure_mode and opts.deterministic_noise:
        fail("--secure-mode and --deterministic-noise contradict each other: pass one of them")
    if opts.base and opts.no_base:
        fail("--base and --no-base contradict each other: pass one of them")
    out: Path = opts.out
    private = private_data(cfg, opts, private)
    try:
        warmup = warmup_stage.Settings.of(cfg, opts.target_epsilon)
    except warmup_stage.WarmupError as e:
        fail(str(e))
    if warmup is not None and warmup.autoencoder_steps and not cfg["data"].get("public"):
        fail(f"config {cfg['name']}: warmup.autoencoder_steps adapts the autoencoder on public images too, and the "
             "config names no public data (data.public)")
    if warmup is not None and world > 1:
        fail(f"config {cfg['name']}'s DP warm-up runs in one process only (every rank would release the statistics "
             "with its own noise): run it without torchrun, or drop the warmup section (--set warmup=null)")
    sigma = calibrate(opts, len(private.train.labels), warmup.history() if warmup else [])
    # what a resume must find unchanged beyond the options: the pipeline's files and the private images themselves
    run_args = {**opts.run_args(), "pipeline_sha256": text.pipeline.sha256 if text else None,
                "data_sha256": data_sha256(private.train)}
    public, missing = None, unwritable(out)
    if missing is None and rank == 0 and not (opts.no_sample or opts.no_eval) and cfg["data"].get("public"):
        public, missing = evaluation_public_data(cfg)
    try:
        start = start_run(out, rank, world, opts.resume, opts.fresh, run_args, refuse=missing)
    except StartRefused as e:
        fail(str(e))
    log = RunLog(out, "train") if rank == 0 else parallel.SilentLog(out, "train")
    if start.mode == RESTART:
        log.print(f"--resume: the run in {out} was stopped before its first checkpoint, so nothing of it was kept: "
                  "starting again from step 0")
    log.print(f"private data: {private.source}, {len(private.train.labels)} train / {len(private.test.labels)} test "
              f"examples; run folder {out}", **{k: v for k, v in run_args.items() if k not in UNLOGGED_KEYS})
    return Job(out, rank, world, private, public, sigma, warmup, run_args, start, log, text)


def private_data(cfg: dict[str, Any], opts: TrainOptions, private: data_mod.DataSet | None) -> data_mod.DataSet:
    """The private data set: the one given, else --data, else the config's private data; never a default one.

    Args:
        cfg: the config.
        opts: the run's options.
        private: the private data set, if the caller loaded it.

    Returns:
        The data set.
    """
    if private is None and not (opts.data or cfg["data"].get("private")):
        fail(f"config {cfg['name']} names no private data set: pass --data PATH (.npz or folder of class folders)")
    try:
        if private is None:
            private = load_private(opts.data or cfg["data"]["private"], cfg)
    except data_mod.DataError as e:
        fail(str(e))
    return private


def data_sha256(split: data_mod.Split) -> str:
    """One sha256 over a split's images and labels (their bytes, shapes and types): a resume checks the private
    data did not change under the same path. Never logged (checkpoint.UNLOGGED_KEYS).

    Args:
        split: the private training split.

    Returns:
        The hex digest.
    """
    h = hashlib.sha256()
    for a in (split.images, split.labels):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def calibrate(opts: TrainOptions, n: int, prior: list[tuple[float, float, int]]) -> float:
    """Sigma for the target epsilon over --epochs passes at the loader's rate (dpldm.calibration), composed after
    the `prior` releases. N, the private training set's size, is the one thing read off the private data (the
    sampling rate, the default delta).

    Args:
        opts: the resolved options; opts.delta is set to default_delta(n) when None.
        n: the number of private training examples.
        prior: accountant history entries of the releases before DP-SGD (the warm-up's), or [].

    Returns:
        The noise multiplier.
    """
    if opts.delta is None:
        opts.delta = default_delta(n)
    if opts.batch_size > n:
        fail(f"--batch-size {opts.batch_size} is larger than the private training set ({n} examples)")
    if not opts.target_epsilon > 0:
        fail(f"--target-epsilon must be positive, got {opts.target_epsilon}")
    try:
        return noise_multiplier(opts.target_epsilon, opts.delta, n, opts.batch_size, opts.epochs, opts.accountant,
                                prior=prior)
    except ValueError as e:
        fail(f"target epsilon {opts.target_epsilon} is unreachable with delta {opts.delta:g}, {opts.epochs} epochs "
             f"and sampling rate {sample_rate(n, opts.batch_size):.4g} ({e}). Raise --target-epsilon, or lower "
             "--epochs or --batch-size" + (", or raise the warm-up's sigma (warmup.sigma)." if prior else "."))


def evaluation_public_data(cfg: dict[str, Any]) -> tuple[data_mod.DataSet | None, str | None]:
    """The evaluation's baseline (a) and Frechet features need the public data: loaded once, before training
    (seconds) rather than when the evaluation reaches it (minutes later).

    Args:
        cfg: the config (its data.public).

    Returns:
        (the public data set, None), or (None, why it cannot be loaded).
    """
    try:
        return load_public(cfg), None
    except data_mod.DataError as e:
        return None, (f"the evaluation needs the public data {cfg['data']['public']!r} (baseline (a), Frechet "
                      f"features), which cannot be loaded: {e} (checked before training; --no-eval skips it)")


# --- load_base: the public autoencoder and LDM --------------------------------------------------------------------


def load_base(cfg: dict[str, Any], opts: TrainOptions, job: Job
              ) -> tuple[Any, ConditionalUNet, tuple[Path, Path]]:
    """The public autoencoder and LDM the run starts from (rank 0 pre-trains a missing cache first; the others then
    find it); a fresh class embedder when the config gives the private data another label set.

    Args:
        cfg: the config.
        opts: the run's options.
        job: prepare()'s answer.

    Returns:
        (the autoencoder, the LDM, (autoencoder folder, LDM folder)).
    """
    if job.text is not None:  # --pipeline: its VAE, its UNet on the private captions' contexts (frozen text encoder)
        seed_all(opts.seed)
        text = job.text
        # (never the number of distinct captions: like every figure of the private data but N, it is not logged)
        job.log.print(f"pipeline {text.pipeline.folder} (sha256 {text.pipeline.sha256[:16]})",
                      pipeline=str(text.pipeline.folder), pipeline_sha256=text.pipeline.sha256)
        model = pipeline_stage.text_model(text, text.captioned.captions)
        return text.pipeline.vae, model, (text.pipeline.folder, text.pipeline.folder)
    try:
        if not job.lead:
            parallel.barrier(job.world)
        ae_dir, ldm_dir = ensure_pretrained(opts, cfg, job.log)
        if job.lead:
            parallel.barrier(job.world)
        vae = load_autoencoder(ae_dir, cfg)
        model, _ = load_ldm(ldm_dir, cfg)
    except CheckpointError as e:
        fail(str(e))
    seed_all(opts.seed)  # before any initialisation: --seed controls everything but the private streams
    if job.private.num_classes != model.class_embedder.num_classes:
        # a configured label set other than the public one (data.private_num_classes): a fresh class embedder
        # (trained privately in attention/all modes)
        model.class_embedder = ClassEmbedder(job.private.num_classes, cfg["unet"]["cross_attention_dim"])
        job.log.print(f"the config gives the private data {job.private.num_classes} classes: new class embedder")
    return vae, model, (ae_dir, ldm_dir)


# --- warm_up: the DP release of per-class statistics, the LDM trained on its samples ------------------------------


def warm_up(cfg: dict[str, Any], opts: TrainOptions, job: Job, vae: Any, model: ConditionalUNet,
            base_dirs: tuple[Path, Path]) -> tuple[Any, tuple[Path, Path]]:
    """dpldm.warmup on a new or restarted run (a resumed one's checkpoint holds the warmed model, and the release in
    its accountant history): release the private training split's per-class statistics once, keep the release in
    <out>/warmup/release.npz (a DP output; a restarted run reuses it, so the data are never released twice), then
    train every LDM parameter on images drawn from it, non-privately (post-processing). With
    warmup.autoencoder_steps, the autoencoder is first adapted on the same images plus the public ones
    (dpldm.adapt_autoencoder, post-processing too) and saved in <out>/autoencoder, which the rest of the run, its
    resumes and dpldm.sample use.

    Args:
        cfg: the config.
        opts: the run's options (seed; deterministic_noise seeds the release's noise from --seed, tests only).
        job: prepare()'s answer.
        vae: the base's autoencoder.
        model: the LDM, trained in place.
        base_dirs: the (autoencoder, LDM) folders the run started from.

    Returns:
        (the autoencoder the run uses, the (autoencoder, LDM) folders to record with the model).
    """
    s = job.warmup
    adapted = job.out / "autoencoder"
    if s is None:
        return vae, base_dirs
    if job.start.mode == RESUME:
        if not s.autoencoder_steps:
            return vae, base_dirs
        try:  # written before the first checkpoint, so a resumable run has it
            return load_autoencoder(adapted, cfg), (adapted, base_dirs[1])
        except CheckpointError as e:
            fail(f"--resume: the run's adapted autoencoder cannot be read ({e}): pass --fresh to start over")
    train_split, k = job.private.train, job.private.num_classes
    path = job.out / "warmup" / warmup_stage.RELEASE_FILE
    if job.start.mode == RESTART and path.exists():
        rel = warmup_stage.Release.load(path)
        if not rel.matches(s, train_split.images.shape[1:], k):
            fail(f"{path}: a release made with other settings than the config's warmup section {s}: pass --fresh "
                 "to start over")
        job.log.print(f"DP warm-up: the release this run made before it was stopped ({path}), reused")
    else:
        noise = np.random.default_rng(opts.seed + 7919 if opts.deterministic_noise else None)  # OS entropy
        rel = warmup_stage.release(train_split.images, train_split.labels, k, s, noise)
        path.parent.mkdir(parents=True, exist_ok=True)
        rel.save(path)  # before anything derived from it is written
    eps = composed_epsilon(job.prior, opts.delta, opts.accountant)
    job.log.print(f"DP warm-up: per-class statistics released (sigma {s.sigma}, {s.frequencies} frequencies, clip "
                  f"{s.clip}; epsilon {eps:.3f} alone at delta {opts.delta:g}), {s.steps} steps on "
                  f"{s.per_class * k} of its samples", warmup_epsilon=eps, warmup=dataclasses.asdict(s))
    images, labels = rel.sample(s.per_class, np.random.default_rng(opts.seed))
    x = images_tensor(data_mod.Split(images, labels), cfg)
    if s.autoencoder_steps:
        public = images_tensor(load_public(cfg).train, cfg)
        job.log.print(f"DP warm-up: the autoencoder adapted for {s.autoencoder_steps} steps on these samples and "
                      f"{len(public)} public images ({cfg['data']['public']}), saved in {adapted}")
        ae_losses = adapt_autoencoder.adapt(vae, x, public, s.autoencoder_steps, s.autoencoder_batch_size,
                                            s.autoencoder_lr, autoencoder_kl_weight(base_dirs[0]),
                                            opts.seed, opts.device)
        save_autoencoder(vae.cpu(), adapted, {"stage": "adapt_autoencoder", "from": str(base_dirs[0]),
                                              "public": cfg["data"]["public"], "steps": s.autoencoder_steps,
                                              "release": str(path)})
        vae.to(opts.device)
        job.log.log(autoencoder_losses=ae_losses)
        base_dirs = (adapted, base_dirs[1])
    z = encode_latents(vae, x)
    losses = warmup_stage.train_on_samples(model, z, torch.from_numpy(labels), cfg, s, opts.seed, opts.device)
    job.log.log(warmup_losses=losses)
    return vae, base_dirs


def autoencoder_kl_weight(folder: Path) -> float:
    """The KL weight the autoencoder in `folder` was pre-trained with (the config in its dpldm.json), else the
    presets' 1e-6.

    Args:
        folder: an autoencoder folder.

    Returns:
        The weight.
    """
    meta = folder / "dpldm.json"
    found = json.loads(meta.read_text()) if meta.is_file() else {}
    return float(found.get("config", {}).get("pretrain_autoencoder", {}).get("kl_weight", 1e-6))


# --- make_private: latents, trainable set, engine -----------------------------------------------------------------


@dataclass
class PrivateTraining:
    """What make_private() returns: the engine's wrapped model, optimizer and loader, and the run's size.

    Attributes:
        model: the model (wrapped by the engine).
        opt: the DP optimizer.
        loader: the Poisson loader of the private latents.
        engine: the dpkernels.PrivacyEngine (accountant, noise and sampler streams).
        n_trainable: the number of trainable parameters.
        total_steps: epochs * len(loader) logical steps.
    """

    model: Any
    opt: Any
    loader: Any
    engine: Any
    n_trainable: int
    total_steps: int


def make_private(cfg: dict[str, Any], opts: TrainOptions, job: Job, vae: Any, model: ConditionalUNet
                 ) -> PrivateTraining:
    """Encode the private images once (the frozen public autoencoder is a fixed per-example map), freeze all but the
    trainable set, and hand model, optimizer and loader to dpkernels.PrivacyEngine.

    Args:
        cfg: the config.
        opts: the run's options.
        job: prepare()'s answer.
        vae: the autoencoder.
        model: the LDM.

    Returns:
        The PrivateTraining objects.
    """
    from dpkernels import PrivacyEngine

    z = encode_split(vae, job.private.train.images, cfg, opts.device)
    y = torch.from_numpy(job.private.train.labels)
    try:
        n_trainable = select_trainable(model, opts.trainable, opts.ablation, opts.lora_rank)
    except ValueError as e:
        fail(str(e))
    model.to(opts.device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=opts.lr, weight_decay=0.0)
    loader = DataLoader(TensorDataset(z, y), batch_size=opts.batch_size)
    engine = PrivacyEngine(accountant=opts.accountant, secure_mode=opts.secure_mode)
    try:
        model, opt, loader = engine.make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=job.sigma,
            max_grad_norm=opts.max_grad_norm, poisson_sampling=True, backend=opts.backend, seed=engine_seed(opts))
    except ValueError as e:  # unknown backend, non-positive clipping norm, unsupported trainable module
        fail(str(e))
    engine.accountant.history[:0] = job.prior  # the warm-up's release came first (a resume loads its own history)
    dp = PrivateTraining(model, opt, loader, engine, n_trainable, opts.epochs * len(loader))
    log_setup(opts, job.log, dp)
    return dp


def log_setup(opts: TrainOptions, log: RunLog, dp: PrivateTraining) -> None:
    """Log what the run trains and with which privacy parameters, before its first step.

    Args:
        opts: the run's options.
        log: the run's log.
        dp: make_private()'s training objects.
    """
    log.print(f"trainable parameters: {dp.n_trainable:,} ({opts.trainable}"
              + (f", ablation {opts.ablation}" if opts.trainable == "attention" else "")
              + (f", rank {opts.lora_rank}" if opts.trainable == "lora" else "") + ")", trainable_params=dp.n_trainable)
    opt, engine = dp.opt, dp.engine
    log.print(f"sigma (noise multiplier) {opt.noise_multiplier:.4f}, sample rate {engine.sample_rate:.5f}, "
              f"{dp.total_steps} steps, target epsilon {opts.target_epsilon} at delta {opts.delta:g}, "
              f"C {opt.max_grad_norm}, k {opts.noise_multiplicity}", sigma=opt.noise_multiplier,
              sample_rate=engine.sample_rate, total_steps=dp.total_steps, delta=opts.delta,
              max_grad_norm=opt.max_grad_norm, expected_batch_size=opt.expected_batch_size)
    log.print(f"DP noise and Poisson sampling seeded: {noise_seeding(opts)}", noise_seeding=noise_seeding(opts))
    if opts.deterministic_noise:
        log.print("WARNING " + DETERMINISTIC_NOISE_WARNING)


# --- resume ------------------------------------------------------------------------------------------------------


def resume(opts: TrainOptions, job: Job, dp: PrivateTraining) -> int:
    """Restore the checkpoint start_run chose (model, optimizer, engine, RNG state) for a resumed run; otherwise,
    on several ranks, give each rank its own diffusion timesteps and noise (the model init was shared).

    Args:
        opts: the run's options.
        job: prepare()'s answer.
        dp: make_private()'s answer.

    Returns:
        The number of logical steps already done (0 unless resumed).
    """
    start = job.start
    if start.mode != RESUME:
        if job.world > 1:
            torch.manual_seed(opts.seed * 1_000_003 + job.rank)
        return 0
    for why in start.refused:
        job.log.print(f"WARNING checkpoint refused, {why}: falling back to {start.found}")
    try:
        step = load_train_state(start.found, dp.model, dp.opt, dp.engine)
    except ValueError as e:
        fail(str(e))
    if accounted_steps(dp.engine, job.prior) != step or dp.engine.accountant.history[:len(job.prior)] != job.prior:
        fail(f"{start.found}: the accountant history {dp.engine.accountant.history} does not hold the warm-up's "
             f"release {job.prior} and the {step} steps the checkpoint says")
    job.log.print(f"resumed from {start.found} at step {step}, epsilon so far {dp.engine.get_epsilon(opts.delta):.4f}",
                  resumed_step=step)
    return step


# --- dp_loop ------------------------------------------------------------------------------------------------------


def dp_loop(cfg: dict[str, Any], opts: TrainOptions, job: Job, dp: PrivateTraining, step: int) -> int:
    """Logical Poisson steps from `step` to the end of the run or --max-steps, a checkpoint every --checkpoint-every
    steps and at the stop. With --noise-multiplicity k each image is used with k diffusion noises; its k rows share
    one example id, so the k losses are averaged before clipping.

    Args:
        cfg: the config.
        opts: the run's options.
        job: prepare()'s answer.
        dp: make_private()'s answer.
        step: the logical steps already done.

    Returns:
        The logical steps done when the loop stops.
    """
    model, opt, loader, engine, total_steps = dp.model, dp.opt, dp.loader, dp.engine, dp.total_steps
    meta = {"args": job.run_args, "sigma": opt.noise_multiplier, "total_steps": total_steps, "finished": False,
            "world": job.world}  # a resume needs the same number of ranks
    sched = train_scheduler(cfg)
    k = opts.noise_multiplicity
    stop_at = total_steps if opts.max_steps is None else min(total_steps, opts.max_steps)
    bar = progress(total_steps, "DP fine-tune", initial=step, disable=not job.lead)
    losses: list[float] = []
    while step < stop_at:
        for zb, yb in engine.virtual_batches(loader, opts.max_physical_batch_size):
            opt.zero_grad(set_to_none=True)
            if len(zb):
                rows_z, rows_y = zb.repeat_interleave(k, 0).to(opts.device), yb.repeat_interleave(k, 0).to(opts.device)
                with torch.autocast(torch.device(opts.device).type, dtype=PRECISIONS[opts.precision] or torch.bfloat16,
                                    enabled=opts.precision != "fp32"):
                    loss = diffusion_loss(model, sched, rows_z, rows_y, cfg["train"].get("label_dropout", 0.0))
                opt.set_example_ids(torch.arange(len(zb), device=opts.device).repeat_interleave(k))
                loss.backward()
                losses.append(loss.item())
            opt.step()  # an empty Poisson batch still steps: the update is pure noise
            if accounted_steps(engine, job.prior) == step:
                continue  # a physical chunk inside a logical batch
            step = accounted_steps(engine, job.prior)
            bar.update()
            if losses:
                job.log.log(step=step, loss=float(np.mean(losses)))
                bar.set_postfix(loss=f"{np.mean(losses):.4f}")
                losses = []
            if step < total_steps and (step % opts.checkpoint_every == 0 or step >= stop_at):
                save_train_state(job.ckpt, model, opt, engine, step, meta)
            if step >= stop_at:
                break
    bar.close()
    return step


# --- finish: epsilon; save, sample, evaluate ------------------------------------------------------------------------


def finish(cfg: dict[str, Any], opts: TrainOptions, job: Job, dp: PrivateTraining, vae: Any,
           base_dirs: tuple[Path, Path], step: int, t_start: float) -> tuple[dict[str, Any], ConditionalUNet]:
    """Report the epsilon spent; a finished run's rank 0 then saves the model (and deletes every private
    checkpoint), samples, evaluates and writes result.json. A run stopped by --max-steps keeps its checkpoint.

    Args:
        cfg: the config.
        opts: the run's options.
        job: prepare()'s answer.
        dp: make_private()'s answer.
        vae: the autoencoder (to decode samples).
        base_dirs: the (autoencoder, LDM) folders the run started from, recorded with the model.
        step: the logical steps done.
        t_start: when the run started (time.time()).

    Returns:
        (result.json's content, the fine-tuned model as trained).
    """
    epsilon = dp.engine.get_epsilon(opts.delta)
    job.log.print(f"epsilon spent: {epsilon:.4f} (delta {opts.delta:g}, {step}/{dp.total_steps} steps, accountant "
                  f"{opts.accountant})", epsilon=epsilon, steps=step)
    result: dict[str, Any] = {"epsilon": epsilon, "delta": opts.delta, "sigma": dp.opt.noise_multiplier,
                              "steps": step, "total_steps": dp.total_steps, "trainable_params": dp.n_trainable,
                              "noise_seeding": noise_seeding(opts), "run": str(job.out),
                              # (sigma, sample rate, steps): what composes this run with others on the same data
                              "accountant_history": [list(h) for h in dp.engine.accountant.history]}
    if job.warmup is not None:
        result["warmup"] = {**dataclasses.asdict(job.warmup),
                            "epsilon_alone": composed_epsilon(job.prior, opts.delta, opts.accountant)}
    if step < dp.total_steps:
        job.log.print(f"stopped at step {step} of {dp.total_steps} (--max-steps): continue with --resume --out "
                      f"{job.out}")
        return result, dp.model
    if not job.lead:  # rank 0 saves, samples and evaluates
        discard_train_state(job.ckpt)
        return result, dp.model
    plain = (save_text_model(opts, job, dp, epsilon) if job.text is not None
             else save_model(cfg, opts, job, dp.model, epsilon, base_dirs))
    if not opts.no_sample:
        result.update(sample_and_evaluate(cfg, opts, job, plain, vae))
    result["wall_s"] = time.time() - t_start
    (job.out / "result.json").write_text(json.dumps(result, indent=1))
    summary = f"done in {result['wall_s'] / 60:.1f} min: epsilon {epsilon:.3f} (delta {opts.delta:g})"
    if "cnn_test_acc" in result:
        summary += f", CNN accuracy on real test data {result['cnn_test_acc']:.4f}"
    if "grid" in result:
        summary += f", grid: {result['grid']}"
    job.log.print(summary, **{k: v for k, v in result.items() if not isinstance(v, str)})
    if any(k.startswith("baseline_") for k in result):
        job.log.print(baselines_table(result))
    return result, dp.model


def save_model(cfg: dict[str, Any], opts: TrainOptions, job: Job, model: Any, epsilon: float,
               base_dirs: tuple[Path, Path]) -> ConditionalUNet:
    """Save the fine-tuned LDM (a plain copy: LoRA merged, engine hooks gone) in <out>/ldm, then delete every
    rank's private checkpoint: a finished run keeps no noise seeds.

    Args:
        cfg: the config.
        opts: the run's options.
        job: prepare()'s answer.
        model: the trained model (engine-wrapped).
        epsilon: the epsilon spent, recorded with the model.
        base_dirs: the (autoencoder, LDM) folders the run started from, recorded with the model.

    Returns:
        The plain copy.
    """
    ae_dir, ldm_dir = base_dirs
    plain = plain_copy(model, cfg)
    # the model goes in place only once the seeds are gone: a kill in between never leaves a releasable model
    # beside the noise seeds that would let whoever has both subtract the noise (a kill before the rename leaves
    # the staged copy, which a resumed run writes again)
    staged = job.out / ".ldm.staged"
    save_ldm(plain, staged, {"stage": "train", "epsilon": epsilon, "delta": opts.delta,
                             "autoencoder": str(ae_dir), "pretrained": str(ldm_dir),
                             # the run's own (warmup.autoencoder_steps): it stays beside ldm/ wherever the run moves
                             "autoencoder_adapted": ae_dir == job.out / "autoencoder"})
    discard_train_state(job.ckpt)  # only for resuming
    discard_private_checkpoints(job.out)  # nor any rank's (each deletes its own too; whoever is first wins)
    if (job.out / "ldm").exists():
        shutil.rmtree(job.out / "ldm")
    os.replace(staged, job.out / "ldm")
    job.log.print(f"fine-tuned LDM saved to {job.out / 'ldm'}")
    return plain


def save_text_model(opts: TrainOptions, job: Job, dp: PrivateTraining, epsilon: float) -> Any:
    """save_model for a --pipeline run: what diffusers loads (LoRA adapters in the run folder, or out/unet) and the
    model card, put in place only once every private checkpoint is gone; then the plain model, conditioned on the
    public sampling prompts (class prompts of --prompt, --prompts lines; never the private captions).

    Args:
        opts: the run's options.
        job: prepare()'s answer.
        dp: make_private()'s answer (the trained model, engine-patched).
        epsilon: the epsilon spent.

    Returns:
        The plain model to sample (no condition when there is no public prompt).
    """
    text = job.text
    if text.captioned.per_class:
        prompts = text.captioned.captions  # the class prompts: the template and the class names, no private text
    elif opts.prompts is not None:
        prompts = [line.strip() for line in Path(opts.prompts).read_text().splitlines() if line.strip()]
    else:
        prompts = []
    plain = pipeline_stage.plain_text_copy(dp.model, text, prompts, opts.trainable, opts.lora_rank)
    record = {"epsilon": round(epsilon, 4), "delta": opts.delta, "sigma": dp.opt.noise_multiplier,
              "sample rate q": dp.engine.sample_rate, "steps": accounted_steps(dp.engine, job.prior),
              "max_grad_norm C": opts.max_grad_norm, "trainable": opts.trainable,
              **({"lora_rank": opts.lora_rank} if opts.trainable == "lora" else {}),
              "pipeline": str(text.pipeline.folder), "pipeline sha256": text.pipeline.sha256,
              "private examples": len(job.private.train.labels)}
    staged = job.out / ".text.staged"
    if staged.exists():
        shutil.rmtree(staged)
    names = [p.name for p in pipeline_stage.save_text_model(plain, staged, opts.trainable, opts.lora_rank, record)]
    discard_train_state(job.ckpt)
    discard_private_checkpoints(job.out)
    for name in names:
        if (job.out / name).is_dir():
            shutil.rmtree(job.out / name)
        os.replace(staged / name, job.out / name)
    shutil.rmtree(staged)
    job.log.print(f"fine-tuned {opts.trainable} weights saved to {job.out} ({', '.join(names)}): diffusers loads "
                  "them", saved=names)
    return plain


def sample_and_evaluate(cfg: dict[str, Any], opts: TrainOptions, job: Job, plain: ConditionalUNet, vae: Any
                        ) -> dict[str, Any]:
    """Sample the fine-tuned model and, unless --no-eval, evaluate the samples beside the baselines.

    Args:
        cfg: the config.
        opts: the run's options (per_class, no_eval, no_baselines, seeds, backend).
        job: prepare()'s answer (the run folder, the private and public data).
        plain: the saved model.
        vae: the autoencoder.

    Returns:
        What they add to result.json (samples, grid, the evaluation's numbers).
    """
    if plain.class_embedder.num_classes == 0:
        job.log.print("no public prompt to sample (--captions without --prompts): nothing sampled")
        return {}
    # a class folder's label is its index in sorted name order: the grid names each row by its class prompt (never
    # by private captions, which are not the sampled conditions)
    names = job.text.captioned.captions if job.text is not None and job.text.captioned.per_class else None
    npz, grid = sample_stage.run(cfg, plain, vae, job.out, opts.per_class, seed=opts.seed, device=opts.device,
                                 names=names)
    result: dict[str, Any] = {"samples": str(npz), "grid": str(grid)}
    if job.text is not None and not job.text.captioned.per_class:
        job.log.print("samples of the --prompts lines: no class labels to evaluate them by")
    elif not opts.no_eval:
        synthetic = data_mod.from_npz(npz, plain.class_embedder.num_classes)
        # the DP-SGD baselines spend the same (epsilon, delta) again, separately: comparison only, never released
        target = DPTarget(opts.target_epsilon, opts.delta, opts.accountant)
        result.update(evaluate_stage.run(cfg, synthetic, job.private, job.public, job.out, seed=opts.seed,
                                         baselines_on=not opts.no_baselines, target=target, backend=opts.backend,
                                         noise_seed=opts.seed if opts.deterministic_noise else None))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
