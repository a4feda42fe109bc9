"""Compartments of a diffusers pipeline (issue 20): `train --pipeline DIR --data FOLDER --prompt TEMPLATE`.

Every compartment is a difference (LoRA adapters, or the attention weights) to one text-conditioned pipeline, and
every one is conditioned on the same table of class prompts: TEMPLATE filled with the class folders' names, in
sorted order (the label order dpldm.data gives class folders). Composition weighs compartments per class label,
so free captions (--captions), which have no label to compose over, are not offered here.

The run records the pipeline by path and sha256 (of every file) with the prompts, and the config derived from the
pipeline (dpldm.pipeline.run_config): every stage that uses the weights checks the hash first.
"""

from __future__ import annotations

import argparse
import copy
import functools
from pathlib import Path
from typing import Any

from torch import nn

from dpldm import data as data_mod
from dpldm import pipeline as pipeline_mod
from dpldm.captions import Captioned
from dpldm.compartments.registry import RunError
from dpldm.models import CheckpointError

CLASS_NAMES = "class_names"  # in the run config's data section: the label order of every shard and added folder


def check_options(args: argparse.Namespace) -> None:
    """Refuse what a compartments run on a pipeline cannot take, before anything is loaded.

    Args:
        args: `train`'s arguments (pipeline, prompt, data, shard_by, base, pretrained, autoencoder).

    Raises:
        RunError: as said in the message (the stages print it as one line).
    """
    if args.pipeline is None:
        if args.prompt is not None:
            raise RunError("--prompt goes with --pipeline DIR")
        return
    mixed = [f"--{k}" for k in ("base", "pretrained", "autoencoder") if getattr(args, k)]
    if mixed:
        raise RunError(f"--pipeline is the base of every compartment: drop {', '.join(mixed)}")
    if not args.prompt:
        raise RunError("--pipeline needs --prompt TEMPLATE (e.g. 'a photo of a {label}'): compartments are "
                       "composed per class, and class c's condition is TEMPLATE filled with its folder name")
    if "{label}" not in args.prompt:
        raise RunError(f"--prompt {args.prompt!r}: needs {{label}} where the class name goes")
    if not args.data or not Path(args.data).is_dir():
        raise RunError(f"--pipeline needs --data FOLDER of class sub-folders (their names fill the prompt), "
                       f"got {args.data!r}; python -m dpldm.class_folders writes a built-in set that way")


def class_names(key: str, data: str) -> list[str]:
    """The run's class names, in label order: the sub-folders of --data (folders key: of its shard folders).

    Args:
        key: the shard key.
        data: the data folder.

    Returns:
        The sorted names.

    Raises:
        RunError: no class sub-folder.
    """
    root = Path(data)
    parents = [p for p in root.iterdir() if p.is_dir()] if key == "folders" else [root]
    names = sorted({c.name for p in parents for c in p.iterdir() if c.is_dir()})
    if not names:
        raise RunError(f"--data {data}: no class sub-folders" + (" in its shard folders" if key == "folders" else ""))
    return names


def start(cfg: dict[str, Any], args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the pipeline of a new run: the run config (the pipeline's layout, the preset's training sections, the
    class names) and the base record.

    Args:
        cfg: the preset's config.
        args: `train`'s arguments, checked by check_options.

    Returns:
        (the run config, the base record {"pipeline", "id", "prompt", "prompts"}).

    Raises:
        RunError: a config with a DP warm-up.
        CheckpointError: a bad pipeline folder or name.
    """
    if cfg.get("warmup"):
        raise RunError(f"config {cfg['name']}'s DP warm-up releases per-class image statistics of a model of its "
                       "own: not for a pipeline; pass --set warmup=null, or another config")
    names = class_names(args.shard_by, args.data)
    try:
        pipe = pipeline_mod.load_pipeline(args.pipeline)
    except pipeline_mod.PipelineError as e:
        raise CheckpointError(str(e)) from e
    run_cfg = pipeline_mod.run_config(cfg, pipe, len(names))
    run_cfg["data"][CLASS_NAMES] = names
    prompts = [args.prompt.format(label=n) for n in names]
    return run_cfg, {"pipeline": str(pipe.folder.resolve()), "id": pipe.sha256, "prompt": args.prompt,
                     "prompts": prompts}


def check(base: dict[str, Any]) -> None:
    """Refuse a pipeline whose files changed since the run recorded them.

    Args:
        base: the run's base record.

    Raises:
        CheckpointError: the folder is gone, or its sha256 differs.
    """
    folder = Path(base["pipeline"])
    if not folder.is_dir():
        raise CheckpointError(f"the base pipeline {folder} is gone: restore it (the run's compartments are "
                              "differences to it)")
    now = pipeline_mod.folder_sha256(folder)
    if now != base["id"]:
        raise CheckpointError(f"the base pipeline {folder} changed since the run was created (sha256 of its files "
                              f"{now[:12]}..., the run recorded {base['id'][:12]}...): restore the pipeline the run "
                              "was trained on, or train a new run on this one")


def fresh_pipeline(base: dict[str, Any]) -> pipeline_mod.Pipeline:
    """The pipeline loaded anew (its UNet untouched by any training in this process), checked against the record.

    Args:
        base: the run's base record.

    Returns:
        The pipeline.

    Raises:
        CheckpointError: it is gone, or changed since the run recorded it.
    """
    try:
        pipe = pipeline_mod.load_pipeline(base["pipeline"])
    except pipeline_mod.PipelineError as e:
        raise CheckpointError(str(e)) from e
    if pipe.sha256 != base["id"]:
        raise CheckpointError(f"the base pipeline {base['pipeline']} changed since the run was created: restore it")
    return pipe


def shard_text_run(base: dict[str, Any], data: data_mod.DataSet) -> pipeline_mod.TextRun:
    """What dpldm.train fine-tunes for one shard: a fresh copy of the pipeline (training changes its UNet in place,
    so no shard may start from another's) and the shard's images under the run's class prompts.

    Args:
        base: the run's base record.
        data: the shard's data (labels index the run's class names).

    Returns:
        The TextRun.
    """
    return pipeline_mod.TextRun(fresh_pipeline(base), Captioned(data, list(base["prompts"]), per_class=True))


@functools.lru_cache(maxsize=2)
def _loaded(folder: str, sha256: str) -> tuple[pipeline_mod.Pipeline, dict[tuple[str, ...], nn.Module]]:
    """The pipeline and its class-prompt table, loaded once per process for sampling (never trained)."""
    return fresh_pipeline({"pipeline": folder, "id": sha256}), {}


def base_model(base: dict[str, Any]) -> pipeline_mod.TextConditionalUNet:
    """The base as a compartment starts from it: a copy of the pipeline's UNet on the class prompts' contexts.

    Args:
        base: the run's base record.

    Returns:
        The model (its own UNet copy), in eval mode.
    """
    pipe, tables = _loaded(base["pipeline"], base["id"])
    key = tuple(base["prompts"])
    if key not in tables:
        tables[key] = pipeline_mod.CaptionContexts(pipeline_mod.encode_captions(pipe, list(key)),
                                                   pipeline_mod.encode_captions(pipe, [""]))
    return pipeline_mod.TextConditionalUNet(copy.deepcopy(pipe.unet), copy.deepcopy(tables[key])).eval()


def base_vae(base: dict[str, Any]) -> nn.Module:
    """The pipeline's VAE (frozen), which encodes and decodes for every compartment.

    Args:
        base: the run's base record.

    Returns:
        The VAE.
    """
    return _loaded(base["pipeline"], base["id"])[0].vae
