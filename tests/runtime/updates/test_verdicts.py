"""One rollback verdict per episode (issue 22): after a rollback the edge reports once and holds the episode's line
(later blobs declined unjudged) instead of rolling back the same trajectory blob after blob; the hold ends at the
next episode or ``hold_frames`` frames later; refits are judged only on frames since the last calibration; every
verdict is recorded in ``metrics()["verdicts"]``. Real ONNX Runtime sessions; the cloud is the protocol server
(real HTTP on 127.0.0.1)."""

from __future__ import annotations

import pytest

from cema_deploy.contract.blob import blob_from_path
from cema_deploy.runtime.backends.registry import get_backend
from cema_deploy.runtime.edge import EdgeRuntime
from cema_deploy.runtime.selection.rules import SampleSelector, SelectionConfig
from cema_deploy.runtime.updates.rollback import RollbackConfig, RollbackConfigError, RollbackMonitor
from tests.conftest import needs_torch
from tests.runtime.test_edge import _blob, _client, _diverse, _sharp_and_flat, _until

pytestmark = needs_torch


def _runtime(out, hold_frames: int = RollbackConfig().hold_frames, **kw) -> EdgeRuntime:  # type: ignore[no-untyped-def]
    """An ORT edge judging refits on a ring of 32 frames (``hold_frames``: the hold after a rollback)."""
    return EdgeRuntime(get_backend("ort-cpu", out), SampleSelector(SelectionConfig.for_classes(10, d_margin=None)),
                       rollback=RollbackConfig(window=32, min_samples=8, hold_frames=hold_frames), **kw)  # fmt: skip


def _bad_trajectory(rt: EdgeRuntime, srv, v0) -> None:  # type: ignore[no-untyped-def]
    """v1 (more informative: kept), then v2, v3, v4: one trajectory of flat (broken) blobs."""
    sharp, flat = _sharp_and_flat(v0.tensors)
    rt.process(_diverse(32, seed=3))
    srv.state.publish(1, _blob(sharp, v0.fingerprint, 1))
    assert rt.wait_for_version(1, timeout=20) and rt.monitor.wait_judged(20) and rt.version == 1
    for v in (2, 3, 4):
        srv.state.publish(v, _blob(flat, v0.fingerprint, v))
        assert rt.wait_for_version(v, timeout=20) and rt.monitor.wait_judged(20)
        assert _until(lambda: rt.version == 1)  # never serves a flat blob past its judgement
    assert rt.uplink is not None and rt.uplink.flush(timeout=20)


@pytest.mark.network
def test_a_trajectory_of_bad_blobs_is_one_verdict_and_one_report(exported, protocol_server) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    v0 = blob_from_path(out / "params.safetensors")
    srv = protocol_server(v0.fingerprint)
    with _runtime(out, client=_client(out, srv), poll_wait_s=0.5) as rt:
        _bad_trajectory(rt, srv, v0)
        m = rt.metrics()
    assert m["rollbacks"] == 1 and m["rolled_back"] == [2] and m["version"] == 1
    assert m["held_blobs"] == 2 and m["holding"] == 2 and m["blobs_applied"] == 2  # v3, v4 never built
    assert [r["version"] for r in srv.state.reports] == [2]  # reported once
    verdicts = m["verdicts"]
    assert [(v["version"], v["previous_version"], v["action"]) for v in verdicts] == [
        (1, 0, "kept"),
        (2, 1, "rolled back"),
    ]
    assert verdicts[1]["frames"] == 32 and verdicts[1]["score_new"] < verdicts[1]["score_previous"]
    assert {"score_previous", "score_new", "allowed_drop", "reason", "episode"} <= set(verdicts[1])


@pytest.mark.network
def test_without_the_hold_each_blob_of_the_trajectory_is_rolled_back_and_reported(exported, protocol_server) -> None:  # type: ignore[no-untyped-def]
    """The rule before issue 22 (``hold_frames=0``), kept as a switch: the chain the hold removes."""
    out, _ = exported("bn")
    v0 = blob_from_path(out / "params.safetensors")
    srv = protocol_server(v0.fingerprint)
    with _runtime(out, hold_frames=0, client=_client(out, srv), poll_wait_s=0.5) as rt:
        _bad_trajectory(rt, srv, v0)
        m = rt.metrics()
    assert m["rollbacks"] == 3 and m["rolled_back"] == [2, 3, 4] and m["held_blobs"] == 0
    assert [r["version"] for r in srv.state.reports] == [2, 3, 4]


@pytest.mark.network
def test_the_hold_ends_after_hold_frames_and_the_next_blob_is_judged_again(exported, protocol_server) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    v0 = blob_from_path(out / "params.safetensors")
    srv = protocol_server(v0.fingerprint)
    sharp, _ = _sharp_and_flat(v0.tensors)
    with _runtime(out, hold_frames=64, client=_client(out, srv), poll_wait_s=0.5) as rt:
        _bad_trajectory(rt, srv, v0)
        assert rt.ledger.holding == 2
        rt.process(_diverse(32, seed=4))
        assert rt.ledger.holding == 2  # 32 of 64 frames
        rt.process(_diverse(32, seed=5))
        assert rt.ledger.holding is None  # released: re-based on the serving parameters
        srv.state.publish(5, _blob(sharp, v0.fingerprint, 5))
        assert rt.wait_for_version(5, timeout=20) and rt.monitor.wait_judged(20)
        m = rt.metrics()
    assert m["version"] == 5 and m["rollbacks"] == 1 and m["held_blobs"] == 2
    assert [(v["version"], v["previous_version"], v["action"]) for v in m["verdicts"]][-1] == (5, 1, "kept")


def test_a_new_episode_ends_the_hold(exported) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    v0 = blob_from_path(out / "params.safetensors")
    sharp, flat = _sharp_and_flat(v0.tensors)
    with _runtime(out) as rt:
        rt.process(_diverse(32, seed=3))
        assert rt.apply_blob_bytes(_blob(sharp, v0.fingerprint, 1)) and rt.monitor.wait_judged(20)
        assert rt.apply_blob_bytes(_blob(flat, v0.fingerprint, 2)) and rt.monitor.wait_judged(20)
        assert rt.version == 1 and rt.ledger.holding == 2
        assert not rt.apply_blob_bytes(_blob(sharp, v0.fingerprint, 3))  # held: declined, not refused
        assert sum(rt.refused.values()) == 0 and rt.metrics()["held_blobs"] == 1
        episode = rt.ledger.episode
        rt.ledger.calibration_queued()  # what a calibration batch does (a new episode)
        assert rt.ledger.episode == episode + 1 and rt.ledger.holding is None
        assert rt.apply_blob_bytes(_blob(sharp, v0.fingerprint, 4)) and rt.version == 4


def test_the_blob_answering_a_calibration_batch_is_not_held(exported) -> None:  # type: ignore[no-untyped-def]
    """A rollback after the calibration batch was queued (e.g. of a reset's blob judged against the previous
    scene's parameters) held the episode's line, and the calibration's own blob was then declined: the edge served
    the rolled-back-to parameters for ``hold_frames`` frames (a whole corruption of the frontier's reset stream).
    The blob answering the batch is the episode's new start: applied; a later blob of the line is still held."""
    out, _ = exported("bn")
    v0 = blob_from_path(out / "params.safetensors")
    sharp, flat = _sharp_and_flat(v0.tensors)
    with _runtime(out) as rt:
        rt.process(_diverse(32, seed=3))
        assert rt.apply_blob_bytes(_blob(sharp, v0.fingerprint, 1)) and rt.monitor.wait_judged(20)
        rt.ledger.calibration_queued()  # the new scene's calibration batch goes up ...
        assert rt.apply_blob_bytes(_blob(flat, v0.fingerprint, 2))  # ... an older blob lands first (exempt: any)
        rt.ledger.calibration_done(3)  # the batch's acknowledgement: its blob is v3
        rt.monitor.applied(2)  # judged as a refit (not its calibration's answer) ...
        assert rt.monitor.wait_judged(20) and _until(lambda: rt.version == 1) and rt.ledger.holding == 2
        assert rt.apply_blob_bytes(_blob(sharp, v0.fingerprint, 3)) and rt.version == 3  # the answer: applied
        rt.ledger.hold(3)
        assert not rt.apply_blob_bytes(_blob(sharp, v0.fingerprint, 4))  # the window closed: the line is held


def test_refits_are_judged_only_on_frames_since_the_ring_was_rebased(exported) -> None:  # type: ignore[no-untyped-def]
    """A calibration batch rebases the ring (``EdgeRuntime._queue_uploads``): frames of the previous domain are not
    judged. Here on the monitor itself: 32 frames, a rebase, 8 frames, a refit -> judged on the 8."""
    out, _ = exported("bn")
    v0 = blob_from_path(out / "params.safetensors")
    sharp, _ = _sharp_and_flat(v0.tensors)
    from cema_deploy.contract.blob import RefitBlob
    from cema_deploy.runtime.frames.preprocess import normalize

    judged = []
    with get_backend("ort-cpu", out) as be:
        mon = RollbackMonitor(be, RollbackConfig(window=64, min_samples=8), num_classes=10,
                              normalize=lambda im: normalize(im, be.manifest.preprocess),
                              on_judged=judged.append)  # fmt: skip
        try:
            for n, seed in ((32, 1), (8, 2)):
                if seed == 2:
                    mon.ring.rebase()
                x = _diverse(n, seed=seed)
                mon.ring.add(x, be.infer(normalize(x, be.manifest.preprocess)), be.version)
            be.refit(RefitBlob(tensors=sharp, fingerprint=v0.fingerprint, version=1))
            mon.applied(1)
            assert mon.wait_judged(20)
        finally:
            mon.close()
    assert len(judged) == 1 and (judged[0].version, judged[0].previous_version, judged[0].n) == (1, 0, 8)


def test_hold_frames_must_not_be_negative() -> None:
    with pytest.raises(RollbackConfigError, match="hold_frames"):
        RollbackConfig(hold_frames=-1)


@pytest.mark.network
def test_edge_run_json_lists_every_verdict(exported, protocol_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from typer.testing import CliRunner

    from cema_deploy.cli import app
    from tests.runtime.test_edge import _publishing_cloud

    out, srv = _publishing_cloud(exported, protocol_server, tmp_path, n=32, seed=4)
    r = CliRunner().invoke(app, [
        "edge", "run", str(out), "--selection", "cema", "--source", str(tmp_path / "s.npy"), "--cloud", srv.url,
        "--token-file", str(tmp_path / "token"), "--batch", "8", "--sync", "--encoding", "raw", "--e0-ratio", "1.5",
        "--e-min-ratio", "0", "--d-margin", "off", "--rollback-window", "8", "--rollback-hold", "512",
        "--json", str(tmp_path / "m.json"), "--quiet",
    ])  # fmt: skip
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["blobs_applied"] >= 2 and m["verdicts"], "refits after the first one with 8 frames are judged"
    judged = [v["version"] for v in m["verdicts"]]
    assert judged == sorted(set(judged)) and set(judged) <= set(range(1, m["blobs_applied"] + 1))
    for v in m["verdicts"]:
        assert v["frames"] == 8 and v["previous_version"] < v["version"]
        assert v["action"] in ("kept", "rolled back") and (v["action"] == "rolled back") == v["rollback"]
        assert {"score_previous", "score_new", "allowed_drop", "reason", "episode"} <= set(v)
    assert m["held_blobs"] == 0 and m["holding"] is None and m["rollbacks"] == sum(v["rollback"] for v in m["verdicts"])
