"""Everything a run shows and leaves behind besides the progress bar and the checkpoints.

`RunOutputs` checks at start-up what could otherwise fail hours later (an output path that is a
file, a tracker that is not installed, a Hub push without token or network), then writes, on
process 0 only: tracker events under `output_dir/logging_dir/train_unconditional` (the layout of
diffusers' script), seeded sample grids as PNG under `output_dir/samples/`, the diffusers
`DDPMPipeline` folder with its model card in `output_dir`, and Hub uploads of that folder and the logs
(checkpoints excluded). The Hub token is kept out of everything written or uploaded.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image
from tqdm import tqdm

from jax_uncond.errors import UsageError
from jax_uncond.model_card import hardware, write_model_card
from jax_uncond.run.checkpoint import CHECKPOINTS_SUBDIR
from jax_uncond.schedulers.base import FlaxSchedulerBase
from jax_uncond.schedulers.samplers import checked_sampler
from jax_uncond.training.config import TrainConfig, to_dict
from jax_uncond.run.faults import Survivor
from jax_uncond.run.uploads import HubUploads

RUN_NAME = "train_unconditional"
"""The tracker's run name, as in diffusers' script: TensorBoard events go to output_dir/logging_dir/RUN_NAME."""
SAMPLES_DIR = "samples"
"""Sample grids are written to output_dir/SAMPLES_DIR/epoch_XXXX.png."""
HUB_IGNORE_PATTERNS = (f"{CHECKPOINTS_SUBDIR}/*", "step_*", "epoch_*", ".*")
"""Never uploaded: the engine's Orbax checkpoints (and the PyTorch script's own ignore patterns)."""
SAMPLE_SEED_SALT = 0x5A3D
"""Folded into --seed for the sample-grid noise: every grid starts from the same noise, so grids compare."""


def output_dir_check(output_dir: str) -> None:
    """The output path must be a folder or not exist yet."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UsageError(f"--output_dir {output_dir} is a file, not a folder; choose another --output_dir")


def eval_scheduler(config: TrainConfig, scheduler: FlaxSchedulerBase) -> FlaxSchedulerBase:
    """The sampler of the sample grids: the training scheduler for ddpm (as the PyTorch script samples),
    else --eval_scheduler built from its config, checked at start-up with --ddpm_num_inference_steps."""
    if config.eval_scheduler == "ddpm":
        return scheduler
    try:
        return checked_sampler(config.eval_scheduler, scheduler, config.ddpm_num_inference_steps)
    except ValueError as e:
        raise UsageError(f"--eval_scheduler {config.eval_scheduler}: {e}") from e


def image_grid(images: np.ndarray) -> Image.Image:
    """NHWC images in [0, 1] tiled row by row into one near-square PIL image (black where the grid is short)."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i, image in enumerate(to_uint8(images)):
        r, q = divmod(i, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = image
    return Image.fromarray(grid[..., 0] if c == 1 else grid)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[0, 1] floats to uint8, rounded as diffusers' `numpy_to_pil` and the PyTorch script do (numpy or jax)."""
    return (images.clip(0.0, 1.0) * 255).round().astype(np.uint8)


def host_params(params: Any) -> Any:
    """A numpy copy of a (replicated or sharded) parameter tree; a collective when arrays span processes."""
    def fetch(x: Any) -> np.ndarray:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(fetch, params)


def hub_token(config: Any) -> str:
    """The token for --push_to_hub: --hub_token, else HF_TOKEN or the saved `hf auth login`."""
    import huggingface_hub

    token = config.hub_token or huggingface_hub.get_token()
    if not token:
        raise UsageError("--push_to_hub needs a Hub token: pass --hub_token, set HF_TOKEN, or run `hf auth login`")
    return token


def create_hub_repo(config: Any, token: str) -> str:
    """Creates (or finds) the Hub repository at start-up, so that no token or no network fails now, not at the end."""
    import huggingface_hub
    from huggingface_hub.errors import HTTPError

    name = config.hub_model_id or os.path.basename(os.path.abspath(config.output_dir))
    try:
        return huggingface_hub.create_repo(name, token=token, private=config.hub_private_repo, exist_ok=True).repo_id
    except (HTTPError, OSError) as e:
        raise UsageError(f"--push_to_hub: cannot create or reach the Hub repository {name!r} "
                         f"({type(e).__name__}: {e}); check the token and the network") from e


class _Tracker:
    """TensorBoard (tensorboardX) or wandb, behind the two calls the run makes."""

    def __init__(self, config: Any, logdir: str):
        self.kind = config.logger
        if self.kind == "wandb":
            import wandb

            self._run = wandb.init(project=RUN_NAME, dir=logdir, config=to_dict(config))
        else:
            from jax_uncond.run.tensorboard import EventWriter  # SummaryWriter's files, written in this thread

            self._writer = EventWriter(os.path.join(logdir, RUN_NAME))
            self._writer.add_text("config", "```\n" + json.dumps(to_dict(config), indent=2) + "\n```", 0)

    def scalars(self, step: int, metrics: Mapping[str, float]) -> None:
        if self.kind == "wandb":
            self._run.log(dict(metrics), step=step)
        else:
            for name, value in metrics.items():
                self._writer.add_scalar(name, value, step)

    def images(self, step: int, epoch: int, images: np.ndarray) -> None:
        """Samples under the PyTorch script's tag: `test_samples` (TensorBoard step = epoch, as there)."""
        if self.kind == "wandb":
            import wandb

            self._run.log({"test_samples": [wandb.Image(i) for i in to_uint8(images)], "epoch": epoch}, step=step)
        else:
            self._writer.add_images("test_samples", to_uint8(images), epoch, dataformats="NHWC")

    def flush(self) -> None:
        if self.kind != "wandb":
            self._writer.flush()

    def close(self) -> None:
        if self.kind == "wandb":
            self._run.finish()
        else:
            self._writer.close()


class RunOutputs:
    """The run's side effects on disk, in the tracker and on the Hub; only process 0 writes.

    Construct it before anything compiles: the constructor does the start-up checks. Call `log`,
    `epoch_end` and `close` on every process (`epoch_end` gathers the parameters, a collective when
    they span processes); the others return without writing.
    """

    def __init__(self, config: Any, model: Any, scheduler: Any, mesh: Any):
        self.config = config
        self.model = model
        self.scheduler = scheduler
        self.eval_scheduler = eval_scheduler(config, scheduler)
        self.mesh = mesh
        self.writes = jax.process_index() == 0
        self._step = 0
        self._uploads: HubUploads | None = None
        self._tracker: _Tracker | None = None
        self._repo_id: str | None = None
        self._faults = Survivor()
        self.card_metrics: dict[str, float] = {}
        """Evaluation figures for the model card (e.g. {"FID": 12.3}), set by whoever measures them."""
        output_dir_check(config.output_dir)
        if not self.writes:
            return
        if config.logger == "wandb":
            self._check_wandb()
        if config.push_to_hub:
            token = hub_token(config)
            self._repo_id = create_hub_repo(config, token)
            self._uploads = HubUploads(self._repo_id, config.output_dir, token, HUB_IGNORE_PATTERNS)
        os.makedirs(config.output_dir, exist_ok=True)
        self._tracker = _Tracker(config, os.path.join(config.output_dir, config.logging_dir))

    def _check_wandb(self) -> None:
        try:
            import wandb  # noqa: F401
        except ImportError as e:
            raise UsageError("--logger wandb needs the wandb package: pip install wandb "
                             "(or use --logger tensorboard)") from e
        if self.config.hub_token:
            raise UsageError("--logger wandb records the command line, which would expose --hub_token; "
                             "set HF_TOKEN or run `hf auth login` instead")

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Scalars (loss, lr, ...) at an optimizer step."""
        self._step = step
        if self._tracker is not None:
            self._faults.attempt("log", f"the tracker events of step {step}",
                                 lambda: self._tracker.scalars(step, {k: float(v) for k, v in metrics.items()}))

    def epoch_end(self, epoch: int, params: Any, last: bool, step: int | None = None) -> None:
        """After 0-based `epoch`: a sample grid and/or the pipeline folder when due, as the PyTorch script.

        Grids are due when `epoch % --save_images_epochs == 0` or `last`; the pipeline (holding
        `params`, the EMA weights with --use_ema) when `epoch % --save_model_epochs == 0` or `last`.
        `step` is the optimizer step (default: the last one logged).
        """
        if step is not None:
            self._step = step
        images_due = last or epoch % self.config.save_images_epochs == 0
        model_due = last or epoch % self.config.save_model_epochs == 0
        if not (images_due or model_due):
            return
        params = host_params(params)
        if not self.writes:
            return
        if images_due:
            self._faults.attempt("grid", f"the sample grid of epoch {epoch}", lambda: self.save_samples(epoch, params))
        if model_due:
            saved = self._faults.attempt("pipeline", f"the pipeline folder in {self.config.output_dir}",
                                         lambda: self.save_pipeline(params))
            if saved and self._uploads is not None:
                self._faults.attempt("log", "the tracker events before an upload", self._tracker.flush)
                self._uploads.submit(f"Epoch {epoch}")

    def pipeline(self) -> Any:
        from jax_uncond.pipelines.ddpm import FlaxDDPMPipeline

        return FlaxDDPMPipeline(unet=self.model, scheduler=self.scheduler)

    def sample(self, params: Any) -> np.ndarray:
        """--eval_batch_size images (NHWC in [0, 1]) from the same seeded noise every time, drawn by
        --eval_scheduler in --ddpm_num_inference_steps steps."""
        rng = jax.random.fold_in(jax.random.key(self.config.seed), SAMPLE_SEED_SALT)
        return np.asarray(self.pipeline()({"unet": params}, rng, batch_size=self.config.eval_batch_size,
                                          num_inference_steps=self.config.ddpm_num_inference_steps,
                                          scheduler=self.eval_scheduler, output_type="np").images)

    def save_samples(self, epoch: int, params: Any) -> str:
        """Samples the grid, logs it to the tracker and writes output_dir/samples/epoch_XXXX.png; returns the path."""
        images = self.sample(params)
        path = os.path.join(self.config.output_dir, SAMPLES_DIR, f"epoch_{epoch:04d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        image_grid(images).save(path)
        self._tracker.images(self._step, epoch, images)
        self._tracker.flush()
        tqdm.write(f"epoch {epoch}: samples in {path}")
        return path

    def save_pipeline(self, params: Any) -> None:
        """The DDPMPipeline folder (model_index.json, unet/, scheduler/) and its model card in output_dir."""
        if self._uploads is not None:  # an upload still reading the previous files must not see them change
            self._uploads.before_change()
        self.pipeline().save_pretrained(self.config.output_dir, {"unet": params})
        write_model_card(self.config.output_dir, self.config, params, samples=SAMPLES_DIR, step=self._step,
                         hardware=hardware(), name_or_path=self._repo_id, metrics=self.card_metrics)
        tqdm.write(f"pipeline saved in {self.config.output_dir}")

    def end_uploads(self) -> list[str]:
        """However the run ends: waits up to `uploads.FINAL_WAIT_S` for the Hub uploads still queued (retries
        included) and names in one line those not done; returns them. Only the first call waits."""
        return [] if self._uploads is None else self._uploads.close()

    def close(self, summary: Mapping[str, Any]) -> None:
        """Waits for uploads (`end_uploads`), closes the tracker and prints the run's summary as one line, with
        the count of each kind of write that failed."""
        if not self.writes:
            return
        not_uploaded = self.end_uploads()
        self._faults.attempt("log", "the tracker's last events", self._tracker.close)
        summary = {**summary, **{f"failed_{kind}_writes": n for kind, n in self._faults.failures.items()}}
        if not_uploaded:
            summary["failed_uploads"] = len(not_uploaded)
        fields = " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items())
        tqdm.write(f"done: {fields} output_dir={self.config.output_dir}")
