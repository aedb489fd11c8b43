"""The edge's durable upload spool: a bounded folder of pending uploads and reports, in FIFO order.

With ``edge run --state DIR`` the uplink keeps its queue here (``DIR/spool``) instead of in memory, so an outage
longer than the memory queue, or a restart, loses nothing that fits the bound. Each entry is one file named
``{seq:012d}-{idempotency key}.{samples|report}``: sample batches in the upload wire format with ``raw``
encoding (:func:`~cema_deploy.contract.samples.samples_to_bytes`; no compression on the serving thread),
reports as JSON. The key is chosen when the entry is written, so an upload retried after a restart carries the
key of its first attempt and the cloud stores it once. A file is deleted once the cloud acknowledged (or
refused) it; a restart reads the folder back in sequence order.

Durability: the uplink's spool thread writes each entry (never the serving thread: a 64-frame 224x224 batch takes
60-90 ms to write here), to a temporary name then renamed (atomic), without ``fsync`` per entry: files survive a
crash or SIGKILL of the edge process (the page cache is the kernel's), not a power cut in the last seconds, and an
entry queued in the last milliseconds before a kill may not be written yet. :meth:`Spool.sync` (called on close)
fsyncs the folder. Never imports torch.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cema_deploy.contract.samples import SampleBatch, samples_from_bytes, samples_to_bytes
from cema_deploy.exceptions import CemaError

log = logging.getLogger("cema_deploy.edge")

_NAME = re.compile(r"^(\d{12})-([0-9a-f-]{1,64})\.(samples|report)$")


@dataclass(frozen=True)
class SpoolRecord:
    """One spooled entry: its file, sequence number, key, size, and (samples) count."""

    path: Path
    seq: int
    key: str
    nbytes: int
    is_samples: bool


class Spool:
    """A folder of pending uploads (one file per entry), bounded by the caller (see :class:`Uplink`).

    Not thread-safe: the uplink calls it under its own lock.

    Example:
        >>> spool = Spool("state/spool")  # doctest: +SKIP
        >>> rec = spool.write_samples(batch, key=str(uuid.uuid4()))  # doctest: +SKIP
        >>> spool.read_samples(rec).images.shape; spool.remove(rec)  # doctest: +SKIP
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CemaError(f"Cannot create the upload spool {self.directory}: {exc}.") from exc
        self._next = 0
        #: Files that could not be read back (deleted, counted).
        self.corrupt = 0

    def load(self) -> list[SpoolRecord]:
        """The entries left by an earlier run, oldest first (stray temporary files are deleted)."""
        records: list[SpoolRecord] = []
        for p in self.directory.iterdir():
            m = _NAME.match(p.name)
            if m is None:
                if p.name.startswith(".") and p.name.endswith(".tmp"):
                    p.unlink(missing_ok=True)  # a write the crash interrupted: never renamed, never acknowledged
                continue
            records.append(SpoolRecord(p, int(m.group(1)), m.group(2), p.stat().st_size, m.group(3) == "samples"))
        records.sort(key=lambda r: r.seq)
        self._next = records[-1].seq + 1 if records else 0
        return records

    def write_samples(self, batch: SampleBatch, *, key: str) -> SpoolRecord:
        return self._write(samples_to_bytes(batch, encoding="raw"), key, "samples")

    def write_report(self, body: dict[str, Any], *, key: str) -> SpoolRecord:
        return self._write(json.dumps(body).encode(), key, "report")

    def read_samples(self, rec: SpoolRecord) -> SampleBatch | None:
        """The batch of a samples entry, or None (counted in ``corrupt``) when the file cannot be read."""
        try:
            return samples_from_bytes(rec.path.read_bytes())
        except (OSError, CemaError) as exc:
            self._corrupt(rec, exc)
            return None

    def read_report(self, rec: SpoolRecord) -> dict[str, Any] | None:
        try:
            body = json.loads(rec.path.read_bytes())
        except (OSError, ValueError) as exc:
            self._corrupt(rec, exc)
            return None
        return body if isinstance(body, dict) else None

    def remove(self, rec: SpoolRecord) -> None:
        rec.path.unlink(missing_ok=True)

    def sync(self) -> None:
        """fsync the folder (the renames of the files written so far reach the disk)."""
        try:
            fd = os.open(self.directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write(self, data: bytes, key: str, suffix: str) -> SpoolRecord:
        seq = self._next
        self._next += 1
        path = self.directory / f"{seq:012d}-{key}.{suffix}"
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise CemaError(f"Cannot write to the upload spool {self.directory}: {exc}.") from exc
        return SpoolRecord(path, seq, key, len(data), suffix == "samples")

    def _corrupt(self, rec: SpoolRecord, exc: Exception) -> None:
        self.corrupt += 1
        log.warning("spooled entry %s is unreadable and was dropped: %s", rec.path.name, exc)
        rec.path.unlink(missing_ok=True)
