"""A deployment shared by many devices, over HTTP on 127.0.0.1 (issue 18): rollback reports are bounded (no report
older than the kept snapshots, the generation's calibration or the reporter's own serving version can wipe
adaptation), the state's epoch is minted once and carried in every signed blob, acks promise only what the worker
publishes, batch-report idempotency survives a restart, and health shows no fingerprint without a token."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

from cema_deploy.contract.protocol import IDEMPOTENCY_HEADER, PROTOCOL_HEADER, PROTOCOL_VERSION
from tests.cloud.conftest import batch, images, make_deployment, serve_deployments
from tests.conftest import needs_torch

pytestmark = [needs_torch, pytest.mark.network]


def _headers(token: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", PROTOCOL_HEADER: str(PROTOCOL_VERSION), **extra}


def _upload(http: Any, url: str, token: str, manifest: Any, n: int, seed: int, **kw: Any) -> Any:
    from cema_deploy.contract.samples import SampleBatch, samples_to_bytes

    body = samples_to_bytes(
        SampleBatch(images=images(n, seed), fingerprint=manifest.fingerprint, **{"edge_version": 0, **kw}),
        encoding="raw",
    )
    r = http.post(url, content=body, headers=_headers(token))
    assert r.status_code == 202, r.text
    return r.json()


def _rollback(http: Any, url: str, token: str, version: int) -> str:
    r = http.post(url, json={"kind": "rollback", "version": version, "reason": "entropy rose"}, headers=_headers(token))
    assert r.status_code == 202, r.text
    outcome: str = r.json().get("outcome", "")
    return outcome


def _tensors(dep: Any, version: int) -> dict[str, np.ndarray]:
    from cema_deploy.contract.blob import blob_from_path

    return dict(blob_from_path(dep.store.blob_path(version)).tensors)


def test_rollback_reports_of_four_devices_never_wipe_the_generations_adaptation(
    exported, teacher_ckpt, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    import httpx

    from cema_deploy.cloud.store.state import StateStore
    from cema_deploy.contract.protocol import reports_url, samples_url

    edge, _ = exported("bn")
    state = tmp_path / "state"
    tokens = {f"cam-{i}": StateStore(state).add_token(f"cam-{i}") for i in range(1, 5)}
    dep = make_deployment(
        edge, teacher_ckpt, state, batch_size=8, spec={"keep_blobs": 2, "rollback_devices": 2, "pending_cap": 64}
    )
    with serve_deployments([dep], state) as cloud, httpx.Client(timeout=60) as http:
        up, rep = samples_url(cloud.url, dep.fingerprint), reports_url(cloud.url, dep.fingerprint)
        m = dep.manifest
        _upload(http, up, tokens["cam-1"], m, 8, 0, kind="calibration", calibration="start")
        assert dep.wait_idle(60) and dep.version == 1 and dep.status().calibrated
        for i in range(4):  # v2..v5 from two devices; keep_blobs = 2 keeps the states of v4 and v5 only
            _upload(http, up, tokens[f"cam-{1 + i % 2}"], m, 8, 10 + i, edge_version=1 + i)
            assert dep.wait_idle(60)
        kept = sorted(p.name for p in (state / "deployments" / "test_resnet" / "snapshots").glob("*.pt"))
        assert dep.version == 5 and kept == ["v00000004.pt", "v00000005.pt"]
        calibrated, v4 = _tensors(dep, 5), _tensors(dep, 4)

        # Two lagging (or restarted) devices report v2, whose state behind it was pruned: before, the deployment
        # returned to the export itself (source statistics) and kept calibrated=True; nor may they roll back the
        # generation's calibration (v1) itself; and a device whose newest upload serves v4 cannot roll back v3.
        outcomes = [_rollback(http, rep, tokens[d], v) for d, v in [("cam-3", 2), ("cam-4", 2), ("cam-3", 1)]]
        outcomes += [_rollback(http, rep, tokens[d], v) for d, v in [("cam-4", 1), ("cam-2", 3)]]
        assert dep.wait_idle(60) and dep.counters["restores"] == 0 and dep.version == 5
        assert dep.status().calibrated and dep.bad == []
        assert all(np.array_equal(_tensors(dep, 5)[k], v) for k, v in calibrated.items())
        assert outcomes[0].startswith("ignored: no kept state") and outcomes[1].startswith("ignored: no kept state")
        assert outcomes[2].startswith("ignored: version 1 is at or before version 1") and outcomes[3].startswith("ign")
        assert "stale" in outcomes[4]

        # Within the bounds, two devices roll v5 back: the state behind it (v4, kept) is published anew.
        assert _rollback(http, rep, tokens["cam-3"], 5) == "counted: 1 of 2 devices"
        assert _rollback(http, rep, tokens["cam-4"], 5) == "restoring the state of version 4"
        assert dep.wait_idle(60) and dep.version == 6 and dep.counters["restores"] == 1 and dep.bad == [5]
        assert dep.status().calibrated and dep.floor == 1
        v6 = _tensors(dep, 6)
        assert all(np.array_equal(v6[k], v) for k, v in v4.items())
        text = httpx.get(cloud.url + "/metrics").text
        assert 'cema_edge_reports_total{deployment="test_resnet",kind="ignored"} 5' in text


def test_a_reset_is_a_floor_no_rollback_crosses(exported, teacher_ckpt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cema_deploy.contract.messages import EdgeReport

    edge, _ = exported("bn")
    dep = make_deployment(edge, teacher_ckpt, tmp_path / "s", batch_size=8, spec={"rollback_devices": 2})
    dep.start()
    try:
        for i in range(2):
            dep.upload(batch(dep.manifest, 8, seed=i))
            assert dep.wait_idle(60)
        assert dep.version == 2 and dep.floor == 0  # never calibrated: the export is the generation's start
        dep.admin("reset")
        assert dep.version == 3 and dep.floor == 3 and not dep.status().calibrated
        dep.upload(batch(dep.manifest, 8, seed=5))
        assert dep.wait_idle(60) and dep.version == 4
        for device in ("cam-a", "cam-b"):
            assert dep.edge_report(EdgeReport(kind="rollback", version=2), device=device).startswith("ignored")
            assert dep.edge_report(EdgeReport(kind="rollback", version=3), device=device).startswith("ignored")
        assert dep.edge_report(EdgeReport(kind="rollback", version=4), device="cam-a").startswith("counted")
        assert dep.edge_report(EdgeReport(kind="rollback", version=4), device="cam-b").endswith("version 3")
        assert dep.wait_idle(60) and dep.version == 5 and dep.counters["restores"] == 1
    finally:
        dep.stop()
    restarted = make_deployment(edge, teacher_ckpt, tmp_path / "s", batch_size=8)
    assert restarted.floor == 3 and restarted.bad == [4]  # the floor is part of the saved book


def test_the_epoch_is_minted_once_per_state_newer_states_have_greater_ones_and_blobs_carry_it_signed(
    exported, teacher_ckpt, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    import httpx

    from cema_deploy.cloud.deployment import Deployment
    from cema_deploy.cloud.store.state import StateStore
    from cema_deploy.contract.blob import blob_from_bytes, blob_to_bytes
    from cema_deploy.contract.protocol import model_url
    from cema_deploy.contract.signing import BlobVerifier, SignatureError, new_key_pair

    edge, _ = exported("bn")
    old = make_deployment(edge, teacher_ckpt, tmp_path / "old")
    assert old.epoch > 1_700_000_000_000  # milliseconds since the Unix epoch
    while time.time_ns() // 1_000_000 <= old.epoch:  # the next millisecond
        time.sleep(0.001)
    priv, pub = new_key_pair(tmp_path / "keys")
    state = tmp_path / "new"
    token = StateStore(state).add_token("cam-1")
    spec = dataclasses.replace(make_deployment(edge, teacher_ckpt, tmp_path / "scratch", batch_size=8).spec)
    dep = Deployment.from_spec(spec, state, signing_key=priv)
    assert dep.epoch > old.epoch and (state / "deployments" / "test_resnet" / "epoch").read_text() == str(dep.epoch)
    with serve_deployments([dep], state) as cloud:
        dep.upload(batch(dep.manifest, 8))
        assert dep.wait_idle(60) and dep.version == 1  # versions start at 1 in a new state
        status = httpx.get(model_url(cloud.url, dep.fingerprint), headers=_headers(token)).json()
        assert status["epoch"] == dep.epoch and status["version"] == 1
    data = dep.store.blob_bytes(1)
    verify = BlobVerifier.from_files([pub])
    blob = verify.blob_from_bytes(data)
    assert blob.epoch == dep.epoch and blob.stamp == (dep.epoch, 1)
    forged = blob_to_bytes(dataclasses.replace(blob_from_bytes(data), epoch=dep.epoch + 1))  # signature kept
    with pytest.raises(SignatureError, match="does not verify"):
        verify(forged)
    again = Deployment.from_spec(spec, state, signing_key=priv)  # restarted: the same epoch, versions go on
    assert again.epoch == dep.epoch and again.version == 1


def test_acks_promise_only_versions_the_worker_publishes(exported, teacher_ckpt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cema_deploy.contract.messages import BatchReport

    edge, _ = exported("bn")
    dep = make_deployment(edge, teacher_ckpt, tmp_path / "s", batch_size=8, replay_min=8)
    acks = [dep.upload(batch(dep.manifest, 8, seed=i)) for i in range(2)]  # not started: two steps planned
    reports = [dep.batch_report(BatchReport(seen=64, selected=0, uploaded=0, generation=0)) for _ in range(2)]
    assert [a.target_version for a in acks] == [1, 2] and [r.target_version for r in reports] == [2, 3]
    assert reports[1].replay_step  # no step attributed to the second report interval: a replay-only step
    resetter = threading.Thread(target=dep.admin, args=("reset",))
    resetter.start()  # the operator resets before the worker ran: the steps and the replay step never run
    while not dep._reset_waiters:
        time.sleep(0.01)
    dep.start()
    try:
        resetter.join(60)
        assert dep.wait_idle(60)
        # before: the reset published v1 and nothing more, so a --sync edge waited for v3 until its timeout
        assert dep.version >= 3 and dep.counters["steps"] == 0 and dep.generation == 2
    finally:
        dep.stop()
    restarted = make_deployment(edge, teacher_ckpt, tmp_path / "s", batch_size=8)
    assert restarted.version == dep.version


def test_batch_report_answers_survive_a_restart(exported, teacher_ckpt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import httpx

    from cema_deploy.cloud.store.state import StateStore
    from cema_deploy.contract.protocol import batches_url

    edge, _ = exported("bn")
    state = tmp_path / "state"
    token = StateStore(state).add_token("cam-1")
    report = {"seen": 64, "selected": 0, "uploaded": 0, "generation": 0}

    def post(cloud: Any, key: str) -> Any:
        url = batches_url(cloud.url, cloud.service.fingerprint)
        r = httpx.post(url, json=report, headers=_headers(token, **{IDEMPOTENCY_HEADER: key}), timeout=60)
        assert r.status_code == 202, r.text
        return r.json()

    with serve_deployments([make_deployment(edge, teacher_ckpt, state, batch_size=8)], state) as cloud:
        first = post(cloud, "report-1")
    with serve_deployments([make_deployment(edge, teacher_ckpt, state, batch_size=8)], state) as cloud:
        again = post(cloud, "report-1")
        assert again == first and cloud.service.counters["duplicate_reports"] == 1  # not counted anew


def test_health_shows_no_fingerprint_without_a_valid_token_and_a_wrong_token_is_refused(
    exported, teacher_ckpt, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    import httpx

    from cema_deploy.cloud.store.state import StateStore, _hash
    from cema_deploy.contract.protocol import HEALTH_PATH, model_url

    edge, _ = exported("bn")
    state = tmp_path / "state"
    token = StateStore(state).add_token("cam-1")
    dep = make_deployment(edge, teacher_ckpt, state)
    with serve_deployments([dep], state) as cloud:
        anonymous = httpx.get(cloud.url + HEALTH_PATH).json()
        assert anonymous["status"] == "ok" and "models" not in anonymous
        assert dep.fingerprint not in httpx.get(cloud.url + HEALTH_PATH).text
        wrong = [token[:-1] + ("A" if token[-1] != "A" else "B"), _hash(token), token + " x", "x" * 43]
        for bad in wrong:
            r = httpx.get(cloud.url + HEALTH_PATH, headers={"Authorization": f"Bearer {bad}"})
            assert "models" not in r.json()
            r = httpx.get(model_url(cloud.url, dep.fingerprint), headers=_headers(bad))
            assert r.status_code == 401
        seen = httpx.get(cloud.url + HEALTH_PATH, headers={"Authorization": f"Bearer {token}"}).json()
        assert seen["models"] == {dep.fingerprint: 0}


def test_serving_plain_http_beyond_this_machine_warns() -> None:
    from cema_deploy.cli.cloud import plain_http_warning

    for host in ("0.0.0.0", "::", "10.0.0.7", "cloud.example.org"):
        warning = plain_http_warning(host, tls=False)
        assert warning is not None and "unencrypted" in warning and "--ssl-certfile" in warning
        assert plain_http_warning(host, tls=True) is None
    assert all(
        plain_http_warning(h, tls=False) is None for h in ("127.0.0.1", "::1", "[::1]", "localhost", "127.0.0.2")
    )
