"""Attribution on two clearly different domains: a digits compartment and a Fashion-MNIST compartment.

Built as a user would: two shard folders (ROOT/digits/<class>/*.png from MNIST's training split, ROOT/fashion/<class>/
*.png from Fashion-MNIST's training split), `python -m dpldm.compartments train --shard-by folders` on the tiny config,
`sample` by access rights, `attribute`. The two domains share the 10 class ids (a folders key records no classes
per shard, so the mixture prior is uniform): a class id does not name a domain. So one domain is asked for through
access rights (a user holding one compartment), and in the composed model (both compartments accessible) the
attribution of every sample is checked against a domain classifier that never saw the compartments' data.

The base. The session's `tiny_runs` base (2 steps on sklearn digits) decodes noise, so the module pre-trains its own
tiny base (autoencoder 200 steps, LDM 300 steps) on PUBLIC images of both domains (rendered font digits and Fashion-
MNIST test rows 0-799, sharing the class ids): per class it is a mixture of the two domains, about half each, and
only a compartment can say which one. The compartments are trained with `--no-dp` (the CLI's non-private mode for
shards of PUBLIC data, which these are): DP fine-tuning did not separate the domains within a CI budget (epsilon 100
and 1000 at delta 1e-5, 10 epochs, `attention` or rank-8 LoRA: single-compartment domain rates 0.53-0.68, against
0.70-0.88 here). DP training and its accounting are covered by tests/test_compartments_stages.py; this file covers
what composition and attribution do with what was trained.

The domain classifier: logistic regression on 2x2-pooled pixels, trained on 400 rendered font digits against 400
Fashion-MNIST test images (rows 2000-2399), none of them seen by the base or the compartments. It is checked first on
held-out REAL images (MNIST's test split against Fashion-MNIST test rows 3000-3299; measured 0.983) and on their
reconstructions through the base's autoencoder (measured 0.962), so a domain it assigns to a sample means something.

What the composed samples show (60 samples, sampling seeds 0-3; the test runs seed 0): the density rule's picks are
skewed towards the digits compartment (0.75-0.82 of the samples, for a uniform prior), already at the first step
(mean digits weight 0.73-0.80 on near-pure noise: the start term, the integral of each compartment's score from 0
to x_T, turns small differences between the learned noise predictions at t=T into about a nat). And each
compartment alone gives 12-30% samples the classifier puts in the other domain. So of the samples that LOOK like
fashion, only 0.53-0.67 are attributed to the fashion compartment (digits: 0.93-0.96), close to what those two
effects predict (0.8 x 0.2 digits-made fashion-looking samples against 0.2 x 0.77 fashion-made ones): that
per-domain share is not asserted. What is asserted, with thresholds set about two binomial standard errors under
the measured values:
- one compartment: the classifier calls >= 65% of its 60 samples its domain (measured digits 0.78-0.88, fashion
  0.70-0.82; the base alone is 0.40-0.52 fashion, so a compartment that learned nothing fails one of the two);
- both compartments: each is picked for >= 10% of the samples (the mixture did not collapse; measured 0.18-0.25);
  for each compartment, >= 65% of the samples attributed to it are classified as its domain (measured digits
  0.81-0.88, fashion 0.80-0.83, i.e. its own rate when sampled alone; picks unrelated to the images would give
  the domain's overall share, 0.68-0.75 digits but 0.25-0.32 fashion); and the attribution is informative both
  ways: P(fashion picked | looks fashion) - P(fashion picked | looks digits) >= 0.3 (Youden's J, measured
  0.48-0.60; 0 for picks unrelated to the images).
Swapping the compartments' names in the expectation makes these checks fail (tried).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from dpldm.compartments import attribute, sample
from dpldm.compartments import train as ctrain

# every test here shares the module's ~45 s setup (a base pre-trained on both domains, two compartments)
pytestmark = pytest.mark.slow

DOMAINS = ("digits", "fashion")  # shard names; the domain classifier's labels 0 and 1
PER_CLASS = 6  # samples per class: 60 per sampling run
SAMPLE_ARGS = ["--per-class", str(PER_CLASS), "--ddim-steps", "10"]


@dataclass
class Setup:
    run: Path
    autoencoder: Path
    classify: Callable[[np.ndarray], np.ndarray]  # uint8 images [N, 28, 28(, 1)] -> 0 digits, 1 fashion
    held_out: tuple[np.ndarray, np.ndarray]  # real images never trained on, and their domain


def pooled(images: np.ndarray) -> np.ndarray:
    x = images.reshape(len(images), 28, 28).astype(np.float32) / 255.0
    return x.reshape(len(x), 14, 2, 14, 2).mean((2, 4)).reshape(len(x), -1)


def write_shard(root: Path, images: np.ndarray, labels: np.ndarray) -> None:
    from PIL import Image

    for k, (img, c) in enumerate(zip(images, labels, strict=True)):
        folder = root / str(int(c))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.reshape(28, 28)).save(folder / f"{k}.png")


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for the module: results that do not depend on the machine's core count (float reduction
    order), and faster on a shared 2-core machine; restored afterwards."""
    before, env = torch.get_num_threads(), os.environ.get("DPLDM_THREADS")
    os.environ["DPLDM_THREADS"] = "1"
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    if env is None:
        os.environ.pop("DPLDM_THREADS", None)
    else:
        os.environ["DPLDM_THREADS"] = env


@pytest.fixture(scope="module")
def domains(one_thread: None, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    from sklearn.linear_model import LogisticRegression

    from dpldm import pretrain, pretrain_autoencoder
    from dpldm.data import fashion_mnist, mnist5k
    from dpldm.font_digits import render

    root = tmp_path_factory.mktemp("domains")
    mnist, fmnist = mnist5k(), fashion_mnist()
    # the public base: font digits and Fashion-MNIST test rows 0-799, the same 10 class ids
    font, font_labels = render(800, seed=11)
    public = root / "public.npz"
    np.savez(public, images=np.concatenate([font, fmnist.test.images[:800, ..., 0]]),
             labels=np.concatenate([font_labels, fmnist.test.labels[:800]]))
    runs = root / "runs"
    ae, ldm = runs / "tiny" / "public" / "autoencoder", runs / "tiny" / "public" / "ldm"
    common = ["--config", "tiny", "--runs", str(runs), "--set", f"data.public={public}"]
    pretrain_autoencoder.main([*common, "--steps", "200", "--batch-size", "16", "--set", "pretrain_autoencoder.lr=0.003"])
    pretrain.main([*common, "--steps", "300", "--batch-size", "32", "--set", "pretrain.lr=0.002"])
    # the shards, one folder each: 300 MNIST training digits, 300 Fashion-MNIST training items
    rng = np.random.default_rng(0)
    shards = root / "shards"
    for name, ds in zip(DOMAINS, (mnist, fmnist), strict=True):
        idx = rng.choice(len(ds.train.labels), 300, replace=False)
        write_shard(shards / name, ds.train.images[idx], ds.train.labels[idx])
    run = root / "cdm"
    ctrain.main(["--config", "tiny", "--runs", str(runs), "--data", str(shards), "--shard-by", "folders",
                 "--out", str(run), "--autoencoder", str(ae), "--pretrained", str(ldm), "--no-dp",
                 "--trainable", "attention", "--lr", "0.003", "--epochs", "20", "--batch-size", "64"])
    # the domain classifier, on public images nothing above trained on
    fonts_clf, _ = render(400, seed=7)
    x = np.concatenate([fonts_clf, fmnist.test.images[2000:2400, ..., 0]])
    y = np.r_[np.zeros(400), np.ones(400)].astype(int)
    clf = LogisticRegression(max_iter=3000).fit(pooled(x), y)
    held_x = np.concatenate([mnist.test.images[:300], fmnist.test.images[3000:3300]])
    held_y = np.r_[np.zeros(300), np.ones(300)].astype(int)
    return Setup(run, ae, lambda images: clf.predict(pooled(images)).astype(int), (held_x, held_y))


def sampled(run: Path, name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images, the compartment each sample's final weights pick (as `attribute` counts it), shard names."""
    with np.load(run / "samples" / name / "samples.npz") as z:
        names = [str(n) for n in z["shards"]]
        return z["images"], z["weights"].astype(np.float32)[-1].argmax(1), names


def test_domain_classifier_is_accurate_on_held_out_real_images(domains: Setup) -> None:
    from dpldm.common import images_tensor
    from dpldm.config import load_config
    from dpldm.data import Split, from_model_tensor
    from dpldm.diffusion import decode, encode
    from dpldm.models import load_autoencoder

    x, y = domains.held_out
    assert (domains.classify(x) == y).mean() >= 0.95  # measured 0.983
    cfg = load_config("tiny")
    vae = load_autoencoder(domains.autoencoder, cfg)
    with torch.no_grad():
        rec = from_model_tensor(decode(vae, encode(vae, images_tensor(Split(x, y), cfg))), 28)
    # the samples are decoded by this autoencoder: what it keeps of a domain, the classifier still sees
    assert (domains.classify(rec) == y).mean() >= 0.9  # measured 0.962


def test_one_compartment_gives_its_domain(domains: Setup, tmp_path: Path) -> None:
    rights = tmp_path / "rights.json"
    rights.write_text(json.dumps({"d": ["digits"], "f": ["fashion"]}))
    for user, shard in (("d", "digits"), ("f", "fashion")):
        res = sample.main(["--run", str(domains.run), "--rights", str(rights), "--user", user, "--name", f"only-{shard}",
                           *SAMPLE_ARGS])
        assert res["trained_on"] == [shard]
        images, _, names = sampled(domains.run, f"only-{shard}")
        assert names == [shard] and len(images) == 10 * PER_CLASS
        rate = (domains.classify(images) == DOMAINS.index(shard)).mean()
        assert rate >= 0.65, f"{shard} compartment: {rate:.2f} of its samples classified as {shard}"


def test_composed_attribution_picks_the_compartment_of_the_samples_domain(domains: Setup) -> None:
    res = sample.main(["--run", str(domains.run), "--shards", ",".join(DOMAINS), "--name", "both", *SAMPLE_ARGS])
    assert res["trained_on"] == list(DOMAINS)
    summary = attribute.main(["--run", str(domains.run), "--samples", "both"])
    images, picked, names = sampled(domains.run, "both")
    assert names == list(DOMAINS)
    domain = domains.classify(images)  # 0 digits, 1 fashion: index of the compartment of that domain
    # attribution.json counts the same picks, per class
    labels = np.repeat(res["classes"], PER_CLASS)
    for c, r in summary.items():
        for i, n in enumerate(names):
            assert r["final_pick"][n] == pytest.approx((picked[labels == int(c)] == i).mean())
    shares = [(picked == i).mean() for i in range(2)]
    assert min(shares) >= 0.1, f"the mixture collapsed: picks per compartment {shares}"
    for i, n in enumerate(names):
        looks = (domain[picked == i] == i).mean()
        assert looks >= 0.65, f"{n}: {looks:.2f} of the {(picked == i).sum()} samples attributed to it look {n}"
    recall = [(picked[domain == i] == i).mean() for i in range(2)]  # per domain (as classified): attributed to it
    youden = recall[0] + recall[1] - 1
    assert youden >= 0.3, f"attribution vs domain: recall per domain {recall}, J {youden:.2f}"
