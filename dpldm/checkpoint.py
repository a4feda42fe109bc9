"""Resumable DP training state: model weights (safetensors), optimizer, engine (accountant + noise), step, args.

A checkpoint is PRIVATE: state.pt holds the engine's state, i.e. the secret seeds and positions of the DP noise
stream and of the Poisson sampler (so a resumed run continues the same private streams). Whoever reads it can
regenerate the noise of every step of the run and subtract it. It is the only place those seeds are written; each
checkpoint carries a PRIVATE.txt saying so, and train.py deletes the checkpoint once training is finished.

Written whole or not at all: a new checkpoint is filled in a temporary folder, then the current one becomes
`<name>.prev` and the new one takes its name, so a run killed, or a disk full, while writing keeps its previous
checkpoint as the latest. meta.json records the sha256 of model.safetensors and state.pt: a corrupt or truncated
checkpoint is refused with the reason, and resuming falls back to `<name>.prev`.

A writer killed (SIGKILL, power loss) before its rename leaves its temporary folder `.<name>.tmp-*`, with a complete
or partial state.pt in it: private too. private_paths() lists it with the checkpoint, and discard_train_state()
deletes it with the rest.

It also owns where each rank's checkpoint lives in a run folder (checkpoint_dir, private_checkpoints) and how a run
starts from what the folder holds (start_run: a new run, a resume, a restart, or a refusal, agreed on by every rank).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dpldm import parallel
from dpldm.files import sha256_file

PRIVATE_NOTE = """PRIVATE: do not share this folder.
state.pt holds the DP engine's state: the secret seeds and stream positions of the Gaussian noise and of the
Poisson sampling of this run (kept so that --resume continues the same private streams). Whoever reads it can
regenerate the noise added to each update and subtract it, which voids the differential-privacy guarantee.
dpldm.train deletes this folder when training finishes; share ldm/, samples.npz, grid.png and result.json instead.
"""


FILES = ("model.safetensors", "state.pt")

# The private folders of one rank's checkpoint in a run folder: checkpoint (rank 0) or checkpoint-rank<r>, each with
# its `.prev`, a `.old` twin and killed writes' `.tmp-*` folders (private_paths).
_PRIVATE = re.compile(r"\.?checkpoint(?:-rank(\d+))?(?:\.prev|\.old|\.tmp-.+)?")

# The dpldm.train options that define the private computation: a resumed run must use the same ones.
RESUME_KEYS = ("data", "target_epsilon", "delta", "epochs", "batch_size", "max_grad_norm", "noise_multiplicity",
               "trainable", "ablation", "lora_rank", "accountant", "lr", "config", "set", "secure_mode",
               "deterministic_noise", "pipeline", "captions", "prompt")
# What the options' paths held when the run started: a resume must find the same pipeline files and private data.
CONTENT_KEYS = ("pipeline_sha256", "data_sha256")
# Of those, the ones never written to the run's log (which may be shared): a hash of the whole private training set
# tells whoever holds a candidate data set whether it is the one, so it lives only in the private checkpoint's meta.
UNLOGGED_KEYS = ("data_sha256",)


def save_train_state(folder: Path, model: nn.Module, optimizer: Any, engine: Any, step: int, meta: dict[str, Any]
                     ) -> None:
    """Write a checkpoint whole or not at all (see the module's docstring); the previous one becomes `.prev`.

    Args:
        folder: the checkpoint folder (checkpoint_dir).
        model: the model whose state_dict is saved.
        optimizer: the DP optimizer.
        engine: the dpkernels.PrivacyEngine (accountant history, noise and sampler streams: PRIVATE).
        step: the logical steps done.
        meta: what else meta.json records (the run's settings, sigma, total steps, number of ranks).
    """

    def write(tmp: Path) -> None:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        # torch's global RNGs (diffusion timesteps and noise, seeded by --seed): a resume continues them too
        rng = {"torch_rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda_rng"] = torch.cuda.get_rng_state_all()
        torch.save({"optimizer": optimizer.state_dict(), "engine": engine.state_dict(), "step": step, **rng},
                   tmp / "state.pt")
        sums = {name: sha256_file(tmp / name) for name in FILES}
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "sha256": sums}, indent=1))
        (tmp / "PRIVATE.txt").write_text(PRIVATE_NOTE)
        for f in tmp.iterdir():  # on disk before the rename makes it the latest
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        write(tmp)
        prev = previous(folder)
        if folder.is_dir():
            if prev.exists():
                shutil.rmtree(prev)
            os.replace(folder, prev)  # a crash here leaves only .prev, which latest_checkpoint finds
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def previous(folder: Path) -> Path:
    """The previous checkpoint's folder.

    Args:
        folder: the checkpoint folder.

    Returns:
        `<folder>.prev`.
    """
    return Path(folder).parent / f"{Path(folder).name}.prev"


def problem(folder: Path) -> str | None:
    """Why the checkpoint in `folder` cannot be used.

    Args:
        folder: a checkpoint folder.

    Returns:
        The reason, or None: it is intact (every file matches the sha256 meta.json records).
    """
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"meta.json unreadable ({type(e).__name__})"
    sums = meta.get("sha256")
    if not isinstance(sums, dict):
        return "no checksums in meta.json (written by an older version, or edited)"
    for name in FILES:
        if not (folder / name).is_file():
            return f"{name} missing"
        if sha256_file(folder / name) != sums.get(name):
            return f"{name} corrupt or truncated (sha256 mismatch)"
    return None


def intact_checkpoints(folder: Path) -> tuple[list[tuple[Path, dict[str, Any]]], list[str]]:
    """Every intact checkpoint, newest first: `folder`, `folder.prev` (and the `.old` twin a crash inside an older
    writer may have left), each with its meta; and why each refused one was refused.

    Args:
        folder: the checkpoint folder.

    Returns:
        ([(path, meta), ...] newest first, [why each newer checkpoint was refused]).
    """
    folder = Path(folder)
    found, refused = [], []
    for path in (folder, previous(folder), folder.parent / f".{folder.name}.old"):
        if not path.is_dir():
            continue
        why = problem(path)
        if why is None:
            found.append((path, json.loads((path / "meta.json").read_text())))
        elif not found:
            refused.append(f"{path}: {why}")
    return found, refused


def latest_checkpoint(folder: Path) -> tuple[Path | None, dict[str, Any] | None, list[str]]:
    """The newest intact checkpoint (see intact_checkpoints).

    Args:
        folder: the checkpoint folder.

    Returns:
        (its path, its meta, why each newer one was refused); (None, None, reasons) if there is none.
    """
    found, refused = intact_checkpoints(folder)
    return (*found[0], refused) if found else (None, None, refused)


def at_step(folder: Path, step: int) -> tuple[Path | None, dict[str, Any] | None]:
    """The intact checkpoint of `step` in `folder` (the latest or the previous one), if any.

    Args:
        folder: the checkpoint folder.
        step: the logical step wanted.

    Returns:
        (its path, its meta), or (None, None).
    """
    return next(((path, meta) for path, meta in intact_checkpoints(folder)[0] if meta.get("step") == step),
                (None, None))


def private_paths(folder: Path) -> list[Path]:
    """Every path that may hold this checkpoint's private state and exists: the checkpoint, its `.prev`, an `.old`
    twin, and the temporary folders of writes that were killed before their rename (`.<name>.tmp-*`).

    Args:
        folder: the checkpoint folder (e.g. <run>/checkpoint).

    Returns:
        The paths.
    """
    folder = Path(folder)
    paths = [folder, previous(folder), folder.parent / f".{folder.name}.old"]
    paths += sorted(folder.parent.glob(f".{glob.escape(folder.name)}.tmp-*"))
    return [p for p in paths if p.exists() or p.is_symlink()]


def remove_private(path: Path) -> None:
    """Delete a private file or folder; another process deleting it at the same time (a rank sweeping every
    rank's leftovers) is fine, a path that survives is an error (its secrets would outlive the run).

    Args:
        path: the file or folder.

    Raises:
        OSError: the path is still there.
    """
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    if path.exists() or path.is_symlink():
        raise OSError(f"could not delete {path}, which holds private DP state (noise seeds): delete it by hand")


def discard_interrupted_writes(folder: Path) -> None:
    """Delete the temporary folders killed writers of this checkpoint left (never used again, and private).

    Args:
        folder: the checkpoint folder; call it only when no write of it is under way (at a run's start).
    """
    for path in Path(folder).parent.glob(f".{glob.escape(Path(folder).name)}.tmp-*"):
        remove_private(path)


def discard_train_state(folder: Path) -> None:
    """Delete a checkpoint, its `.prev`, any `.old` twin and any killed write's temporary folder: a finished run
    keeps no noise state.

    Args:
        folder: the checkpoint folder (e.g. <run>/checkpoint).
    """
    for path in private_paths(folder):
        remove_private(path)


def load_train_state(found: Path, model: nn.Module, optimizer: Any, engine: Any) -> int:
    """Restores everything in place from an intact checkpoint (latest_checkpoint's), torch's RNG state included.

    Args:
        found: the checkpoint folder.
        model: the model to load the weights into.
        optimizer: the DP optimizer.
        engine: the dpkernels.PrivacyEngine.

    Returns:
        The number of logical steps already taken.

    Raises:
        ValueError: the checkpoint is not intact or does not match the model.
    """
    why = problem(found)
    if why is not None:
        raise ValueError(f"checkpoint {found}: {why}")
    weights = load_file(found / "model.safetensors")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {found} does not match the model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    state = torch.load(found / "state.pt", weights_only=False)  # our own file: optimizer + accountant history
    optimizer.load_state_dict(state["optimizer"])
    engine.load_state_dict(state["engine"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"])


# --- each rank's checkpoint in a run folder -----------------------------------------------------------------------


def checkpoint_dir(out: Path, rank: int) -> Path:
    """Where a rank keeps its checkpoint (its own sampler and RNG state) in a run folder.

    Args:
        out: the run folder.
        rank: the process's rank (0 alone).

    Returns:
        <out>/checkpoint for rank 0, <out>/checkpoint-rank<rank> for the others.
    """
    return out / "checkpoint" if rank == 0 else out / f"checkpoint-rank{rank}"


def private_checkpoints(out: Path) -> dict[int, list[Path]]:
    """Every rank's private checkpoint paths in a run folder, by rank (whichever job wrote them).

    Args:
        out: the run folder.

    Returns:
        {rank: [paths]}.
    """
    found: dict[int, list[Path]] = {}
    for path in sorted(Path(out).iterdir()) if Path(out).is_dir() else ():
        m = _PRIVATE.fullmatch(path.name)
        if m:
            found.setdefault(int(m.group(1) or 0), []).append(path)
    return found


def checkpoint_ranks(out: Path) -> list[int]:
    """The ranks that hold a checkpoint folder (or its `.prev`, `.old`) in a run folder, whichever job wrote it;
    killed writes' temporary folders do not count (they are never resumed from).

    Args:
        out: the run folder.

    Returns:
        The ranks, sorted.
    """
    return sorted(r for r, paths in private_checkpoints(out).items() if any(".tmp-" not in p.name for p in paths))


def discard_private_checkpoints(out: Path, from_rank: int = 0) -> None:
    """Delete the private checkpoint paths of every rank >= from_rank in a run folder.

    Args:
        out: the run folder.
        from_rank: 0 deletes every rank's; a job's world size deletes those of ranks no rank of it owns.
    """
    for rank, paths in private_checkpoints(out).items():
        if rank >= from_rank:
            for path in paths:
                remove_private(path)


# --- how a run starts from what its folder holds -------------------------------------------------------------------

# How a run starts, decided on every rank and agreed on by all (the smallest wins: one refusal stops every rank).
REFUSE, RESTART, RESUME, NEW = 0, 1, 2, 3


def unwritable(out: Path) -> str | None:
    """Why the run folder cannot be written (None: it can): it, or its nearest existing parent, must be a folder in
    which a file can be created. Nothing is left behind by the check.

    Args:
        out: the run folder (it may not exist yet).

    Returns:
        The reason, for the user, or None.
    """
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
    model).

    Args:
        out: the run folder.

    Returns:
        The RESUME_KEYS and CONTENT_KEYS of its log's first train record; None when `out` holds no such run.
    """
    log = out / "log.jsonl"
    if (out / "ldm").exists() or (out / "result.json").exists() or not log.is_file():
        return None
    for line in log.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        if isinstance(rec, dict) and rec.get("stage") == "train" and "target_epsilon" in rec:
            return {k: rec.get(k) for k in RESUME_KEYS + CONTENT_KEYS}
    return None


def start_mode(resume: bool, fresh: bool, out: Path, rank: int, world: int, run_args: dict[str, Any],
               found: Path | None, meta: dict[str, Any] | None, refused: list[str]) -> tuple[int, str | None]:
    """How this rank would start the run in `out` (REFUSE, RESTART, RESUME or NEW) and, for REFUSE, why.

    RESTART: --resume of a run killed before its first checkpoint. Nothing of it was kept (no model, no noise
    seed; its training losses are not covered by DP anyway), so it starts again from step 0.

    Args:
        resume: --resume was passed.
        fresh: --fresh was passed.
        out: the run folder.
        rank: this process's rank.
        world: the job's number of ranks.
        run_args: the settings a resume must share (RESUME_KEYS).
        found: this rank's newest intact checkpoint (latest_checkpoint's answer), or None.
        meta: its meta.json.
        refused: why each newer checkpoint of this rank was refused.

    Returns:
        (mode, why): why is None unless mode is REFUSE.
    """
    unfinished = meta is not None and not meta.get("finished")
    if not resume:
        if unfinished and not fresh:
            return REFUSE, (f"{out} holds an unfinished run (step {meta['step']}); pass --resume to continue it or "
                            "--fresh to discard it")
        return NEW, None
    if found is None and refused:
        return REFUSE, f"--resume: no intact checkpoint in {out}: " + "; ".join(refused)
    ranks = checkpoint_ranks(out)
    if found is None:
        if ranks:
            return REFUSE, (f"--resume: rank {rank} holds no checkpoint in {out}, but rank(s) {ranks} do: it was "
                            "written by a job with another number of ranks (resume with that job), or pass --fresh")
        started = started_run_args(out)
        if started is None:
            return REFUSE, f"--resume: no unfinished checkpoint in {out}"
        diff = {k: (started.get(k), v) for k, v in run_args.items()
                if k not in UNLOGGED_KEYS and started.get(k) != v}
        if diff:
            return REFUSE, (f"--resume: the run in {out} was started with other settings: "
                            + "; ".join(f"{k}: then {a!r}, now {b!r}" for k, (a, b) in diff.items()))
        return RESTART, None
    if not unfinished:
        return REFUSE, f"--resume: no unfinished checkpoint in {out}"
    diff = {k: (meta["args"].get(k), v) for k, v in run_args.items() if meta["args"].get(k) != v}
    if diff:
        return REFUSE, (f"--resume: the checkpoint in {found} was made with other settings: "
                        + "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" if k not in UNLOGGED_KEYS
                                    else f"{k}: the private training images or labels changed since" for k, (a, b)
                                    in diff.items()))
    # each rank's sampler and RNG streams live in its own checkpoint: another number of ranks cannot continue them
    written_by = meta.get("world") or max(ranks) + 1  # older checkpoints did not record it
    how = ("plain `python -m dpldm.train" if written_by == 1
           else f"`torchrun --nproc_per_node {written_by} -m dpldm.train")
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




class StartRefused(ValueError):
    """A run that cannot start in its folder; the message says why and what to pass instead."""


@dataclass
class Start:
    """How a run starts, the same on every rank (start_run's answer).

    Attributes:
        mode: RESTART, RESUME or NEW.
        found: the checkpoint a RESUME continues from (None otherwise).
        meta: its meta.json.
        refused: why each newer checkpoint of this rank was refused (a RESUME falls back past them).
    """

    mode: int
    found: Path | None
    meta: dict[str, Any] | None
    refused: list[str]


def start_run(out: Path, rank: int, world: int, resume: bool, fresh: bool, run_args: dict[str, Any],
              refuse: str | None = None) -> Start:
    """Decide, on every rank, how the run in `out` starts, and agree on it: one refusal stops every rank. A resume
    whose ranks hold different newest steps (a job killed while checkpointing) continues from the newest step
    they all hold; a new run (or a restart) first clears what an earlier run left. Ends on a barrier.

    Args:
        out: the run folder.
        rank: this process's rank.
        world: the job's number of ranks.
        resume: --resume was passed.
        fresh: --fresh was passed.
        run_args: the settings a resume must share (RESUME_KEYS).
        refuse: a reason to refuse found before (an unwritable folder, missing evaluation data), or None.

    Returns:
        The Start every rank takes.

    Raises:
        StartRefused: the run cannot start in `out` (nothing was changed in it but killed writers' leftovers).
    """
    ckpt = checkpoint_dir(out, rank)
    discard_interrupted_writes(ckpt)  # a killed writer's temporary folder: private, and never used again
    found, meta, refused = latest_checkpoint(ckpt)
    mode, why = (REFUSE, refuse) if refuse else start_mode(resume, fresh, out, rank, world, run_args, found, meta,
                                                           refused)
    lo, hi = parallel.min_max_int(mode, world)  # every rank takes the same road, or all refuse
    if lo == REFUSE:
        raise StartRefused(why or f"{'--resume' if resume else 'the run'} was refused on another rank (its error "
                                  f"says why); nothing in {out} was changed")
    if lo != hi:
        raise StartRefused(f"--resume: the ranks found different states in {out} (some hold a checkpoint, some "
                           "none): it was written by a job with another number of ranks, or a rank's checkpoint was "
                           "removed; resume with the job that wrote it, or pass --fresh")
    if mode == RESUME and not parallel.same_on_all_ranks(meta["step"], world):
        found, meta = rewind_to_common_step(ckpt, meta["step"], world)
    if mode != RESUME and out.exists():
        clear_for_new_run(out, ckpt, rank, world)
    parallel.barrier(world)
    return Start(mode, found, meta, refused)


def rewind_to_common_step(ckpt: Path, step: int, world: int) -> tuple[Path, dict[str, Any]]:
    """A job killed while its ranks were checkpointing: every rank resumes at the newest step all of them hold,
    and deletes its newer checkpoints (a timeline no rank continues).

    Args:
        ckpt: this rank's checkpoint folder.
        step: the step of this rank's newest intact checkpoint.
        world: the job's number of ranks.

    Returns:
        The checkpoint of the common step and its meta.
    """
    common = parallel.oldest(step, world)
    held = [m["step"] for _, m in intact_checkpoints(ckpt)[0]]
    found, meta = at_step(ckpt, common)
    if not parallel.on_all_ranks(found is not None, world):
        raise StartRefused(f"--resume: the ranks' checkpoints have no step in common (this rank holds steps {held}, "
                           f"the furthest behind is at step {common}): pass --fresh")
    for path, m in intact_checkpoints(ckpt)[0]:
        if m["step"] > common:
            shutil.rmtree(path)
    return found, meta


def clear_for_new_run(out: Path, ckpt: Path, rank: int, world: int) -> None:
    """What a new run (or a restart) removes from its folder first: this rank's checkpoint and, on rank 0, the
    checkpoints of ranks this job does not have (an earlier job's private state, of no use to a new run), the
    previous model, its adapted autoencoder and its log.

    Args:
        out: the run folder.
        ckpt: this rank's checkpoint folder.
        rank: this process's rank.
        world: the job's number of ranks.
    """
    discard_train_state(ckpt)
    if rank != 0:
        return
    discard_private_checkpoints(out, from_rank=world)
    for stale in ("ldm", "autoencoder", "log.jsonl"):
        p = out / stale
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
