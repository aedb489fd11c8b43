"""The cloud acting on one device's rollback report (issue 22): a deployment that has heard from one device only
restores that device's line on its report, once per episode (hysteresis: a second report in the episode changes
nothing); once a second device is known, the fleet's two-device rule holds again. Real HTTP on 127.0.0.1 (uvicorn in
a thread), a real ONNX Runtime edge uploading, reports posted as an edge posts them."""

from __future__ import annotations

import httpx
import pytest

from tests.cloud.conftest import images, make_deployment, serve_deployments
from tests.cloud.test_edge_cloud import _edge
from tests.conftest import needs_torch

pytestmark = [needs_torch, pytest.mark.network]


def _report(url: str, token: str, fingerprint: str, version: int) -> str:
    """POST a rollback report as the edge's client does; the cloud's answer says what it did."""
    from cema_deploy.contract import protocol
    from cema_deploy.contract.messages import EdgeReport

    body = EdgeReport(kind="rollback", version=version, reason="mutual information dropped").to_json()
    headers = {"Authorization": f"Bearer {token}", protocol.PROTOCOL_HEADER: str(protocol.PROTOCOL_VERSION)}
    r = httpx.post(protocol.reports_url(url, fingerprint), json=body, headers=headers)
    assert r.status_code == 202, r.text
    return str(r.json()["outcome"])


def _serve(rt, seed: int, batches: int) -> None:  # type: ignore[no-untyped-def]
    for i in range(batches):
        rt.process(images(8, seed=100 * seed + i))
        assert rt.sync(timeout=60)


def test_a_sole_device_report_restores_its_line_once_per_episode_and_fleets_keep_two(
    exported, teacher_ckpt, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    from cema_deploy.cloud.store.state import StateStore

    edge, _ = exported("bn")
    state = tmp_path / "s"
    dep = make_deployment(edge, teacher_ckpt, state, batch_size=8)  # rollback_devices = 2, the default
    assert dep.spec.rollback_devices == 2
    store = StateStore(state)
    cam1, cam2 = store.add_token("cam-1"), store.add_token("cam-2")
    fp = dep.manifest.fingerprint
    with serve_deployments([dep], state) as cloud:
        with _edge(edge, cloud.url, cam1, sync=True, recalibrate=False) as rt:
            _serve(rt, 1, 4)  # a calibration batch, then steps: one episode
            assert rt.version == dep.version
        floor, bad = dep.floor, dep.version
        assert bad > floor > 0
        # the only device rolled back the newest version: the cloud restores its line (before: "1 of 2 devices")
        assert _report(cloud.url, cam1, fp, bad).startswith("restoring the state of version")
        assert dep.wait_idle(60) and dep.counters["restores"] == 1 and bad in dep.bad and dep.version > bad
        # the line goes on from the restored state; a report in the same episode changes nothing (hysteresis)
        with _edge(edge, cloud.url, cam1, sync=True, recalibrate=False) as rt:
            _serve(rt, 2, 2)
        assert dep.floor == floor  # the same episode
        again = dep.version
        assert "once in this episode" in _report(cloud.url, cam1, fp, again)
        assert dep.wait_idle(60) and dep.counters["restores"] == 1 and again not in dep.bad
        assert dep.counters["report:hysteresis"] == 1
        # a second device: a fleet, where one device's report only counts and two mark a version bad
        with _edge(edge, cloud.url, cam2, sync=True, recalibrate=False) as rt:
            _serve(rt, 3, 1)
        newest = dep.version
        assert _report(cloud.url, cam1, fp, newest) == "counted: 1 of 2 devices"
        assert dep.wait_idle(60) and dep.counters["restores"] == 1
        assert _report(cloud.url, cam2, fp, newest).startswith("restoring the state of version")
        assert dep.wait_idle(60) and dep.counters["restores"] == 2 and newest in dep.bad
