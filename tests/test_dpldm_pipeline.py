"""Bring your own pipeline (issue 20): a tiny text-conditioned Stable-Diffusion-style folder, built from configs by
dpldm.tiny_pipeline, loads offline; DP fine-tuning of its UNet with each trainable set gives Opacus hooks' update
(noise 0) on per-example caption contexts."""

from __future__ import annotations

import copy
from pathlib import Path

import opacus
import pytest
import torch

import dpkernels
from dpldm import pipeline as pipeline_mod
from dpldm import tiny_pipeline
from dpldm.trainable import select_trainable
from tests.test_engine_parity import assert_same_update, one_step

CAPTIONS = ["a handwritten seven", "a photo of a coat", "", "a handwritten zero", "the digit nine"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_pipeline.build(tmp_path_factory.mktemp("pipe") / "tiny")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_the_tiny_pipeline_loads_offline_and_encodes_each_caption_alone(tiny_folder: Path, offline: None) -> None:
    pipe = pipeline_mod.load_pipeline(tiny_folder)
    assert type(pipe.pipe).__name__ == "StableDiffusionPipeline"
    assert not any(p.requires_grad for p in pipe.pipe.text_encoder.parameters())
    ctx = pipeline_mod.encode_captions(pipe, CAPTIONS)
    assert ctx.shape == (len(CAPTIONS), tiny_pipeline.MAX_TOKENS, tiny_pipeline.WIDTH)
    alone = torch.cat([pipeline_mod.encode_captions(pipe, [c]) for c in CAPTIONS])
    assert torch.allclose(ctx, alone, atol=1e-6), "a caption's context depends on the other captions"
    assert len(pipe.pipe.tokenizer("a handwritten seven").input_ids) == 5  # <bos> a handwritten seven <eos>
    assert pipe.sha256 == pipeline_mod.folder_sha256(tiny_folder)


@pytest.mark.parametrize("broken", ["no model_index.json", "no text_encoder"])
def test_an_incomplete_folder_is_refused_by_name(tiny_folder: Path, tmp_path: Path, broken: str) -> None:
    import shutil

    copy_dir = tmp_path / "pipe"
    shutil.copytree(tiny_folder, copy_dir)
    if broken == "no model_index.json":
        (copy_dir / "model_index.json").unlink()
        match = "no model_index.json"
    else:
        shutil.rmtree(copy_dir / "text_encoder")
        match = r"missing component folder\(s\) \['text_encoder'\]"
    with pytest.raises(pipeline_mod.PipelineError, match=match):
        pipeline_mod.load_pipeline(copy_dir)


def text_model(pipe: pipeline_mod.Pipeline) -> pipeline_mod.TextConditionalUNet:
    table = pipeline_mod.CaptionContexts(pipeline_mod.encode_captions(pipe, CAPTIONS),
                                         pipeline_mod.encode_captions(pipe, [""]))
    return pipeline_mod.TextConditionalUNet(copy.deepcopy(pipe.unet), table)


def text_batch(pipe: pipeline_mod.Pipeline, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    b, c, s = 6, pipe.unet.config.in_channels, pipe.unet.config.sample_size
    labels = torch.tensor([0, 1, 2, 3, 4, len(CAPTIONS)])  # every caption, and the null one
    return (torch.randn(b, c, s, s, generator=g), torch.randint(0, 1000, (b,), generator=g), labels,
            torch.randn(b, c, s, s, generator=g))


def text_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    z, t, labels, eps = batch
    return ((model(z, t, labels) - eps) ** 2).mean()


@pytest.mark.parametrize("mode", ["attention", "lora", "all"])
def test_every_trainable_set_matches_opacus_on_caption_contexts(tiny_folder: Path, mode: str) -> None:
    pipe = pipeline_mod.load_pipeline(tiny_folder)
    torch.manual_seed(4)
    model = text_model(pipe)
    select_trainable(model, mode, lora_rank=4)
    if mode == "lora":
        for n, p in model.named_parameters():
            if "lora_B" in n:  # peft starts B at zero, which would leave A without a gradient to compare
                torch.nn.init.normal_(p, std=0.1)
    model = model.double().train()  # the pipeline loads frozen, in eval mode
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and (mode != "lora" or all("lora_" in n for n in trainable))
    batch = tuple(b.double() if b.is_floating_point() else b for b in text_batch(pipe))
    ours = one_step(dpkernels.PrivacyEngine(), model, batch, text_loss, 0.1)
    theirs = one_step(opacus.PrivacyEngine(), model, batch, text_loss, 0.1)
    assert_same_update(ours, theirs, trainable)


def test_the_null_condition_is_the_empty_caption_and_no_caption_is_saved(tiny_folder: Path) -> None:
    pipe = pipeline_mod.load_pipeline(tiny_folder)
    model = text_model(pipe)
    table = model.class_embedder
    assert (table.num_classes, table.null_class) == (len(CAPTIONS), len(CAPTIONS))
    assert torch.equal(table(torch.tensor([table.null_class]))[0], table(torch.tensor([2]))[0])  # CAPTIONS[2] is ""
    state = model.state_dict()
    assert not any(k.startswith("class_embedder") for k in state), "private caption contexts in the state_dict"
    assert set(state) == {"unet." + k for k in pipe.unet.state_dict()}


def test_saved_adapters_load_into_the_pipeline_and_change_it_as_trained(tiny_folder: Path, tmp_path: Path,
                                                                         offline: None) -> None:
    pipe = pipeline_mod.load_pipeline(tiny_folder)
    model = text_model(pipe)
    select_trainable(model, "lora", lora_rank=4)
    torch.manual_seed(5)
    for n, p in model.named_parameters():
        if "lora_" in n:  # as if trained: B away from its zero start
            torch.nn.init.normal_(p, std=0.2)
    path = pipeline_mod.save_lora(model.unet, tmp_path / "run", rank=4)
    assert path.is_file()
    fresh = pipeline_mod.load_pipeline(tiny_folder).pipe
    z, t, labels, _ = text_batch(pipe)
    context = model.class_embedder(labels)
    with torch.no_grad():
        before = fresh.unet(z, t, encoder_hidden_states=context).sample
        fresh.load_lora_weights(tmp_path / "run")
        after = fresh.unet(z, t, encoder_hidden_states=context).sample
        trained = model(z, t, labels)
    assert (after - before).abs().max() > 1e-3, "the adapters did not change the pipeline"
    torch.testing.assert_close(after, trained, rtol=1e-5, atol=1e-6)
