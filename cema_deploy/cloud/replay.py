"""The cloud's durable log of uploaded samples, which is also its replay buffer (Sec. 3.3: the last 10,000).

Each acknowledged upload is one ``.npy`` file named by the global index of its first sample, written atomically
and fsynced before the upload is acknowledged, so a killed process loses no acknowledged sample. Samples are
numbered in arrival order; the adaptation worker consumes them in order (its cursor lives in ``state.json``) and
replays random ones from the newest ``capacity``.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np

from cema_deploy.cloud._atomic import write_atomic


class ReplayStore:
    """Uploaded uint8 images ``[H, W, 3]``, in arrival order, durable on disk."""

    def __init__(self, directory: Path, *, capacity: int = 10_000) -> None:
        self.directory = directory
        self.capacity = capacity
        self._lock = threading.Lock()
        self._chunks: list[tuple[int, np.ndarray]] = []  # (first global index, images)
        directory.mkdir(parents=True, exist_ok=True)
        for f in sorted(directory.glob("*.npy")):
            self._chunks.append((int(f.stem), np.load(f, allow_pickle=False)))
        for tmp in directory.glob(".*.tmp"):  # a write interrupted by a crash was never acknowledged
            tmp.unlink(missing_ok=True)

    @property
    def total(self) -> int:
        """Samples ever appended (the next sample's global index)."""
        with self._lock:
            return self._total_locked()

    def _total_locked(self) -> int:
        return self._chunks[-1][0] + len(self._chunks[-1][1]) if self._chunks else 0

    def __len__(self) -> int:
        """Samples held now (the replay buffer's size)."""
        with self._lock:
            return sum(len(c) for _, c in self._chunks)

    def append(self, images: np.ndarray) -> tuple[int, int]:
        """Store ``images`` durably; returns their global index range ``[start, end)``."""
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(images, dtype=np.uint8), allow_pickle=False)
        with self._lock:
            start = self._total_locked()
            write_atomic(self.directory / f"{start:012d}.npy", buf.getvalue())
            self._chunks.append((start, images.copy()))
            return start, start + len(images)

    def read(self, start: int, end: int) -> np.ndarray:
        """Samples ``[start, end)``; they must still be held."""
        with self._lock:
            parts = [c[max(start - s, 0) : max(min(end - s, len(c)), 0)] for s, c in self._chunks
                     if s < end and s + len(c) > start]
        out = np.concatenate(parts) if parts else np.zeros((0, 0, 0, 3), np.uint8)
        if len(out) != end - start:
            raise IndexError(f"samples [{start}, {end}) are no longer held (have {len(out)})")
        return out

    def sample(self, k: int, rng: np.random.Generator, *, below: int | None = None) -> np.ndarray:
        """``k`` samples drawn without replacement from the newest ``capacity`` held below index ``below``."""
        with self._lock:
            end = self._total_locked() if below is None else below
            lo = max(end - self.capacity, self._chunks[0][0] if self._chunks else 0)
        if end - lo <= 0 or k <= 0:
            return np.zeros((0, 0, 0, 3), np.uint8)
        idx = np.sort(rng.choice(np.arange(lo, end), size=min(k, end - lo), replace=False))
        return np.stack([self.read(int(i), int(i) + 1)[0] for i in idx])

    def trim(self, keep_from: int) -> None:
        """Forget whole uploads that lie entirely before ``keep_from`` (and before the newest ``capacity``)."""
        with self._lock:
            limit = min(keep_from, self._total_locked() - self.capacity)
            while self._chunks and self._chunks[0][0] + len(self._chunks[0][1]) <= limit:
                start, _ = self._chunks.pop(0)
                (self.directory / f"{start:012d}.npy").unlink(missing_ok=True)
