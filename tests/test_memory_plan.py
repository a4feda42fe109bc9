"""benchmarks/memory_plan.py: its layer list, shapes and norm methods against dpldm's trainable set and a real DP step.

A tiny UNet with SD 1.5's block types (3 cross-attention down blocks and a plain one, a plain up block and 3
cross-attention ones, a cross-attention middle block, a 77-token text context):
- the plan's layers hold every parameter dpldm.trainable selects, each exactly once (attention, lora, all);
- each private linear's and convolution's T, d, p and norm method are the ones the engine logs in a real DP step
  on CPU (and the method is dpkernels.ops.choose_strategy's);
- the meta-device trace saves what a real CPU forward saves (same bytes), so the activation count is not an
  artefact of the meta device;
- the largest batch is the largest that fits.
"""

from __future__ import annotations

import logging
import re
from collections import Counter

import pytest
import torch

from benchmarks import memory_plan as mp
from dpkernels.ops import choose_strategy

TINY = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "norm_num_groups": 4,
    "block_out_channels": [8, 16, 16, 16], "cross_attention_dim": 12, "attention_head_dim": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
RESOLUTION = 64  # 8 x 8 latents
CONTEXT = 5  # text tokens (SD's 77 is the CLI default; fewer keep T distinct from the spatial sizes here)
MODES = ("attention", "lora", "all")


@pytest.fixture(scope="module")
def plans() -> dict[str, dict]:
    return {m: mp.make_plan(TINY, RESOLUTION, m, lora_rank=2, context_tokens=CONTEXT) for m in MODES}


def _real(mode: str) -> torch.nn.Module:
    return mp.build_model(TINY, mode, lora_rank=2, device="cpu")


@pytest.mark.parametrize("mode", MODES)
def test_every_trainable_parameter_is_in_exactly_one_layer(plans: dict, mode: str) -> None:
    model = _real(mode)  # dpldm.trainable.select_trainable picked these
    selected = {n for n, p in model.named_parameters() if p.requires_grad}
    assert selected, "nothing trainable"
    planned = Counter(f"{lp.name}.{pname}" for lp in plans[mode]["layers"]
                      for pname, p in model.get_submodule(lp.name).named_parameters(recurse=False) if p.requires_grad)
    assert max(planned.values()) == 1
    assert set(planned) == selected
    assert sum(lp.params for lp in plans[mode]["layers"]) == sum(
        p.numel() for p in model.parameters() if p.requires_grad) == plans[mode]["setup"]["trainable_params"]
    if mode == "lora":
        assert all(".lora_" in lp.name for lp in plans[mode]["layers"])


@pytest.mark.parametrize("mode", MODES)
def test_shapes_and_methods_are_the_engines_in_a_real_step(plans: dict, mode: str,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    from benchmarks.models import Workload
    from benchmarks.step_variants import make_step

    model = _real(mode)
    inputs = mp.example_inputs(model, TINY, RESOLUTION, 3, device="cpu", context_tokens=CONTEXT)
    w = Workload("tiny", model, inputs, torch.randn_like(inputs[0]), 3, "")
    caplog.set_level(logging.INFO, logger="dpkernels")
    make_step("ours", w)()
    # the engine logs each linear's (and convolution's, per group) choice once: "<name> uses the <m> norm (T=, d=, p=)"
    seen = {}
    for rec in caplog.records:
        m = re.fullmatch(r"dpkernels: (\S+) uses the (\w+) norm \(T=(\d+), d=(\d+), p=(\d+)\)", rec.getMessage())
        if m:
            seen[m[1]] = (m[2], int(m[3]), int(m[4]), int(m[5]))
    layers = [lp for lp in plans[mode]["layers"] if lp.method in ("ghost", "direct")]
    assert layers and {lp.name for lp in layers} == set(seen)
    for lp in layers:
        assert (lp.method, lp.T, lp.d, lp.p) == seen[lp.name], lp.name
        assert lp.method == choose_strategy(lp.T, lp.d, lp.p)
    assert {lp.T for lp in layers} >= {64, CONTEXT}  # spatial tokens at the top level, and the text context


@pytest.mark.parametrize("mode", ["attention", "all"])
def test_the_meta_trace_saves_what_a_real_cpu_forward_saves(mode: str) -> None:
    traces = {}
    for device in ("meta", "cpu"):
        model = mp.build_model(TINY, mode, device=device)
        traces[device] = mp.trace(model, mp.example_inputs(model, TINY, RESOLUTION, 1, device=device,
                                                           context_tokens=CONTEXT))
    meta, cpu = traces["meta"], traces["cpu"]
    assert sum(nb for _, nb in meta.saved.values()) == sum(nb for _, nb in cpu.saved.values())
    assert [(c.name, c.in_shape, c.out_shape) for c in meta.calls] == [(c.name, c.in_shape, c.out_shape)
                                                                       for c in cpu.calls]
    assert cpu.weight_bytes == meta.weight_bytes > 0


def test_largest_batch_fits_and_one_more_does_not(plans: dict) -> None:
    for plan in plans.values():
        for v in plan["variants"]:
            budget = v.peak_bytes(1) * 10  # room for about 10 examples
            b = mp._largest_batch(v, budget)
            assert b >= 1 and v.peak_bytes(b) <= budget < v.peak_bytes(b + 1)
    ours = {v.variant: v for v in plans["all"]["variants"]}
    # per-sample gradients of every parameter: Opacus' peak grows fastest with the batch
    assert ours["opacus_hooks"].per_example_bytes > ours["ours"].per_example_bytes >= ours["nonprivate"].per_example_bytes


def test_sd15_config_builds_on_meta_without_weights() -> None:
    cfg = mp.load_unet_config(mp.REPO_ROOT / "benchmarks" / "configs" / "sd15_unet.json")
    model = mp.build_model(cfg, "attention")
    params = list(model.parameters())
    assert {p.device.type for p in params} == {"meta"}
    assert sum(p.numel() for p in params) == 859_520_964  # SD 1.5's UNet
