"""What one deployment knows of each device that talks to it, for the operator (``cloud status``): the version it
serves, when it was last seen, its uploads, the requests refused to it, and its rollback and refusal reports.

The version a device serves is the one it last said it serves: the ``after`` of its blob polls (an edge polls for
versions newer than the one it serves) and the ``edge_version`` of its uploads, whichever came last. The book is
persisted in the deployment's ``state.json``; polls between two saves are kept in memory only (the next save
carries them). Thread-safe.

Example:
    >>> book = DeviceBook()
    >>> book.seen("cam-01", version=3, now=100.0)
    >>> book.to_json()["cam-01"]["version"], book.to_json()["cam-01"]["last_seen"]
    (3, 100.0)
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from typing import Any

#: Devices remembered per deployment, at most (the ones seen longest ago are forgotten first).
MAX_DEVICES = 100_000


@dataclass
class DeviceRecord:
    """One device as one deployment sees it."""

    version: int = -1  # the version it last said it serves (-1: not yet said)
    last_seen: float = 0.0  # Unix time of its last request to this deployment
    uploads: int = 0  # accepted uploads
    samples: int = 0  # accepted samples
    refusals: int = 0  # its requests this deployment (or the ingress, for it) refused: 401 expired, 409, 429
    rollbacks: int = 0  # rollback reports: it rolled a published version back
    blob_refusals: int = 0  # refusal reports: it refused a published blob (signature, fingerprint, values)


class DeviceBook:
    """Per-device records of one deployment (see the module docstring)."""

    def __init__(self, records: dict[str, DeviceRecord] | None = None) -> None:
        self._records: dict[str, DeviceRecord] = dict(records or {})
        self._lock = threading.Lock()

    def _get(self, device: str, now: float | None) -> DeviceRecord:
        rec = self._records.get(device)
        if rec is None:
            if len(self._records) >= MAX_DEVICES:
                oldest = min(self._records, key=lambda d: self._records[d].last_seen)
                del self._records[oldest]
            rec = self._records[device] = DeviceRecord()
        rec.last_seen = max(rec.last_seen, time.time() if now is None else now)
        return rec

    def seen(self, device: str, *, version: int | None = None, refused: bool = False, now: float | None = None) -> None:
        """``device`` made a request (saying it serves ``version``, when given); ``refused``: it was refused."""
        if not device:
            return
        with self._lock:
            rec = self._get(device, now)
            if version is not None:
                rec.version = version
            rec.refusals += int(refused)

    def uploaded(self, device: str, samples: int, *, version: int) -> None:
        if not device:
            return
        with self._lock:
            rec = self._get(device, None)
            rec.uploads += 1
            rec.samples += samples
            rec.version = version

    def reported(self, device: str, kind: str) -> None:
        """A rollback or refusal report of ``device``."""
        if not device:
            return
        with self._lock:
            rec = self._get(device, None)
            if kind == "rollback":
                rec.rollbacks += 1
            else:
                rec.blob_refusals += 1

    def to_json(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {d: dataclasses.asdict(r) for d, r in sorted(self._records.items())}

    @classmethod
    def from_json(cls, obj: Any) -> DeviceBook:
        """The book saved by :meth:`to_json` (fields it does not know are ignored; a malformed entry is dropped)."""
        names = {f.name: f.type for f in dataclasses.fields(DeviceRecord)}
        records: dict[str, DeviceRecord] = {}
        for device, entry in (obj or {}).items() if isinstance(obj, dict) else ():
            if not isinstance(entry, dict):
                continue
            rec = DeviceRecord()
            try:
                for k, v in entry.items():
                    if k in names:
                        setattr(rec, k, float(v) if names[k] == "float" else int(v))
            except (TypeError, ValueError):
                continue
            records[str(device)] = rec
        return cls(records)
