"""dpldm.train as a library (issue 18, items 1-2): TrainOptions mirrors the command line, a library call raises
TrainError (only main exits), dpldm.compartments builds each shard's options directly (no argv round trip), and
every DP trainer in dpldm takes its sampling rate and sigma from dpldm.calibration. No training here: seconds."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from dpldm import calibration, train
from dpldm.checkpoint import RESUME_KEYS
from dpldm.compartments import train as ctrain
from dpldm.config import load_config


def test_options_mirror_the_command_line() -> None:
    """One field per flag, in the parser's order (the order run_args are logged and checkpointed in), with the
    parser's defaults."""
    p = train.parser()
    assert [a.dest for a in p._actions if a.dest != "help"] == [f.name for f in dataclasses.fields(train.TrainOptions)]
    assert train.TrainOptions.from_args(p.parse_args([])) == train.TrainOptions()


def test_resolved_fills_unset_options_from_the_config_on_a_copy() -> None:
    cfg = load_config("tiny")
    opts = train.TrainOptions(config="tiny", runs=Path("r"), lr=0.5)
    full = opts.resolved(cfg)
    assert opts.trainable is None and opts.out is None  # the caller's options are left as they are
    assert full.lr == 0.5 and full.trainable == cfg["train"]["trainable"] and full.epochs == cfg["train"]["epochs"]
    assert full.out == Path("r") / "tiny" / f"dp-{full.trainable}-eps{full.target_epsilon:g}"
    assert full.resolved(cfg) == full
    assert set(full.run_args()) == set(RESUME_KEYS)


@pytest.mark.parametrize("change, message", [
    ({"secure_mode": True, "deterministic_noise": True}, "--secure-mode and --deterministic-noise contradict"),
    ({"base": "x", "no_base": True}, "--base and --no-base contradict"),
    ({"data": "nowhere/private.npz"}, "nowhere/private.npz"),
])
def test_a_library_call_raises_train_error_and_main_exits(tmp_path: Path, change: dict, message: str) -> None:
    opts = train.TrainOptions(config="tiny", runs=tmp_path / "runs", out=tmp_path / "run", **change)
    with pytest.raises(train.TrainError, match=message) as refused:
        train.run(load_config("tiny"), opts)
    assert isinstance(refused.value, ValueError) and not (tmp_path / "run").exists()
    argv = ["--config", "tiny", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "run")]
    argv += {"secure_mode": ["--secure-mode", "--deterministic-noise"], "base": ["--base", "x", "--no-base"],
             "data": ["--data", "nowhere/private.npz"]}[next(iter(change))]
    with pytest.raises(SystemExit) as exited:
        train.main(argv)
    assert exited.value.code == f"error: {refused.value}"  # the message printed, exit status 1


@pytest.mark.parametrize("resume", [False, True])
@pytest.mark.parametrize("pipeline", [False, True])
def test_shard_options_are_what_the_old_argv_parsed_to(resume: bool, pipeline: bool) -> None:
    """dpldm.compartments used to build `--flag value` lists and re-parse them with dpldm.train's parser: the
    options it builds now are exactly what those lists parsed to (a pipeline base: --pipeline and --prompt)."""
    registered = {"config": "tiny", "set": ["train.lr=0.01"], "runs": "/r", "seed": 3, "target_epsilon": 5.0,
                  "epochs": 2, "max_physical_batch_size": 8, "max_grad_norm": 0.5, "noise_multiplicity": 2,
                  "trainable": "lora", "lora_rank": 2, "accountant": "rdp", "backend": "torch",
                  "checkpoint_every": 3, "secure_mode": False, "deterministic_noise": True, "no_dp": False}
    args = ctrain.shard_args(registered, "cpu")  # ablation and lr unset: the config's
    argv = ["--config", "tiny", "--runs", "/r", "--seed", "3", "--device", "cpu", "--out", "/w", "--no-sample",
            "--resume" if resume else "--fresh", "--batch-size", "7", "--delta", "1e-06",
            *(["--pipeline", "/p", "--prompt", "a {label}"] if pipeline else ["--autoencoder", "/a", "--pretrained", "/l"]),
            "--set", "train.lr=0.01", "--target-epsilon", "5.0", "--epochs", "2",
            "--max-physical-batch-size", "8", "--max-grad-norm", "0.5", "--noise-multiplicity", "2", "--trainable",
            "lora", "--lora-rank", "2", "--accountant", "rdp", "--backend", "torch", "--checkpoint-every", "3",
            "--deterministic-noise"]
    base = {"pipeline": "/p", "prompt": "a {label}"} if pipeline else {"autoencoder": "/a", "ldm": "/l"}
    built = ctrain.shard_options(args, Path("/w"), 7, 1e-6, base, resume)
    assert built == train.TrainOptions.from_args(train.parser().parse_args(argv))
    cfg = load_config("tiny")
    assert built.resolved(cfg).run_args() == train.TrainOptions.from_args(
        train.parser().parse_args(argv)).resolved(cfg).run_args()


def test_resolve_base_options_are_what_the_old_argv_parsed_to() -> None:
    args = argparse.Namespace(config="tiny", runs="/r", set=["a=1"], base="b", pretrained=None, autoencoder=Path("/a"))
    old = train.parser().parse_args(["--config", "tiny", "--runs", "/r", "--base", "b", "--autoencoder", "/a"])
    old.set = args.set
    seen = []

    def chosen(opts: train.TrainOptions, cfg: dict, log: object) -> tuple[Path, Path]:
        seen.append(opts)
        raise train.TrainError("stop")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "ensure_pretrained", chosen)
        with pytest.raises(train.TrainError, match="stop"):
            ctrain.resolve_base(load_config("tiny"), args, None)
    assert seen == [train.TrainOptions.from_args(old)]


def test_one_sampling_rate_and_sigma() -> None:
    from dpkernels.privacy import get_noise_multiplier

    for n, batch in ((4000, 500), (10, 3), (7, 7), (5, 16)):
        assert calibration.sample_rate(n, batch) == 1 / len(DataLoader(range(n), batch_size=batch))
    assert calibration.noise_multiplier(10.0, 1e-5, 4000, 500, 1, "rdp") == get_noise_multiplier(
        target_epsilon=10.0, target_delta=1e-5, sample_rate=0.125, epochs=1, accountant="rdp")
    with pytest.raises(ValueError):
        calibration.noise_multiplier(1e-5, 1e-5, 4000, 500, 1000, "rdp")
