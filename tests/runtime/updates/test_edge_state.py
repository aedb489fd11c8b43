"""Durable edge state (``--state``): a restart serves the saved blob at once, never re-applies a refused or
rolled-back version, keeps the selector's state and does not recalibrate; a SIGKILLed `cema-deploy edge run`
resumes. The same run serves Prometheus metrics over HTTP (``--metrics-port``)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cema_deploy.contract.blob import RefitBlob, blob_from_path, blob_to_bytes
from cema_deploy.contract.samples import SampleBatch
from cema_deploy.runtime.backends.registry import get_backend
from cema_deploy.runtime.edge import EdgeRuntime
from cema_deploy.runtime.selection.rules import SampleSelector, SelectionConfig
from cema_deploy.runtime.updates.rollback import RollbackConfig
from cema_deploy.runtime.updates.state import STATE_FILE, EdgeState, EdgeStateError, EdgeStateStore
from tests.conftest import needs_torch
from tests.runtime.conftest import until
from tests.runtime.test_edge import _diverse, _last_bn

pytestmark = needs_torch
ROOT = Path(__file__).resolve().parents[3]


def _gamma_blob(v0: RefitBlob, version: int, scale: float) -> bytes:
    """The last BatchNorm's gamma scaled: 30+ gives confident, spread predictions; 0 (and beta 0) a blob that
    carries no information about the input (a broken one)."""
    bn = _last_bn(v0.tensors)
    t = dict(v0.tensors)
    t[f"{bn}.weight"] = v0.tensors[f"{bn}.weight"] * scale
    if scale == 0:
        t[f"{bn}.bias"] = np.zeros_like(v0.tensors[f"{bn}.bias"])
    return blob_to_bytes(RefitBlob(tensors=t, fingerprint=v0.fingerprint, version=version))


def _rt(out, state: Path, **kw) -> EdgeRuntime:  # type: ignore[no-untyped-def]
    cfg = SelectionConfig.for_classes(10, d_margin=None, warmup=16)
    return EdgeRuntime(get_backend("ort-cpu", out), SampleSelector(cfg), state_dir=state,
                       rollback=RollbackConfig(window=32, min_samples=8), **kw)  # fmt: skip


def test_a_restart_serves_the_saved_blob_and_never_reapplies_a_refused_version(exported, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    v0 = blob_from_path(out / "params.safetensors")
    x = _diverse(32, seed=1)
    state = tmp_path / "state"
    with _rt(out, state) as rt:
        rt.process(x)
        assert rt.apply_blob_bytes(_gamma_blob(v0, 1, 30)) and rt.monitor.wait_judged(20)
        assert not rt.apply_blob_bytes(blob_to_bytes(RefitBlob(tensors=v0.tensors, fingerprint="ff" * 32, version=2)))
        assert rt.apply_blob_bytes(_gamma_blob(v0, 3, 0)) and rt.monitor.wait_judged(20)
        assert rt.version == 1 and rt.rollbacks == 1
        served = rt.process(x).logits
        saved_selector = rt.selector.state_dict()
    files = sorted(p.name for p in state.iterdir())
    assert files == [STATE_FILE, "serving-v00000001.safetensors"]
    with _rt(out, state) as rt:
        assert rt.restored_version == 1 and rt.version == 1  # at once, before any cloud answered
        assert rt.refused_upto == 3 and rt.metrics()["rolled_back"] == [3]
        assert rt.intake.refused_versions == {2: "fingerprint"}
        assert rt.selector.state_dict() == saved_selector  # warm-up mean, counters, redundancy average
        step = rt.process(x)
        assert step.version == 1 and np.array_equal(step.logits, served)
        assert not rt.apply_blob_bytes(_gamma_blob(v0, 3, 31)) and rt.refused["stale"] == 1
        assert rt.apply_blob_bytes(_gamma_blob(v0, 4, 31)) and rt.version == 4
    st = json.loads((state / STATE_FILE).read_text())
    assert st["serving_version"] == 4 and st["refused_upto"] == 3 and set(st["rolled_back"]) == {"3"}


def test_a_state_folder_of_another_model_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = EdgeStateStore(tmp_path)
    store.save(EdgeState(fingerprint="ab" * 32, serving_version=0), None)
    assert store.load("ab" * 32) is not None
    with pytest.raises(EdgeStateError, match="belongs to model fingerprint abababababab"):
        store.load("cd" * 32)
    (tmp_path / STATE_FILE).write_text("{ not json")
    with pytest.raises(EdgeStateError, match="unreadable"):
        store.load("ab" * 32)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line[:1] != "#"}


def _edge_run(out: Path, tmp: Path, srv: Any, source: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cema_deploy", "edge", "run", str(out), "--selection", "cema",
            "--source", str(tmp / source), "--cloud",
            srv.url, "--token", srv.state.token, "--batch", "8", "--sync", "--sync-timeout", "30", "--e0-ratio", "1.5",
            "--e-min-ratio", "0", "--d-margin", "off", "--warmup", "16", "--rollback-window", "32", "--state",
            str(tmp / "state"), "--quiet", "--rollback-hold", "0", *extra]  # fmt: skip


@pytest.mark.network
def test_sigkill_mid_stream_then_restart_resumes(exported, protocol_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    v0 = blob_from_path(out / "params.safetensors")
    srv = protocol_server(v0.fingerprint)

    def on_upload(batch: SampleBatch) -> int:  # one "step" per upload; v3 is broken
        with srv.state.lock:
            v = srv.state.version + 1
        srv.state.publish(v, _gamma_blob(v0, v, 0 if v == 3 else 30 + v))
        return v

    srv.state.on_upload = on_upload
    srv.state.upload_delay_s = 0.1  # keep the stream running long enough to be killed in the middle
    np.save(tmp_path / "long.npy", _diverse(8 * 40, seed=2))
    np.save(tmp_path / "short.npy", _diverse(16, seed=3))
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(_edge_run(out, tmp_path, srv, "long.npy", "--metrics-port", str(port)), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    state_file = tmp_path / "state" / STATE_FILE

    def saved() -> dict[str, Any]:
        try:
            return dict(json.loads(state_file.read_text()))
        except (OSError, ValueError):
            return {}

    try:
        assert until(lambda: saved().get("serving_version", 0) >= 5 and "3" in saved().get("rolled_back", {}), 120)
        metrics = _scrape(port)  # the same process serves Prometheus text while it runs
        assert proc.poll() is None  # still mid-stream
    finally:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert (
        metrics["cema_edge_frames_total"] >= 40 and metrics['cema_edge_rollbacks_total{reason="information_drop"}'] == 1
    )
    assert metrics["cema_edge_refits_total"] >= 4 and metrics["cema_edge_serving_version"] >= 4
    assert metrics['cema_edge_uploaded_frames_total{kind="selected"}'] >= 32
    batches = metrics["cema_edge_batch_latency_seconds_count"]  # observed when a batch's sync ended
    assert metrics["cema_edge_frames_total"] / 8 - 1 <= batches <= metrics["cema_edge_frames_total"] / 8
    assert metrics['cema_edge_batch_latency_seconds_bucket{le="+Inf"}'] == batches
    assert metrics["cema_edge_generation"] == 1
    at_kill = saved()
    serving, seen = at_kill["serving_version"], at_kill["selector"]["counters"]["seen"]
    polls_before = len(srv.state.blob_requests)
    srv.state.upload_delay_s = 0.0
    args = _edge_run(out, tmp_path, srv, "short.npy", "--predictions", str(tmp_path / "p.npz"), "--json",
                     str(tmp_path / "m.json"))  # fmt: skip
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "m.json").read_text())
    with np.load(tmp_path / "p.npz") as p:
        assert p["version"][0] == serving  # the saved blob served the first frame after the restart
    assert m["restored_version"] == serving and m["refused_upto"] >= 3 and m["rollbacks"] == 0
    assert m["selection"]["seen"] == seen + 16  # the selector went on from its saved state
    assert m["calibrations"] == {} and m["uploaded"]["calibration"] == 0  # the cloud says calibrated
    assert min(srv.state.blob_requests[polls_before:]) >= serving  # never asked for v3 (or anything older)
    assert "restored from" in r.stderr


def test_sigterm_saves_the_state_on_the_way_out(exported, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    np.save(tmp_path / "s.npy", _diverse(16, seed=4))
    # a cloud that is down and --sync: the run waits (here up to 60 s a batch) until it is told to stop
    args = [sys.executable, "-m", "cema_deploy", "edge", "run", str(out), "--selection", "cema",
            "--source", str(tmp_path / "s.npy"),
            "--batch", "8", "--cloud", f"http://127.0.0.1:{_free_port()}", "--token", "t", "--sync", "--sync-timeout",
            "60", "--state", str(tmp_path / "state"), "--state-interval", "0.2", "--quiet"]  # fmt: skip
    proc = subprocess.Popen(args, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    state_file = tmp_path / "state" / STATE_FILE
    try:
        assert until(state_file.exists, 120)  # running: the interval save happened
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-2000:]  # a requested stop (issue 19): everything written, exit 0
    st = json.loads(state_file.read_text())
    assert st["saved_at"] >= sent  # saved again while exiting
