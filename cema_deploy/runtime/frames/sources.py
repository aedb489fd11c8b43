"""Where the edge's images come from: the front door over every kind of source.

========  ===================================================  ==========================================
kind      ``source``                                            read by
========  ===================================================  ==========================================
folder    a folder of image files (sorted, recursive)           PIL, converted to RGB
npy       a ``.npy`` of uint8 ``[N, H, W, 3]``                  numpy, memory-mapped (never loaded whole)
video     a video file (``.mp4``, ``.avi``, ``.mkv``, ...)      OpenCV on a reader thread, blocking
camera    a camera index: the string ``"0"``, ``"1"``, ...      OpenCV on a reader thread, drop-oldest
url       ``rtsp://``, ``http(s)://``, ``rtmp://``, ... URL     OpenCV (FFmpeg) on a reader thread, drop-oldest
pipeline  a GStreamer pipeline (``... ! appsink``)              OpenCV built with GStreamer, drop-oldest
========  ===================================================  ==========================================

A ``Path`` (any ``os.PathLike``) is always a file or folder; only a ``str`` can name a camera, URL or pipeline
(so a folder named ``0`` is ``Path("0")`` or ``./0``). The OpenCV kinds need the ``video`` extra
(:mod:`cema_deploy.runtime.frames.video`). Labels, when given, are a ``.npy`` of N integer class indices in the same
order; they need a source of known length.

Example:
    >>> for images in batches_from_source("stream.npy", 64):  # doctest: +SKIP
    ...     step = runtime.process(images)
    >>> with batches_from_source("rtsp://cam-01/stream", 8, fps=5) as frames:  # doctest: +SKIP
    ...     for images in frames:
    ...         step = runtime.process(images)
    ...     print(frames.stats.dropped)
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cema_deploy._lazy import lazy_import
from cema_deploy.runtime.frames.video import (
    URL_SCHEMES,
    VIDEO_SUFFIXES,
    CaptureSpec,
    FrameReader,
    RateCap,
    SourceError,
    capture_from_spec,
    frame_count_from_spec,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "SourceBatches",
    "SourceError",
    "SourceKind",
    "SourceStats",
    "batches_from_source",
    "count_images",
    "labels_from_path",
    "source_kind",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SourceKind = Literal["folder", "npy", "video", "camera", "url", "pipeline"]
Source = str | os.PathLike[str]

log = logging.getLogger("cema_deploy.edge")

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def source_kind(source: Source) -> SourceKind:
    """Which kind of source ``source`` names (see the module docstring); nothing is opened."""
    if isinstance(source, str):
        if source.isdigit():
            return "camera"
        if (m := _SCHEME.match(source)) is not None:
            if m.group(1).lower() not in URL_SCHEMES:
                raise SourceError(
                    f"URL scheme {m.group(1)!r} of {source!r} is not supported; use one of {', '.join(URL_SCHEMES)}."
                )
            return "url"
        if " ! " in source:  # GStreamer's link operator
            return "pipeline"
    path = Path(source)
    if path.suffix.lower() == ".npy":
        return "npy"
    if path.suffix.lower() in VIDEO_SUFFIXES:
        return "video"
    return "folder"


def count_images(source: Source) -> int | None:
    """Images in a source without decoding any: folders and ``.npy`` exactly, video files as their container
    records them (an OpenCV estimate for some formats; None when unknown), live sources None."""
    kind = source_kind(source)
    if kind == "npy":
        return int(_npy_images(Path(source)).shape[0])
    if kind == "folder":
        return len(_files(Path(source)))
    return frame_count_from_spec(_capture_spec(source, kind))


@dataclass
class SourceStats:
    """What a source has delivered so far; ``dropped``/``skipped`` only grow for live sources."""

    kind: str
    live: bool
    frames: int = 0
    #: live frames dropped because the consumer fell behind (the buffer kept the newest ones)
    dropped: int = 0
    #: live frames skipped by the ``fps`` cap
    skipped: int = 0
    #: image files that could not be read (skipped; a folder source only)
    unreadable: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class SourceBatches(Iterator[np.ndarray]):
    """The batches of one open source (an iterator); close it, or use it as a context manager, to stop early."""

    def __init__(
        self,
        kind: SourceKind,
        batches: Iterator[np.ndarray],
        reader: FrameReader | None = None,
        stats: SourceStats | None = None,
    ) -> None:
        self.kind, self._batches = kind, batches
        #: the OpenCV reader of a video/camera/url/pipeline source (None for folders and .npy)
        self.reader = reader
        self._stats = stats or SourceStats(kind=kind, live=reader.live if reader is not None else False)

    def __next__(self) -> np.ndarray:
        try:
            images = next(self._batches)
        except BaseException:
            self.close()
            raise
        self._stats.frames += len(images)
        return images

    @property
    def stats(self) -> SourceStats:
        """Frames delivered, and for OpenCV sources the frames dropped and skipped by the reader."""
        if self.reader is not None:
            self._stats.dropped, self._stats.skipped = self.reader.dropped, self.reader.skipped
        return self._stats

    def close(self) -> None:
        """Stop reading: the reader thread ends and releases the capture."""
        if self.reader is not None:
            self.reader.close()
        close = getattr(self._batches, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> SourceBatches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def batches_from_source(
    source: Source,
    batch: int,
    *,
    fps: float | None = None,
    queue_size: int | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] | None = None,
) -> SourceBatches:
    """uint8 RGB batches ``[<=batch, H, W, 3]`` in order, from any kind of source (opened now).

    Folders, ``.npy`` and video files give full batches (the last may be shorter) and lose no frame. A live
    source gives, after its first frame, the frames already buffered (1 to ``batch``), so a batch never waits for
    the camera; its reader keeps the newest ``queue_size`` frames (default ``batch``: a file's reader decodes the
    next batch while this one runs; mind the memory of large frames, 64 at 1080p are 400 MB).
    ``fps`` caps the frames taken per second: files and folders are read no faster, live frames that come
    sooner are skipped. A folder's images may differ in size: within one batch they are resized to the first
    one's size (the runtime then preprocesses each batch to the model's input); a video batch ends where the
    frame size changes. ``clock`` and ``sleep`` drive the fps cap (injectable: tests run it on a fake clock).
    """
    if batch < 1:
        raise SourceError(f"batch must be >= 1, got {batch}.")
    if queue_size is not None and queue_size < 1:
        raise SourceError(f"queue_size must be >= 1, got {queue_size}.")
    rate = RateCap(fps, clock=clock, sleep=sleep or time.sleep) if fps is not None else None
    kind = source_kind(source)
    if kind == "npy":
        return SourceBatches(kind, _npy_batches(_npy_images(Path(source)), batch, rate))
    if kind == "folder":
        stats = SourceStats(kind=kind, live=False)
        return SourceBatches(kind, _folder_batches(_files(Path(source)), batch, rate, stats), stats=stats)
    spec = _capture_spec(source, kind)
    reader = FrameReader(
        capture_from_spec(spec),
        live=spec.live,
        queue_size=queue_size or batch,
        fps=fps,
        name=spec.describe(),
        clock=clock,
        sleep=sleep,
    ).start()
    return SourceBatches(kind, _reader_batches(reader, batch), reader)


def labels_from_path(path: str | os.PathLike[str], count: int) -> np.ndarray:
    """Integer labels ``[count]`` from a ``.npy`` file, checked against the number of images."""
    path = Path(path)
    try:
        y = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise SourceError(f"Labels {path} are not a readable .npy array ({exc}).") from exc
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise SourceError(f"Labels {path} hold {y.dtype}{list(y.shape)}; expected a 1-D array of integer classes.")
    if y.shape[0] != count:
        raise SourceError(f"Labels {path} hold {y.shape[0]} labels but the source has {count} images; they must match.")
    labels: np.ndarray = y.astype(np.int64)
    return labels


# ---- the kinds --------------------------------------------------------------------------------------------
def _capture_spec(source: Source, kind: SourceKind) -> CaptureSpec:
    if kind == "camera":
        return CaptureSpec(kind="camera", target=int(str(source)))
    if kind == "url":
        return CaptureSpec(kind="url", target=str(source))
    if kind == "pipeline":
        return CaptureSpec(kind="pipeline", target=str(source))
    return CaptureSpec(kind="video", target=str(Path(source)))


def _reader_batches(reader: FrameReader, batch: int) -> Iterator[np.ndarray]:
    try:
        while frames := reader.take(batch):
            yield np.stack(frames)
    finally:
        reader.close()


def _npy_batches(arr: np.ndarray, batch: int, rate: RateCap | None) -> Iterator[np.ndarray]:
    for i in range(0, arr.shape[0], batch):
        images = np.ascontiguousarray(arr[i : i + batch])
        _pace(rate, len(images))
        yield images


def _folder_batches(files: list[Path], batch: int, rate: RateCap | None, stats: SourceStats) -> Iterator[np.ndarray]:
    """A file that cannot be read (truncated, not an image, gone) is skipped and counted in
    ``stats.unreadable``, logged once per kind of failure; only a folder where no file at all could be read is an
    error (a folder filled by another process routinely holds a partial write)."""
    image_mod = lazy_import("PIL.Image", extra="edge", purpose="reading image folders")
    kinds: set[str] = set()
    read = 0
    for i in range(0, len(files), batch):
        imgs = []
        for f in files[i : i + batch]:
            try:
                with image_mod.open(f) as im:
                    imgs.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
            except Exception as exc:  # PIL raises many types on bad files
                stats.unreadable += 1
                kind = _failure_kind(exc)
                if kind not in kinds:
                    kinds.add(kind)
                    log.warning("skipped %s: not a readable image (%s); further images that fail this way are "
                                "skipped and counted (frames_unreadable), not logged", f, exc)  # fmt: skip
        if not imgs:
            continue
        read += len(imgs)
        if len({im.shape for im in imgs}) > 1:
            h, w = imgs[0].shape[:2]
            imgs = [im if im.shape[:2] == (h, w) else np.asarray(image_mod.fromarray(im).resize((w, h))) for im in imgs]
        _pace(rate, len(imgs))
        yield np.stack(imgs)
    if read == 0:
        raise SourceError(
            f"None of the {len(files)} image files under {files[0].parent} could be read ({files[0]} is not a "
            "readable image, nor is any other); convert them to PNG/JPEG."
        )


def _failure_kind(exc: Exception) -> str:
    """One name per way an image file fails (the message without the file's name), for logging once per kind."""
    text = re.sub(r"\d+", "N", re.sub(r"'[^']*'|\"[^\"]*\"", "", str(exc)))
    return f"{type(exc).__name__}: {text[:80]}"


def _pace(rate: RateCap | None, frames: int) -> None:
    """A batch of ``frames`` counts as that many frames against the fps cap."""
    if rate is not None:
        for _ in range(frames):
            rate.wait()


def _npy_images(path: Path) -> np.ndarray:
    if not path.is_file():
        raise SourceError(f"{path} does not exist; expected a .npy file of uint8 [N, H, W, 3] images.")
    try:
        arr: np.ndarray = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise SourceError(f"{path} is not a readable .npy array ({exc}).") from exc
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise SourceError(
            f"{path} holds {arr.dtype}{list(arr.shape)}; expected uint8 [N, H, W, 3] RGB images "
            "(convert with np.asarray(x, np.uint8) and move channels last)."
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise SourceError(f"{path} holds no images (shape {list(arr.shape)}).")
    return arr


def _files(path: Path) -> list[Path]:
    if not path.is_dir():
        raise SourceError(
            f"{path} is neither a folder of images, a .npy file of uint8 [N, H, W, 3] images nor a video file "
            f"({', '.join(VIDEO_SUFFIXES)}); a camera is its index (0, 1, ...), a stream its URL."
        )
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SourceError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    return files
