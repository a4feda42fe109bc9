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


def test_lora_update_is_the_per_example_loops_not_only_opacus(tiny_folder: Path) -> None:
    # Opacus + peft has corrupted LoRA updates silently (opacus#820): the reference here is a plain loop, one
    # example at a time through autograd, each gradient clipped to C, summed, divided by the batch size
    pipe = pipeline_mod.load_pipeline(tiny_folder)
    torch.manual_seed(6)
    model = text_model(pipe)
    select_trainable(model, "lora", lora_rank=4)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    model = model.double().train()
    batch = tuple(b.double() if b.is_floating_point() else b for b in text_batch(pipe))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    c, b = 0.05, len(batch[0])
    ref = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    for i in range(b):
        model.zero_grad()
        text_loss(model, tuple(x[i : i + 1] for x in batch)).backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
        for n, g in grads.items():
            # Opacus' clipping factor, C / (norm + 1e-6), capped at 1 (the engine's; dpkernels/README.md)
            ref[n] -= g * min(1.0, c / (float(norm) + 1e-6)) / b  # SGD, lr 1: minus the clipped mean
    model.zero_grad()
    ours = one_step(dpkernels.PrivacyEngine(), model, batch, text_loss, c)
    assert_same_update(ours, ref, trainable)


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


# --- dpldm.train --pipeline, end to end ---------------------------------------------------------------------------

SECRET = "a handwritten zebra"  # a private caption: it must not appear in anything the run writes


def private_folder(root: Path, captions: bool) -> tuple[Path, list[str]]:
    """24 RGB images in two classes; with captions, a metadata.jsonl (one private caption among them)."""
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        cls = ["seven", "one"][i % 2]
        rel = f"{cls}/{i}.png"
        (root / cls).mkdir(parents=True, exist_ok=True)
        img = np.full((32, 32, 3), 30 + 180 * (i % 2), np.uint8) + rng.integers(0, 40, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / rel)
        rows.append({"file_name": rel, "text": SECRET if i == 5 else f"a handwritten {cls}"})
    extra: list[str] = []
    if captions:
        (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        (root.parent / "prompts.txt").write_text("a handwritten seven\na handwritten one\n")
        extra = ["--captions", str(root / "metadata.jsonl"), "--prompts", str(root.parent / "prompts.txt")]
    else:
        extra = ["--prompt", "a handwritten {label}"]
    return root, extra


def pipeline_args(folder: Path, data: Path, out: Path, mode: str, *extra: str) -> list[str]:
    return ["--config", "tiny", "--pipeline", str(folder), "--data", str(data), "--out", str(out), "--trainable",
            mode, "--lora-rank", "4", "--batch-size", "8", "--max-physical-batch-size", "8", "--epochs", "2",
            "--per-class", "2", "--deterministic-noise", "--no-baselines", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("mode,captions", [("lora", True), ("attention", False)])
def test_train_on_a_pipeline_saves_what_diffusers_loads(tiny_folder: Path, tmp_path: Path, offline: None,
                                                        mode: str, captions: bool) -> None:
    import numpy as np

    from dpldm import train

    data, extra = private_folder(tmp_path / "private", captions)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="NO privacy"):
        result, trained = train.run(*_cfg_and_opts(pipeline_args(tiny_folder, data, out, mode, *extra)))
    assert 0 < result["epsilon"] <= 10.0 + 1e-6 and result["steps"] == result["total_steps"] > 0
    card = (out / "README.md").read_text()
    assert f"| epsilon | {round(result['epsilon'], 4)} |" in card and pipeline_mod.folder_sha256(tiny_folder) in card
    fresh = pipeline_mod.load_pipeline(tiny_folder).pipe
    if mode == "lora":
        fresh.load_lora_weights(out)
    else:
        from diffusers import UNet2DConditionModel

        fresh.unet = UNet2DConditionModel.from_pretrained(out / "unet")
    prompts = ["a handwritten seven", "a handwritten one"]
    context = pipeline_mod.encode_captions(pipeline_mod.load_pipeline(tiny_folder), prompts)
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500])
    trained.eval()
    with torch.no_grad():
        want = trained.unet(z, t, encoder_hidden_states=context).sample
        got = fresh.unet.eval()(z, t, encoder_hidden_states=context).sample
        base = pipeline_mod.load_pipeline(tiny_folder).unet(z, t, encoder_hidden_states=context).sample
    assert (want - base).abs().max() > 1e-4, "training did not move the model"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with np.load(out / "samples.npz") as f:
        assert f["images"].shape == (4, 32, 32, 3) and sorted(f["labels"].tolist()) == [0, 0, 1, 1]
    assert ("cnn_test_acc" in result) == (not captions)  # captions: no class labels to evaluate by
    if captions:  # dpldm.sample on the saved adapters draws what the run drew (same seed, prompts, weights)
        from dpldm import sample

        sample.main(["--config", "tiny", "--pipeline", str(tiny_folder), "--lora", str(out), "--prompts",
                     str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "again"), "--per-class", "2"])
        with np.load(out / "samples.npz") as a, np.load(tmp_path / "again" / "samples.npz") as b:
            assert np.abs(a["images"].astype(int) - b["images"]).max() <= 1 and np.array_equal(a["labels"], b["labels"])
        assert (tmp_path / "again" / "grid.png").is_file()
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"{path} holds a private caption"
    assert not any(p.name.startswith(".") for p in out.iterdir()), "a staged or private folder was left behind"


def test_a_resume_on_a_changed_pipeline_is_refused(tiny_folder: Path, tmp_path: Path, offline: None) -> None:
    """The pipeline's path is not enough: its files are hashed when the run starts, and a resume on other weights
    under the same path (a re-download, an edited config) is refused."""
    import json
    import shutil

    from dpldm import train

    folder = tmp_path / "pipe"
    shutil.copytree(tiny_folder, folder)
    data, extra = private_folder(tmp_path / "private", captions=False)
    out = tmp_path / "run"
    argv = pipeline_args(folder, data, out, "lora", *extra)
    with pytest.warns(UserWarning, match="NO privacy"):
        train.main([*argv, "--max-steps", "1", "--checkpoint-every", "1"])
    before = pipeline_mod.folder_sha256(folder)
    assert json.loads((out / "checkpoint" / "meta.json").read_text())["args"]["pipeline_sha256"] == before
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace("0.012", "0.0125"))
    with pytest.raises(SystemExit, match="pipeline_sha256"):
        train.main([*argv, "--resume"])


def _cfg_and_opts(argv: list[str]):
    from dpldm import train
    from dpldm.config import load_config

    opts = train.TrainOptions.from_args(train.parser().parse_args(argv))
    return load_config(opts.config, opts.set), opts


@pytest.mark.parametrize("extra,match", [
    ([], "exactly one of --captions FILE"),
    (["--prompt", "x {label}", "--captions", "c.jsonl"], "exactly one of --captions FILE"),
    (["--prompt", "no label here"], "needs {label}"),
    (["--prompt", "x {label}", "--prompts", "missing.txt"], "--prompts missing.txt: no such file"),
])
def test_bad_pipeline_runs_are_refused_before_training(tiny_folder: Path, tmp_path: Path, extra: list[str],
                                                       match: str) -> None:
    from dpldm import train

    data, _ = private_folder(tmp_path / "private", captions=False)
    argv = pipeline_args(tiny_folder, data, tmp_path / "run", "lora", *extra)
    with pytest.raises(SystemExit, match=match):
        train.main(argv)
    assert not (tmp_path / "run").exists()


def test_encoding_a_batch_at_a_time_gives_the_whole_sets_latents() -> None:
    import numpy as np

    from dpldm.common import images_tensor
    from dpldm.config import load_config
    from dpldm.data import Split
    from dpldm.diffusion import encode_latents, encode_split
    from dpldm.models import build_autoencoder

    cfg = load_config("tiny")
    torch.manual_seed(0)
    vae = build_autoencoder(cfg).eval()
    images = np.random.default_rng(0).integers(0, 256, (11, 28, 28, 1), dtype=np.uint8)
    whole = encode_latents(vae, images_tensor(Split(images, np.zeros(11, np.int64)), cfg))
    torch.testing.assert_close(encode_split(vae, images, cfg, batch_size=4), whole, rtol=1e-5, atol=1e-5)
