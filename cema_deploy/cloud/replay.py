"""The cloud's replay buffer (Sec. 3.3: the last 10,000 uploaded samples), in memory or durable on disk.

:class:`ReplayStore` is also the service's durable log of uploads: each acknowledged upload is one ``.npy`` file
named by the global index of its first sample, written atomically and fsynced (file and folder) before the upload
is acknowledged, so a killed process loses no acknowledged sample. Samples are numbered in arrival order; the
adaptation worker consumes them in order (its cursor lives in the state directory) and replays random ones from
the newest ``capacity`` it has reached (:class:`ReplayWindow`). Uploads older than that are deleted (``trim``).
"""

from __future__ import annotations

import bisect
import io
import threading
from collections import deque
from pathlib import Path
from typing import Protocol

import numpy as np

from cema_deploy.cloud._atomic import write_atomic
from cema_deploy.exceptions import CloudError


class ReplayBuffer(Protocol):
    """What :class:`~cema_deploy.cloud.cema.Cema` needs of a replay buffer."""

    def __len__(self) -> int: ...

    def sample(self, k: int, rng: np.random.Generator) -> np.ndarray:
        """``min(k, len(self))`` uint8 ``[H, W, 3]`` samples drawn without replacement."""
        ...


class MemoryReplay:
    """The newest ``capacity`` samples in memory (the official ``history_buffer``)."""

    def __init__(self, *, capacity: int = 10_000) -> None:
        self._samples: deque[np.ndarray] = deque(maxlen=max(capacity, 0))

    def __len__(self) -> int:
        return len(self._samples)

    def add(self, images: np.ndarray) -> None:
        self._samples.extend(np.array(images, dtype=np.uint8, copy=True))

    def sample(self, k: int, rng: np.random.Generator) -> np.ndarray:
        n = len(self._samples)
        if k <= 0 or n == 0:
            return np.zeros((0, 0, 0, 3), np.uint8)
        idx = np.sort(rng.choice(n, size=min(k, n), replace=False))
        return np.stack([self._samples[int(i)] for i in idx])


class ReplayStore:
    """Uploaded uint8 images ``[H, W, 3]``, in arrival order, durable on disk. Thread-safe.

    Example:
        >>> store = ReplayStore(Path("state/replay"))  # doctest: +SKIP
        >>> store.append(images); store.read(0, len(images))  # doctest: +SKIP
    """

    def __init__(self, directory: Path, *, capacity: int = 10_000) -> None:
        self.directory = Path(directory)
        self.capacity = capacity
        self._lock = threading.Lock()
        self._starts: list[int] = []  # first global index of each upload, ascending
        self._chunks: list[np.ndarray] = []
        self.directory.mkdir(parents=True, exist_ok=True)
        for tmp in self.directory.glob(".*.tmp"):  # a write interrupted by a crash was never acknowledged
            tmp.unlink(missing_ok=True)
        for f in sorted(self.directory.glob("*.npy")):
            try:
                start, images = int(f.stem), np.load(f, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise CloudError(
                    f"Replay file {f} is unreadable ({exc}); the state directory was altered. "
                    "Remove the file (its samples are lost) or start from a new --state."
                ) from exc
            if self._starts and start != self._starts[-1] + len(self._chunks[-1]):
                raise CloudError(
                    f"Replay file {f} does not follow the previous upload; the replay folder was "
                    "altered. Restore it or start from a new --state."
                )
            self._starts.append(start)
            self._chunks.append(images)

    @property
    def total(self) -> int:
        """Samples ever appended (the next sample's global index)."""
        with self._lock:
            return self._total_locked()

    @property
    def first(self) -> int:
        """Global index of the oldest sample held."""
        with self._lock:
            return self._starts[0] if self._starts else 0

    def _total_locked(self) -> int:
        return self._starts[-1] + len(self._chunks[-1]) if self._starts else 0

    def __len__(self) -> int:
        """Samples held now (pending ones included)."""
        with self._lock:
            return self._total_locked() - (self._starts[0] if self._starts else 0)

    def append(self, images: np.ndarray) -> tuple[int, int]:
        """Store ``images`` durably (fsynced when this returns); returns their global index range ``[start, end)``."""
        images = np.array(images, dtype=np.uint8, copy=True)
        buf = io.BytesIO()
        np.save(buf, images, allow_pickle=False)
        with self._lock:
            start = self._total_locked()
            write_atomic(self.directory / f"{start:012d}.npy", buf.getvalue())
            self._starts.append(start)
            self._chunks.append(images)
            return start, start + len(images)

    def read(self, start: int, end: int) -> np.ndarray:
        """Samples ``[start, end)``; they must still be held."""
        with self._lock:
            first = self._starts[0] if self._starts else 0
            if start < first or end > self._total_locked() or start > end:
                raise IndexError(f"samples [{start}, {end}) are not held (held: [{first}, {self._total_locked()}))")
            i = max(bisect.bisect_right(self._starts, start) - 1, 0)
            parts = []
            while i < len(self._starts) and self._starts[i] < end:
                s, c = self._starts[i], self._chunks[i]
                parts.append(c[max(start - s, 0) : min(end - s, len(c))])
                i += 1
        return np.concatenate(parts) if parts else np.zeros((0, 0, 0, 3), np.uint8)

    def window(self, end: int) -> tuple[int, int]:
        """``[lo, end)``: the newest ``capacity`` samples held below ``end``."""
        with self._lock:
            first = self._starts[0] if self._starts else 0
        return max(end - self.capacity, first), end

    def sample(self, k: int, rng: np.random.Generator, *, below: int | None = None) -> np.ndarray:
        """``k`` samples drawn without replacement from the newest ``capacity`` held below index ``below``."""
        lo, end = self.window(self.total if below is None else below)
        if end - lo <= 0 or k <= 0:
            return np.zeros((0, 0, 0, 3), np.uint8)
        idx = np.sort(rng.choice(end - lo, size=min(k, end - lo), replace=False)) + lo
        with self._lock:
            out = []
            for g in idx:
                i = bisect.bisect_right(self._starts, int(g)) - 1
                out.append(self._chunks[i][int(g) - self._starts[i]])
        return np.stack(out)

    def trim(self, keep_from: int) -> None:
        """Delete whole uploads that lie entirely before ``keep_from`` and before the newest ``capacity``."""
        with self._lock:
            limit = min(keep_from, self._total_locked() - self.capacity)
            while self._starts and self._starts[0] + len(self._chunks[0]) <= limit:
                start = self._starts.pop(0)
                self._chunks.pop(0)
                (self.directory / f"{start:012d}.npy").unlink(missing_ok=True)


class ReplayWindow:
    """The replay buffer as CEMA sees it: the newest ``capacity`` samples of ``store`` below ``end`` (the end of
    the batch being adapted), so that seeded draws do not depend on how many uploads are still pending."""

    def __init__(self, store: ReplayStore, end: int = 0) -> None:
        self.store = store
        self.end = end

    def __len__(self) -> int:
        lo, end = self.store.window(self.end)
        return max(end - lo, 0)

    def sample(self, k: int, rng: np.random.Generator) -> np.ndarray:
        return self.store.sample(k, rng, below=self.end)
