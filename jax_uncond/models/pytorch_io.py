"""The one PyTorch <-> Flax table for UNet2DModel weights, and diffusers' weight files (torch-free).

Flax module names copy diffusers' attribute names, so a parameter path maps to a PyTorch state-dict key
by three rules:
  1. list entries: Flax `resnets_0` <-> PyTorch `resnets.0` for the containers in `LIST_CONTAINERS`;
  2. leaf names and layouts: `LEAF_RULES` (conv HWIO <-> OIHW, dense (in, out) <-> (out, in),
     norm scale <-> weight, embedding table <-> weight);
  3. reading only: pre-0.10 diffusers attention names (`query`, `key`, `value`, `proj_attn`) are
     accepted as their current names, as diffusers itself does (`LEGACY_ATTENTION_NAMES`).
Loading is driven by the Flax parameter template (`jax.eval_shape` of the init), so every expected
tensor is checked: missing, unexpected and mis-shaped tensors are reported together in one error.
"""

from __future__ import annotations

import math
import os
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jax_uncond.models.embeddings import FOURIER_SCALE

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
BIN_NAME = "diffusion_pytorch_model.bin"

LIST_CONTAINERS = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers", "to_out")


class LeafRule(NamedTuple):
    """How one Flax leaf maps to PyTorch: name, layout both ways, and PyTorch's default init of it.

    init: "fan_in" U(+-1/sqrt(fan_in)) (kaiming_uniform(a=sqrt(5)) for weights, the same bound for
    biases), "bias" (fan_in of the sibling kernel; zeros beside a GroupNorm scale), "ones",
    "normal" (nn.Embedding's N(0, 1)), "fourier" (N(0, FOURIER_SCALE^2)).
    """

    torch_name: str
    to_torch: Callable[[np.ndarray], np.ndarray]
    to_flax: Callable[[np.ndarray], np.ndarray]
    init: str


def _identity(x: np.ndarray) -> np.ndarray:
    return x


# Keyed by (Flax leaf name, ndim).
LEAF_RULES: dict[tuple[str, int], LeafRule] = {
    ("kernel", 4): LeafRule("weight", lambda k: k.transpose(3, 2, 0, 1), lambda w: w.transpose(2, 3, 1, 0), "fan_in"),
    ("kernel", 2): LeafRule("weight", lambda k: k.T, lambda w: w.T, "fan_in"),
    ("bias", 1): LeafRule("bias", _identity, _identity, "bias"),
    ("scale", 1): LeafRule("weight", _identity, _identity, "ones"),  # GroupNorm
    ("embedding", 2): LeafRule("weight", _identity, _identity, "normal"),  # nn.Embedding (learned time, classes)
    ("weight", 1): LeafRule("weight", _identity, _identity, "fourier"),  # GaussianFourierProjection
}

LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


class WeightMismatchError(ValueError):
    """A weight file does not hold exactly the tensors the model config asks for."""


def _module_segment(segment: str) -> str:
    container, _, index = segment.rpartition("_")
    return f"{container}.{index}" if container in LIST_CONTAINERS and index.isdigit() else segment


def torch_key(path: tuple[str, ...], ndim: int) -> tuple[str, LeafRule]:
    """The PyTorch state-dict key and layout rule for the Flax parameter at `path`."""
    rule = LEAF_RULES.get((path[-1], ndim))
    if rule is None:
        raise KeyError(f"no PyTorch mapping for Flax parameter {'/'.join(path)} with {ndim} dims")
    return ".".join([_module_segment(s) for s in path[:-1]] + [rule.torch_name]), rule


class InitEntry(NamedTuple):
    """How `draw_init` fills one parameter: kind "uniform" (U(+-scale)), "normal" (N(0, scale^2)) or "const"."""

    path: tuple[str, ...]
    shape: tuple[int, ...]
    kind: str
    scale: float


def init_plan(template: Any) -> tuple[InitEntry, ...]:
    """PyTorch's default init for every leaf of `template` (a pytree of shapes), from `LEAF_RULES`."""
    flat = traverse_util.flatten_dict(template)
    plan = []
    for path, leaf in flat.items():
        shape = tuple(leaf.shape)
        init, fan_in_shape = torch_key(path, len(shape))[1].init, shape
        if init == "bias":
            kernel = flat.get(path[:-1] + ("kernel",))
            init, fan_in_shape = ("fan_in", tuple(kernel.shape)) if kernel is not None else ("zeros", shape)
        kind, scale = {
            "fan_in": ("uniform", 1.0 / math.sqrt(math.prod(fan_in_shape[:-1]))),
            "zeros": ("const", 0.0),
            "ones": ("const", 1.0),
            "normal": ("normal", 1.0),
            "fourier": ("normal", FOURIER_SCALE),
        }[init]
        plan.append(InitEntry(path, shape, kind, scale))
    return tuple(plan)


@partial(jax.jit, static_argnums=(0, 2))
def draw_init(plan: tuple[InitEntry, ...], rng: jax.Array, dtype: Any = jnp.float32) -> dict:
    """Parameters following `plan`: all uniform leaves from one draw and all normal leaves from another,
    so the init compiles fast however many tensors the model has."""
    sizes = {kind: sum(math.prod(e.shape) for e in plan if e.kind == kind) for kind in ("uniform", "normal")}
    uniform_key, normal_key = jax.random.split(rng)
    draws = {"uniform": jax.random.uniform(uniform_key, (sizes["uniform"],), jnp.float32, -1.0, 1.0),
             "normal": jax.random.normal(normal_key, (sizes["normal"],), jnp.float32)}
    offsets = {"uniform": 0, "normal": 0}
    out = {}
    for entry in plan:
        if entry.kind == "const":
            value = jnp.full(entry.shape, entry.scale, jnp.float32)
        else:
            start, size = offsets[entry.kind], math.prod(entry.shape)
            value = draws[entry.kind][start:start + size].reshape(entry.shape) * entry.scale
            offsets[entry.kind] += size
        out[entry.path] = value.astype(dtype)
    return traverse_util.unflatten_dict(out)


def state_dict_from_params(params: Any) -> dict[str, np.ndarray]:
    """Flax params -> diffusers state dict of contiguous float32 numpy arrays."""
    state_dict = {}
    for path, value in traverse_util.flatten_dict(params).items():
        array = np.asarray(value, dtype=np.float32)
        key, rule = torch_key(path, array.ndim)
        state_dict[key] = np.ascontiguousarray(rule.to_torch(array))
    return state_dict


def _rename_legacy(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    renamed = dict(state_dict)
    for key in state_dict:
        parts = key.split(".")
        if len(parts) >= 4 and parts[-4] == "attentions" and parts[-2] in LEGACY_ATTENTION_NAMES:
            new = ".".join(parts[:-2] + [LEGACY_ATTENTION_NAMES[parts[-2]], parts[-1]])
            if new not in renamed:
                renamed[new] = renamed.pop(key)
    return renamed


class Matched(NamedTuple):
    """A state dict matched against the tensors a model expects: the converted flat Flax params, and the
    keys missing from the file, in it but not expected, and converted to another shape than expected."""

    flat: dict[tuple[str, ...], np.ndarray]
    missing: list[str]
    unexpected: list[str]
    misshaped: list[str]


def match_state_dict(state_dict: Mapping[str, np.ndarray],
                     expected: Mapping[str, tuple[tuple[str, ...], Callable[[np.ndarray], np.ndarray], tuple[int, ...]]],
                     ignored: Callable[[str], bool] = lambda key: False) -> Matched:
    """Every tensor `expected` names (state-dict key -> (Flax path, layout conversion, Flax shape)) converted,
    and every mismatch found (keys that are `ignored` are not unexpected); the callers word the error."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(k for k in set(state_dict) - set(expected) if not ignored(k))
    flat, misshaped = {}, []
    for key in sorted(set(expected) & set(state_dict)):
        path, to_flax, shape = expected[key]
        value = to_flax(state_dict[key])
        if value.shape != shape:
            misshaped.append(key)
        flat[path] = value
    return Matched(flat, missing, unexpected, misshaped)


def params_from_state_dict(state_dict: dict[str, np.ndarray], template: Any, source: str = "state dict") -> dict:
    """diffusers state dict -> Flax params shaped like `template` (a pytree of arrays or ShapeDtypeStructs).

    Raises WeightMismatchError listing every missing, unexpected and mis-shaped tensor.
    """
    state_dict = _rename_legacy(state_dict)
    rules, expected = {}, {}
    for path, leaf in traverse_util.flatten_dict(template).items():
        key, rule = torch_key(path, len(leaf.shape))
        rules[key] = rule
        expected[key] = (path, lambda x, rule=rule: rule.to_flax(np.asarray(x)), tuple(leaf.shape))
    flat, missing, unexpected, misshaped = match_state_dict(state_dict, expected)
    misshaped = [f"{key}: file has {tuple(state_dict[key].shape)}, config needs "
                 f"{tuple(rules[key].to_torch(np.empty(expected[key][2], np.bool_)).shape)}" for key in misshaped]
    if missing or unexpected or misshaped:
        lines = [f"{source} does not match the UNet2DModel config:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items))
        lines.append("Check that config.json belongs to these weights (block types, channels, layers).")
        raise WeightMismatchError("\n".join(lines))
    return traverse_util.unflatten_dict(flat)


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a `.safetensors` file with numpy; a `.bin` file needs PyTorch (imported only here)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(str(path))
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{path} is a PyTorch pickle (.bin); reading it needs PyTorch (`pip install torch`), "
            "or convert it once to diffusion_pytorch_model.safetensors"
        ) from None
    state_dict = torch.load(str(path), map_location="cpu", weights_only=True)
    return {k: v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy() for k, v in state_dict.items()}


def save_state_dict(state_dict: dict[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write a safetensors file with diffusers' "pt" format metadata."""
    from safetensors.numpy import save_file

    save_file(state_dict, str(path), metadata={"format": "pt"})


def _weights_name(base: str, variant: str | None) -> str:
    if variant is None:
        return base
    stem, ext = os.path.splitext(base)
    return f"{stem}.{variant}{ext}"


def resolve_files(
    name_or_path: str | os.PathLike,
    *,
    subfolder: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    variant: str | None = None,
    token: str | None = None,
    local_files_only: bool = False,
) -> tuple[Path, Path]:
    """(config.json, weight file) of a local diffusers model folder or a Hub repo id.

    Prefers safetensors; falls back to `.bin` only when no safetensors file exists.
    """
    names = [_weights_name(SAFETENSORS_NAME, variant), _weights_name(BIN_NAME, variant)]
    folder = Path(name_or_path) / subfolder if subfolder else Path(name_or_path)
    if Path(name_or_path).is_dir():
        if not (folder / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}; is it a diffusers UNet2DModel folder?")
        for name in names:
            if (folder / name).is_file():
                return folder / CONFIG_NAME, folder / name
        raise FileNotFoundError(f"{folder} has neither {names[0]} nor {names[1]}")

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    def download(filename: str) -> Path:
        return Path(hf_hub_download(
            str(name_or_path), filename, subfolder=subfolder, cache_dir=cache_dir, revision=revision,
            token=token, local_files_only=local_files_only,
        ))  # fmt: skip

    config = download(CONFIG_NAME)
    try:
        return config, download(names[0])
    except EntryNotFoundError:
        try:
            return config, download(names[1])
        except EntryNotFoundError:
            raise FileNotFoundError(f"Hub repo {name_or_path} (subfolder {subfolder}) has neither {names[0]} nor {names[1]}") from None
