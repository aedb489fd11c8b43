"""`cema-deploy edge run` as an operator meets it (issue 19), each with real processes on 127.0.0.1: a stop signal
writes every output, an unreadable frame is skipped and counted, the exit codes of the README's table, and output
that survives a pipe and 80 columns."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.edge_process import free_port, start_edge, wait_metric, write_frames
from tests.conftest import needs_torch

pytestmark = needs_torch


def _rows(csv: Path) -> int:
    return len(csv.read_text().splitlines()) - 1  # header


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_writes_every_output_and_exits_0(exported, tmp_path, sig) -> None:  # type: ignore[no-untyped-def]
    """Issue 19 (1): Ctrl-C or SIGTERM wrote neither --predictions nor --json nor a summary (exit 0 / 143). A paced
    folder stands in for a camera (it only ends by a signal here); without --state the queued uploads that the
    (unreachable) cloud never took are counted and said in one line."""
    out, _ = exported("bn")
    frames = write_frames(tmp_path / "frames", 200)
    port = free_port()
    args = ["--source", str(frames), "--batch", "2", "--fps", "10", "--metrics-port", str(port), "--quiet",
            "--predictions", str(tmp_path / "p.csv"), "--json", str(tmp_path / "m.json")]  # fmt: skip
    if sig == signal.SIGTERM:  # a cloud that is not there: its uploads can only be lost (no --state)
        args += ["--cloud", f"http://127.0.0.1:{free_port()}", "--token", "t", "--upload-share", "1"]
    proc = start_edge(str(out), *args)
    try:
        assert wait_metric(proc, port, "frames_total", 6), proc.stderr.read() if proc.poll() is not None else ""
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["stopped_by"] == sig.name and m["exit_code"] == 0
    assert m["frames"] == m["run"]["frames"] == _rows(tmp_path / "p.csv") >= 6
    assert m["source"]["frames"] < 200  # stopped early, and every frame served is in the outputs
    assert f"{sig.name}: stopped after {m['frames']} frames" in stderr
    assert stdout.startswith(f"this run: {m['frames']} frames")
    if sig == signal.SIGTERM:
        assert m["cloud_up"] is False and m["lost"] == m["undelivered"] > 0
        assert stderr.count(f"{m['lost']} samples were not uploaded (the cloud is unreachable): lost: no --state") == 1
        assert stderr.count("is unreachable (") == 1


def test_an_unreadable_frame_is_skipped_counted_and_said_once_per_kind(exported, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Issue 19 (2): one unreadable image aborted the edge (exit 1) and discarded what it had served."""
    out, _ = exported("bn")
    frames = write_frames(tmp_path / "frames", 20)
    good = (frames / "005.png").read_bytes()
    (frames / "005a.png").write_bytes(good[: len(good) // 2])  # a partial write of another process
    (frames / "011a.png").write_bytes(good[: len(good) // 3])  # the same kind again: counted, not said again
    (frames / "015a.png").write_text("not an image")  # another kind
    csv, js = tmp_path / "p.csv", tmp_path / "m.json"
    r = subprocess.run([sys.executable, "-m", "cema_deploy", "edge", "run", str(out), "--source", str(frames),
                        "--batch", "4", "--predictions", str(csv), "--json", str(js), "--metrics-port", "0"],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    m = json.loads(js.read_text())
    assert m["frames"] == _rows(csv) == 20 and m["frames_unreadable"] == 3
    said = [line for line in r.stderr.splitlines() if line.startswith("skipped ")]
    assert len(said) == 2 and "005a.png" in r.stderr and "015a.png" in r.stderr
    assert "unreadable frames skipped 3" in r.stdout
    # every frame unreadable: an error (exit 1), said in one message
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_text("x")
    r = subprocess.run([sys.executable, "-m", "cema_deploy", "edge", "run", str(out), "--source", str(bad)],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 1 and "None of the 1 image files under" in r.stderr and "Traceback" not in r.stderr


def test_frames_unreadable_is_a_metric() -> None:
    from cema_deploy.runtime.metrics import prometheus_text

    m = {"frames": 3, "fps": 1.0, "wall_fps": 1.0, "blobs_applied": 0, "version": 0, "frames_unreadable": 2}
    assert "cema_edge_frames_unreadable_total 2" in prometheus_text(m)


@pytest.mark.parametrize(
    "bad",
    [
        ["--upload-share", "0"],  # the parser refuses it, as its help says: (0, 1]
        ["--encoding", "gif"],
        ["--predictions", "p.txt"],
        ["MISSING"],  # a model that cannot load
    ],
)
def test_bad_arguments_and_a_model_that_cannot_load_exit_2(exported, tmp_path, bad) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    frames = write_frames(tmp_path / "frames", 2)
    model = str(tmp_path / "missing") if bad == ["MISSING"] else str(out)
    extra = [] if bad == ["MISSING"] else bad
    r = subprocess.run([sys.executable, "-m", "cema_deploy", "edge", "run", model, "--source", str(frames), *extra],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr


def test_output_survives_a_pipe_and_80_columns(exported, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Issue 19 (9): piped output broke (lines cut with an ellipsis, the summary wrapped); --json - is stdout."""
    out, _ = exported("bn")
    frames = write_frames(tmp_path / "frames", 12)
    env = {**_env(), "COLUMNS": "80"}
    r = subprocess.run([sys.executable, "-m", "cema_deploy", "edge", "run", str(out), "--source", str(frames),
                        "--batch", "4"], capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1 and r.stdout.startswith("this run: 12 frames")  # one line, not wrapped
    assert "…" not in r.stdout + r.stderr and "..." not in r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "cema_deploy", "edge", "run", str(out), "--source", str(frames),
                        "--json", "-"], capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert json.loads(r.stdout)["frames"] == 12 and "this run: 12 frames" in r.stderr
    h = subprocess.run([sys.executable, "-m", "cema_deploy", "edge", "run", "--help"], capture_output=True,
                       text=True, timeout=120, env=env)  # fmt: skip
    lines = h.stdout.splitlines()
    assert h.returncode == 0 and len(lines) < 150 and max(len(x) for x in lines) <= 80
    assert "…" not in h.stdout


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def test_an_unreachable_cloud_is_said_and_not_waited_for_when_a_spool_keeps_the_samples(exported, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Issue 19 (5): a wrong host printed nothing, stalled 30 s at exit and exited 0. Now one line says the cloud
    is unreachable, the JSON counts it, and with --state the end does not wait: the spool keeps the samples."""
    out, _ = exported("bn")
    frames = write_frames(tmp_path / "frames", 16)
    r = subprocess.run([sys.executable, "-m", "cema_deploy", "edge", "run", str(out), "--source", str(frames),
                        "--batch", "4", "--cloud", f"http://127.0.0.1:{free_port()}", "--token", "t",
                        "--upload-share", "1", "--state", str(tmp_path / "state"), "--json", "-"],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["cloud_up"] is False and m["cloud_outages"] == 1 and m["lost"] == 0 and m["undelivered"] == 16
    assert r.stderr.count("is unreachable (") == 1 and "waiting up to" not in r.stderr
    assert "16 samples were not uploaded (the cloud is unreachable): in the spool" in r.stderr
