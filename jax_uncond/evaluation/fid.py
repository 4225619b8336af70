"""FID and KID of a model's samples, sampled and scored on every device of every process.

`sample_features` draws images with the compiled sampler over the mesh in global batches, quantises
them to uint8 as saving PNG files would, and feeds them to the Inception network on the same mesh: the
images never leave the devices, only their features come back. `FidEvaluator` is the training
run's: built at start-up (weights and reference checked before the train step compiles), called at
epoch ends.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from jax_uncond.console import say
from jax_uncond.data.sources import ImageSource
from jax_uncond.errors import UsageError
from jax_uncond.evaluation.features import InceptionFeatures
from jax_uncond.evaluation.inception import FEATURE_DIM
from jax_uncond.evaluation.inception_weights import load_inception_weights
from jax_uncond.evaluation.reference import reference_statistics
from jax_uncond.evaluation.statistics import FeatureStatistics, scores
from jax_uncond.run.outputs import to_uint8
from jax_uncond.training.sharding import batch_sharding

FID_SEED_SALT = 0xF1D
"""Folded into the seed for the FID samples' noise: every evaluation of a run draws from the same noise."""


@functools.lru_cache(maxsize=8)
def _quantiser(mesh: Mesh) -> Any:
    return jax.jit(to_uint8, out_shardings=batch_sharding(mesh))


def sample_features(pipeline: Any, params: dict, scheduler: Any, num_inference_steps: int, num_samples: int,
                    extractor: InceptionFeatures, seed: int) -> np.ndarray:
    """Inception features of `num_samples` images sampled over the extractor's mesh, `extractor.batch_size` per
    call (the last call's extra images are dropped); (num_samples, dims) on every process."""
    key = jax.random.fold_in(jax.random.key(seed), FID_SEED_SALT)
    quantise = _quantiser(extractor.mesh)

    def batches():
        for index in range(math.ceil(num_samples / extractor.batch_size)):
            yield quantise(pipeline.sample_on_mesh(params, jax.random.fold_in(key, index), extractor.batch_size,
                                                   num_inference_steps, scheduler, extractor.mesh))

    return extractor.of_batches(batches(), num_samples, desc="FID samples")


class FidEvaluator:
    """--fid_epochs: FID and KID of the weights being trained, every N epochs and at the end.

    Construct it at start-up on every process: it loads the Inception weights and computes (or reads
    the cached) reference statistics, so a bad file fails before anything else compiles; `source` is
    the training data (the default reference), if already loaded. Call it on every process (sampling
    is collective); process 0 computes the scores and returns the metrics.
    """

    def __init__(self, config: Any, model: Any, scheduler: Any, mesh: Mesh, batch_size: int,
                 source: ImageSource | None = None):
        from jax_uncond.pipelines.ddpm import FlaxDDPMPipeline
        from jax_uncond.schedulers.samplers import checked_sampler, default_steps

        self.config = config
        if config.fid_num_samples < 2:
            raise UsageError(f"--fid_num_samples {config.fid_num_samples}: FID needs at least 2 samples")
        self.pipeline = FlaxDDPMPipeline(unet=model, scheduler=scheduler)
        self.steps = config.fid_inference_steps or default_steps(config.fid_scheduler, len(scheduler))
        try:  # at start-up, not at the first evaluation
            self.scheduler = checked_sampler(config.fid_scheduler, scheduler, self.steps)
        except ValueError as e:
            raise UsageError(f"--fid_scheduler {config.fid_scheduler} with {self.steps} steps: {e}") from e
        weights = load_inception_weights(config.inception_weights)
        if weights.note():
            say(weights.note())
        self.extractor = InceptionFeatures(weights.params, mesh, config.fid_batch_size or batch_size, config.fid_dims)
        self.reference, reference_name = reference_statistics(config.fid_reference, config, self.extractor,
                                                                   weights.sha256, source)
        say(f"fid: every {config.fid_epochs} epoch(s), {config.fid_num_samples} samples ({config.fid_scheduler}, "
            f"{self.steps} steps), {config.fid_dims}-d features, against {reference_name}")
        self.latest: dict[str, Any] | None = None
        """The last evaluation's scores: fid, kid_mean, kid_std."""
        self.best: tuple[float, int] | None = None

    def due(self, epoch: int, last: bool) -> bool:
        """After every --fid_epochs completed epochs (0-based `epoch`), and after the last step."""
        return last or (epoch + 1) % self.config.fid_epochs == 0

    def __call__(self, params: Any, step: int) -> dict[str, float]:
        """Samples --fid_num_samples images from `params` and scores them; the metrics to log (process 0)."""
        features = sample_features(self.pipeline, {"unet": params}, self.scheduler, self.steps,
                                   self.config.fid_num_samples, self.extractor, self.config.seed)
        if jax.process_index() != 0:
            return {}
        values = scores(FeatureStatistics.from_features(features), self.reference)
        fid = values["fid"]
        if self.best is None or fid < self.best[0]:
            self.best = (fid, step)
        self.latest = values
        kid = ("" if values["kid_mean"] is None
               else f" kid {values['kid_mean']:.4g} ± {values['kid_std']:.2g}")
        tqdm.write(f"step {step}: fid {fid:.4f}{kid}; best fid {self.best[0]:.4f} at step {self.best[1]}")
        metrics = {"fid": fid, "fid_best": self.best[0], "fid_best_step": float(self.best[1])}
        if values["kid_mean"] is not None:
            metrics.update(kid=values["kid_mean"], kid_std=values["kid_std"])
        return metrics

    def card_metrics(self) -> dict[str, float]:
        """The last scores for the model card, named with what they depend on (empty before the first)."""
        if self.latest is None:
            return {}
        what = f"{self.config.fid_num_samples} samples, {self.config.fid_scheduler} {self.steps} steps"
        if self.config.fid_dims != FEATURE_DIM:
            what += f", {self.config.fid_dims}-d features"
        out = {f"FID ({what})": self.latest["fid"]}
        if self.latest["kid_mean"] is not None:
            out[f"KID ({what})"] = self.latest["kid_mean"]
        return out

    def summary(self) -> dict[str, float]:
        """For the run summary: the last FID (and KID) and the best FID with its step."""
        if self.latest is None or self.best is None:
            return {}
        out = {"fid": self.latest["fid"], "fid_best": self.best[0], "fid_best_step": self.best[1]}
        if self.latest["kid_mean"] is not None:
            out["kid"] = self.latest["kid_mean"]
        return out
