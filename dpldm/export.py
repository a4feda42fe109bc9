"""A plain (unpatched, LoRA-merged) copy of a fine-tuned model, for saving in diffusers format and sampling."""

from __future__ import annotations

from typing import Any

import torch

from dpldm.models import ConditionalUNet, build_unet


@torch.no_grad()
def plain_copy(model: ConditionalUNet, cfg: dict[str, Any]) -> ConditionalUNet:
    """LoRA adapters folded into the base weights (W + B A * alpha/r); engine patches left behind."""
    state = {}
    lora: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in model.state_dict().items():
        if ".lora_" in k:
            base, rest = k.split(".lora_", 1)
            lora.setdefault(base, {})[rest.split(".")[0]] = v  # 'A' or 'B'
        else:
            state[k.replace(".base_layer.", ".")] = v.clone()
    for base, ab in lora.items():
        module = model.get_submodule(base)
        scale = module.scaling["default"]
        state[base + ".weight"] += scale * ab["B"] @ ab["A"]
    emb = model.class_embedder
    cfg = {**cfg, "data": {**cfg["data"], "num_classes": emb.num_classes},
           "unet": {**cfg["unet"], "cross_attention_dim": emb.embedding.embedding_dim}}
    out = build_unet(cfg)
    out.load_state_dict(state)
    return out.eval()
