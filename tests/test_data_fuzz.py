"""Fuzzed image folders: every bad file is decoded or skipped and counted, decompression bombs are refused
from their headers, EXIF orientation is applied as `datasets` does (docs/data.md, "Bad input")."""

import io
import struct
import zlib

import jax
import numpy as np
import pytest
from PIL import Image, ImageFile
from PIL.WebPImagePlugin import WebPImageFile

from jax_uncond.data import transforms
from jax_uncond.data.loader import make_train_loader
from jax_uncond.training.config import parse_args
from jax_uncond.training.sharding import make_mesh

RES = 8
LIMIT = transforms.pixel_limit(RES)


def encode(image, fmt, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_header(width, height, rows=b""):
    """A PNG that declares width x height and carries only `rows` of (compressed) data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def jpeg_declaring(width, height):
    """A real JPEG whose frame header (SOF0) is patched to declare width x height."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (9, 99, 199)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def good_images(rng):
    """Files every decoder reads: the modes and formats a user's folder holds."""
    def picture(w=24, h=20):
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    rotated = picture(30, 20)
    exif = rotated.getexif()
    exif[0x0112] = 6
    files = {
        "rgb.png": encode(picture(), "PNG"), "photo.jpg": encode(picture(), "JPEG"),
        "photo.webp": encode(picture(), "WEBP"), "one_pixel.png": encode(Image.new("RGB", (1, 1), (5, 6, 7)), "PNG"),
        "cmyk.jpg": encode(picture().convert("CMYK"), "JPEG"),
        "deep16.png": encode(Image.fromarray(rng.integers(0, 65535, (20, 24)).astype(np.uint16)), "PNG"),
        "palette.png": encode(picture().convert("P"), "PNG", transparency=3),
        "gray_alpha.png": encode(picture().convert("LA"), "PNG"),
        "rgba.webp": encode(picture().convert("RGBA"), "WEBP"),
        "exif_rotated.jpg": encode(rotated, "JPEG", exif=exif),
        "strip.png": encode(Image.new("L", (1, 2000), 128), "PNG"),  # resized to 8 x 16000: fine
    }
    for i in range(30):
        files[f"plain_{i:02d}.{('png', 'jpg', 'webp')[i % 3]}"] = encode(picture(), ("PNG", "JPEG", "WEBP")[i % 3])
    return files


def bad_images(rng, good):
    """At least 300 files that are broken in the ways files break, and decompression bombs."""
    files = {}
    for i in range(70):
        files[f"random_{i:02d}.{('png', 'jpg', 'webp')[i % 3]}"] = rng.bytes(int(rng.integers(1, 3000)))
    for i in range(10):
        files[f"empty_{i}.png"] = b""
    for name, lengths in (("rgb.png", 60), ("photo.jpg", 60), ("photo.webp", 60), ("cmyk.jpg", 15),
                          ("deep16.png", 15), ("rgba.webp", 15)):
        data = good[name]
        for n in np.unique(np.linspace(0, len(data) - 1, lengths).astype(int)):
            files[f"cut_{n:05d}_{name}"] = data[:n]
    for i in range(45):
        data = bytearray(good[("rgb.png", "photo.jpg", "photo.webp")[i % 3]])
        for _ in range(8):
            data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
        files[f"flipped_{i:02d}.{('png', 'jpg', 'webp')[i % 3]}"] = bytes(data)
    return files


BOMBS = {
    "bomb_9000.png": png_header(9000, 9000, b"\x00" * (9000 * 3 + 1) * 4),  # 81 MP: under PIL's own limits
    "bomb_100k.png": png_header(100_000, 100_000),  # 10 GP: PIL's DecompressionBombError
    "bomb_60k.jpg": jpeg_declaring(60_000, 60_000),
    "bomb_strip.png": png_header(1, 10_000_000),  # resized to 8 x 80,000,000
    "bomb_wide.jpg": jpeg_declaring(65_000, 1_200),
}


def undecodable(data):
    """The oracle, with PIL alone: a bomb by construction, or a file PIL cannot open and fully load."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            image.convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError):
        return True
    return False


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("fuzz") / "images"
    good = good_images(rng)
    bad = bad_images(rng, good)
    files = {**good, **bad, **BOMBS}
    for i, (name, data) in enumerate(files.items()):  # shuffled prefixes: bad files spread among good ones
        sub = root / f"part{i % 4}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{rng.integers(10**6):06d}_{name}").write_bytes(data)
    expected_bad = sum(undecodable(d) for d in bad.values()) + len(BOMBS)
    assert len(bad) + len(BOMBS) >= 300 and expected_bad >= 250
    return root, len(files), expected_bad


def test_fuzzed_folder_trains_on_the_good_files_and_counts_every_bad_one(folder, tmp_path, monkeypatch):
    root, total, expected_bad = folder
    decoded = []
    for cls in (ImageFile.ImageFile, WebPImageFile):  # every full decode, with the size its header declares
        original = cls.load

        def load(self, original=original):
            decoded.append(self.size[0] * self.size[1])
            return original(self)

        monkeypatch.setattr(cls, "load", load)
    config = parse_args(["--train_data_dir", str(root), "--resolution", str(RES), "--cache_dir", str(tmp_path),
                         "--random_flip"])
    loader = make_train_loader(config, make_mesh(jax.devices()[:1]), batch_size=1)
    for _ in range(loader.steps_per_epoch):  # one epoch with batches of 1 visits every file the header check kept
        images = np.asarray(next(loader)["images"])
        assert images.shape == (1, 3, RES, RES) and np.all(np.abs(images) <= 1)
    loader.close()
    assert loader.skipped_files == expected_bad
    assert total - expected_bad <= loader.num_examples < total
    assert decoded and max(decoded) <= LIMIT  # no bomb reached a decoder


def test_pixel_limit_reads_the_header_only():
    assert LIMIT == 8000 * 8000 and transforms.pixel_limit(2200) == 16 * 2200 * 2200
    assert transforms.pixel_limit(10_000) == Image.MAX_IMAGE_PIXELS  # never above PIL's warning threshold
    for name, data in BOMBS.items():
        with pytest.raises(transforms.BAD_IMAGE_ERRORS):
            transforms.decode_image(data, RES)
    transforms.check_image_size(Image.new("L", (1, 2000)), RES)  # resized to 8 x 16000
    with pytest.raises(transforms.ImageTooLargeError, match="resized: 8 x 16000000"):
        transforms.check_image_size(Image.new("L", (1, 2_000_000)), RES)


def test_exif_orientation_is_applied_as_datasets_does(tmp_path):
    import datasets

    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    for orientation in (1, 3, 6, 8):
        exif = image.getexif()
        exif[0x0112] = orientation
        path = str(tmp_path / f"o{orientation}.png")
        image.save(path, exif=exif)
        theirs = datasets.Image().decode_example({"path": path, "bytes": None})
        ours = transforms.decode_image({"path": path, "bytes": None}, RES)
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs), err_msg=str(orientation))
        assert ours.size == ((30, 20) if orientation in (1, 3) else (20, 30))
