"""Data-parallel DP-SGD (dpkernels.distributed) with 2 CPU processes on gloo: the same update as one process on the
same logical batch (noise off), the noise added exactly once (noise on), the same epsilon, every rank taking every
step even with an empty local batch, and a DistributedDataParallel-wrapped module."""

from __future__ import annotations

import datetime
import gc
import multiprocessing as mp
import os
import shutil
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from opacus.accountants import PRVAccountant
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpkernels import PrivacyEngine
from tests.dpldm_helpers import tiny_private, tiny_runs  # noqa: F401

WORLD = 2
N, BATCH = 64, 16  # q = 1/4, expected batch E = 16
BATCH_ROWS = torch.arange(0, 40, 2)  # one fixed logical batch of 20 examples


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N, 8, generator=g), torch.randint(0, 3, (N,), generator=g))


def model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def make(module: nn.Module, sigma: float, ds: TensorDataset, batch: int = BATCH, seed: int = 5):
    engine = PrivacyEngine()
    opt = torch.optim.SGD(module.parameters(), lr=1.0)
    return engine, *engine.make_private(module=module, optimizer=opt, data_loader=DataLoader(ds, batch_size=batch),
                                        noise_multiplier=sigma, max_grad_norm=0.5, seed=seed)


def one_step(module: nn.Module, opt, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    if len(x):
        F.cross_entropy(module(x), y).backward()
    opt.step()


# --- what each rank runs -----------------------------------------------------------------------------------------

def case_same_update(rank: int, out: Path, wrap: bool) -> None:
    ds = data()
    m = model()
    if wrap:
        m = nn.parallel.DistributedDataParallel(m)
    _, module, opt, _ = make(m, 0.0, ds)
    rows = BATCH_ROWS[rank::WORLD]
    one_step(module, opt, ds.tensors[0][rows], ds.tensors[1][rows])
    inner = module.module if wrap else module
    torch.save({"params": [p.detach().clone() for p in inner.parameters()], "bytes": opt.bytes_all_reduced},
               out / f"rank{rank}.pt")


def case_noise(rank: int, out: Path) -> None:
    big = nn.Linear(200, 500)
    g = torch.Generator().manual_seed(2)  # every rank holds the same data set (make_private compares them)
    _, module, opt, _ = make(big, 1.0, TensorDataset(torch.randn(N, 200, generator=g), torch.zeros(N)), seed=11)
    opt.zero_grad()
    opt.step()  # an empty batch on every rank: the update is the noise alone
    torch.save({"grad": module.weight.grad.clone()}, out / f"rank{rank}.pt")


def case_epoch(rank: int, out: Path) -> None:
    g = torch.Generator().manual_seed(3)  # the same data set on every rank; 3 examples a rank: empty local batches
    ds = TensorDataset(torch.randn(6, 8, generator=g), torch.randint(0, 3, (6,), generator=g))
    engine, module, opt, loader = make(model(), 1.0, ds, batch=2, seed=rank + 20)  # q = 1/3
    sizes = []
    for _ in range(3):
        for x, y in loader:
            sizes.append(len(x))
            one_step(module, opt, x, y)
    torch.save({"sizes": sizes, "epsilon": float(engine.get_epsilon(1e-5)), "sigma": opt.noise_multiplier,
                "q": engine.sample_rate, "params": [p.detach().clone() for p in module.parameters()]},
               out / f"rank{rank}.pt")


def case_rank_dies(rank: int, out: Path) -> None:
    ds = data()
    _, module, opt, _ = make(model(), 1.0, ds)
    if rank == 1:
        os._exit(3)  # dies without a word, as a killed process would
    x, y = ds.tensors[0][:4], ds.tensors[1][:4]
    before = [p.detach().clone() for p in module.parameters()]
    try:
        one_step(module, opt, x, y)
    except RuntimeError as e:
        unchanged = all(torch.equal(a, p) for a, p in zip(before, module.parameters(), strict=True))
        (out / "rank0.txt").write_text(f"{unchanged}\n{e}")
        os._exit(0)  # the process group cannot be torn down cleanly with a dead peer


def case_dpldm_sequence(rank: int, out: Path, calls: list[tuple[str, object]]) -> None:
    """Several dpldm.train jobs one after the other on the same process group (one spawn for all): ("train", argv)
    runs one, ("refused", argv) expects it to stop with an error and keeps the message, ("files", name) has rank 0
    apply FILE_STEPS[name] between two barriers, as a job killed in between would have left the files."""
    from dpldm import train

    os.environ["WORLD_SIZE"] = str(WORLD)
    done: dict[str, list] = {"train": [], "refused": []}
    for kind, arg in calls:
        if kind == "files":
            dist.barrier()
            if rank == 0:
                FILE_STEPS[arg](out)
            dist.barrier()
        elif kind == "train":
            done["train"].append({k: float(v) for k, v in train.main(arg).items() if k in ("epsilon", "steps")})
        else:
            with pytest.raises(SystemExit) as e:
                train.main(arg)
            done["refused"].append(str(e.value))
    torch.save(done, out / f"rank{rank}.pt")


# (the setting named in the error, how rank 1 differs): each refused at make_private, on every rank
DIFFERING = [("max_grad_norm", {"max_grad_norm": 0.7}), ("noise_multiplier", {"noise_multiplier": 0.9}),
             ("clipping", {"clipping": "per_layer"}), ("loss_reduction", {"loss_reduction": "sum"}),
             ("the accountant", {"accountant": "rdp"}), ("target_delta", {"target_delta": 1e-6}),
             ("the data set's content", {"reversed data": True})]


def case_settings_differ(rank: int, out: Path) -> None:
    ds = data()
    messages = []
    for _, change in DIFFERING + [(None, {})]:  # the last: the same settings everywhere, accepted
        kw = {"max_grad_norm": 0.5, "noise_multiplier": 1.0, "clipping": "flat", "loss_reduction": "mean",
              "accountant": "prv", "target_delta": 1e-5, **(change if rank == 1 else {})}
        engine = PrivacyEngine(accountant=kw.pop("accountant"))
        m = model()
        rank_ds = TensorDataset(*(t.flip(0) for t in ds.tensors)) if kw.pop("reversed data", False) else ds
        args = dict(module=m, optimizer=torch.optim.SGD(m.parameters(), lr=1.0),
                    data_loader=DataLoader(rank_ds, batch_size=BATCH), seed=5, **kw)
        try:
            if "target_delta" in change:
                del args["noise_multiplier"]
                engine.make_private_with_epsilon(target_epsilon=3.0, epochs=2, **args)
            else:
                del args["target_delta"]
                engine.make_private(**args)
            messages.append("accepted")
        except ValueError as e:
            messages.append(str(e))
    (out / f"rank{rank}.txt").write_text("\n".join(messages))



CASES = {"same_update": case_same_update, "settings_differ": case_settings_differ, "noise": case_noise,
         "epoch": case_epoch, "rank_dies": case_rank_dies, "dpldm_sequence": case_dpldm_sequence}


def worker(rank: int, out: Path, case: str, args: tuple) -> None:
    try:
        dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=60))
        CASES[case](rank, out, *args)
        gc.collect()  # DDP and engine hooks sit in reference cycles: free them before their process group
        dist.destroy_process_group()
    except BaseException:
        (out / f"error{rank}.txt").write_text(traceback.format_exc())
        raise


def start(case: str, tmp_path: Path, *args: object) -> list[mp.Process]:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(r, tmp_path, case, args)) for r in range(WORLD)]
    for p in procs:
        p.start()
    return procs


def run(case: str, tmp_path: Path, *args: object) -> list[dict]:
    procs = start(case, tmp_path, *args)
    for p in procs:
        p.join(timeout=180)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    errors = [f.read_text() for f in sorted(tmp_path.glob("error*.txt"))]
    assert not hung, f"a rank hung: {errors}"
    assert not errors and all(p.exitcode == 0 for p in procs), errors
    if case == "settings_differ":  # each rank's error messages
        return [(tmp_path / f"rank{r}.txt").read_text() for r in range(WORLD)]
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


# --- the checks ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("wrap", [False, True], ids=["module", "ddp"])
def test_two_ranks_give_one_process_update_on_the_same_batch(tmp_path: Path, wrap: bool) -> None:
    results = run("same_update", tmp_path, wrap)
    ds = data()
    _, single, opt, _ = make(model(), 0.0, ds)
    one_step(single, opt, ds.tensors[0][BATCH_ROWS], ds.tensors[1][BATCH_ROWS])
    for r in results:
        for got, want in zip(r["params"], single.parameters(), strict=True):
            torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
    n_params = sum(p.numel() for p in single.parameters())
    assert results[0]["bytes"] == 4 * n_params  # one fp32 all-reduce of every trainable parameter: DDP's payload


def test_settings_that_differ_between_ranks_are_refused(tmp_path: Path) -> None:
    """Issue 17, item 5: a rank with another max_grad_norm, noise_multiplier, clipping mode, loss reduction,
    accountant or target delta was accepted (only N and q were compared), and the ranks reported different
    epsilons; so was the same data in another order on one rank (an example sampled twice per step: 2 C). Every
    rank now refuses it at make_private, naming the setting; equal settings are accepted."""
    for r, text in enumerate(run("settings_differ", tmp_path)):
        messages = text.split("\n")
        assert len(messages) == len(DIFFERING) + 1
        for (name, _), message in zip(DIFFERING, messages, strict=False):
            assert message.startswith("settings differ between ranks") and name in message, (r, name, message)
        assert messages[-1] == "accepted", (r, messages[-1])


def test_noise_is_added_exactly_once(tmp_path: Path) -> None:
    g0, g1 = (r["grad"] for r in run("noise", tmp_path))
    assert torch.equal(g0, g1)  # every rank applies the same update
    std = float(g0.std()) * BATCH / (1.0 * 0.5)  # in units of sigma * C / E
    assert abs(std - 1.0) < 0.02, std  # twice the noise would give 1.41, none 0


def test_every_rank_takes_every_step_and_reports_one_epsilon(tmp_path: Path) -> None:
    r0, r1 = run("epoch", tmp_path)
    assert len(r0["sizes"]) == len(r1["sizes"]) == 9  # 3 epochs of 1/q = 3 steps, empty local batches included
    assert 0 in r0["sizes"] + r1["sizes"]
    for got, want in zip(r0["params"], r1["params"], strict=True):
        assert torch.equal(got, want)
    acc = PRVAccountant()
    acc.history = [(r0["sigma"], r0["q"], 9)]
    assert r0["epsilon"] == r1["epsilon"] == pytest.approx(acc.get_epsilon(1e-5))
    assert r0["q"] == pytest.approx(1 / 3)


def test_a_dead_rank_stops_the_others_with_a_clear_error(tmp_path: Path) -> None:
    t0 = time.time()
    procs = start("rank_dies", tmp_path)
    for p in procs:
        p.join(timeout=120)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, "rank 0 hung after rank 1 died"
    unchanged, message = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    assert "the gradient all-reduce failed on rank 0" in message and unchanged == "True"
    assert time.time() - t0 < 100


def killed_while_checkpointing(job: Path) -> None:
    """The state a job killed between its ranks' checkpoint writes leaves (job/killed: rank 1 still at the step
    before), and a copy of it with no step in common (job/apart: rank 0 holds step 3 only, rank 1 step 2 only)."""
    run_dir = job / "killed"
    behind = run_dir / "checkpoint-rank1"
    shutil.rmtree(behind)
    (run_dir / "checkpoint-rank1.prev").rename(behind)
    shutil.copytree(run_dir, job / "apart")
    shutil.rmtree(job / "apart" / "checkpoint.prev")


FILE_STEPS = {"killed_while_checkpointing": killed_while_checkpointing}


def test_two_ranks_resume_at_the_step_they_all_hold(tmp_path: Path, tiny_runs: Path,  # noqa: F811
                                                    tiny_private: Path) -> None:  # noqa: F811
    """dpldm.train on two ranks takes the steps and spends the epsilon of one process, saves the model and leaves
    no rank's checkpoint. Ranks whose latest checkpoints differ by a step (killed mid-checkpoint) resume together at
    the step every rank holds, and finish as the uninterrupted 2-rank run; with no step in common every rank stops,
    clearly. (One pair of ranks runs every job: a spawn costs more than a tiny run.)"""
    from dpldm import train
    from tests.dpldm_helpers import train_args

    def argv(name: str, *extra: str) -> list[str]:
        return train_args(tiny_runs, tiny_private, tmp_path / name, "--deterministic-noise",
                          "--checkpoint-every", "1", *extra)

    r0, r1 = run("dpldm_sequence", tmp_path, [
        ("train", argv("whole")), ("train", argv("killed", "--max-steps", "3")),
        ("files", "killed_while_checkpointing"), ("refused", argv("apart", "--resume")),
        ("train", argv("killed", "--resume"))])
    assert r0["train"] == r1["train"]
    with pytest.warns(UserWarning, match="NO privacy"):
        alone = train.main(train_args(tiny_runs, tiny_private, tmp_path / "alone", "--deterministic-noise"))
    assert r0["train"][0] == {"epsilon": pytest.approx(alone["epsilon"]), "steps": alone["steps"]}
    assert (tmp_path / "whole" / "ldm").is_dir() and (tmp_path / "whole" / "log.jsonl").is_file()
    assert not [p for p in (tmp_path / "whole").iterdir() if p.name.startswith("checkpoint")]  # every rank's seeds
    messages = r0["refused"] + r1["refused"]
    assert len(messages) == 2 and all("no step in common" in m and "pass --fresh" in m for m in messages), messages
    whole, _, resumed = r0["train"]
    assert resumed == whole
    a, b = (load_file(tmp_path / d / "ldm" / "unet" / "diffusion_pytorch_model.safetensors")
            for d in ("whole", "killed"))
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed at the common step, the model differs"
    assert '"resumed_step": 2' in (tmp_path / "killed" / "log.jsonl").read_text()


@pytest.mark.slow
def test_resume_on_another_number_of_ranks_is_refused_and_no_rank_state_is_left(
        tmp_path: Path, tiny_runs: Path, tiny_private: Path) -> None:  # noqa: F811
    """Issue 17, item 8: a 1-process checkpoint resumed by 2 ranks, or a 2-rank one by one process, is refused on
    every rank with nothing deleted; a run that ends leaves no rank's private state (checkpoint-rank1, its .prev)."""
    import warnings

    from dpldm import train
    from dpldm.checkpoint import latest_checkpoint
    from tests.dpldm_helpers import train_args

    def argv(out: Path, *extra: str) -> list[str]:
        return train_args(tiny_runs, tiny_private, out, "--deterministic-noise", "--checkpoint-every", "1", *extra)

    def files(out: Path) -> list[tuple[str, int]]:
        return sorted((str(p.relative_to(out)), p.stat().st_size) for p in out.rglob("*") if p.is_file())

    one, two = tmp_path / "one", tmp_path / "two"
    with pytest.warns(UserWarning, match="NO privacy"):
        train.main(argv(one, "--max-steps", "2"))
    kept = files(one)
    job = tmp_path / "job"
    job.mkdir()
    r0, r1 = run("dpldm_sequence", job, [("refused", argv(one, "--resume")), ("train", argv(two, "--max-steps", "2"))])
    assert "written by a job of 1 rank(s), and this job has 2" in r0["refused"][0], r0
    assert "rank 1 holds no checkpoint" in r1["refused"][0], r1
    assert files(one) == kept and latest_checkpoint(one / "checkpoint")[1]["step"] == 2

    assert (two / "checkpoint-rank1" / "state.pt").is_file() and (two / "checkpoint-rank1.prev").is_dir()
    kept = files(two)
    with warnings.catch_warnings(), pytest.raises(SystemExit, match=r"written by a job of 2 rank.*this job has 1"):
        warnings.simplefilter("ignore")
        train.main(argv(two, "--resume"))
    assert files(two) == kept, "a refused resume must not change anything"

    with pytest.warns(UserWarning, match="NO privacy"):
        assert train.main(argv(two, "--fresh"))["steps"] == 4
    assert not [p.name for p in two.iterdir() if "checkpoint" in p.name], "a rank's private state outlived the run"
