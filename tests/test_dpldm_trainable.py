"""The trainable set matches DP-LDM (attention), DP-LoRA (adapters only) and the ablation counts."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from dpldm.config import load_config
from dpldm.models import build_unet
from dpldm.trainable import select_trainable, transformer_blocks


@pytest.fixture()
def cfg() -> dict:
    return load_config("tiny")


def transformer_param_names(model: torch.nn.Module, skip_first: int = 0) -> set[str]:
    """Independent of dpldm.trainable: parameters under Transformer2DModel modules, in down/mid/up order."""
    prefixes = [n for n, m in model.named_modules() if isinstance(m, Transformer2DModel)]
    order = {"unet.down_blocks": 0, "unet.mid_block": 1, "unet.up_blocks": 2}
    prefixes.sort(key=lambda n: (order[".".join(n.split(".")[:2])], n))  # names sort right below 10 blocks
    prefixes = prefixes[skip_first:]
    return {n for n, _ in model.named_parameters() if any(n.startswith(p + ".") for p in prefixes)}


def test_attention_is_exactly_transformer_blocks_plus_embedder(cfg: dict) -> None:
    model = build_unet(cfg)
    n = select_trainable(model, "attention")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    expected = transformer_param_names(model) | {"class_embedder.embedding.weight"}
    assert trainable == expected
    assert n == sum(p.numel() for name, p in model.named_parameters() if name in expected)
    # each kind of DP-LDM SpatialTransformer parameter is in, and the rest of the UNet is out
    for part in ("norm.weight", "proj_in.weight", "attn1.to_q.weight", "attn2.to_k.weight", "attn2.to_out.0.bias",
                 "ff.net.0.proj.weight", "norm3.weight", "proj_out.weight"):
        assert any(part in name for name in trainable), part
    for frozen in ("conv_in.weight", "time_embedding.linear_1.weight", "resnets.0.conv1.weight", "conv_out.weight"):
        assert not any(frozen in name for name in trainable), frozen


@pytest.mark.parametrize("ablation", [1, 2, 4])
def test_ablation_freezes_first_blocks(cfg: dict, ablation: int) -> None:
    model = build_unet(cfg)
    blocks = transformer_blocks(model)
    assert len(blocks) == 4  # tiny: one down, one mid, two up
    select_trainable(model, "attention", ablation=ablation)
    trained = [all(p.requires_grad for p in b.parameters()) for b in blocks]
    frozen = [not any(p.requires_grad for p in b.parameters()) for b in blocks]
    assert frozen[: ablation - 1] == [True] * (ablation - 1)
    assert trained[ablation - 1 :] == [True] * (len(blocks) - ablation + 1)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == transformer_param_names(model, ablation - 1) | {"class_embedder.embedding.weight"}


def test_ablation_out_of_range_is_refused(cfg: dict) -> None:
    with pytest.raises(ValueError, match="--ablation must be in 1..4"):
        select_trainable(build_unet(cfg), "attention", ablation=5)


def analytic_lora_count(cfg: dict, rank: int) -> int:
    """From the config alone: every transformer block of width c has attn1 (q,k,v,out: c->c) and attn2
    (q: c->c, k,v: ctx->c, out: c->c); a LoRA pair on a d_in->d_out Linear has rank*(d_in+d_out) weights."""
    u = cfg["unet"]
    ch, ctx, lpb = u["block_out_channels"], u["cross_attention_dim"], u["layers_per_block"]
    widths = [c for t, c in zip(u["down_block_types"], ch) if "CrossAttn" in t] * lpb
    widths += [ch[-1]]  # mid block
    widths += [c for t, c in zip(u["up_block_types"], reversed(ch)) if "CrossAttn" in t] * (lpb + 1)
    per_block = lambda c: rank * (4 * 2 * c + 2 * c + 2 * (ctx + c) + 2 * c)
    return sum(per_block(c) for c in widths)


@pytest.mark.parametrize("rank", [1, 4])
def test_lora_trains_only_adapters_with_analytic_count(cfg: dict, rank: int) -> None:
    model = build_unet(cfg)
    n = select_trainable(model, "lora", lora_rank=rank)
    assert n == analytic_lora_count(cfg, rank)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert not model.class_embedder.embedding.weight.requires_grad


def test_all_trains_everything(cfg: dict) -> None:
    model = build_unet(cfg)
    assert select_trainable(model, "all") == sum(p.numel() for p in model.parameters())


def test_lora_param_count_is_the_same_before_and_after_the_adapters_are_injected() -> None:
    from dpldm.config import load_config
    from dpldm.models import build_unet
    from dpldm.trainable import lora_param_count, select_trainable

    model = build_unet(load_config("tiny"))
    before = lora_param_count(model, 4)
    assert before > 0
    assert select_trainable(model, "lora", lora_rank=4) == before == lora_param_count(model, 4)
