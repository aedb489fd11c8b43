"""The deployment's acknowledged uploads, durable on disk, and the replay window CEMA draws from (Sec. 3.3: the
last 10,000 uploaded samples; the official ``history_buffer``).

Every acknowledged upload is one safetensors file ``uploads/<seq>.safetensors`` (its images plus metadata: kind,
generation, idempotency key, the acknowledgement sent, arrival time), written atomically and fsynced before the
upload is acknowledged, so a killed process loses no acknowledged sample and knows every key it answered.

Samples live in two numbered sequences, each in arrival order: *adapt* samples (``selected`` uploads and the
selected part of calibration batches), which the deployment adapts on in order (its ``cursor``) and then replays,
and *statistics* samples, which only move running statistics (beyond the paper). A calibration batch is held
whole until it was applied; then only its adapt samples are kept. A file is deleted as soon as nothing in it is
needed: its adapt samples left the replay window (the newest ``capacity`` consumed samples; pending samples never
push anything out of it), its statistics samples were used, its calibration applied, or it is older than the
retention. Not thread-safe: the owning deployment holds its lock around every call but :meth:`write`.
"""

from __future__ import annotations

import bisect
import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from cema_deploy._atomic import write_atomic
from cema_deploy.contract.safetensors_io import MAX_HEADER_BYTES, header_from_bytes, header_json
from cema_deploy.exceptions import CloudError, ContractError

_EMPTY = np.zeros((0, 0, 0, 3), np.uint8)


@dataclass
class Upload:
    """One acknowledged upload as indexed: its frames are its adapt samples first, then the rest (the unselected
    part of a calibration batch not yet applied, or statistics samples). The frames live in the upload's file
    (``path``), read on demand (:attr:`images`, :meth:`SampleStore.read_adapt`, ...); ``frames`` holds them in RAM
    only from :meth:`SampleStore.new_upload` until :meth:`SampleStore.write`."""

    seq: int
    kind: str
    generation: int
    count: int  # frames held (in the file, or in ``frames`` before it is written)
    n_adapt: int
    adapt_start: int
    n_stats: int
    stats_start: int
    calibration: str = ""  # "start" / "shift" while the calibration is not applied yet
    key: str = ""
    ack: str = ""  # the UploadAck sent, as JSON
    device: str = ""
    received: float = 0.0
    path: Path | None = None
    frames: np.ndarray | None = None

    @property
    def adapt_end(self) -> int:
        return self.adapt_start + self.n_adapt

    @property
    def stats_end(self) -> int:
        return self.stats_start + self.n_stats

    @property
    def images(self) -> np.ndarray:
        """All its frames ``[count, H, W, 3]`` (read from its file once written)."""
        if self.frames is not None:
            return self.frames[: self.count]
        if self.path is None:
            raise CloudError(f"Upload {self.seq} has neither frames in memory nor a file.")
        return read_frames(self.path, range(self.count))

    def metadata(self) -> dict[str, str]:
        meta = {
            k: str(getattr(self, k))
            for k in ("seq", "kind", "generation", "n_adapt", "adapt_start", "n_stats", "stats_start")
        }
        meta.update(calibration=self.calibration, key=self.key, ack=self.ack, device=self.device)
        meta["received"] = repr(float(self.received))
        return meta

    @classmethod
    def from_file(cls, path: Path) -> Upload:
        """The upload in ``path``, its header only read (the frames stay on disk)."""
        meta, (n, _h, _w) = _images_entry(path)[:2]
        return cls(
            seq=int(meta["seq"]),
            kind=meta["kind"],
            generation=int(meta["generation"]),
            count=n,
            n_adapt=int(meta["n_adapt"]),
            adapt_start=int(meta["adapt_start"]),
            n_stats=int(meta["n_stats"]),
            stats_start=int(meta["stats_start"]),
            calibration=meta.get("calibration", ""),
            key=meta.get("key", ""),
            ack=meta.get("ack", ""),
            device=meta.get("device", ""),
            received=float(meta.get("received", "0")),
            path=path,
        )


def _images_entry(path: Path, f: BinaryIO | None = None) -> tuple[dict[str, str], tuple[int, int, int], int]:
    """(metadata, (N, H, W), byte offset of the ``images`` tensor) of an upload file, from its header alone (read
    through ``f`` when given: the same file as the frames read next, even if the path was replaced since)."""
    if f is None:
        with open(path, "rb") as own:
            return _images_entry(path, own)
    f.seek(0)
    prefix = f.read(8)
    (hlen,) = struct.unpack("<Q", prefix) if len(prefix) == 8 else (-1,)
    if not 0 <= hlen <= MAX_HEADER_BYTES:
        raise ContractError(f"{path}: not an upload file (header length {hlen}).")
    head = f.read(hlen)
    size = os.fstat(f.fileno()).st_size
    header, body = header_from_bytes(prefix + head, source=str(path), error=ContractError)
    meta = header.pop("__metadata__")
    info = header.get("images")
    if not isinstance(info, dict) or info.get("dtype") != "U8" or len(info.get("shape", [])) != 4:
        raise ContractError(f"{path}: the upload holds no uint8 images [N, H, W, 3].")
    n, h, w, c = (int(x) for x in info["shape"])
    begin, end = (int(x) for x in info["data_offsets"])
    if c != 3 or end - begin != n * h * w * 3 or body + end > size:
        raise ContractError(f"{path}: images {info!r:.200} do not fit the file ({size} bytes).")
    return meta, (n, h, w), body + begin


def read_frames(path: Path, indices: Iterable[int]) -> np.ndarray:
    """Frames ``indices`` (ascending) of an upload file, read from disk into one new writable array."""
    wanted = list(indices)
    with open(path, "rb") as f:  # one open file for header and frames: an atomic rewrite never mixes the two
        _meta, (n, h, w), offset = _images_entry(path, f)
        frame = h * w * 3
        out = np.empty((len(wanted), h, w, 3), np.uint8)
        flat = out.reshape(len(wanted), frame)
        i = 0
        while i < len(wanted):  # runs of consecutive frames in one read each
            j = i + 1
            while j < len(wanted) and wanted[j] == wanted[j - 1] + 1:
                j += 1
            if not (wanted[i] >= 0 and wanted[j - 1] < n):
                raise IndexError(f"frames {wanted[i]}..{wanted[j - 1]} of {path} (holding {n})")
            f.seek(offset + wanted[i] * frame)
            if f.readinto(flat[i:j].data.cast("B")) != (j - i) * frame:
                raise CloudError(f"{path} is shorter than its header says; the state directory was altered.")
            i = j
    return out


def write_upload(path: Path, up: Upload, frames: np.ndarray) -> None:
    """Write ``frames`` as ``up``'s file (safetensors: one ``images`` tensor plus metadata), atomically and
    fsynced, without copying the frames."""
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    header = {
        "__metadata__": up.metadata(),
        "images": {"dtype": "U8", "shape": list(frames.shape), "data_offsets": [0, frames.nbytes]},
    }
    head = header_json(header)
    head += b" " * (-len(head) % 8)
    write_atomic(path, [struct.pack("<Q", len(head)) + head, frames.data.cast("B")])


class SampleStore:
    """The uploads of one deployment (see the module docstring).

    Example:
        >>> store = SampleStore(Path("state/uploads"), capacity=10_000)  # doctest: +SKIP
        >>> up = store.new_upload("selected", images, generation=1); store.write(up); store.add(up)  # doctest: +SKIP
    """

    def __init__(self, directory: Path, *, capacity: int = 10_000) -> None:
        self.directory = Path(directory)
        self.capacity = capacity
        self.directory.mkdir(parents=True, exist_ok=True)
        self.uploads: dict[int, Upload] = {}
        self._adapt: list[Upload] = []  # uploads with adapt samples, by adapt_start
        self._adapt_starts: list[int] = []
        self._stats: list[Upload] = []
        self._stats_starts: list[int] = []
        self.adapt_total = 0
        self.stats_total = 0
        self.next_seq = 1
        legacy = sorted(self.directory.parent.glob("replay/*.npy"))
        if legacy:
            raise CloudError(
                f"{self.directory.parent} holds uploads of the protocol-1 cloud ({legacy[0]}); this version keeps "
                "them as uploads/*.safetensors. Start this deployment from a new state directory."
            )
        for tmp in self.directory.glob(".*.tmp"):  # a write interrupted by a crash was never acknowledged
            tmp.unlink(missing_ok=True)
        for f in sorted(self.directory.glob("*.safetensors")):
            try:
                up = Upload.from_file(f)
            except (OSError, ContractError, KeyError, ValueError) as exc:
                raise CloudError(
                    f"Upload file {f} is unreadable ({exc}); the state directory was altered. "
                    "Remove the file (its samples are lost) or start from a new --state."
                ) from exc
            self._index(up)

    # ---- appending (the deployment holds its write lock from new_upload to add) ------------------------------
    def new_upload(
        self,
        kind: str,
        images: np.ndarray,
        *,
        generation: int,
        selected: np.ndarray | None = None,
        calibration: str = "",
        key: str = "",
        device: str = "",
        received: float = 0.0,
    ) -> Upload:
        """The next upload, numbered but not yet visible: adapt samples of ``selected`` kind are all of them, of a
        calibration batch the ``selected`` ones, of ``statistics`` none."""
        images = np.asarray(images, dtype=np.uint8)
        if kind == "statistics":
            n_adapt, n_stats = 0, len(images)
        elif kind == "calibration":
            sel = np.zeros(len(images), bool) if selected is None else np.asarray(selected, bool)
            images = np.concatenate([images[sel], images[~sel]])
            n_adapt, n_stats = int(sel.sum()), 0
        else:
            n_adapt, n_stats = len(images), 0
        return Upload(
            seq=self.next_seq,
            kind=kind,
            generation=generation,
            count=len(images),
            frames=np.ascontiguousarray(images),  # written to disk by write(), then dropped from RAM
            n_adapt=n_adapt,
            adapt_start=self.adapt_total,
            n_stats=n_stats,
            stats_start=self.stats_total,
            calibration=calibration,
            key=key,
            device=device,
            received=received,
        )

    def path(self, seq: int) -> Path:
        return self.directory / f"{seq:012d}.safetensors"

    def write(self, up: Upload) -> None:
        """Store ``up`` durably (fsynced file and folder when this returns); its frames then leave RAM. An upload
        already on disk is rewritten with its first ``count`` frames (a calibration once applied)."""
        frames = up.images
        path = self.path(up.seq)
        write_upload(path, up, frames)
        up.path, up.frames = path, None

    def add(self, up: Upload) -> None:
        """Make a written upload visible to the adaptation loop."""
        self._index(up)

    def _index(self, up: Upload) -> None:
        self.uploads[up.seq] = up
        if up.n_adapt:
            self._adapt.append(up)
            self._adapt_starts.append(up.adapt_start)
        if up.n_stats:
            self._stats.append(up)
            self._stats_starts.append(up.stats_start)
        self.adapt_total = max(self.adapt_total, up.adapt_end)
        self.stats_total = max(self.stats_total, up.stats_end)
        self.next_seq = max(self.next_seq, up.seq + 1)

    def resume(self, *, adapt_total: int, stats_total: int, next_seq: int) -> None:
        """Counters saved with the state win when larger (their uploads may all have been deleted)."""
        self.adapt_total = max(self.adapt_total, adapt_total)
        self.stats_total = max(self.stats_total, stats_total)
        self.next_seq = max(self.next_seq, next_seq)

    # ---- reading --------------------------------------------------------------------------------------------
    @property
    def first_adapt(self) -> int:
        """Adapt index of the oldest adapt sample held."""
        return self._adapt[0].adapt_start if self._adapt else self.adapt_total

    def read_adapt(self, start: int, end: int) -> np.ndarray:
        return _read(self._adapt, self._adapt_starts, start, end, lambda u: (u.adapt_start, u.n_adapt))

    def read_stats(self, start: int, end: int) -> np.ndarray:
        return _read(self._stats, self._stats_starts, start, end, lambda u: (u.stats_start, u.n_stats))

    def upload_end(self, index: int) -> int:
        """End (adapt index) of the upload holding adapt sample ``index``."""
        i = bisect.bisect_right(self._adapt_starts, index) - 1
        return self._adapt[i].adapt_end if i >= 0 else index + 1

    def window(self, end: int, start: int = 0) -> tuple[int, int]:
        """``[lo, end)``: the newest ``capacity`` adapt samples held below ``end``, none below ``start`` (an
        episode's first adapt index where replay keeps to the episode; 0: the whole window, the official)."""
        end = min(end, self.adapt_total)
        return max(end - self.capacity, self.first_adapt, 0, start), max(end, 0)

    def window_len(self, end: int, start: int = 0) -> int:
        lo, hi = self.window(end, start)
        return max(hi - lo, 0)

    def sample(self, k: int, rng: np.random.Generator, *, end: int, start: int = 0) -> np.ndarray:
        """``min(k, window)`` samples drawn without replacement from :meth:`window` ``(end, start)``."""
        return self.sample_indexed(k, rng, end=end, start=start)[1]

    def sample_indexed(
        self, k: int, rng: np.random.Generator, *, end: int, start: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`sample` with the adapt indices it read (:meth:`draw`), from one draw."""
        idx = self.draw(k, rng, end=end, start=start)
        return idx, (self.frames_at(idx) if len(idx) else _EMPTY)

    def draw(self, k: int, rng: np.random.Generator, *, end: int, start: int = 0) -> np.ndarray:
        """The adapt indices :meth:`sample` reads (ascending), drawn as it draws them."""
        lo, hi = self.window(end, start)
        if hi <= lo or k <= 0:
            return np.zeros(0, np.int64)
        return np.sort(rng.choice(hi - lo, size=min(k, hi - lo), replace=False)) + lo

    def devices_at(self, idx: Iterable[int]) -> list[str]:
        """The device that uploaded each adapt sample of ``idx`` ("" when not said)."""
        out = []
        for g in idx:
            i = bisect.bisect_right(self._adapt_starts, int(g)) - 1
            out.append(self._adapt[i].device if i >= 0 else "")
        return out

    def frames_at(self, idx: np.ndarray) -> np.ndarray:
        """The frames of adapt indices ``idx`` (ascending, held)."""
        by_upload: dict[int, list[int]] = {}
        for g in idx:  # ascending, so each upload's frames are ascending too
            i = bisect.bisect_right(self._adapt_starts, int(g)) - 1
            by_upload.setdefault(i, []).append(int(g) - self._adapt[i].adapt_start)
        return np.concatenate([_frames(self._adapt[i], local) for i, local in by_upload.items()])

    def pending_calibrations(self) -> list[Upload]:
        return [u for u in self.uploads.values() if u.calibration]

    def held(self) -> int:
        """Samples held in files (adapt, statistics and calibration samples)."""
        return sum(u.count for u in self.uploads.values())

    # ---- releasing ------------------------------------------------------------------------------------------
    def applied(self, up: Upload) -> Upload | None:
        """Mark ``up``'s calibration applied: only its adapt samples are kept. Returns the upload to rewrite (call
        :meth:`write`), or ``None`` when nothing of it is needed any more (call :meth:`release`)."""
        up.calibration = ""
        up.count = up.n_adapt  # the file keeps the others until write() rewrites it
        return up if up.n_adapt else None

    def collect(self, *, cursor: int, stats_cursor: int, expire_before: float = 0.0) -> list[Upload]:
        """Uploads nothing needs any more, removed from the index (their files are the caller's to delete). With
        ``expire_before``, uploads received earlier go too, whatever they hold (the retention)."""
        keep_from = cursor - self.capacity

        def needed(u: Upload) -> bool:
            if u.received < expire_before:
                return False
            return bool(
                u.calibration or (u.n_adapt and u.adapt_end > keep_from) or (u.n_stats and u.stats_end > stats_cursor)
            )

        done = [u for u in self.uploads.values() if not needed(u)]
        self._remove(done)
        return done

    def take_all(self) -> list[Upload]:
        """Every upload (an operator reset discards them all)."""
        done = list(self.uploads.values())
        self._remove(done)
        return done

    def _remove(self, done: list[Upload]) -> None:
        if not done:
            return
        gone = {u.seq for u in done}
        for u in done:
            del self.uploads[u.seq]
        self._adapt = [u for u in self._adapt if u.seq not in gone]
        self._adapt_starts = [u.adapt_start for u in self._adapt]
        self._stats = [u for u in self._stats if u.seq not in gone]
        self._stats_starts = [u.stats_start for u in self._stats]

    def delete_files(self, done: list[Upload]) -> None:
        for u in done:
            self.path(u.seq).unlink(missing_ok=True)


def _frames(u: Upload, local: list[int]) -> np.ndarray:
    if u.frames is not None:
        return u.frames[local]
    assert u.path is not None
    return read_frames(u.path, local)


def _read(
    chunks: list[Upload], starts: list[int], start: int, end: int, span: Callable[[Upload], tuple[int, int]]
) -> np.ndarray:
    """Samples ``[start, end)`` of one sequence; ``span(u)`` is (first index, how many) of ``u`` in it, which are
    the first frames of its file."""
    parts = []
    i = max(bisect.bisect_right(starts, start) - 1, 0)
    covered = start
    while i < len(chunks) and covered < end:
        s, n = span(chunks[i])
        lo, hi = max(start - s, 0), min(end - s, n)
        if lo < hi:
            if s + lo != covered:
                break
            parts.append(_frames(chunks[i], list(range(lo, hi))))
            covered = s + hi
        i += 1
    if covered != end or start > end:
        raise IndexError(f"samples [{start}, {end}) are not all held")
    return np.concatenate(parts) if parts else _EMPTY


def keys_journal_lines(path: Path, limit: int) -> list[tuple[str, str]]:
    """The newest ``limit`` (key, ack JSON) pairs of a ``keys.jsonl`` journal (unreadable lines skipped)."""
    if not path.exists() or limit <= 0:
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines()[-limit:]:
        try:
            item = json.loads(line)
            out.append((str(item["key"]), str(item["ack"])))
        except (ValueError, KeyError, TypeError):
            continue
    return out
