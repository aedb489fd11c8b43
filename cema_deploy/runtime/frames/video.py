"""Frames from OpenCV: video files, cameras, RTSP/HTTP streams and GStreamer pipelines (the ``video`` extra).

OpenCV (``cv2``) is imported only when a video source is opened, through :func:`cema_deploy._lazy.lazy_import`, so
an edge install without the extra imports this module and fails with one sentence naming the extra when a video
source is asked for. A :class:`FrameReader` decodes on its own thread into a bounded buffer:

* files block when the buffer is full, so no frame is lost (a slow consumer slows the decoding down);
* live sources (camera, URL, pipeline) cannot wait: when the buffer is full the oldest frame is dropped and
  counted, so the consumer always gets the newest frames;
* an ``fps`` cap (:class:`RateCap`) paces a file's reading and, for live sources, skips (and counts) the frames
  that arrive sooner than ``1 / fps`` after the last one taken. Skipped frames are grabbed but never converted.

Frames leave the reader as uint8 RGB ``[H, W, 3]`` (OpenCV decodes to BGR; grey and BGRA frames are converted too).
All calls on a capture (grab, retrieve, release) happen on the reader thread.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from cema_deploy._lazy import lazy_import
from cema_deploy.exceptions import CemaError

__all__ = [
    "URL_SCHEMES",
    "VIDEO_SUFFIXES",
    "Capture",
    "CaptureSpec",
    "FrameReader",
    "RateCap",
    "SourceError",
    "capture_from_spec",
    "frame_count_from_spec",
    "gstreamer_available",
]

#: File suffixes read as video files (anything else that is not a folder or ``.npy`` is refused).
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".mts", ".flv", ".wmv")
#: URL schemes opened as network streams (through OpenCV's FFmpeg backend where it has one).
URL_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "tcp", "srt")
#: Seconds OpenCV may take to open a network stream, and to wait for one frame of it.
STREAM_TIMEOUT_S = 10.0

Clock = Callable[[], float]
Sleep = Callable[[float], None]


class SourceError(CemaError):
    """A source of images (or labels) that cannot be opened or read; ``runtime.sources`` re-exports it."""


class Capture(Protocol):
    """What :class:`FrameReader` needs of a ``cv2.VideoCapture``."""

    def grab(self) -> bool: ...

    def retrieve(self) -> tuple[bool, Any]: ...

    def release(self) -> None: ...


@dataclass(frozen=True, kw_only=True)
class CaptureSpec:
    """One OpenCV source: a video file path, a camera index, a stream URL or a GStreamer pipeline."""

    kind: Literal["video", "camera", "url", "pipeline"]
    target: str | int

    @property
    def live(self) -> bool:
        """Live sources cannot wait for the consumer: their reader drops the oldest frame instead."""
        return self.kind != "video"

    def describe(self) -> str:
        """The source for messages (a URL's password replaced by ``***``)."""
        if self.kind == "camera":
            return f"camera {self.target}"
        if self.kind == "url":
            return f"stream {_redacted(str(self.target))}"
        if self.kind == "pipeline":
            return f"GStreamer pipeline '{self.target}'"
        return f"video file {self.target}"


def _cv2() -> ModuleType:
    return lazy_import("cv2", extra="video", purpose="Reading video files, cameras and streams")


def gstreamer_available(cv2: ModuleType | None = None) -> bool:
    """Whether this OpenCV can run GStreamer pipelines (``videoio_registry``, else the build information)."""
    cv2 = cv2 or _cv2()
    registry = getattr(cv2, "videoio_registry", None)
    if registry is not None and hasattr(registry, "hasBackend"):
        return bool(registry.hasBackend(cv2.CAP_GSTREAMER))
    return any(
        line.split(":", 1)[0].strip() == "GStreamer" and "YES" in line
        for line in str(cv2.getBuildInformation()).splitlines()
    )


def capture_from_spec(spec: CaptureSpec, *, timeout_s: float = STREAM_TIMEOUT_S) -> Any:
    """An opened ``cv2.VideoCapture`` for ``spec``, or :class:`SourceError` saying what was tried."""
    cv2 = _cv2()
    where = f"OpenCV {cv2.__version__}"
    if spec.kind == "video":
        path = Path(str(spec.target))
        if not path.is_file():
            raise SourceError(
                f"{path} does not exist; expected a video file ({', '.join(VIDEO_SUFFIXES)}), a folder of images "
                "or a .npy file."
            )
        cap = cv2.VideoCapture(str(path), cv2.CAP_ANY)
        if not cap.isOpened():
            raise SourceError(
                f"{where} cannot open the video file {path} (stream backends: {_backends(cv2, 'getStreamBackends')}); "
                "check that it is a complete video OpenCV can decode, or convert it (e.g. to H.264 MP4 or MJPG AVI)."
            )
        return cap
    if spec.kind == "camera":
        cap = cv2.VideoCapture(int(spec.target), cv2.CAP_ANY)
        if not cap.isOpened():
            raise SourceError(
                f"{where} cannot open camera {spec.target} (camera backends: {_backends(cv2, 'getCameraBackends')}); "
                f"check that the device exists (/dev/video{spec.target} on Linux), that no other process holds it and "
                "that this user may read it."
            )
        return cap
    if spec.kind == "url":
        url = str(spec.target)
        ms = int(timeout_s * 1000)
        if _has_backend(cv2, cv2.CAP_FFMPEG):
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
            cap, tried = cv2.VideoCapture(url, cv2.CAP_FFMPEG, params), f"FFmpeg backend, {timeout_s:g} s timeout"
        else:
            cap, tried = cv2.VideoCapture(url, cv2.CAP_ANY), "no FFmpeg backend in this OpenCV; default backend"
        if not cap.isOpened():
            raise SourceError(
                f"{where} cannot open the stream {_redacted(url)} ({tried}); check that the URL, port, path and "
                "credentials are right and reachable from this device (e.g. `ffprobe URL`)."
            )
        return cap
    pipeline = str(spec.target)
    if not gstreamer_available(cv2):
        raise SourceError(
            f"{where} is built without GStreamer, so it cannot run the pipeline '{pipeline}'. The opencv-python "
            "wheels (the 'video' extra) have no GStreamer: use an OpenCV built with it in this Python environment "
            "(on Jetson, JetPack's system OpenCV; cv2.getBuildInformation() then shows 'GStreamer: YES')."
        )
    if "appsink" not in pipeline:
        raise SourceError(
            f"The GStreamer pipeline '{pipeline}' has no appsink; OpenCV reads frames from one, so end it in e.g. "
            "'! videoconvert ! video/x-raw,format=BGR ! appsink drop=true'."
        )
    cap = cv2.VideoCapture(pipeline, cv2.CAP_GSTREAMER)
    if not cap.isOpened():
        raise SourceError(
            f"GStreamer could not start the pipeline '{pipeline}'; run it with gst-launch-1.0 (appsink replaced by "
            "fakesink) to see why (a missing plugin, a wrong device or caps)."
        )
    return cap


def frame_count_from_spec(spec: CaptureSpec) -> int | None:
    """Frames in a video file as its container records them (``CAP_PROP_FRAME_COUNT``); None when unknown or live.

    Some containers only carry a duration, from which OpenCV estimates the count.
    """
    if spec.live:
        return None
    cv2 = _cv2()
    cap = capture_from_spec(spec)
    try:
        n = float(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    finally:
        cap.release()
    return int(n) if math.isfinite(n) and n > 0 else None


class RateCap:
    """At most ``fps`` frames per second: :meth:`wait` sleeps until the next frame is due (files), :meth:`admit`
    says whether a frame that has just arrived is taken (live sources). ``clock``/``sleep`` are injectable."""

    def __init__(self, fps: float, *, clock: Clock = time.monotonic, sleep: Sleep = time.sleep) -> None:
        if not (fps > 0 and math.isfinite(fps)):
            raise SourceError(f"fps must be a positive number, got {fps}.")
        self.period = 1.0 / fps
        self._clock, self._sleep = clock, sleep
        self._next: float | None = None

    def wait(self) -> None:
        """Block until the next frame is due, then count it as taken."""
        now = self._clock()
        if self._next is not None and now < self._next:
            self._sleep(self._next - now)
            now = self._clock()
        self._take(now)

    def admit(self) -> bool:
        """True (and counted as taken) when a frame arriving now is due; False when it comes too soon."""
        now = self._clock()
        if self._next is not None and now < self._next:
            return False
        self._take(now)
        return True

    def _take(self, now: float) -> None:
        # keep to the 1/fps grid while on time; restart it from now after a gap (no burst to catch up)
        self._next = now + self.period if self._next is None else max(self._next + self.period, now)


class FrameReader:
    """Decodes ``capture`` on a thread into a buffer of at most ``queue_size`` RGB frames.

    ``live=False`` (files): the reader waits while the buffer is full. ``live=True``: it drops the oldest buffered
    frame instead (counted in ``dropped``). The reader owns the capture and releases it when it stops.

    Example:
        >>> reader = FrameReader(capture_from_spec(spec), live=spec.live, queue_size=64)  # doctest: +SKIP
        >>> frames = reader.take(32)  # doctest: +SKIP
    """

    def __init__(
        self,
        capture: Capture,
        *,
        live: bool,
        queue_size: int,
        fps: float | None = None,
        name: str = "video",
        clock: Clock = time.monotonic,
        sleep: Sleep | None = None,
    ) -> None:
        if queue_size < 1:
            raise SourceError(f"queue_size must be >= 1, got {queue_size}.")
        self.live, self.queue_size, self.name = live, queue_size, name
        self._capture = capture
        self._stopped = threading.Event()
        # by default the pacing sleep ends early when the reader is closed
        self._cap = RateCap(fps, clock=clock, sleep=sleep or self._sleep_unless_closed) if fps is not None else None
        self._buf: collections.deque[np.ndarray] = collections.deque()
        self._cond = threading.Condition()
        self._stop = False
        self._done = False
        self._error: BaseException | None = None
        #: frames decoded, handed out, dropped (live, buffer full) and skipped (live, over the fps cap)
        self.decoded = self.delivered = self.dropped = self.skipped = 0
        #: the most frames the buffer ever held (never above ``queue_size``)
        self.max_depth = 0
        self._thread = threading.Thread(target=self._run, name=f"cema-reader-{name}", daemon=True)

    def start(self) -> FrameReader:
        self._thread.start()
        return self

    def _sleep_unless_closed(self, seconds: float) -> None:
        self._stopped.wait(seconds)

    @property
    def running(self) -> bool:
        """Whether the reader thread is alive (it holds the capture until it ends)."""
        return self._thread.is_alive()

    # ---- the reader thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        cv2: ModuleType | None = None
        try:
            while not self._stop:
                if self._cap is not None and not self.live:
                    self._cap.wait()
                if not self._capture.grab():
                    break  # end of the file, or the stream/camera stopped delivering
                if self._cap is not None and self.live and not self._cap.admit():
                    with self._cond:
                        self.skipped += 1
                    continue
                ok, frame = self._capture.retrieve()
                if not ok or frame is None:
                    break
                cv2 = cv2 or _cv2()
                self._put(_rgb(cv2, frame))
        except BaseException as exc:  # handed to the consumer, raised there as a SourceError
            self._error = exc
        finally:
            try:
                self._capture.release()
            finally:
                with self._cond:
                    self._done = True
                    self._cond.notify_all()

    def _put(self, frame: np.ndarray) -> None:
        with self._cond:
            if self.live:
                if len(self._buf) >= self.queue_size:
                    self._buf.popleft()
                    self.dropped += 1
            else:
                while len(self._buf) >= self.queue_size and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
            self._buf.append(frame)
            self.decoded += 1
            self.max_depth = max(self.max_depth, len(self._buf))
            self._cond.notify_all()

    # ---- the consumer ---------------------------------------------------------------------------------
    def take(self, n: int, *, fill: bool | None = None) -> list[np.ndarray]:
        """Up to ``n`` frames of one shape, in order; ``[]`` at the end of the source.

        Waits for the first frame. ``fill`` (default: not live) also waits until ``n`` frames or the end;
        otherwise only the frames already buffered join the first. A frame of another shape starts the next batch.
        """
        fill = (not self.live) if fill is None else fill
        with self._cond:
            while not self._buf and not self._done:
                self._cond.wait()
            if not self._buf:
                self._raise_if_failed()
                return []
            out = [self._buf.popleft()]
            while len(out) < n:
                if self._buf:
                    if self._buf[0].shape != out[0].shape:
                        break
                    out.append(self._buf.popleft())
                elif self._done or not fill:
                    break
                else:
                    self._cond.wait()
            self.delivered += len(out)
            self._cond.notify_all()
            return out

    def wait_done(self, timeout: float | None = None) -> bool:
        """Block until the reader has stopped (end of source, error or :meth:`close`); True when it has."""
        with self._cond:
            return self._cond.wait_for(lambda: self._done, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the reader and wait (up to ``timeout``, e.g. a stream read in progress) for it to release."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._stopped.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            exc, self._error = self._error, None
            if isinstance(exc, CemaError):
                raise exc
            raise SourceError(f"Reading the {self.name} failed after {self.decoded} frames: {exc}") from exc


def _rgb(cv2: ModuleType, frame: np.ndarray) -> np.ndarray:
    if frame.dtype != np.uint8:
        raise SourceError(f"Frames are {frame.dtype}; expected 8-bit video (uint8).")
    if frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] == 1):
        code = cv2.COLOR_GRAY2RGB
    elif frame.ndim == 3 and frame.shape[2] == 3:
        code = cv2.COLOR_BGR2RGB
    elif frame.ndim == 3 and frame.shape[2] == 4:
        code = cv2.COLOR_BGRA2RGB
    else:
        raise SourceError(f"Frames of shape {list(frame.shape)} are neither grey, BGR nor BGRA.")
    rgb: np.ndarray = cv2.cvtColor(frame, code)
    return rgb


def _has_backend(cv2: ModuleType, api: int) -> bool:
    registry = getattr(cv2, "videoio_registry", None)
    return registry is None or not hasattr(registry, "hasBackend") or bool(registry.hasBackend(api))


def _backends(cv2: ModuleType, which: str) -> str:
    registry = getattr(cv2, "videoio_registry", None)
    if registry is None or not hasattr(registry, which):
        return "unknown"
    names = [str(registry.getBackendName(b)) for b in getattr(registry, which)()]
    return ", ".join(dict.fromkeys(names)) or "none"


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.netloc.rsplit('@', 1)[-1]}"
    return urlunsplit(parts._replace(netloc=netloc))
