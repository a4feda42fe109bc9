"""A tiny text-conditioned Stable-Diffusion-style pipeline folder, built from configs with random weights.

The same architecture as a real one (AutoencoderKL, UNet2DConditionModel with cross-attention on a CLIP text
encoder's hidden states, CLIPTokenizer, DDPMScheduler), saved with diffusers' own `save_pretrained`, so that
`--pipeline DIR` is exercised offline on what a user's Stable Diffusion folder looks like, in seconds:

    python -m dpldm.tiny_pipeline OUT [--seed 0]

The tokenizer's vocabulary is written here: every byte (CLIP's byte-level BPE), plus merges that make each word of
WORDS one token, so that captions such as "a handwritten seven" are a few tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

# words the merges turn into single tokens (any other text is tokenized byte by byte)
WORDS = ("a", "an", "the", "of", "photo", "handwritten", "digit", "letter", "zero", "one", "two", "three", "four",
         "five", "six", "seven", "eight", "nine", "shirt", "trouser", "pullover", "dress", "coat", "sandal", "sneaker",
         "bag", "ankle", "boot")
MAX_TOKENS = 16  # the context length T (Stable Diffusion: 77)
WIDTH = 32  # the text encoder's hidden size = the UNet's cross_attention_dim (Stable Diffusion 1.5: 768)


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from bytes to printable characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars), strict=True))


def write_tokenizer(folder: Path) -> int:
    """vocab.json, merges.txt and the tokenizer config of a CLIPTokenizer whose vocabulary is the bytes and WORDS.

    Args:
        folder: where to write them (created).

    Returns:
        The vocabulary size.
    """
    byte_chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in byte_chars + [c + "</w>" for c in byte_chars]:
        vocab.setdefault(tok, len(vocab))
    merges: list[str] = []
    for word in WORDS:  # left to right: h a -> ha, ha n -> han, ..., with "</w>" on the last character
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = f"{parts[0]} {parts[1]}"
            if pair not in merges:
                merges.append(pair)
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS,
                        pad_token="<|endoftext|>")
    tok.save_pretrained(folder)
    return len(vocab)


def text_parts(folder: Path, width: int = WIDTH) -> tuple[Any, Any]:
    """The tokenizer (written to folder/tokenizer) and a freshly initialised CLIP text encoder of `width`.

    Args:
        folder: the pipeline folder being written.
        width: the hidden size (the UNet's cross_attention_dim).

    Returns:
        (tokenizer, text encoder).
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab_size = write_tokenizer(folder / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=MAX_TOKENS, projection_dim=width,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    return tokenizer, text_encoder


def save_pipeline(out: Path, vae: Any, text_encoder: Any, tokenizer: Any, unet: Any, scheduler: Any) -> Path:
    """A StableDiffusionPipeline of these parts, saved with diffusers' save_pretrained (no safety checker).

    Args:
        out: the folder.
        vae: the AutoencoderKL.
        text_encoder: the CLIP text encoder.
        tokenizer: its tokenizer.
        unet: the UNet2DConditionModel.
        scheduler: the noise scheduler.

    Returns:
        `out`.
    """
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def build(out: Path, seed: int = 0, channels: int = 3, sample_size: int = 32) -> Path:
    """Write a tiny pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/).

    Args:
        out: the folder (must not exist, or be empty).
        seed: for the random weights.
        channels: image channels (3: RGB as Stable Diffusion; 1: grayscale).
        sample_size: image size in pixels (latents are a quarter of it).

    Returns:
        `out`.

    Raises:
        FileExistsError: `out` holds files.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    torch.manual_seed(seed)
    tokenizer, text_encoder = text_parts(out)
    vae = AutoencoderKL(in_channels=channels, out_channels=channels, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
                        sample_size=sample_size)
    unet = UNet2DConditionModel(
        sample_size=sample_size // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=WIDTH, attention_head_dim=8,
        norm_num_groups=16)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False)
    return save_pipeline(out, vae, text_encoder, tokenizer, unet, scheduler)


def main(argv: list[str] | None = None) -> None:
    """The command line.

    Args:
        argv: the arguments (default sys.argv[1:]).
    """
    p = argparse.ArgumentParser(prog="python -m dpldm.tiny_pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--channels", type=int, default=3, choices=[1, 3])
    p.add_argument("--sample-size", type=int, default=32)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        build(args.out, args.seed, args.channels, args.sample_size)
    except FileExistsError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
