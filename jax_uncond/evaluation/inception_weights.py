"""pytorch-fid's Inception weights without PyTorch: the `.pth` reader, the one name/layout table, the download.

A `.pth` file is a pickle whose tensors point into storages: either a zip archive (`torch.save` since
PyTorch 1.6: `<name>/data.pkl` plus one raw `<name>/data/<key>` record per storage) or the older
sequential format (magic number, protocol, system info, the pickle, the storage keys, then each storage
as an int64 element count and its raw bytes), which is what pytorch-fid's 2019 file uses. Both are read
by an unpickler that admits only the globals a state dict needs (tensor rebuild, typed storages,
OrderedDict), so a file cannot run code while it is read.

Flax module names are PyTorch's attribute names (`inception.py`), so a parameter path maps to a
state-dict key by joining it with dots and renaming the leaf through `LEAF_TABLE`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import re
import struct
import sys
import urllib.error
import urllib.request
import zipfile
from typing import Any, Callable

import numpy as np
from flax import traverse_util

from jax_uncond.errors import UsageError
from jax_uncond.models import pytorch_io

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
"""pytorch-fid's published FID Inception weights (`pytorch_fid.inception.FID_WEIGHTS_URL`)."""
CACHE_ENV = "JAX_UNCOND_CACHE"
"""Environment variable naming the cache folder (default ~/.cache/jax_uncond) for downloaded weights."""


class WeightsFileError(UsageError):
    """A weights file that is missing, unreadable, truncated, of the wrong checksum, or not the state dict."""


# ---- the one PyTorch <-> Flax table ------------------------------------------------------------------------------

LEAF_TABLE: dict[tuple[str, str], tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    ("conv", "kernel"): ("conv.weight", lambda w: w.transpose(2, 3, 1, 0)),  # OIHW -> HWIO
    ("bn", "scale"): ("bn.weight", lambda w: w),
    ("bn", "bias"): ("bn.bias", lambda w: w),
    ("bn", "mean"): ("bn.running_mean", lambda w: w),
    ("bn", "var"): ("bn.running_var", lambda w: w),
}
"""(Flax module, Flax leaf) -> (PyTorch suffix, PyTorch -> Flax layout). The module path above is the same."""
IGNORED_KEYS = re.compile(r"^fc\.(weight|bias)$|\.num_batches_tracked$")
"""In the file but unused for features: the 1008-class classifier and BatchNorm's step counters."""


def torch_key(path: tuple[str, ...]) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    """The state-dict key and layout conversion of the Flax parameter at `path`."""
    suffix, to_flax = LEAF_TABLE[path[-2:]]
    return ".".join(path[:-2] + (suffix,)), to_flax


def params_from_state_dict(state_dict: dict[str, np.ndarray], template: Any, source: str) -> dict:
    """pytorch-fid's Inception state dict -> Flax params shaped like `template`; every mismatch listed at once."""
    expected = {}
    for path, leaf in traverse_util.flatten_dict(template).items():
        key, to_flax = torch_key(path)
        expected[key] = (path, lambda x, f=to_flax: np.ascontiguousarray(f(np.asarray(x, np.float32))),
                         tuple(leaf.shape))
    flat, missing, unexpected, misshaped = pytorch_io.match_state_dict(
        state_dict, expected, ignored=lambda key: bool(IGNORED_KEYS.search(key)))
    misshaped = [f"{key} {tuple(state_dict[key].shape)}" for key in misshaped]
    if missing or unexpected or misshaped:
        parts = [f"{title} ({len(items)}): {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}"
                 for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped))
                 if items]
        raise WeightsFileError(f"{source} is not pytorch-fid's FID Inception state dict ({'; '.join(parts)}); "
                               f"pass the file published at {FID_WEIGHTS_URL}")
    return traverse_util.unflatten_dict(flat)


# ---- the torch-free .pth reader ----------------------------------------------------------------------------------

STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


@dataclasses.dataclass
class _Storage:
    dtype: np.dtype
    key: str
    numel: int
    data: np.ndarray | None = None  # filled from the file once the pickle is read
    view: tuple[str, int, int] | None = None  # legacy storage views: (root key, offset, size)


@dataclasses.dataclass
class _TensorRef:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple, stride: tuple, *_: Any) -> _TensorRef:
    """Stands in for torch._utils._rebuild_tensor(_v2): remembers where the tensor's values are."""
    return _TensorRef(storage, int(offset), tuple(size), tuple(stride))


def _rebuild_parameter(data: _TensorRef, *_: Any) -> _TensorRef:
    """Stands in for torch._utils._rebuild_parameter: an nn.Parameter saved as such is its tensor."""
    return data


class _StorageType:
    def __init__(self, name: str):
        self.dtype = np.dtype(STORAGE_DTYPES[name])


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a state dict; any global beyond OrderedDict, tensor and parameter rebuilds and typed storages is
    refused."""

    def __init__(self, file: Any, legacy: bool):
        super().__init__(file)
        self.legacy = legacy
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            import collections

            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a tensor state dict")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
        if key not in self.storages:
            self.storages[key] = _Storage(storage_type.dtype, key, numel)
        view = pid[5] if self.legacy and len(pid) > 5 else None
        if view is not None:  # (view key, offset, size) into the root storage
            view_key, offset, size = str(view[0]), int(view[1]), int(view[2])
            return _Storage(storage_type.dtype, view_key, size, view=(key, offset, size))
        return self.storages[key]


def _read_exact(f: Any, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise EOFError(f"truncated while reading {what}")
    return data


def _read_legacy(f: Any) -> tuple[Any, dict[str, _Storage]]:
    unpickler = _RestrictedUnpickler(f, legacy=True)  # every pickle of the file goes through it
    if unpickler.load() != LEGACY_MAGIC:
        raise pickle.UnpicklingError("not a PyTorch file (no magic number)")
    if unpickler.load() != LEGACY_PROTOCOL:
        raise pickle.UnpicklingError("unsupported PyTorch legacy protocol version")
    sys_info = unpickler.load()
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
        raise pickle.UnpicklingError("only little-endian PyTorch files are supported")
    obj = unpickler.load()
    keys = unpickler.load()
    if not isinstance(keys, list):
        raise pickle.UnpicklingError("no list of storage keys after the pickle")
    for key in keys:
        storage = unpickler.storages[str(key)]
        numel = struct.unpack("<q", _read_exact(f, 8, f"storage {key}"))[0]
        if numel != storage.numel:
            raise pickle.UnpicklingError(f"storage {key}: {numel} values in the file, {storage.numel} in the pickle")
        storage.data = np.frombuffer(_read_exact(f, numel * storage.dtype.itemsize, f"storage {key}"), storage.dtype)
    return obj, unpickler.storages


def _read_zip(path: str) -> tuple[Any, dict[str, _Storage]]:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise pickle.UnpicklingError("a zip file without exactly one data.pkl")
        prefix = pickles[0][: -len("data.pkl")]
        if prefix + "byteorder" in names and archive.read(prefix + "byteorder").strip() != b"little":
            raise pickle.UnpicklingError("only little-endian PyTorch files are supported")
        unpickler = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), legacy=False)
        obj = unpickler.load()
        for key, storage in unpickler.storages.items():
            storage.data = np.frombuffer(archive.read(f"{prefix}data/{key}"), storage.dtype)
    return obj, unpickler.storages


def _materialise(ref: _TensorRef, storages: dict[str, _Storage]) -> np.ndarray:
    storage = ref.storage
    data = storage.data
    if storage.view is not None:
        root, offset, size = storage.view
        data = storages[root].data[offset:offset + size]
    if data is None or len(data) < storage.numel:
        raise EOFError(f"storage {storage.key} holds fewer values than its tensors need")
    if any(s < 0 for s in ref.stride) or len(ref.stride) != len(ref.size):
        raise pickle.UnpicklingError("a tensor with negative or mismatched strides")
    end = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride)) + 1 if all(ref.size) else ref.offset
    if ref.offset < 0 or end > len(data):
        raise pickle.UnpicklingError("a tensor reaches past the end of its storage")
    itemsize = data.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(data[ref.offset:], ref.size, [s * itemsize for s in ref.stride],
                                           writeable=False)
    return np.array(view)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A PyTorch `.pth` state dict (zip or legacy format) as {key: numpy array}, without PyTorch.

    Raises WeightsFileError for a missing, truncated or foreign file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsFileError(f"--inception_weights {path}: no such file")
    try:
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"
            if not zipped:
                f.seek(0)
                obj, storages = _read_legacy(f)
        if zipped:
            if not zipfile.is_zipfile(path):
                raise zipfile.BadZipFile("a zip file without its directory: truncated or damaged")
            obj, storages = _read_zip(path)
        if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, _TensorRef)
                                                for k, v in obj.items()):
            raise pickle.UnpicklingError("the file holds no state dict of tensors")
        return {key: _materialise(ref, storages) for key, ref in obj.items()}
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, KeyError, ValueError, TypeError,
            AttributeError, IndexError, struct.error) as e:
        reason = " ".join(str(e).split())  # one line
        raise WeightsFileError(f"{path} is not a readable PyTorch state dict ({type(e).__name__}: {reason})") from e


# ---- where the file comes from -----------------------------------------------------------------------------------

def cache_dir() -> str:
    """$JAX_UNCOND_CACHE, else ~/.cache/jax_uncond."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "jax_uncond")


def expected_sha256_prefix(url: str | None = None) -> str:
    """The SHA-256 prefix in the file name of `url` (default FID_WEIGHTS_URL): `name-<hex>.pth`, PyTorch hub's
    convention."""
    url = url or FID_WEIGHTS_URL
    match = re.search(r"-([a-f0-9]{8,})\.", os.path.basename(url))
    if match is None:
        raise ValueError(f"{url}: no SHA-256 prefix in the file name")
    return match.group(1)


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, destination: str) -> None:
    """Fetch `url` to `destination` (atomically: a partial file never takes its name), checking its SHA-256."""
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    partial = f"{destination}.{os.getpid()}.part"
    print(f"downloading the FID Inception weights from {url} to {destination}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as f:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                f.write(chunk)
    except (urllib.error.URLError, OSError) as e:
        if os.path.exists(partial):
            os.remove(partial)
        raise WeightsFileError(f"cannot download the FID Inception weights from {url} ({e}); download the file "
                               "yourself and pass it with --inception_weights FILE") from e
    digest, prefix = sha256_of(partial), expected_sha256_prefix(url)
    if not digest.startswith(prefix):
        os.remove(partial)
        raise WeightsFileError(f"the file downloaded from {url} has SHA-256 {digest[:16]}..., not {prefix}...: "
                               "download it again, or pass a good copy with --inception_weights FILE")
    os.replace(partial, destination)


def resolve_weights(path: str | None) -> str:
    """The weights file: `path` (--inception_weights), else the cached download (fetched once)."""
    if path is not None:
        if not os.path.isfile(path):
            raise WeightsFileError(f"--inception_weights {path}: no such file")
        return path
    cached = os.path.join(cache_dir(), os.path.basename(FID_WEIGHTS_URL))
    if not os.path.isfile(cached):
        _download(FID_WEIGHTS_URL, cached)
    return cached


@dataclasses.dataclass(frozen=True)
class InceptionWeights:
    """The Flax parameters and where they came from."""

    params: dict
    path: str
    sha256: str
    published: bool

    def note(self) -> str | None:
        """One line for the user when the scores will not be comparable with pytorch-fid's published weights."""
        if self.published:
            return None
        return (f"note: {self.path} is not pytorch-fid's published Inception file (SHA-256 {self.sha256[:8]}..., "
                f"published {expected_sha256_prefix()}...): scores compare only with scores from the same file")


def load_inception_weights(path: str | None = None) -> InceptionWeights:
    """pytorch-fid's Inception weights as Flax params: from `path` (--inception_weights) or the cached download.

    The download's checksum must match; a file given by the user may differ (a note says so).
    """
    from jax_uncond.evaluation.inception import param_shapes

    resolved = resolve_weights(path)
    digest = sha256_of(resolved)
    published = digest.startswith(expected_sha256_prefix())
    if path is None and not published:
        raise WeightsFileError(f"the cached {resolved} does not have the published SHA-256 "
                               f"({expected_sha256_prefix()}...): delete it to download it again")
    params = params_from_state_dict(read_state_dict(resolved), param_shapes(), resolved)
    return InceptionWeights(params, resolved, digest, published)
