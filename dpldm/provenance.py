"""What the pre-training stages record beside their weights: the command, the machine, the run, the autoencoder.

`dpldm.ship` writes a base's model card from these records (dpldm.json of an autoencoder, ldm.json of an LDM).
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import time
from pathlib import Path
from typing import Any

import torch

from dpldm.files import sha256_file

# The autoencoder files whose hashes the LDM's metadata records: the LDM was trained on latents of exactly these.
AE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")


def command_line(module: str, argv: list[str]) -> str:
    """The command as typed, quoted so that it can be pasted back.

    Args:
        module: the module run with `python -m`.
        argv: its arguments.

    Returns:
        `python -m <module> <args>`.
    """
    return shlex.join(["python", "-m", module, *argv])


def cpu_model() -> str:
    """The CPU's model name.

    Returns:
        /proc/cpuinfo's `model name`, else what the platform module says.
    """
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Where a stage ran: CPU model, cores available to the process, torch threads, library versions, GPU.

    Args:
        device: the torch device the stage trained on.

    Returns:
        {"cpu", "cores", "torch_threads", "torch", "diffusers", "python", "device"[, "gpu"]}.
    """
    import diffusers

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {"cpu": cpu_model(), "cores": cores, "torch_threads": torch.get_num_threads(),
                            "torch": torch.__version__, "diffusers": diffusers.__version__,
                            "python": platform.python_version(), "device": device}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def run_record(cfg: dict[str, Any], *, steps: int, batch_size: int, seed: int, device: str, t_start: float,
               public_images: int, command: str | None) -> dict[str, Any]:
    """The metadata a pre-training stage saves beside its weights, from which a model card is written.

    Args:
        cfg: the resolved config (recorded whole, so that the run can be redone).
        steps: training steps taken.
        batch_size: the batch size.
        seed: the stage's seed.
        device: where it trained.
        t_start: time.time() when the stage started.
        public_images: how many public training images it saw.
        command: the command line, or None when the stage was called from Python (e.g. train pre-training on
            the way).

    Returns:
        {"steps", "batch_size", "seed", "public_images", "wall_s", "finished", "machine", "command", "config"}.
    """
    return {"steps": steps, "batch_size": batch_size, "seed": seed, "public_images": public_images,
            "wall_s": round(time.time() - t_start, 1),
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(device), "command": command, "config": cfg}


def autoencoder_hashes(ae_dir: Path) -> dict[str, str]:
    """sha256 of the autoencoder files an LDM depends on (weights, and config.json for its scaling factor).

    Args:
        ae_dir: the autoencoder folder.

    Returns:
        {file name: sha256} for those of AE_FILES that exist.
    """
    return {f: sha256_file(Path(ae_dir) / f) for f in AE_FILES if (Path(ae_dir) / f).is_file()}
