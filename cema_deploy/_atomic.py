"""Crash-safe file writes: write to a temporary file in the same folder, fsync, rename, fsync the folder.

Standard library only: the edge runtime, the contract (signing keys) and the cloud share it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

#: The mode of files every side may read (exports, manifests, blobs): what a default umask (022) gives a new file.
PUBLIC_FILE_MODE = 0o644


def write_atomic(
    path: Path, data: bytes | Sequence[bytes | memoryview], *, mode: int | None = None, durable: bool = True
) -> None:
    """Replace ``path`` with ``data`` (bytes, or chunks written in order without joining them) so that a crash
    at any point leaves the old or the new file, never a mix.
    The file is created readable by its owner only (``mkstemp``) and gets ``mode`` before any byte is written, so
    a private key is never readable by others, not even for a moment. ``durable=False`` skips the two fsyncs: a
    reader still never sees half a file, but a crash may lose it (scratch files, such as a refit's norms file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if mode is not None:
            os.fchmod(fd, mode)  # exactly ``mode``: the umask neither clears nor sets bits here
        with os.fdopen(fd, "wb") as f:
            for chunk in [data] if isinstance(data, bytes) else data:
                f.write(chunk)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
