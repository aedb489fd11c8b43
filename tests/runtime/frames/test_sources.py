"""Sources on real files: a video the test writes with OpenCV (MJPG AVI) read back through the front door and the
reader thread; the fps cap through an injected clock; drop-oldest with a consumer that waits for the reader; the
errors of sources that cannot be opened. Nothing here waits on wall-clock time."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cema_deploy.exceptions import CemaError, MissingExtraError
from cema_deploy.runtime.frames.sources import SourceError, batches_from_source, count_images, source_kind
from cema_deploy.runtime.frames.video import CaptureSpec, FrameReader, capture_from_spec, gstreamer_available
from tests.conftest import needs_torch

N_FRAMES, H, W = 20, 48, 64
#: RGB of the colour band on top of every frame (distinct channels: a BGR/RGB swap shows)
BAND_RGB = (220, 120, 20)
BITS = 8  # the frame index, one bit per 8-pixel-wide column below the band (0 or 255: robust to JPEG)


def _frame_bgr(i: int) -> np.ndarray:
    f = np.zeros((H, W, 3), np.uint8)
    f[:16] = BAND_RGB[::-1]  # OpenCV writes BGR
    for k in range(BITS):
        if (i >> k) & 1:
            f[16:, k * 8 : (k + 1) * 8] = 255
    return f


def _index(rgb: np.ndarray) -> int:
    bits = [rgb[20:44, k * 8 + 2 : (k + 1) * 8 - 2].mean() > 128 for k in range(BITS)]
    return sum(int(b) << k for k, b in enumerate(bits))


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cv2 = pytest.importorskip("cv2", reason="needs the video extra (opencv-python-headless)")
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (W, H))
    assert writer.isOpened(), "this OpenCV cannot write MJPG AVI"
    for i in range(N_FRAMES):
        writer.write(_frame_bgr(i))
    writer.release()
    return path


class FakeClock:
    """Time that moves only when the code under test sleeps (or a capture says a frame took time)."""

    def __init__(self) -> None:
        self.t = 0.0
        self.slept = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, dt: float) -> None:
        self.t += dt
        self.slept += dt


class TimedCapture:
    """A real capture whose grabs are stamped on a FakeClock; ``frame_s`` > 0 makes it a live camera at 1/frame_s."""

    def __init__(self, cap: Any, clock: FakeClock, frame_s: float = 0.0) -> None:
        self.cap, self.clock, self.frame_s = cap, clock, frame_s
        self.grabbed_at: list[float] = []

    def grab(self) -> bool:
        self.clock.t += self.frame_s
        ok = bool(self.cap.grab())
        if ok:
            self.grabbed_at.append(self.clock.t)
        return ok

    def retrieve(self) -> tuple[bool, Any]:
        ok, frame = self.cap.retrieve()
        return bool(ok), frame

    def release(self) -> None:
        self.cap.release()


def _file_capture(video: Path) -> Any:
    return capture_from_spec(CaptureSpec(kind="video", target=str(video)))


def test_video_file_in_order_rgb_full_batches(video: Path) -> None:
    assert source_kind(video) == "video" and count_images(video) == N_FRAMES  # the AVI records its frame count
    with batches_from_source(video, 8) as frames:
        got = list(frames)
        stats = frames.stats
    assert [b.shape for b in got] == [(8, H, W, 3), (8, H, W, 3), (4, H, W, 3)]
    assert all(b.dtype == np.uint8 for b in got)
    allf = np.concatenate(got)
    assert [_index(f) for f in allf] == list(range(N_FRAMES))
    band = allf[:, 2:14, 4:-4].reshape(-1, 3).mean(axis=0)
    assert np.abs(band - BAND_RGB).max() < 12, band  # RGB, not BGR (JPEG moves values by a few levels)
    assert (stats.kind, stats.live, stats.frames, stats.dropped, stats.skipped) == ("video", False, N_FRAMES, 0, 0)


def test_file_reader_blocks_and_loses_nothing(video: Path) -> None:
    """A full buffer makes a file's reader wait: one frame at a time through a buffer of 2, nothing dropped."""
    reader = FrameReader(_file_capture(video), live=False, queue_size=2).start()
    seen = []
    while frames := reader.take(1):
        seen += [_index(f) for f in frames]
    assert seen == list(range(N_FRAMES))
    assert reader.dropped == 0 and reader.decoded == reader.delivered == N_FRAMES and reader.max_depth <= 2
    assert reader.wait_done(30)


def test_live_reader_drops_the_oldest_and_keeps_the_newest(video: Path) -> None:
    """A consumer that takes nothing until the source has ended: a live reader kept only the newest 4 frames."""
    reader = FrameReader(_file_capture(video), live=True, queue_size=4).start()
    assert reader.wait_done(30)  # the whole clip went through the reader while nobody consumed
    batch = reader.take(64)  # live: what is buffered, without waiting for 64
    assert [_index(f) for f in batch] == list(range(N_FRAMES - 4, N_FRAMES))
    assert reader.take(64) == []
    assert (reader.decoded, reader.dropped, reader.delivered, reader.max_depth) == (N_FRAMES, N_FRAMES - 4, 4, 4)


def test_fps_cap_paces_a_file(video: Path, tmp_path: Path) -> None:
    """Files are read no faster than the cap: grabs at exactly k / fps on the injected clock, every frame kept."""
    clock = FakeClock()
    cap = TimedCapture(_file_capture(video), clock)
    reader = FrameReader(cap, live=False, queue_size=64, fps=8, clock=clock, sleep=clock.sleep).start()
    seen = [_index(f) for f in reader.take(64)]
    assert seen == list(range(N_FRAMES))
    assert cap.grabbed_at == [k / 8 for k in range(N_FRAMES)]
    # the front door passes fps to the reader, and paces .npy (and folders) the same way
    clock = FakeClock()
    assert sum(len(b) for b in batches_from_source(video, 4, fps=8, clock=clock, sleep=clock.sleep)) == N_FRAMES
    assert clock.t >= (N_FRAMES - 1) / 8
    np.save(tmp_path / "s.npy", np.zeros((N_FRAMES, 4, 4, 3), np.uint8))
    clock = FakeClock()
    assert [len(b) for b in batches_from_source(tmp_path / "s.npy", 8, fps=8, clock=clock, sleep=clock.sleep)] == [
        8,
        8,
        4,
    ]
    assert clock.t == (N_FRAMES - 1) / 8


def test_fps_cap_skips_live_frames(video: Path) -> None:
    """A live camera at 32 frames/s capped at 8: every 4th frame is taken, the others skipped (and counted)."""
    clock = FakeClock()
    cam = TimedCapture(_file_capture(video), clock, frame_s=1 / 32)
    reader = FrameReader(cam, live=True, queue_size=64, fps=8, clock=clock, sleep=clock.sleep).start()
    assert reader.wait_done(30)
    assert [_index(f) for f in reader.take(64)] == [0, 4, 8, 12, 16]
    assert (reader.skipped, reader.dropped, clock.slept) == (15, 0, 0.0)  # a live source is never waited for


def test_closing_early_stops_the_reader(video: Path) -> None:
    with batches_from_source(video, 2, queue_size=2) as frames:
        first = next(frames)
        assert frames.reader is not None and frames.reader.running
    assert [_index(f) for f in first] == [0, 1]
    assert not frames.reader.running  # closed: the thread ended and released the capture


def test_kinds() -> None:
    assert source_kind("0") == source_kind("12") == "camera"
    assert source_kind(Path("0")) == "folder"  # a Path is never a camera
    assert source_kind("rtsp://cam/stream") == source_kind("https://host/live.m3u8") == "url"
    assert source_kind("v4l2src ! videoconvert ! appsink") == "pipeline"
    assert source_kind("clips/a.MP4") == "video" and source_kind("s.npy") == "npy" and source_kind("frames") == "folder"
    assert count_images("0") is None and count_images("rtsp://cam/stream") is None  # live: unknown length
    with pytest.raises(SourceError, match=r"URL scheme 'ftp'.*not supported"):
        source_kind("ftp://host/clip.mp4")


def test_sources_that_cannot_be_opened(tmp_path: Path) -> None:
    pytest.importorskip("cv2", reason="needs the video extra (opencv-python-headless)")
    with pytest.raises(SourceError, match="does not exist; expected a video file"):
        batches_from_source(tmp_path / "missing.mp4", 4)
    with pytest.raises(SourceError, match="does not exist; expected a video file"):
        count_images(tmp_path / "missing.mp4")
    (tmp_path / "junk.avi").write_bytes(b"not a video at all" * 100)
    with pytest.raises(SourceError, match="cannot open the video file"):
        batches_from_source(tmp_path / "junk.avi", 4)
    # nothing listens on port 1: refused at once, and the password stays out of the message
    with pytest.raises(SourceError, match=r"cannot open the stream rtsp://cam:\*\*\*@127\.0\.0\.1:1/live") as err:
        batches_from_source("rtsp://cam:secret@127.0.0.1:1/live", 4)
    assert "secret" not in str(err.value)
    with pytest.raises(SourceError, match=r"cannot open the stream http://127\.0\.0\.1:1/clip\.mp4"):
        batches_from_source("http://127.0.0.1:1/clip.mp4", 4)
    with pytest.raises(SourceError, match="cannot open camera 97"):
        batches_from_source("97", 4)
    pipeline = "videotestsrc num-buffers=3 ! videoconvert ! appsink"
    if not gstreamer_available():
        with pytest.raises(SourceError, match="built without GStreamer"):
            batches_from_source(pipeline, 4)
    else:
        with pytest.raises(SourceError, match="has no appsink"):
            batches_from_source("videotestsrc ! fakesink", 4)


def test_missing_video_extra_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cv2", None)  # as if opencv were not installed
    (tmp_path / "clip.mp4").write_bytes(b"")
    with pytest.raises(MissingExtraError, match=r"pip install 'cema-deploy\[video\]'"):
        batches_from_source(tmp_path / "clip.mp4", 4)
    with pytest.raises(MissingExtraError, match="'video' extra"):
        batches_from_source("0", 4)
    np.save(tmp_path / "s.npy", np.zeros((2, 4, 4, 3), np.uint8))  # the other kinds never need it
    assert count_images(tmp_path / "s.npy") == 2 and count_images("0") is None


@needs_torch
def test_edge_run_on_a_video(exported, video: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from cema_deploy.cli import app

    out, _ = exported("bn")
    args = ["edge", "run", str(out), "--batch", "8", "--quiet"]
    r = CliRunner().invoke(app, [*args, "--source", str(video), "--fps", "1000", "--json", str(tmp_path / "m.json")])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["refit_path"] == "hybrid"  # the ORT CPU backend's in-place refits passed their self-tests
    assert m["frames"] == N_FRAMES and m["source"] == {
        "kind": "video",
        "live": False,
        "frames": N_FRAMES,
        "dropped": 0,
        "skipped": 0,
        "unreadable": 0,
    }
    np.save(tmp_path / "y.npy", np.zeros(N_FRAMES, np.int64))
    r = CliRunner().invoke(app, [*args, "--source", "0", "--labels", str(tmp_path / "y.npy")])
    assert isinstance(r.exception, CemaError) and "--labels needs a source of known length" in str(r.exception)
