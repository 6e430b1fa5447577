"""A cached file's read checksum, recorded as the storage-cache records it, and the damage a bad disk does under
it: what the verified-read tests of the reader and the preloader share."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from hotslot import checksum


def record_checksum(path: Path) -> None:
    """Records the read checksum of `path` on it (the xattr the storage-cache writes when it caches a blob); skips
    the test where xxhash is missing or the filesystem keeps no user xattrs."""
    if not checksum.available():
        pytest.skip("xxhash is not installed")
    with open(path, "rb") as f:
        value = checksum.of_file(f.fileno())
    if not checksum.record(path, value):
        pytest.skip(f"the filesystem of {path} keeps no user xattrs")


def flip_byte(path: Path, offset_from_end: int = 10) -> None:
    """Flips one byte in place, `offset_from_end` bytes before the end, keeping the recorded checksum."""
    with open(path, "r+b") as f:
        f.seek(-offset_from_end, os.SEEK_END)
        byte = f.read(1)[0]
        f.seek(-offset_from_end, os.SEEK_END)
        f.write(bytes([byte ^ 0xFF]))
