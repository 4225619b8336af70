"""pytorch-fid's Inception weights read without PyTorch: both `torch.save` formats, the name/layout table,
a pickle that tries to run code, broken files, and the download (mocked: tests never touch the network)."""

import io
import os
import pickle
import urllib.error
import zipfile

import numpy as np
import pytest
import torch

from fid_parts import save_weights, weights_files
from jax_uncond.errors import UsageError
from jax_uncond.evaluation import inception_weights as iw
from jax_uncond.evaluation.inception import param_shapes


@pytest.fixture(scope="module")
def files():
    return weights_files()


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_reads_both_formats_as_torch_load(files, fmt):
    ours = iw.read_state_dict(files[fmt])
    theirs = torch.load(files[fmt], map_location="cpu", weights_only=True)
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours[key].dtype == value.numpy().dtype and np.array_equal(ours[key], value.numpy()), key


def test_views_and_strides_are_followed(tmp_path):
    """Transposed, sliced, shared-storage tensors and parameters come back as torch.load gives them."""
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {"t": base.t(), "row": base[1], "col": base[:, 2], "same": base, "half": base.half()[::2],
             "parameter": torch.nn.Parameter(base[2:])}
    for legacy in (False, True):
        path = save_weights(tmp_path / f"views_{legacy}.pth", state, legacy)
        ours = iw.read_state_dict(path)
        for key, value in state.items():
            np.testing.assert_array_equal(ours[key], value.detach().numpy(), err_msg=f"{key} legacy={legacy}")


def test_table_maps_every_tensor(files):
    """Each Flax leaf is its PyTorch tensor through the one table: conv OIHW -> HWIO, the rest as is; only the
    classifier and the batch counters are left out."""
    state_dict = iw.read_state_dict(files["zip"])
    weights = iw.load_inception_weights(files["zip"])
    from flax import traverse_util

    flat = traverse_util.flatten_dict(weights.params)
    used = set()
    for path, value in flat.items():
        key, _ = iw.torch_key(path)
        expected = state_dict[key].transpose(2, 3, 1, 0) if path[-1] == "kernel" else state_dict[key]
        np.testing.assert_array_equal(value, expected, err_msg=key)
        used.add(key)
    assert sorted(set(state_dict) - used) == sorted(k for k in state_dict if k.startswith("fc.")
                                                    or k.endswith("num_batches_tracked"))
    assert not weights.published and weights.note() and weights.sha256 == iw.sha256_of(files["zip"])


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_refuses_a_pickle_that_runs_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    zip_path = tmp_path / "evil.pth"
    with zipfile.ZipFile(zip_path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"x": _Boom()}, protocol=2))
    legacy_path = tmp_path / "evil_legacy.pth"
    with open(legacy_path, "wb") as f:
        for part in (iw.LEGACY_MAGIC, iw.LEGACY_PROTOCOL, {"little_endian": True}, {"x": _Boom()}, []):
            pickle.dump(part, f, protocol=2)
    for path in (zip_path, legacy_path):
        with pytest.raises(iw.WeightsFileError, match="refusing to load posix.system|refusing to load os.system"):
            iw.read_state_dict(path)
    assert not (tmp_path / "pwned.txt").exists()


def _truncated(files, tmp_path, fmt):
    data = open(files[fmt], "rb").read()
    path = tmp_path / f"truncated_{fmt}.pth"
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("case,message", [
    ("missing", "no such file"),
    ("truncated_zip", "not a readable PyTorch state dict"),
    ("truncated_legacy", "not a readable PyTorch state dict"),
    ("text", "not a readable PyTorch state dict"),
    ("wrong_keys", "missing (566"),
    ("wrong_shape", "wrong shape (1): Conv2d_1a_3x3.conv.weight"),
])
def test_bad_files_are_usage_errors(files, tmp_path, case, message):
    if case == "missing":
        path = tmp_path / "nothing.pth"
    elif case.startswith("truncated"):
        path = _truncated(files, tmp_path, case.split("_")[1])
    elif case == "text":
        path = tmp_path / "notes.pth"
        path.write_text("not a weights file\n")
    elif case == "wrong_keys":
        path = save_weights(tmp_path / "other.pth", {"weight": torch.zeros(3), "bias": torch.zeros(3)}, legacy=False)
    else:
        state = torch.load(files["zip"], weights_only=True)
        state["Conv2d_1a_3x3.conv.weight"] = torch.zeros(32, 3, 5, 5)
        path = save_weights(tmp_path / "misshaped.pth", state, legacy=True)
    with pytest.raises(UsageError) as error:
        iw.load_inception_weights(str(path))
    assert message.replace("(566", "(") in str(error.value) and "\n" not in str(error.value)


def test_url_is_pytorch_fids():
    from pytorch_fid.inception import FID_WEIGHTS_URL

    assert iw.FID_WEIGHTS_URL == FID_WEIGHTS_URL
    assert iw.expected_sha256_prefix() == "6726825d"


class _FakeURL:
    """`urllib.request.urlopen` serving fixed bytes, counting the calls."""

    def __init__(self, data: bytes | None):
        self.data = data
        self.calls = []

    def __call__(self, url, timeout=None):
        self.calls.append(url)
        if self.data is None:
            raise urllib.error.URLError("no network in tests")
        return io.BytesIO(self.data)


def test_download_once_into_the_cache(files, tmp_path, monkeypatch):
    data = open(files["zip"], "rb").read()
    url = f"https://example.invalid/pt_inception-2015-12-05-{iw.sha256_of(files['zip'])[:8]}.pth"
    fake = _FakeURL(data)
    monkeypatch.setenv(iw.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(iw, "FID_WEIGHTS_URL", url)
    monkeypatch.setattr(iw.urllib.request, "urlopen", fake)
    first = iw.load_inception_weights()
    second = iw.load_inception_weights()
    assert fake.calls == [url] and first.published and second.path == first.path
    assert os.listdir(tmp_path / "cache") == [os.path.basename(url)]
    from_legacy = iw.load_inception_weights(files["legacy"]).params
    np.testing.assert_array_equal(first.params["Mixed_7c"]["branch_pool"]["conv"]["kernel"],
                                  from_legacy["Mixed_7c"]["branch_pool"]["conv"]["kernel"])


@pytest.mark.parametrize("data,message", [(None, "cannot download"), (b"corrupted", "SHA-256")])
def test_failed_download_leaves_nothing(tmp_path, monkeypatch, data, message):
    monkeypatch.setenv(iw.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(iw.urllib.request, "urlopen", _FakeURL(data))
    with pytest.raises(UsageError, match=message):
        iw.load_inception_weights()
    assert not os.listdir(tmp_path / "cache")


def test_cache_dir_default(monkeypatch):
    monkeypatch.delenv(iw.CACHE_ENV, raising=False)
    assert iw.cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "jax_uncond")
    assert param_shapes()["Conv2d_1a_3x3"]["conv"]["kernel"].shape == (3, 3, 3, 32)
