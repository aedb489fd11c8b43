"""Each device's latest BatchNorm statistics, as it reported them (protocol 3), per deployment, on disk.

An edge whose statistics adapter is on owns its running statistics and reports them with its batch reports
(:mod:`cema_deploy.contract.edge_statistics`); the deployment keeps the latest report of every device here, one
file per device (``edge-stats/<hash of the device>.safetensors``, float32, the device's name and local generation
in the metadata), written atomically and fsynced before the report is acknowledged, so the book survives a
restart with the rest of the deployment's state. The student step normalises each device's uploads with that
device's statistics (:mod:`cema_deploy.cloud.edge_statistics`). An operator reset keeps the book: the statistics
are the edges', not the cloud's adaptation state. A device whose batch report says it owns no statistics (its
adapter was switched off, ``stats_generation`` 0) is forgotten. Thread-safe; numpy only.

Example:
    >>> import tempfile, numpy as np
    >>> book = EdgeStatsBook(Path(tempfile.mkdtemp()))
    >>> book.put("cam-1", {"bn.running_mean": np.zeros(2, np.float32)}, local_generation=3)
    >>> EdgeStatsBook(book.directory).get("cam-1").local_generation
    3
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cema_deploy._atomic import write_atomic
from cema_deploy.contract.safetensors_io import tensors_from_bytes, tensors_to_bytes
from cema_deploy.exceptions import ContractError

log = logging.getLogger("cema_deploy.cloud")

__all__ = ["DeviceStatistics", "EdgeStatsBook"]


@dataclass(frozen=True)
class DeviceStatistics:
    """One device's latest report: running mean/var tensors by refittable name (float32)."""

    device: str
    tensors: Mapping[str, np.ndarray]
    local_generation: int
    received: float
    reports: int  # reports accepted from this device since the book was created


class EdgeStatsBook:
    """The latest statistics of every device of one deployment (see the module docstring)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._by_device: dict[str, DeviceStatistics] = {}
        self._lock = threading.Lock()
        if not self.directory.is_dir():
            return
        for tmp in self.directory.glob(".*.tmp"):  # a write interrupted by a crash was never acknowledged
            tmp.unlink(missing_ok=True)
        for f in sorted(self.directory.glob("*.safetensors")):
            try:
                tensors, meta = tensors_from_bytes(f.read_bytes(), source=str(f))
                st = DeviceStatistics(
                    device=meta["device"],
                    tensors=tensors,
                    local_generation=int(meta.get("local_generation", "0")),
                    received=float(meta.get("received", "0")),
                    reports=int(meta.get("reports", "1")),
                )
            except (OSError, ContractError, KeyError, ValueError) as exc:
                log.warning("ignoring the unreadable edge statistics %s (%s); its device's next report replaces it",
                            f, exc)  # fmt: skip
                continue
            self._by_device[st.device] = st

    def path(self, device: str) -> Path:
        return self.directory / f"{hashlib.sha256(device.encode()).hexdigest()[:32]}.safetensors"

    def put(self, device: str, tensors: Mapping[str, np.ndarray], *, local_generation: int) -> None:
        """Keep ``tensors`` (already checked against the manifest) as ``device``'s latest, durably."""
        with self._lock:
            old = self._by_device.get(device)
            st = DeviceStatistics(
                device=device,
                tensors={k: np.asarray(v, np.float32) for k, v in tensors.items()},
                local_generation=local_generation,
                received=time.time(),
                reports=(old.reports if old is not None else 0) + 1,
            )
            meta = {"device": device, "local_generation": str(local_generation), "received": repr(st.received),
                    "reports": str(st.reports)}  # fmt: skip
            write_atomic(self.path(device), tensors_to_bytes(st.tensors, meta))
            self._by_device[device] = st

    def forget(self, device: str) -> bool:
        """``device`` no longer owns its statistics (its adapter was switched off): drop its entry and file; True
        when there was one."""
        with self._lock:
            if self._by_device.pop(device, None) is None:
                return False
            self.path(device).unlink(missing_ok=True)
            return True

    def get(self, device: str) -> DeviceStatistics | None:
        with self._lock:
            return self._by_device.get(device)

    def snapshot(self) -> dict[str, DeviceStatistics]:
        """Every device's latest statistics (a copy of the index; the tensors are never modified in place)."""
        with self._lock:
            return dict(self._by_device)

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_device)
