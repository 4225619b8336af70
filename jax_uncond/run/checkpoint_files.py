"""A checkpoint's file list with sizes and CRC-32s, written inside it before Orbax commits it.

Orbax notices a missing or truncated array file, but restores a file whose bytes were changed in
place (a disk or copy fault) without complaint: the weights come back wrong. So every save also
writes `jax_uncond_files.json` (relative path -> [size, crc32]) into the checkpoint's temporary folder,
after Orbax has written and merged everything and before the folder is renamed into place; a restore
first checks every listed file. Two top-level files Orbax rewrites at commit time and does not need to
restore (`_CHECKPOINT_METADATA`, `commit_success.txt`) are left out. Checkpoints without the file (saved
by older versions) are restored on Orbax's checks alone.
"""

from __future__ import annotations

import json
import os
import zlib

MANIFEST = "jax_uncond_files.json"
UNLISTED = frozenset({MANIFEST, "_CHECKPOINT_METADATA", "commit_success.txt"})
"""Top-level names not listed: this file, and what Orbax rewrites while committing the folder."""
CHUNK = 1 << 22


class ChecksumError(ValueError):
    """A checkpoint file is missing, or its size or CRC-32 differs from what was saved."""


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(folder: str) -> list[str]:
    found = []
    for root, _, names in os.walk(folder):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), folder)
            if relative not in UNLISTED:
                found.append(relative)
    return sorted(found)


def write(folder: str) -> None:
    """Lists every file of the checkpoint `folder` with its size and CRC-32 (written atomically)."""
    listing = {name: [os.path.getsize(os.path.join(folder, name)), _crc32(os.path.join(folder, name))]
               for name in _files(folder)}
    temporary = os.path.join(folder, MANIFEST + ".tmp")
    with open(temporary, "w") as f:
        json.dump({"version": 1, "files": listing}, f)
    os.replace(temporary, os.path.join(folder, MANIFEST))


def verify(folder: str) -> bool:
    """Checks the checkpoint `folder` against its list: False when it has none, raises ChecksumError
    naming the first file that is missing, has another size, or other bytes."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as f:
            listing = json.load(f)["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise ChecksumError(f"{MANIFEST} is unreadable ({type(e).__name__}: {e})") from e
    for name, (size, crc) in sorted(listing.items()):
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            raise ChecksumError(f"{name} is missing")
        actual = os.path.getsize(file)
        if actual != size:
            raise ChecksumError(f"{name} has {actual} bytes, {size} were saved (truncated or overwritten)")
        if _crc32(file) != crc:
            raise ChecksumError(f"{name} has other bytes than were saved (CRC-32 mismatch: corrupted)")
    return True
