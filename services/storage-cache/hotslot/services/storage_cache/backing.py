"""The shared backing store (the NFS mount; any POSIX directory works the same): where model files are fetched from
and written through to. Every path a request names is resolved here and refused if it leaves the root. Tests
subclass BackingStore to count reads or fail writes."""
from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

from hotslot.errors import NotFound
from hotslot.manifest import resolve_under_root, validate_relative_path


class BackingStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def resolve_dir(self, source: str, field: str) -> Path:
        """The directory `source` (relative to the root), following symlinks but never out of the root."""
        return resolve_under_root(self.root, source, field)

    def resolve_file(self, source: str, rel: str, field: str) -> Path:
        """The backing path of file `rel` of a model stored at `source`. NotFound if it is not a regular file."""
        validate_relative_path(rel, field)
        path = resolve_under_root(self.root, f"{source.rstrip('/')}/{rel}", field)
        if not path.is_file():
            raise NotFound(
                f"{source}/{rel} is missing from the backing store (or is not a regular file); the model's files "
                "changed after it was registered: restore the file or register the model again"
            )
        return path

    def open_for_read(self, path: Path) -> BinaryIO:
        """Unbuffered: callers read large chunks with readinto, and a Python-level buffer would only add a copy.
        Never mmap: a page fault on an NFS mapping stalls on the network, and a file truncated meanwhile
        raises SIGBUS instead of an error."""
        f = open(path, "rb", buffering=0)  # noqa: SIM115 - returned to the caller, who closes it
        if hasattr(os, "posix_fadvise"):
            # Larger read-ahead on the backing store; the copy reads each file once, front to back.
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return f

    def open_for_write(self, path: Path) -> BinaryIO:
        """A new file (exclusive create: two uploads never share a temp file)."""
        return open(path, "xb", buffering=0)  # noqa: SIM115 - returned to the caller, who closes it


def write_all(out: BinaryIO, data: bytes | memoryview) -> None:
    """Writes all of `data` to a raw (unbuffered) file, whose write may take less than it is given."""
    view = memoryview(data)
    while view:
        n = out.write(view)
        view = view[n:]
