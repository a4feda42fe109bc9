"""Bring your own model: a local diffusers latent-diffusion pipeline folder (Stable-Diffusion style: unet, vae,
text_encoder, tokenizer, scheduler), loaded with diffusers' own loaders, offline.

The text encoder is frozen: captions become cross-attention contexts once, under no_grad, each from its own caption
only (per-example preprocessing: nothing is computed across examples outside the DP step). The module DP training
sees is TextConditionalUNet: the pipeline's UNet, fed those contexts; caption dropout swaps a context for the empty
caption's (classifier-free guidance).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class PipelineError(ValueError):
    """A pipeline folder that is missing, incomplete, or not a text-conditioned latent diffusion pipeline."""


@dataclass
class Pipeline:
    """The parts of a loaded pipeline that DP fine-tuning uses."""

    folder: Path
    pipe: Any  # the diffusers pipeline, as DiffusionPipeline.from_pretrained loaded it
    sha256: str  # of every file in the folder (names and bytes): the model card's base hash

    @property
    def unet(self) -> nn.Module:
        """The UNet2DConditionModel."""
        return self.pipe.unet

    @property
    def vae(self) -> nn.Module:
        """The AutoencoderKL."""
        return self.pipe.vae


def folder_sha256(folder: Path) -> str:
    """One sha256 over a folder's files (relative names and contents, in sorted order).

    Args:
        folder: the folder.

    Returns:
        The hex digest.
    """
    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def pipeline_folder(value: str | Path) -> tuple[Path, bool]:
    """Where `--pipeline VALUE` points: a folder, or the name of an installed pipeline base (dpldm.base_models: a
    folder of $DPLDM_BASES or the package's bases/), which is verified against its SHA256SUMS first.

    Args:
        value: a pipeline folder, a shipped base's folder, or a base name.

    Returns:
        (the folder, whether it is a verified shipped base).

    Raises:
        PipelineError: neither an existing folder nor an installed base's name, or a base that fails verification
            or is not a pipeline.
    """
    from dpldm.base_models import MANIFEST, RECORD, BaseNotFound, search_dirs, verified_base
    from dpldm.models import CheckpointError

    path = Path(value).expanduser()
    shipped = path.is_dir() and (path / MANIFEST).is_file() and (path / RECORD).is_file()
    if path.is_dir() and not shipped:
        return path, False  # a user's own pipeline folder: loaded as it is
    try:
        return verified_base(str(path.resolve()) if shipped else str(value), kind="pipeline"), True
    except BaseNotFound:
        where = ", ".join(str(d) for d in search_dirs())
        raise PipelineError(f"--pipeline {value}: no such folder, and no installed pipeline base of that name "
                            f"(searched {where})") from None
    except CheckpointError as e:
        raise PipelineError(str(e)) from None


def load_pipeline(folder: str | Path) -> Pipeline:
    """Load a local diffusers pipeline folder without touching the network, its models frozen.

    Args:
        folder: the folder holding model_index.json and the components' sub-folders, or the name of an installed
            pipeline base (pipeline_folder), whose fp16 weights are loaded as float32.

    Returns:
        The loaded pipeline.

    Raises:
        PipelineError: the folder, model_index.json or a component is missing, or the UNet does not cross-attend
            to a text encoder's hidden states of its width; a base that fails verification.
    """
    from diffusers import DiffusionPipeline

    folder, shipped = pipeline_folder(folder)
    if not (folder / "model_index.json").is_file():
        raise PipelineError(f"{folder}: no model_index.json (not a diffusers pipeline folder: "
                            "pipeline.save_pretrained(DIR) writes one)")
    missing = [c for c in COMPONENTS if not (folder / c).is_dir()]
    if missing:
        raise PipelineError(f"{folder}: missing component folder(s) {missing}; a text-conditioned latent diffusion "
                            f"pipeline needs {list(COMPONENTS)}")
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    for name in ("vae", "text_encoder", "unet"):
        module = getattr(pipe, name).requires_grad_(False).eval()
        if shipped:
            module.float()  # stored in fp16 to halve the package, trained and sampled in fp32
    ctx, width = pipe.unet.config.cross_attention_dim, pipe.text_encoder.config.hidden_size
    if ctx != width:
        raise PipelineError(f"{folder}: the UNet cross-attends to width {ctx}, the text encoder gives {width}")
    return Pipeline(folder, pipe, folder_sha256(folder))


@torch.no_grad()
def encode_captions(pipeline: Pipeline, captions: list[str], batch_size: int = 256) -> torch.Tensor:
    """Each caption's cross-attention context, from that caption alone (the frozen text encoder's last hidden
    state, padded to the tokenizer's length, as Stable Diffusion's pipeline computes it).

    Args:
        pipeline: the loaded pipeline.
        captions: one per example ("" is the unconditional context).
        batch_size: captions per text-encoder call (the result does not depend on it).

    Returns:
        [len(captions), T, width] float32.
    """
    tok, enc = pipeline.pipe.tokenizer, pipeline.pipe.text_encoder
    out = []
    for i in range(0, len(captions), batch_size):
        ids = tok(captions[i : i + batch_size], padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids
        out.append(enc(ids.to(enc.device))[0].float().cpu())
    return torch.cat(out) if out else torch.empty(0)


class CaptionContexts(nn.Module):
    """A frozen condition-index -> context map, in the place of ConditionalUNet's class embedder: row i is caption
    i's context, the last row the empty caption's (the null condition of caption dropout and guidance). So the DP
    loop, sampling and guidance treat a caption index exactly as a class label.

    The rows are held in a NON-persistent buffer: contexts of private captions never reach a state_dict, a
    checkpoint or a saved model.

    Args:
        contexts: [K, T, width], one per caption (encode_captions).
        null_context: [1, T, width], the empty caption's.
    """

    def __init__(self, contexts: torch.Tensor, null_context: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("contexts", torch.cat([contexts, null_context]).detach().float(), persistent=False)

    @property
    def num_classes(self) -> int:
        """How many captions (indices 0..num_classes-1)."""
        return len(self.contexts) - 1

    @property
    def null_class(self) -> int:
        """The index of the empty caption."""
        return len(self.contexts) - 1

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """The contexts of caption indices.

        Args:
            labels: [B] indices (null_class for the empty caption).

        Returns:
            [B, T, width].
        """
        return self.contexts[labels]


class TextConditionalUNet(nn.Module):
    """The module DP fine-tuning sees for a text-conditioned pipeline: its UNet, each example's condition a caption
    index into a frozen table of caption contexts (computed once by the frozen text encoder).

    Args:
        unet: the pipeline's UNet2DConditionModel.
        captions: the caption contexts.
    """

    def __init__(self, unet: nn.Module, captions: CaptionContexts) -> None:
        super().__init__()
        self.unet = unet
        self.class_embedder = captions  # the name ConditionalUNet's condition map has (diffusion_loss, sampling)

    def forward(self, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The predicted noise.

        Args:
            z: noisy latents [B, C, H, W].
            t: timesteps [B].
            labels: caption indices [B].

        Returns:
            eps, the shape of z.
        """
        context = self.class_embedder(labels).to(next(self.unet.parameters()).dtype)
        return self.unet(z, t, encoder_hidden_states=context, return_dict=False)[0]


def save_lora(unet: nn.Module, folder: Path, rank: int, alpha: float | None = None) -> Path:
    """Save the LoRA adapters of a pipeline's UNet in diffusers' LoRA format, so that
    `pipeline.load_lora_weights(folder)` puts them back (pytorch_lora_weights.safetensors, with the adapter's
    rank and alpha as metadata).

    Args:
        unet: the UNet2DConditionModel with peft adapters (dpldm.trainable.add_lora).
        folder: where to write (created).
        rank: the adapters' rank.
        alpha: their alpha (default rank: scale 1, as add_lora).

    Returns:
        The file written.

    Raises:
        ValueError: the UNet has no LoRA adapter.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from dpldm.trainable import LORA_TARGETS

    state = get_peft_model_state_dict(unet)
    if not state:
        raise ValueError("the UNet has no LoRA adapter to save")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"r": rank, "lora_alpha": alpha or rank, "target_modules": LORA_TARGETS, "lora_dropout": 0.0}
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=convert_state_dict_to_diffusers(state),
                                              unet_lora_adapter_metadata=meta, safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


# --- a dpldm.train run on a pipeline (--pipeline) -----------------------------------------------------------------


@dataclass
class TextRun:
    """What `dpldm.train --pipeline` fine-tunes: the pipeline and the private captioned data."""

    pipeline: Pipeline
    captioned: Any  # dpldm.captions.Captioned


def run_config(cfg: dict[str, Any], pipeline: Pipeline, num_classes: int) -> dict[str, Any]:
    """The run's config on a pipeline: the pipeline's image layout, latent shape and noise schedule in place of the
    preset's model sections (the preset keeps train, sample and evaluate); no public data, no warm-up.

    Args:
        cfg: the preset's config.
        pipeline: the loaded pipeline.
        num_classes: the number of captions (or class prompts).

    Returns:
        A new config.
    """
    unet, vae, sched = pipeline.unet.config, pipeline.vae.config, pipeline.pipe.scheduler.config
    size = unet.sample_size * pipeline.pipe.vae_scale_factor
    out = {k: v for k, v in cfg.items() if k not in ("warmup", "autoencoder", "base")}
    # a preset made for this latent size keeps its layout (MNIST's 28 px padded to 32); otherwise the full size
    keep = cfg.get("data", {}).get("pad_to") == size and cfg["data"].get("channels") == vae.in_channels
    out["data"] = {"image_size": cfg["data"]["image_size"] if keep else size, "pad_to": size,
                   "channels": vae.in_channels, "num_classes": num_classes, "private": None, "public": None}
    out["unet"] = {"in_channels": unet.in_channels, "sample_size": unet.sample_size,
                   "cross_attention_dim": unet.cross_attention_dim}
    out["scheduler"] = {k: sched[k] for k in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end")}
    return out


def text_run(cfg: dict[str, Any], folder: Path, data: str | None, captions_file: Path | None,
             prompt: str | None) -> tuple[dict[str, Any], TextRun]:
    """Load the pipeline and the private captioned data of `dpldm.train --pipeline`.

    Args:
        cfg: the preset's config.
        folder: the pipeline folder.
        data: --data, the private images' folder.
        captions_file: --captions, or None.
        prompt: --prompt, or None (exactly one of the two).

    Returns:
        (the run's config, the TextRun).

    Raises:
        PipelineError: a missing --data, both or neither of --captions and --prompt, a bad pipeline folder.
        DataError: bad private data.
    """
    from dpldm import captions as captions_mod

    if not data:
        raise PipelineError("--pipeline needs --data FOLDER: the private images (with --captions FILE, or class "
                            "sub-folders with --prompt TEMPLATE)")
    if (captions_file is None) == (prompt is None):
        raise PipelineError("--pipeline needs exactly one of --captions FILE (a caption per image) and --prompt "
                            "TEMPLATE (class sub-folders, e.g. --prompt 'a photo of a {label}')")
    if cfg.get("warmup"):
        raise PipelineError(f"config {cfg['name']}'s DP warm-up releases per-class image statistics of a model of "
                            "its own: not for a pipeline; pass --set warmup=null, or another config")
    pipeline = load_pipeline(folder)
    layout = run_config(cfg, pipeline, 1)["data"]
    if captions_file is not None:
        captioned = captions_mod.captioned_folder(Path(data), captions_file, layout["channels"], layout["image_size"])
    else:
        classes = sorted(p.name for p in Path(data).iterdir() if p.is_dir()) if Path(data).is_dir() else []
        captioned = captions_mod.prompted_folder(Path(data), prompt, layout["channels"], max(1, len(classes)),
                                                 layout["image_size"])
    return run_config(cfg, pipeline, len(captioned.captions)), TextRun(pipeline, captioned)


def text_model(run: TextRun, prompts: list[str]) -> TextConditionalUNet:
    """The module to fine-tune (or sample): the pipeline's UNet on the contexts of `prompts`.

    Args:
        run: the TextRun.
        prompts: the condition of each index.

    Returns:
        The model (the pipeline's UNet itself, in train mode).
    """
    table = CaptionContexts(encode_captions(run.pipeline, prompts), encode_captions(run.pipeline, [""]))
    return TextConditionalUNet(run.pipeline.unet, table).train()


def plain_text_copy(model: nn.Module, run: TextRun, prompts: list[str], trainable: str, lora_rank: int
                    ) -> TextConditionalUNet:
    """The trained weights in a fresh UNet of the pipeline's config (no engine patch; LoRA adapters kept separate,
    as diffusers loads them), conditioned on `prompts` (public: never the private captions).

    Args:
        model: the trained model.
        run: the TextRun.
        prompts: the sampling conditions.
        trainable: the trainable set.
        lora_rank: the adapters' rank (lora).

    Returns:
        The copy, in eval mode.
    """
    from dpldm.trainable import add_lora

    unet = type(run.pipeline.unet).from_config(run.pipeline.unet.config)
    if trainable == "lora":
        add_lora(TextConditionalUNet(unet, model.class_embedder), lora_rank)  # adapters injected into `unet`
    unet.load_state_dict({k.removeprefix("unet."): v for k, v in model.state_dict().items()})
    table = CaptionContexts(encode_captions(run.pipeline, prompts), encode_captions(run.pipeline, [""]))
    return TextConditionalUNet(unet, table).eval()


def save_text_model(plain: TextConditionalUNet, out: Path, trainable: str, lora_rank: int,
                    record: dict[str, Any]) -> list[Path]:
    """Save what diffusers loads: LoRA adapters in its LoRA format in `out` (pipeline.load_lora_weights(out)), or
    the fine-tuned UNet as a diffusers folder out/unet; and out/README.md, the model card.

    Args:
        plain: plain_text_copy's model.
        out: the run folder.
        trainable: the trainable set.
        lora_rank: the adapters' rank (lora).
        record: the privacy and provenance figures for the card (epsilon, delta, sigma, q, steps, C, pipeline
            and its sha256, trainable set).

    Returns:
        The paths written.
    """
    if trainable == "lora":
        written = [save_lora(plain.unet, out, lora_rank)]
    else:
        plain.unet.save_pretrained(out / "unet", safe_serialization=True)
        written = [out / "unet"]
    intro = ("Differentially private fine-tuning (DP-SGD: per-example clipping and Gaussian noise) of a diffusers "
             "pipeline on private images with text. Load it with:")
    lines = ["# DP fine-tuned with dpldm", "", intro, "", "```python", "from diffusers import DiffusionPipeline",
             f"pipe = DiffusionPipeline.from_pretrained({record['pipeline']!r})"]
    lines += ([f"pipe.load_lora_weights({str(out)!r})"] if trainable == "lora" else
              ["from diffusers import UNet2DConditionModel",
               f"pipe.unet = UNet2DConditionModel.from_pretrained({str(out / 'unet')!r})"])
    lines += ["```", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in record.items()]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    return written + [out / "README.md"]
