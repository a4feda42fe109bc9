"""Stage 5: utility of a synthetic data set.

- CNN, MLP and logistic regression trained on the synthetic set; model selection on a held-out slice of the
  SYNTHETIC data; accuracy on the REAL test set (used once, by the selected model).
- The real test set is the private data's held-out split, never trained on or released. The numbers computed on
  it (accuracies, distances, its size) are the utility measurement: they describe the test examples and are not
  covered by the DP guarantee, which is about the training split (as in DP papers reporting test accuracy).
- Frechet distance between synthetic and real test images in the feature space of a CNN trained on real
  PUBLIC data (never on private data).
- Baselines (dpldm/baselines.py), the same CNN: (a) trained on the public data alone, (b) DP-SGD on the private
  train split at the run's (epsilon, delta), (b2) the same from (a), (c) non-private on the private train split
  (the ceiling). (b) and (b2) are separate DP computations, for comparison only, never released. The target
  epsilon and delta come from --target-epsilon/--delta, else from the run's log.jsonl or result.json next to
  --synthetic; --no-baselines skips them.
- Inception FID only with --inception-weights: a local TorchScript Inception (e.g. NVIDIA's
  inception-2015-12-05.pt, called as model(uint8 images [N,3,299,299], return_features=True) -> [N, 2048]).

    python -m dpldm.evaluate --synthetic runs/mnist/dp-attention-eps10/samples.npz [--data PATH] [--no-baselines]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

from dpldm import baselines
from dpldm import data as data_mod
from dpldm.baselines import DPTarget, Tensors
from dpldm.classifiers import accuracy, epochs_for, sklearn_models, split_holdout, to_input, train_cnn
from dpldm.common import add_config_args, config_from, load_private, load_public, private_classes, seed_all
from dpldm.runlog import RunLog


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dpldm.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--synthetic", type=Path, required=True, help=".npz with images and labels (from dpldm.sample)")
    p.add_argument("--data", help="real private data set (default: the config's): its TEST split tests every "
                                  "classifier, its TRAIN split trains the baselines (b), (b2) and (c)")
    p.add_argument("--out", type=Path, help="folder for eval.json (default: next to --synthetic)")
    p.add_argument("--cnn-epochs", type=int)
    p.add_argument("--inception-weights", type=Path, help="local TorchScript Inception for FID (optional)")
    p.add_argument("--no-sklearn", action="store_true", help="skip the MLP and logistic regression")
    p.add_argument("--no-baselines", action="store_true", help="skip the baselines (public-only, DP-SGD, non-private)")
    p.add_argument("--target-epsilon", type=float, help="epsilon of the DP-SGD baselines (default: the run's, read "
                                                        "from log.jsonl or result.json next to --synthetic)")
    p.add_argument("--delta", type=float, help="delta of the DP-SGD baselines (default: the run's)")
    p.add_argument("--accountant", choices=("prv", "rdp", "gdp"), help="default: the run's, else prv")
    return p


def run_target(folder: Path) -> DPTarget | None:
    """The DP fine-tuning's (target epsilon, delta, accountant) from its run folder: the train stage's log.jsonl
    records, else result.json (the epsilon it spent). None when neither says."""
    found: dict[str, Any] = {}
    log = folder / "log.jsonl"
    if log.is_file():
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("stage") == "train":
                found.update({k: rec[k] for k in ("target_epsilon", "delta", "accountant") if k in rec})
    result = folder / "result.json"
    if "target_epsilon" not in found and result.is_file():
        res = json.loads(result.read_text())
        found.setdefault("delta", res.get("delta"))
        found["target_epsilon"] = res.get("epsilon")
    if found.get("target_epsilon") is None or found.get("delta") is None:
        return None
    return DPTarget(float(found["target_epsilon"]), float(found["delta"]), found.get("accountant", "prv"))


def cli_target(args: argparse.Namespace) -> DPTarget | None:
    """--target-epsilon/--delta, each defaulting to the run's; an error when the baselines need them and none is
    found."""
    if args.no_baselines:
        return None
    run = run_target(args.synthetic.parent)
    eps = args.target_epsilon if args.target_epsilon is not None else (run.epsilon if run else None)
    delta = args.delta if args.delta is not None else (run.delta if run else None)
    if eps is None or delta is None:
        raise SystemExit(f"error: the DP-SGD baselines need the run's epsilon and delta, and {args.synthetic.parent} "
                         "holds no log.jsonl or result.json of a DP run: pass --target-epsilon and --delta, or "
                         "--no-baselines")
    return DPTarget(eps, delta, args.accountant or (run.accountant if run else "prv"))


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LinAlgWarning: singular for small sets; regularised below
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():  # near-singular product: regularise, as pytorch-fid does
            eps = np.eye(len(s1)) * 1e-6
            covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(covmean)))


@torch.no_grad()
def features(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 1000) -> np.ndarray:
    model.eval()
    return torch.cat([model.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).double().numpy()


@torch.no_grad()
def inception_features(path: Path, images: np.ndarray, batch_size: int = 100) -> np.ndarray:
    net = torch.jit.load(str(path), map_location="cpu").eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).permute(0, 3, 1, 2)
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = F.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False).round().clamp(0, 255)
        out.append(net(x.to(torch.uint8), return_features=True).double())
    return torch.cat(out).numpy()


def conform(split: data_mod.Split, cfg: dict[str, Any]) -> data_mod.Split:
    """Real images at the synthetic images' size and channel count (user data may differ)."""
    d = cfg["data"]
    if split.images.shape[1:] == (d["image_size"], d["image_size"], d["channels"]):
        return split
    x = data_mod.to_model_tensor(split.images, d["image_size"], d["image_size"], d["channels"])
    return data_mod.Split(data_mod.from_model_tensor(x, d["image_size"]), split.labels)


def tensors(split: data_mod.Split, cfg: dict[str, Any]) -> Tensors:
    split = conform(split, cfg)
    return Tensors(to_input(split.images), torch.from_numpy(split.labels))


def run(cfg: dict[str, Any], synthetic: data_mod.Split, real: data_mod.DataSet, public: data_mod.DataSet | None,
        out: Path, cnn_epochs: int | None = None, inception_weights: Path | None = None, use_sklearn: bool = True,
        seed: int = 0, baselines_on: bool = True, target: DPTarget | None = None, noise_seed: int | None = None,
        backend: str = "auto") -> dict[str, Any]:
    """Classifiers on `synthetic`, tested on real.test; with baselines_on, the baselines (trained on `public` and
    real.train) beside them. target: the DP run's (epsilon, delta) for the DP-SGD baselines (None: skipped)."""
    hp = cfg["evaluate"]
    cnn_epochs = cnn_epochs or epochs_for(hp, "cnn_epochs", len(synthetic.labels))
    seed_all(seed)
    log = RunLog(out, "evaluate")
    tr, val = split_holdout(len(synthetic.labels), hp["holdout_fraction"], seed)
    xs, ys = to_input(synthetic.images), torch.from_numpy(synthetic.labels)
    test = conform(real.test, cfg)
    xt, yt = to_input(test.images), torch.from_numpy(test.labels)
    n_cls = max(real.num_classes, int(ys.max()) + 1)
    cnn, val_acc = train_cnn(xs[tr], ys[tr], xs[val], ys[val], n_cls, cnn_epochs, seed, arch=hp.get("cnn"))
    result: dict[str, Any] = {"n_synthetic": len(ys), "n_test": len(yt), "cnn_epochs": cnn_epochs,
                              "cnn_val_acc_synthetic": val_acc,
                              "cnn_test_acc": accuracy(cnn, xt, yt)}
    if use_sklearn:
        flat = synthetic.images.reshape(len(ys), -1) / 255.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklearn convergence warnings on small iteration budgets
            models = sklearn_models(flat[tr], synthetic.labels[tr], flat[val], synthetic.labels[val], seed)
        flat_t = test.images.reshape(len(yt), -1) / 255.0
        for name, (m, acc) in models.items():
            result[f"{name}_val_acc_synthetic"] = acc
            result[f"{name}_test_acc"] = float(m.score(flat_t, test.labels))
    pub_cnn, pub_s = None, 0.0
    if public is not None:  # Frechet distance in the feature space of a classifier trained on real PUBLIC data
        t0 = time.time()
        pub_cnn, _ = baselines.public_only(tensors(public.train, cfg), public.num_classes,
                                           epochs_for(hp, "public_cnn_epochs", len(public.train.labels)), seed,
                                           hp.get("cnn"))
        pub_s = time.time() - t0  # it is baseline (a) too: trained once
        result["frechet_distance_public_cnn"] = frechet_distance(features(pub_cnn, xs), features(pub_cnn, xt))
    if inception_weights is not None:
        result["fid_inception"] = frechet_distance(inception_features(inception_weights, synthetic.images),
                                                   inception_features(inception_weights, test.images))
    if baselines_on:
        result.update(baselines.run(cfg, tensors(real.train, cfg), Tensors(xt, yt), real.num_classes, target,
                                    pub_cnn, public.num_classes if public else None, pub_s, seed, noise_seed, backend,
                                    lambda m: frechet_distance(features(m, xs), features(m, xt))))
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    shown = {k: v for k, v in result.items() if not k.startswith("baseline") or k.endswith("_test_acc")}
    log.print("evaluation: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in shown.items()), **result)  # all of them in log.jsonl
    return result


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    cfg = config_from(args)
    target = cli_target(args)  # before any data is read: a missing epsilon is an error at once
    try:
        synthetic = data_mod.from_npz(args.synthetic, private_classes(cfg))
        if not (args.data or cfg["data"].get("private")):
            raise data_mod.DataError(f"config {cfg['name']} names no real data set: pass --data PATH")
        real = load_private(args.data or cfg["data"]["private"], cfg)
        public = load_public(cfg) if cfg["data"].get("public") else None
    except data_mod.DataError as e:
        raise SystemExit(f"error: {e}") from None
    out = args.out or args.synthetic.parent
    result = run(cfg, synthetic, real, public, out, args.cnn_epochs, args.inception_weights, not args.no_sklearn,
                 args.seed, not args.no_baselines, target)
    if target is not None:
        RunLog(out, "evaluate").print(baselines.table(result, target.epsilon))


if __name__ == "__main__":
    main()
