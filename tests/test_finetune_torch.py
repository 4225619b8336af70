"""Fine-tuning trains like the PyTorch script, step for step (a permanent regression test).

200 steps of the compiled train step, started from a train_unconditional.py `checkpoint-N` (its `unet/`
weights, its `unet_ema/` EMA, and with --resume_step_from_pretrained its step count for the LR schedule and
the EMA warm-up), against the script's loop body (UNet2DModel, DDPMScheduler.add_noise, AdamW, clip 1.0,
get_scheduler cosine with warm-up, EMAModel) continuing the same checkpoint with a fresh AdamW, on the
same batches, with the noise and timesteps the JAX step drew (reproduced here from `fold_in(key, step)`).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine_parts import ArrayLoader, RecordingOutputs, build_parts
from finetune_parts import PRETRAIN, PRETRAIN_STEPS, SCHEDULE, SCHEDULE_FLAGS, one_torch_thread, pytorch_step
from jax_uncond.models import pytorch_io
from jax_uncond.run import pretrained
from jax_uncond.training.config import parse_args
from jax_uncond.run.loop import train
from jax_uncond.training.sharding import make_mesh

STEPS = 200
BATCH = 8


def step_noise(seed: int, step: int, shape: tuple, num_train_timesteps: int) -> tuple[np.ndarray, np.ndarray]:
    """The noise and timesteps training/step.py draws at `step` for a global batch of `shape`."""
    step_key = jax.random.split(jax.random.key(seed))[1]  # loop.train: init_key, step_key
    noise_key, time_key, _ = jax.random.split(jax.random.fold_in(step_key, step), 3)
    noise = jax.random.normal(noise_key, shape, jnp.float32)
    timesteps = jax.random.randint(time_key, (shape[0],), 0, num_train_timesteps)
    return np.asarray(noise), np.asarray(timesteps)


def relative_l2(actual: dict[str, np.ndarray], desired: dict[str, np.ndarray]) -> float:
    assert actual.keys() == desired.keys()
    diff = sum(float(np.sum((actual[k].astype(np.float64) - desired[k]) ** 2)) for k in desired)
    norm = sum(float(np.sum(desired[k].astype(np.float64) ** 2)) for k in desired)
    return (diff / norm) ** 0.5


@pytest.mark.slow
def test_continuing_a_pytorch_checkpoint_matches_the_script_step_for_step(pretrained_sources, tmp_path):
    import torch
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    folder = pretrained_sources["checkpoint"]
    config = parse_args(["--pretrained_model_name_or_path", str(folder), "--resume_step_from_pretrained",
                         "--use_ema", "--output_dir", str(tmp_path / "run"), "--resolution", "8",
                         "--global_batch_size", str(BATCH), "--max_train_steps", str(PRETRAIN["total"]),
                         "--lr_warmup_steps", str(PRETRAIN["warmup"]),
                         "--learning_rate", str(PRETRAIN["learning_rate"]),
                         "--checkpointing_steps", "100000", "--logging_steps", "1", *SCHEDULE_FLAGS])
    assert PRETRAIN["total"] == PRETRAIN_STEPS + STEPS
    mesh = make_mesh(jax.devices()[:1])
    config, source = pretrained.prepare(config, None, print)
    model, scheduler = build_parts(config)
    start = pretrained.load(source, model, config)
    loader = ArrayLoader(mesh, BATCH, seed=config.seed)
    outputs = RecordingOutputs()
    state = train(config, model, scheduler, mesh, loader, outputs, BATCH, None, start)
    assert sorted(outputs.logs) == list(range(PRETRAIN_STEPS + 1, PRETRAIN_STEPS + STEPS + 1))

    # The script's loop body, continuing the same checkpoint: its load_model_hook's UNet and EMAModel,
    # a fresh AdamW (moments are not carried over) and the LR schedule advanced to step N.
    unet = UNet2DModel.from_pretrained(folder / "unet")
    ema = EMAModel.from_pretrained(folder / "unet_ema", UNet2DModel)
    assert ema.optimization_step == PRETRAIN_STEPS
    noise_scheduler = DDPMScheduler(**SCHEDULE)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate,
                                  betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=config.max_train_steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": on purpose here
        for _ in range(PRETRAIN_STEPS):
            lr_scheduler.step()
    with one_torch_thread():
        losses = []
        for i in range(STEPS):
            clean = torch.from_numpy(loader.batch(i))
            noise, timesteps = step_noise(config.seed, PRETRAIN_STEPS + i, tuple(clean.shape),
                                          SCHEDULE["num_train_timesteps"])
            losses.append(pytorch_step(unet, noise_scheduler, optimizer, lr_scheduler, ema, clean,
                                       torch.tensor(noise), torch.tensor(timesteps).long()))

    np.testing.assert_allclose(outputs.losses(), losses, rtol=1e-4)
    names = [name for name, _ in unet.named_parameters()]
    torch_params = {k: v.detach().numpy() for k, v in unet.state_dict().items()}
    torch_ema = {name: p.detach().numpy() for name, p in zip(names, ema.shadow_params)}
    jax_params = pytorch_io.state_dict_from_params(state.params)
    jax_ema = pytorch_io.state_dict_from_params(state.ema_params)
    start_params = pytorch_io.state_dict_from_params(start.weights.params)
    moved = relative_l2(start_params, torch_params)
    params_error, ema_error = relative_l2(jax_params, torch_params), relative_l2(jax_ema, torch_ema)
    print(f"moved {moved:.3g}; relative L2 error: params {params_error:.3g}, EMA {ema_error:.3g}; "
          f"max loss error {np.max(np.abs(np.subtract(outputs.losses(), losses)) / np.abs(losses)):.3g}")
    assert moved > 1e-2  # the run trained: the comparison is not of two copies of the start
    assert params_error < 1e-4 and ema_error < 1e-4
