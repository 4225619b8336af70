"""Pretrained sources for the fine-tuning tests, made by diffusers and PyTorch as a user would have them.

A tiny UNet2DModel is trained `PRETRAIN_STEPS` steps by `train_unconditional.py`'s loop body (so its
weights and EMA are not at init), then written as every layout `--pretrained_model_name_or_path` takes:
a DDPMPipeline folder, a UNet2DModel folder, and accelerate `checkpoint-N` folders with the script's save
hook (`unet/` + `unet_ema/`, or `unet/` alone) and without it (`model.safetensors` of a DDP-wrapped model).
"""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path
from typing import Iterator

import numpy as np

import engine_parts

TINY_UNET = {**engine_parts.TINY_UNET, "sample_size": 16}
SCHEDULE = {"num_train_timesteps": 100, "beta_schedule": "squaredcos_cap_v2"}
"""The pretrained pipeline's noise schedule (not the flags' defaults, so tests see where it came from)."""
SCHEDULE_FLAGS = ("--ddpm_num_steps", "100", "--ddpm_beta_schedule", "squaredcos_cap_v2")
"""The same schedule as flags, for the sources without a scheduler_config.json."""
PRETRAIN_STEPS = 20
PRETRAIN = {"learning_rate": 1e-3, "warmup": 50, "total": 220, "ema_max_decay": 0.9999}
"""The PyTorch run's recipe; the continued run (docs: continuing a PyTorch run) keeps it."""


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """PyTorch on one CPU thread: on a shared 2-core machine its thread pool's spinning makes the tiny UNet's
    steps 10-30x slower (measured: 30 ms vs 0.4-0.9 s per step)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def pytorch_run(steps: int = PRETRAIN_STEPS, seed: int = 0):
    """(unet, ema, optimizer, lr_scheduler, noise_scheduler) after `steps` steps of the PyTorch script's loop."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    torch.manual_seed(seed)
    unet = UNet2DModel(**TINY_UNET)
    noise_scheduler = DDPMScheduler(**SCHEDULE)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=PRETRAIN["learning_rate"], betas=(0.95, 0.999),
                                  weight_decay=1e-6, eps=1e-8)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=PRETRAIN["warmup"],
                                 num_training_steps=PRETRAIN["total"])
    ema = EMAModel(unet.parameters(), decay=PRETRAIN["ema_max_decay"], use_ema_warmup=True, inv_gamma=1.0,
                   power=0.75, model_cls=UNet2DModel, model_config=unet.config)
    for _ in range(steps):
        clean = torch.rand(4, 3, 16, 16) * 2 - 1
        noise = torch.randn(clean.shape)
        timesteps = torch.randint(0, SCHEDULE["num_train_timesteps"], (4,)).long()
        pytorch_step(unet, noise_scheduler, optimizer, lr_scheduler, ema, clean, noise, timesteps)
    return unet, ema, optimizer, lr_scheduler, noise_scheduler


def pytorch_step(unet, noise_scheduler, optimizer, lr_scheduler, ema, clean, noise, timesteps) -> float:
    """One step of train_unconditional.py's loop body (epsilon prediction, one process, no accumulation);
    returns the loss."""
    import torch
    import torch.nn.functional as F

    noisy = noise_scheduler.add_noise(clean, noise, timesteps)
    loss = F.mse_loss(unet(noisy, timesteps).sample.float(), noise.float())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad()
    ema.step(unet.parameters())
    return loss.item()


def _accelerate_files(folder: Path, optimizer, lr_scheduler) -> None:
    """What accelerate's `save_state` writes besides the models: optimizer, LR scheduler, random states."""
    import torch

    torch.save(optimizer.state_dict(), folder / "optimizer.bin")
    torch.save(lr_scheduler.state_dict(), folder / "scheduler.bin")
    torch.save({"random_state": random.getstate(), "numpy_random_seed": np.random.get_state(),
                "torch_manual_seed": torch.get_rng_state()}, folder / "random_states_0.pkl")


def make_sources(root: Path) -> dict[str, Path]:
    """Every layout of the same PyTorch run under `root`; returns {layout: folder}."""
    from diffusers import DDPMPipeline, UNet2DModel
    from safetensors.torch import save_file

    with one_torch_thread():
        unet, ema, optimizer, lr_scheduler, noise_scheduler = pytorch_run()
    folders = {
        "pipeline": root / "pipeline",
        "unet": root / "unet-only",
        "checkpoint": root / "with-ema" / f"checkpoint-{PRETRAIN_STEPS}",
        "checkpoint_no_ema": root / "no-ema" / f"checkpoint-{PRETRAIN_STEPS}",
        "checkpoint_bare": root / "bare" / f"checkpoint-{PRETRAIN_STEPS}",
    }
    DDPMPipeline(unet=unet, scheduler=noise_scheduler).save_pretrained(folders["pipeline"])
    small = UNet2DModel(**{**TINY_UNET, "sample_size": 8})  # trained at --resolution 16 in the tests
    small.load_state_dict(unet.state_dict())
    small.save_pretrained(folders["unet"])
    for name in ("checkpoint", "checkpoint_no_ema", "checkpoint_bare"):
        os.makedirs(folders[name])
        _accelerate_files(folders[name], optimizer, lr_scheduler)
    unet.save_pretrained(folders["checkpoint"] / "unet")  # the script's save_model_hook
    ema.save_pretrained(folders["checkpoint"] / "unet_ema")
    unet.save_pretrained(folders["checkpoint_no_ema"] / "unet")
    wrapped = {f"module.{k}": v.contiguous() for k, v in unet.state_dict().items()}  # DDP, no hook
    save_file(wrapped, str(folders["checkpoint_bare"] / "model.safetensors"), metadata={"format": "pt"})
    return folders


def unet_tensors(folder: Path) -> dict[str, np.ndarray]:
    """The diffusers state dict of a UNet folder (safetensors), as numpy."""
    from safetensors.numpy import load_file

    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))
