"""Feature statistics and the two distances: FID exactly as pytorch-fid computes it, KID as clean-fid and
torch-fidelity define it. Pure functions of numpy arrays (float64 where pytorch-fid uses float64)."""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
from scipy import linalg

from jax_uncond.errors import UsageError

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_SEED = 0


@dataclasses.dataclass(frozen=True)
class FeatureStatistics:
    """Mean and covariance of Inception features (pytorch-fid's `mu`, `sigma`), and the features themselves
    when known (KID needs them; pytorch-fid's own `.npz` files hold only `mu` and `sigma`)."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None = None

    @classmethod
    def from_features(cls, features: np.ndarray) -> FeatureStatistics:
        """`np.mean` and `np.cov(rowvar=False)` of the features in float64, as pytorch-fid's
        `calculate_activation_statistics`; fewer than 2 images have no covariance."""
        if len(features) < 2:
            raise UsageError(f"FID needs at least 2 images to estimate a covariance; got {len(features)}")
        act = np.asarray(features, np.float64)
        return cls(np.mean(act, axis=0), np.cov(act, rowvar=False), np.asarray(features, np.float32))

    @property
    def num_images(self) -> int | None:
        return None if self.features is None else len(self.features)

    def save(self, path: str | os.PathLike) -> None:
        """An `.npz` that pytorch-fid reads (`mu`, `sigma`), plus `features` for KID."""
        extra = {} if self.features is None else {"features": self.features}
        np.savez_compressed(path, mu=self.mu, sigma=self.sigma, **extra)

    @classmethod
    def load(cls, path: str | os.PathLike, dim: int) -> FeatureStatistics:
        """An `.npz` with `mu` and `sigma` (pytorch-fid's format; `features` if present), of dimension `dim`."""
        try:
            with np.load(path) as f:
                if "mu" not in f.files or "sigma" not in f.files:
                    held = ", ".join(f.files) or "nothing"
                    raise UsageError(f"{path} has no `mu` and `sigma` arrays (it holds {held}); pass statistics "
                                     "written by pytorch-fid --save-stats or --save_stats")
                mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
                features = np.asarray(f["features"], np.float32) if "features" in f.files else None
        except (OSError, ValueError) as e:
            if isinstance(e, UsageError):
                raise
            raise UsageError(f"{path} is not a readable .npz file ({e})") from e
        if mu.shape != (dim,) or sigma.shape != (dim, dim) or (features is not None and features.shape[1:] != (dim,)):
            raise UsageError(f"{path} holds statistics of shape {mu.shape}/{sigma.shape}, not of {dim} Inception "
                             f"features: compute them with the same --dims (pytorch-fid's default: 2048)")
        return cls(mu, sigma, features)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """`pytorch_fid.fid_score.calculate_frechet_distance`, line for line: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)),
    with its fallback (eps on the diagonals) when the product's square root is not finite."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different dimensions: {mu1.shape} and {mu2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        print(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates", file=sys.stderr)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def kid_subsets(n1: int, n2: int, num_subsets: int = KID_SUBSETS, max_subset_size: int = KID_SUBSET_SIZE,
                seed: int = KID_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of each subset pair, drawn without replacement: (num_subsets, m) each, m = min(n1, n2, 1000)."""
    m = min(n1, n2, max_subset_size)
    if m < 2:
        raise UsageError(f"KID needs at least 2 images on each side; got {n1} and {n2}")
    rng = np.random.RandomState(seed)
    pairs = [(rng.choice(n1, m, replace=False), rng.choice(n2, m, replace=False)) for _ in range(num_subsets)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def kernel_inception_distance(features1: np.ndarray, features2: np.ndarray, num_subsets: int = KID_SUBSETS,
                              max_subset_size: int = KID_SUBSET_SIZE, seed: int = KID_SEED) -> tuple[float, float]:
    """KID: the unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, over random subsets
    of min(n, 1000) images per side; returns (mean, std) over the subsets (torch-fidelity's definition)."""
    index1, index2 = kid_subsets(len(features1), len(features2), num_subsets, max_subset_size, seed)
    x_all, y_all = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    d, m = x_all.shape[1], index1.shape[1]
    mmds = np.empty(len(index1))
    for i, (rows1, rows2) in enumerate(zip(index1, index2)):
        x, y = x_all[rows1], y_all[rows2]
        k_xx, k_yy, k_xy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        mmds[i] = ((k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
                   - 2 * k_xy.sum() / (m * m))
    return float(np.mean(mmds)), float(np.std(mmds))


def scores(samples: FeatureStatistics, reference: FeatureStatistics) -> dict[str, float | None]:
    """{"fid", "kid_mean", "kid_std"} of `samples` against `reference`; KID is None when either side has only
    `mu` and `sigma` (e.g. an `.npz` written by pytorch-fid)."""
    fid = frechet_distance(samples.mu, samples.sigma, reference.mu, reference.sigma)
    kid_mean = kid_std = None
    if samples.features is not None and reference.features is not None:
        kid_mean, kid_std = kernel_inception_distance(samples.features, reference.features)
    return {"fid": fid, "kid_mean": kid_mean, "kid_std": kid_std}
