"""A DP warm-up before DP-SGD: one cheap Gaussian release of the private images' per-class statistics, then
ordinary training of the LDM on images drawn from it (issue 19; DP-FETA's "easy features first").

The release. Each private image (pixels in [0, 1]) is reduced to its low-frequency DCT coefficients z (the
(u, v) with u + v < `frequencies`, per channel: a fixed public basis) and clipped to |z| <= R. Per class c, one
Gaussian mechanism releases

    S1_c = sum z / a,   S2_c = upper triangle of sum z z^T / b,   N_c = count / c_w,   each coordinate + N(0, sigma^2)

An example is in one class, so adding or removing it changes the released vector by (z/a, triu(z z^T)/b, 1/c_w),
whose squared norm is at most R^2/a^2 + R^4/b^2 + 1/c_w^2 (the upper triangle of z z^T with its diagonal has
squared norm sum_{i<=j} z_i^2 z_j^2 <= |z|^4). With a = R/sqrt(w1), b = R^2/sqrt(w2), c_w = 1/sqrt(w3) and
w1 + w2 + w3 = 1 the sensitivity is 1: the release is the Gaussian mechanism with noise multiplier sigma over the
whole data set, which the accountant records as (sigma, sample rate 1, 1 step), composed with the DP-SGD steps
that follow (dpldm.calibration.noise_multiplier(prior=...)).

The warm-up. Everything after the release is post-processing: per class, the Gaussian N(S1/N, S2/N - mean mean^T)
(eigenvalues clipped at 0) is sampled, mapped back to pixels, encoded by the public autoencoder, and the LDM is
trained on those latents without DP, for as many steps as the run can afford. No private image is read again
until the DP-SGD steps.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

# the unit sensitivity's split between the three parts: the second moment carries most of what the samples
# need, the count needs little (N ~ thousands per class)
WEIGHTS = {"mean": 0.2, "second_moment": 0.75, "count": 0.05}
RELEASE_FILE = "release.npz"
_CASTS = {"float": float, "int": int}  # a Settings field's annotation (a string here) -> how a YAML value is read


class WarmupError(ValueError):
    """A warm-up refused: bad settings, or a stored release that does not match them."""


@dataclass(frozen=True)
class Settings:
    """The warm-up section of a config.

    Attributes:
        sigma: the release's noise multiplier (its sensitivity is 1). In a config, a number or a table from target
            epsilon to sigma (see of()).
        frequencies: DCT coefficients (u, v) with u + v < frequencies are kept, per channel.
        clip: R, the L2 bound of an image's coefficient vector (pixels in [0, 1]).
        per_class: samples drawn per class for the warm-up training.
        steps: optimizer steps of the warm-up training.
        batch_size: its batch size.
        lr: its learning rate (AdamW, cosine with warm-up, every LDM parameter).
        autoencoder_steps: before the LDM's warm-up, steps of dpldm.adapt_autoencoder on the same samples plus the
            public images (0: the base's autoencoder as it is).
        autoencoder_batch_size: that adaptation's batch, half samples, half public images.
        autoencoder_lr: its learning rate.
    """

    sigma: float
    frequencies: int
    clip: float
    per_class: int
    steps: int
    batch_size: int
    lr: float
    autoencoder_steps: int = 0
    autoencoder_batch_size: int = 64
    autoencoder_lr: float = 3e-4

    @classmethod
    def of(cls, cfg: dict[str, Any], target_epsilon: float | None = None) -> Settings | None:
        """The config's `warmup` section, checked; None when the config has none (or `warmup: null`).

        Args:
            cfg: the config.
            target_epsilon: the run's target epsilon, which picks sigma when the config gives a table
                {epsilon: sigma}: the entry of the largest epsilon at or below the target (below every entry, the
                smallest's). Default: the config's train.target_epsilon.

        Returns:
            The settings, or None.

        Raises:
            WarmupError: a missing, unknown or out-of-range setting.
        """
        section = cfg.get("warmup")
        if not section:
            return None
        if isinstance(section.get("sigma"), dict):
            target = target_epsilon if target_epsilon is not None else cfg.get("train", {}).get("target_epsilon")
            section = {**section, "sigma": sigma_for(section["sigma"], target)}
        fields = cls.__dataclass_fields__
        names = set(fields)
        required = {n for n, f in fields.items() if f.default is MISSING}
        if not required <= set(section) <= names:
            raise WarmupError(f"config warmup section: missing {sorted(required - set(section))}, unknown "
                              f"{sorted(set(section) - names)}")
        try:
            s = cls(**{n: _CASTS[str(fields[n].type)](v) for n, v in section.items()})
        except (TypeError, ValueError) as e:
            raise WarmupError(f"config warmup section: {e}") from e
        if not (s.sigma > 0 and s.clip > 0 and s.frequencies >= 1 and s.per_class >= 1 and s.steps >= 0
                and s.batch_size >= 1 and s.lr > 0 and s.autoencoder_steps >= 0 and s.autoencoder_batch_size >= 2
                and s.autoencoder_lr > 0):
            raise WarmupError(f"config warmup section out of range: {asdict(s)} (sigma, clip, lr, autoencoder_lr > 0; "
                              "frequencies, per_class, batch_size >= 1; autoencoder_batch_size >= 2; steps, "
                              "autoencoder_steps >= 0)")
        return s

    def history(self) -> list[tuple[float, float, int]]:
        """The release as the accountant records it: one step of the Gaussian mechanism at sample rate 1.

        Returns:
            [(sigma, 1.0, 1)].
        """
        return [(float(self.sigma), 1.0, 1)]


def sigma_for(table: dict[Any, Any], target_epsilon: float | None) -> float:
    """The release's sigma for a target epsilon, from a config's table {epsilon: sigma}. A table because the
    release's share of the budget should differ: at epsilon 10 a release at sigma 1 leaves DP-SGD's sigma 5% higher
    (PRV), while at epsilon 1 sigma 4 would already double it.

    Args:
        table: {epsilon: sigma}, keys and values positive numbers.
        target_epsilon: the run's target epsilon.

    Returns:
        The sigma of the largest epsilon at or below the target; below every entry, the smallest epsilon's.

    Raises:
        WarmupError: an empty or malformed table, or no target epsilon to pick with.
    """
    try:
        entries = sorted((float(e), float(s)) for e, s in table.items())
    except (TypeError, ValueError) as e:
        raise WarmupError(f"config warmup.sigma {table}: a table from epsilon to sigma needs numbers ({e})") from e
    if not entries or min(min(e, s) for e, s in entries) <= 0:
        raise WarmupError(f"config warmup.sigma {table}: a table from epsilon to sigma needs positive entries")
    if target_epsilon is None:
        raise WarmupError(f"config warmup.sigma {table} depends on the target epsilon, and none is given")
    below = [s for e, s in entries if e <= float(target_epsilon)]
    return below[-1] if below else entries[0][1]


def dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix of size n (rows: frequencies).

    Args:
        n: the signal length.

    Returns:
        [n, n] float64, D @ D.T = I.
    """
    k, x = np.arange(n)[:, None], np.arange(n)[None, :]
    d = np.sqrt(2.0 / n) * np.cos(np.pi * (x + 0.5) * k / n)
    d[0] /= np.sqrt(2.0)
    return d


def basis(height: int, width: int, frequencies: int) -> np.ndarray:
    """The kept 2-D DCT basis images, flattened: orthonormal rows, lowest frequencies first.

    Args:
        height: image height.
        width: image width.
        frequencies: (u, v) with u + v < frequencies are kept.

    Returns:
        [k, height * width] float64.
    """
    du, dv = dct_matrix(height), dct_matrix(width)
    pairs = sorted(((u, v) for u in range(height) for v in range(width) if u + v < frequencies),
                   key=lambda p: (p[0] + p[1], p[0]))
    return np.stack([np.outer(du[u], dv[v]).ravel() for u, v in pairs])


def coefficients(images: np.ndarray, frequencies: int) -> np.ndarray:
    """Each image's kept DCT coefficients, channels side by side.

    Args:
        images: uint8 [N, H, W, C].
        frequencies: see basis().

    Returns:
        [N, C * k] float64 (pixels scaled to [0, 1]).
    """
    n, h, w, c = images.shape
    b = basis(h, w, frequencies)
    x = images.astype(np.float64) / 255.0
    return np.concatenate([x[..., i].reshape(n, h * w) @ b.T for i in range(c)], axis=1)


@dataclass(frozen=True)
class Release:
    """The DP release: noisy per-class sums (already divided by their scales), and the settings it was made with.

    Attributes:
        sums: [K, d] noisy sum of z per class.
        second_moments: [K, d, d] noisy sum of z z^T per class (symmetric: the noise of the upper triangle mirrored).
        counts: [K] noisy example counts.
        shape: (H, W, C) of the images.
        sigma: the noise multiplier.
        clip: R.
        frequencies: the kept frequencies.
    """

    sums: np.ndarray
    second_moments: np.ndarray
    counts: np.ndarray
    shape: tuple[int, int, int]
    sigma: float
    clip: float
    frequencies: int

    def save(self, path: Path) -> None:
        """Write the release (a DP output: it may be kept and shared like the model) as .npz, whole or not at all.

        Args:
            path: the file.
        """
        meta = {"shape": list(self.shape), "sigma": self.sigma, "clip": self.clip, "frequencies": self.frequencies,
                "weights": WEIGHTS}
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, sums=self.sums, second_moments=self.second_moments, counts=self.counts,
                     meta=np.array(json.dumps(meta)))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Release:
        """Read a release save() wrote.

        Args:
            path: the file.

        Returns:
            The release.
        """
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            return cls(f["sums"], f["second_moments"], f["counts"], tuple(meta["shape"]), meta["sigma"],
                       meta["clip"], meta["frequencies"])

    def matches(self, settings: Settings, shape: tuple[int, int, int], num_classes: int) -> bool:
        """Whether this release was made with these settings, for images of this shape and this label set.

        Args:
            settings: the warm-up settings.
            shape: (H, W, C).
            num_classes: the number of classes.

        Returns:
            True when they match.
        """
        return (self.sigma == settings.sigma and self.clip == settings.clip and self.frequencies ==
                settings.frequencies and tuple(self.shape) == tuple(shape) and len(self.counts) == num_classes)

    def gaussians(self) -> tuple[np.ndarray, np.ndarray]:
        """The per-class Gaussians the release defines (post-processing): negative eigenvalues of the noisy
        covariance clipped at 0. (Lowering every eigenvalue by the noise's bulk, 2 s sqrt(d), read worse on the
        MNIST proxy: benchmarks/RESULTS.md.)

        Returns:
            (means [K, d], covariance square roots [K, d, d]: cov = L L^T).
        """
        n = np.maximum(self.counts, 1.0)[:, None]
        means = self.sums / n
        roots = []
        for c in range(len(self.counts)):
            cov = self.second_moments[c] / n[c, 0] - np.outer(means[c], means[c])
            ev, vec = np.linalg.eigh((cov + cov.T) / 2)
            roots.append(vec * np.sqrt(np.clip(ev, 0.0, None)))
        return means, np.stack(roots)

    def sample(self, per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Images drawn from the per-class Gaussians, mapped back to pixels.

        Args:
            per_class: images per class.
            rng: the sampling generator (post-processing: any seed will do).

        Returns:
            (uint8 images [K * per_class, H, W, C], int64 labels).
        """
        means, roots = self.gaussians()
        images, labels = [], []
        for c in range(len(means)):
            z = means[c] + rng.standard_normal((per_class, means.shape[1])) @ roots[c].T
            images.append(to_images(z, self.shape, self.frequencies))
            labels.append(np.full(per_class, c, dtype=np.int64))
        return np.concatenate(images), np.concatenate(labels)


def to_images(z: np.ndarray, shape: tuple[int, int, int], frequencies: int) -> np.ndarray:
    """Kept DCT coefficients (coefficients()' layout) back to pixels.

    Args:
        z: [N, C * k] coefficients, pixels scaled to [0, 1].
        shape: (H, W, C).
        frequencies: see basis().

    Returns:
        uint8 images [N, H, W, C].
    """
    h, w, ch = shape
    b = basis(h, w, frequencies)
    k = len(b)
    pixels = np.stack([z[:, i * k:(i + 1) * k] @ b for i in range(ch)], axis=-1).reshape(len(z), h, w, ch)
    return np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)


def scales(clip: float) -> tuple[float, float, float]:
    """(a, b, c_w): the divisors of the three parts that make the release's sensitivity 1 (module docstring).

    Args:
        clip: R.

    Returns:
        (a, b, c_w).
    """
    return (clip / np.sqrt(WEIGHTS["mean"]), clip * clip / np.sqrt(WEIGHTS["second_moment"]),
            1.0 / np.sqrt(WEIGHTS["count"]))


def statistics(images: np.ndarray, labels: np.ndarray, num_classes: int, clip: float, frequencies: int
               ) -> np.ndarray:
    """The vector the Gaussian mechanism perturbs: per class, the scaled sum of the clipped coefficients, the upper
    triangle of their scaled second moment, the scaled count. One example moves it by at most 1 in L2 norm.

    Args:
        images: uint8 [N, H, W, C].
        labels: their labels in [0, num_classes).
        num_classes: the label set's size.
        clip: R.
        frequencies: the kept frequencies.

    Returns:
        [num_classes, d + d (d + 1) / 2 + 1] float64.
    """
    z = coefficients(images, frequencies)
    z = z * np.minimum(1.0, clip / np.maximum(np.linalg.norm(z, axis=1), 1e-300))[:, None]
    a, b, cw = scales(clip)
    iu = np.triu_indices(z.shape[1])
    rows = []
    for c in range(num_classes):
        zc = z[labels == c]
        rows.append(np.concatenate([zc.sum(0) / a, (zc.T @ zc)[iu] / b, [len(zc) / cw]]))
    return np.stack(rows)


def release(images: np.ndarray, labels: np.ndarray, num_classes: int, settings: Settings,
            rng: np.random.Generator) -> Release:
    """The Gaussian mechanism: statistics(...) + N(0, sigma^2 I), then unscaled into sums, second moments, counts.

    Args:
        images: the PRIVATE images, uint8 [N, H, W, C].
        labels: their labels in [0, num_classes).
        num_classes: the label set's size (a class without examples is released too: noise only).
        settings: sigma, clip, frequencies.
        rng: the noise generator: seeded from the OS outside tests.

    Returns:
        The release.
    """
    v = statistics(images, labels, num_classes, settings.clip, settings.frequencies)
    v = v + settings.sigma * rng.standard_normal(v.shape)
    a, b, cw = scales(settings.clip)
    h, w, ch = images.shape[1:]
    d = ch * len(basis(h, w, settings.frequencies))  # the coefficients per image
    iu = np.triu_indices(d)
    seconds = np.zeros((num_classes, d, d))
    seconds[:, iu[0], iu[1]] = v[:, d:-1] * b
    seconds = seconds + np.triu(seconds, 1).transpose(0, 2, 1)
    return Release(v[:, :d] * a, seconds, v[:, -1] * cw, tuple(images.shape[1:]), settings.sigma, settings.clip,
                   settings.frequencies)


def train_on_samples(model: torch.nn.Module, latents: torch.Tensor, labels: torch.Tensor, cfg: dict[str, Any],
                     settings: Settings, seed: int, device: str, desc: str = "DP warm-up") -> list[float]:
    """Ordinary (non-private) training of every LDM parameter on latents of the release's samples.

    Args:
        model: the LDM (trained in place).
        latents: the samples' latents.
        labels: their labels.
        cfg: the config (scheduler, train.label_dropout).
        settings: steps, batch_size, lr.
        seed: for batches, timesteps and noise.
        device: where to train.
        desc: the progress bar's label.

    Returns:
        The loss of every 50th step.
    """
    from dpldm.fit import Recipe, fit

    for p in model.parameters():
        p.requires_grad_(True)
    recipe = Recipe(settings.steps, settings.batch_size, settings.lr, cfg["train"].get("label_dropout", 0.0))
    return fit(model, latents, labels, cfg, recipe, torch.Generator().manual_seed(seed), device, desc).losses
