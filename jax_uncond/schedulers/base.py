"""Config plumbing shared by the schedulers: diffusers-compatible config dicts and scheduler_config.json.

A scheduler object holds only its config (hashable, so it can be a static argument of `jax.jit` and a
cache key); everything numeric lives in the state pytree that `create_state` returns.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
from typing import Any, ClassVar, Mapping

import jax
import numpy as np

from jax_uncond.diffusers_format import DIFFUSERS_VERSION
from jax_uncond.schedulers.common import (
    BETA_SCHEDULES,
    FINAL_SIGMAS_TYPES,
    PREDICTION_TYPES,
    SIGMA_SPACINGS,
    TIMESTEP_SPACINGS,
    add_noise_common,
    get_velocity_common,
    make_betas,
)

logger = logging.getLogger(__name__)

SCHEDULER_CONFIG_NAME = "scheduler_config.json"


def init_keys(cls: type) -> set[str]:
    """The config keys a scheduler class takes: its `__init__` arguments."""
    return set(inspect.signature(cls.__init__).parameters) - {"self"}


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false; got {value!r}")


def check_number(name: str, value: Any, low: float, high: float, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be a number in {bracket}{low}, {high}]; got {value!r}")


def check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value > high):
        allowed = f"{low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an int {allowed}; got {value!r}")


def check_optional_sigma(name: str, value: Any) -> None:
    if value is not None:
        check_number(name, value, 0.0, math.inf, low_open=True)


FLOW_MATCHING_DEFAULTS = {"use_flow_sigmas": False, "flow_shift": 1.0, "use_dynamic_shifting": False,
                          "time_shift_type": "exponential", "shift_terminal": None}
"""diffusers' flow-matching keys and the only values accepted here (this project's models are DDPM-trained)."""


def check_sigma_options(c: Mapping[str, Any]) -> None:
    """The sigma-spacing flags (at most one set; beta sigmas need scipy), final_sigmas_type, and no
    flow-matching option."""
    for name in SIGMA_SPACINGS:
        check_bool(name, c[name])
    chosen = [name for name in SIGMA_SPACINGS if c[name]]
    if len(chosen) > 1:
        raise ValueError(f"set at most one of {', '.join(SIGMA_SPACINGS)}; got {', '.join(chosen)}")
    if c["use_beta_sigmas"]:
        try:
            import scipy.stats  # noqa: F401
        except ImportError as e:
            raise ValueError("use_beta_sigmas needs scipy: pip install scipy") from e
    check_choice("final_sigmas_type", c["final_sigmas_type"], FINAL_SIGMAS_TYPES)
    for name, allowed in FLOW_MATCHING_DEFAULTS.items():
        if name in c and c[name] != allowed:
            raise ValueError(
                f"{name} must be {allowed!r}: flow-matching options are not supported (DDPM-trained models "
                f"only); got {c[name]!r}"
            )


def _subclasses(cls: type) -> list[type]:
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_subclasses(direct))]


def scheduler_classes() -> list[type[FlaxSchedulerBase]]:
    """Every scheduler class (each ports one diffusers class, named by its `diffusers_class`)."""
    return [cls for cls in _subclasses(FlaxSchedulerBase) if "diffusers_class" in vars(cls)]


class FlaxSchedulerBase:
    """A diffusers scheduler config in a hashable object; subclasses define `__init__` with diffusers' keys."""

    diffusers_class: ClassVar[str]
    beta_schedules: ClassVar[tuple[str, ...]] = BETA_SCHEDULES
    prediction_types: ClassVar[tuple[str, ...]] = PREDICTION_TYPES

    def _register(self, config: dict[str, Any]) -> None:
        """Validate and freeze the `__init__` arguments as this scheduler's config."""
        config = {k: v for k, v in config.items() if k not in ("self", "__class__")}
        if config["trained_betas"] is not None:
            config["trained_betas"] = tuple(float(b) for b in config["trained_betas"])
        config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}  # hashable
        self._validate(config)
        self._config = config
        self._key = (type(self).__name__, tuple(sorted(config.items())))

    def _validate(self, c: dict[str, Any]) -> None:
        steps = c["num_train_timesteps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_train_timesteps must be a positive int; got {steps!r}")
        check_choice("beta_schedule", c["beta_schedule"], self.beta_schedules)
        check_number("beta_start", c["beta_start"], 0.0, 1.0)
        check_number("beta_end", c["beta_end"], 0.0, 1.0)
        if c["trained_betas"] is not None:
            betas = c["trained_betas"]
            if len(betas) != steps or not all(0.0 <= b <= 1.0 for b in betas):
                raise ValueError(
                    f"trained_betas must hold num_train_timesteps={steps} values in [0, 1]; got {len(betas)} values"
                )
        check_choice("prediction_type", c["prediction_type"], self.prediction_types)
        check_choice("timestep_spacing", c["timestep_spacing"], TIMESTEP_SPACINGS)
        for name in ("clip_sample", "thresholding", "rescale_betas_zero_snr"):
            if name in c:  # every key below only where the class takes it
                check_bool(name, c[name])
        if "clip_sample_range" in c:
            check_number("clip_sample_range", c["clip_sample_range"], 0.0, math.inf, low_open=True)
        if "dynamic_thresholding_ratio" in c:
            check_number("dynamic_thresholding_ratio", c["dynamic_thresholding_ratio"], 0.0, 1.0)
        if "sample_max_value" in c:
            check_number("sample_max_value", c["sample_max_value"], 0.0, math.inf, low_open=True)
        offset = c["steps_offset"]
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"steps_offset must be a non-negative int; got {offset!r}")

    @property
    def config(self) -> dict[str, Any]:
        """The diffusers config keys and values (a fresh dict; JSON-ready)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self._config.items()}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FlaxSchedulerBase) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config.items())})"

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any):
        """Build from a diffusers config dict (e.g. `scheduler.config` or a parsed scheduler_config.json).

        Private `_...` keys and the keys only another scheduler class takes are dropped, as diffusers does for
        compatible schedulers; any other unknown key is reported in a warning and ignored.
        """
        used_defaults = set(config.get("_use_default_values", ()))
        config = {k: v for k, v in config.items() if not k.startswith("_") and k not in used_defaults}
        config.update(overrides)
        expected = init_keys(cls)
        compatible = set().union(*(init_keys(c) for c in scheduler_classes()))
        unknown = {k: v for k, v in config.items() if k not in expected and k not in compatible}
        if unknown:
            logger.warning(
                "The config attributes %s were passed to %s, but are not expected and will be ignored.",
                unknown,
                cls.__name__,
            )
        return cls(**{k: v for k, v in config.items() if k in expected})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None):
        """Read `scheduler_config.json` from a local folder; returns `(scheduler, state)`."""
        folder = os.path.join(pretrained_model_name_or_path, subfolder or "")
        path = os.path.join(folder, SCHEDULER_CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"no {SCHEDULER_CONFIG_NAME} in {folder!r}: pass the folder that holds it, or the pipeline "
                f"folder with subfolder='scheduler'"
            )
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        scheduler = cls.from_config(config)
        return scheduler, scheduler.create_state()

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write `scheduler_config.json` as diffusers does, loadable by diffusers' class of the same name."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is a file; pass a folder")
        os.makedirs(save_directory, exist_ok=True)
        config = {"_class_name": self.diffusers_class, "_diffusers_version": DIFFUSERS_VERSION, **self.config}
        with open(os.path.join(save_directory, SCHEDULER_CONFIG_NAME), "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def _betas(self) -> np.ndarray:
        """The float32 betas of this config (host-side)."""
        c = self._config
        return make_betas(
            c["num_train_timesteps"], c["beta_start"], c["beta_end"], c["beta_schedule"], c["trained_betas"],
            c["rescale_betas_zero_snr"],
        )  # fmt: skip

    def _state_arrays(self, timesteps: np.ndarray, **arrays: Any) -> dict[str, jax.Array]:
        """`timesteps` and the other state arrays as int32 (integers: timesteps, step counters) or float32,
        transferred explicitly (fine under a transfer guard)."""

        def cast(value: Any) -> np.ndarray:
            value = np.asarray(value)
            return value.astype(np.int32 if np.issubdtype(value.dtype, np.integer) else np.float32)

        return jax.device_put({"timesteps": cast(timesteps), **{k: cast(v) for k, v in arrays.items()}})

    def scale_model_input(self, state: Any, sample: jax.Array, timestep: int | None = None) -> jax.Array:
        """DDPM and DDIM do not scale the model input (kept for interchangeability with other schedulers)."""
        return sample

    def add_noise(self, state: Any, original_samples: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
        """Noise x_0 to x_t (the forward process) at per-example `timesteps`."""
        return add_noise_common(state.common, original_samples, noise, timesteps)

    def get_velocity(self, state: Any, sample: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
        """The v-prediction target for x_0 = `sample` and `noise` at `timesteps`."""
        return get_velocity_common(state.common, sample, noise, timesteps)

    def __len__(self) -> int:
        return self._config["num_train_timesteps"]
