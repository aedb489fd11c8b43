"""The Ray engine on a real local Ray cluster (started here on 127.0.0.1, not local mode): two deployments as
named actors behind the real HTTP ingress, driven by the edge's own client; a killed actor loses no acknowledged
upload and never reuses a version; parked long polls share one subscription per deployment."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.cloud.conftest import batch, dep_dir, serve_engine
from tests.conftest import needs_torch

ray = pytest.importorskip("ray", reason="the Ray engine needs the cluster extra: pip install 'cema-deploy[cluster]'")

pytestmark = [needs_torch, pytest.mark.network, pytest.mark.ray]

B = 8


@dataclass
class Cluster:
    url: str
    state: Path
    engine: Any
    token: str
    manifests: dict[str, Any]  # deployment name -> manifest

    def client(self, name: str, **kw: Any) -> Any:
        from cema_deploy.runtime.link.client import CloudClient

        return CloudClient(self.url, self.token, self.manifests[name].fingerprint, device_id="cam-1", **kw)

    def metrics(self, name: str) -> dict[str, Any]:
        fp = self.manifests[name].fingerprint
        return next(m for m in self.engine.metrics() if m["fingerprint"] == fp)


def _on_disk(directory: Path) -> list[tuple[str, int]]:
    """(idempotency key, samples) of every acknowledged upload held in a deployment's state directory."""
    from cema_deploy.cloud.store.replay import Upload

    ups = [Upload.from_file(f) for f in sorted((directory / "uploads").glob("*.safetensors"))]
    return [(u.key, u.count) for u in ups]


def _keys_on_disk(directory: Path) -> list[str]:
    return [k for k, _ in _on_disk(directory)]


@pytest.fixture(scope="module")
def cluster(exported, teacher_ckpt, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:  # type: ignore[no-untyped-def]
    from cema_deploy.cloud.config import CemaConfig, DeploymentSpec, ServiceConfig
    from cema_deploy.cloud.engines import get_engine
    from cema_deploy.cloud.store.state import StateStore
    from cema_deploy.contract.manifest import manifest_from_dir

    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        state = tmp_path_factory.mktemp("ray") / "state"
        edges = {"cams": exported("bn")[0], "doors": exported("ln")[0]}
        specs = tuple(
            DeploymentSpec(
                name=name,
                edge=edge,
                teacher="test_resnet",
                teacher_weights=teacher_ckpt,
                method=CemaConfig.preset("cema", batch_size=B),
                cpus=1.0,
            )
            for name, edge in edges.items()
        )
        engine = get_engine("ray").from_config(ServiceConfig(deployments=specs, state=state), keep_actors=False)
        engine.start()
        token = StateStore(state).add_token("cam-1")
        manifests = {name: manifest_from_dir(edge) for name, edge in edges.items()}
        with serve_engine(engine, state) as running:
            yield Cluster(running.url, state, engine, token, manifests)
    finally:
        ray.shutdown()


def test_upload_202_adapts_publishes_and_the_long_poll_returns_it(cluster: Cluster) -> None:
    import httpx

    from cema_deploy.contract.blob import blob_from_bytes
    from cema_deploy.contract.protocol import MODELS_PATH, PROTOCOL_HEADER, PROTOCOL_VERSION

    m = cluster.manifests["cams"]
    with cluster.client("cams") as client:
        acks = [client.upload(batch(m, 4, seed=i), idempotency_key=f"first-{i}") for i in range(2)]
        assert [a.accepted for a in acks] == [4, 4] and acks[-1].target_version == 1
        found = client.fetch_blob(after=0, wait=60)
        assert found is not None and found[0] >= 1
        blob = blob_from_bytes(found[1])
        assert blob.version == found[0] and blob.fingerprint == m.fingerprint
        assert client.status().version >= 1
    headers = {"Authorization": f"Bearer {cluster.token}", PROTOCOL_HEADER: str(PROTOCOL_VERSION)}
    listed = httpx.get(cluster.url + MODELS_PATH, headers=headers, timeout=30).json()["models"]
    assert sorted(x["name"] for x in listed) == ["cams", "doors"]
    # one deployment's uploads never touch the other's state
    assert len(_keys_on_disk(dep_dir(cluster.state, "cams"))) >= 2
    assert not _keys_on_disk(dep_dir(cluster.state, "doors"))
    assert 'cema_blob_version{deployment="cams"' in httpx.get(cluster.url + "/metrics", timeout=30).text


def test_an_upload_retried_with_its_key_through_the_ingress_is_stored_once(cluster: Cluster) -> None:
    m = cluster.manifests["cams"]
    with cluster.client("cams") as client:
        first = client.upload(batch(m, 3, seed=40), idempotency_key="retried-key")
        again = client.upload(batch(m, 3, seed=40), idempotency_key="retried-key")
    assert not first.duplicate and again.duplicate and again.accepted == first.accepted
    assert _keys_on_disk(dep_dir(cluster.state, "cams")).count("retried-key") == 1


def test_parked_polls_share_one_outstanding_actor_wait(cluster: Cluster) -> None:
    m = cluster.manifests["doors"]
    fp = m.fingerprint
    before = cluster.metrics("doors")
    assert before["version"] == 0 and before["version_waiters"] == 1  # the ingress's one subscription
    n = 6
    results: list[Any] = [None] * n

    def poll(i: int) -> None:
        with cluster.client("doors") as c:
            results[i] = c.fetch_blob(after=0, wait=60)

    threads = [threading.Thread(target=poll, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while cluster.engine.parked[fp] < n:
        assert time.monotonic() < deadline, f"only {cluster.engine.parked[fp]} of {n} polls parked"
        time.sleep(0.05)
    parked = cluster.metrics("doors")
    assert parked["parked_polls"] == n
    assert parked["version_waiters"] == 1  # N parked polls, one waiting call at the actor
    with cluster.client("doors") as client:
        for i in range(2):
            client.upload(batch(m, 4, seed=50 + i), idempotency_key=f"doors-{i}")
    for t in threads:
        t.join(90)
    assert all(r is not None and r[0] >= 1 for r in results), results
    after = cluster.metrics("doors")
    # the subscription answered once per new version (and at most once per SUBSCRIBE_S): never once per poll
    assert after["version_wait_calls"] - before["version_wait_calls"] < n
    assert after["subscription_calls"] - before["subscription_calls"] < n


def test_a_killed_actor_loses_no_acknowledged_upload_and_never_reuses_a_version(cluster: Cluster) -> None:
    from cema_deploy.contract.blob import blob_from_bytes
    from cema_deploy.exceptions import UplinkError

    m = cluster.manifests["cams"]
    fp = m.fingerprint
    handle = cluster.engine.handle(fp)
    pid_before = ray.get(handle.info.remote())["pid"]
    killed_at, blobs_at_kill = 0.0, 0
    on_disk_before = _keys_on_disk(dep_dir(cluster.state, "cams"))
    acked: list[str] = []
    versions: list[tuple[float, int]] = []  # (time seen, version) of every blob the long poll got
    stop = threading.Event()

    def poller() -> None:
        with cluster.client("cams") as c:
            held = 0
            while not stop.is_set():
                with contextlib.suppress(UplinkError):
                    found = c.fetch_blob(after=held, wait=2)
                    if found is not None:
                        held = blob_from_bytes(found[1]).version
                        versions.append((time.monotonic(), held))

    watcher = threading.Thread(target=poller)
    watcher.start()
    with cluster.client("cams", timeout_s=120) as client:
        for i in range(12):
            key = f"stream-{i}"
            for _ in range(20):  # as the edge's uplink: a retryable failure is sent again with the same key
                try:
                    ack = client.upload(batch(m, 4, seed=100 + i), idempotency_key=key)
                    break
                except UplinkError as exc:
                    assert exc.retryable, exc
                    time.sleep(0.5)
            else:
                pytest.fail(f"upload {key} never acknowledged")
            acked.append(key)
            assert ack.accepted == 4
            if i == 5:  # mid-stream: Ray restarts it (the default no_restart=True would end it for good)
                ray.kill(handle, no_restart=False)
                time.sleep(0.5)  # the process is gone: no blob can be written by it any more
                killed_at, blobs_at_kill = time.time(), max(_blob_versions(cluster.state))
        final = client.fetch_blob(after=blobs_at_kill, wait=60)
    stop.set()
    watcher.join(30)
    assert ray.get(handle.info.remote())["pid"] != pid_before  # it was restarted, not spared
    held = _on_disk(dep_dir(cluster.state, "cams"))
    keys = [k for k, _ in held]
    assert set(acked) <= set(keys), sorted(set(acked) - set(keys))  # every acknowledged upload survived
    assert all(keys.count(k) == 1 for k in acked)  # and none was stored twice
    assert len(keys) == len(on_disk_before) + len(acked)
    seen = [v for _, v in versions]
    assert seen == sorted(seen) and len(set(seen)) == len(seen)  # the edge saw versions only rise
    # every blob the restarted actor wrote has a version above every blob that existed when it was killed
    after_kill = [v for v, mtime in _blob_versions(cluster.state).items() if mtime > killed_at]
    assert after_kill and min(after_kill) > blobs_at_kill
    assert final is not None and final[0] > blobs_at_kill
    # the restarted actor adapts on: the replay window holds every acknowledged sample
    deadline = time.monotonic() + 90
    while (row := cluster.metrics("cams"))["pending"] >= B:
        assert time.monotonic() < deadline, row["pending"]
        time.sleep(0.2)
    assert row["replay_window"] == sum(n for _, n in held)


def _blob_versions(state: Path) -> dict[int, float]:
    """Version -> modification time of the blobs of "cams" on disk (version 0 is the export's own)."""
    blobs = dep_dir(state, "cams") / "blobs"
    return {int(p.stem[1:]): p.stat().st_mtime for p in blobs.glob("v*.safetensors")}


def test_without_ray_engine_ray_names_the_cluster_extra(exported, teacher_ckpt, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import sys

    from typer.testing import CliRunner

    from cema_deploy.cli import app
    from cema_deploy.exceptions import MissingExtraError

    monkeypatch.setitem(sys.modules, "ray", None)  # as on an install without the cluster extra
    monkeypatch.delitem(sys.modules, "cema_deploy.cloud.engines.ray_engine", raising=False)
    args = ["cloud", "serve", "--edge", str(exported("bn")[0]), "--teacher", "test_resnet"]
    args += ["--teacher-weights", str(teacher_ckpt), "--state", str(tmp_path / "state")]
    r = CliRunner().invoke(app, [*args, "--engine", "ray"])
    assert r.exit_code == 1 and isinstance(r.exception, MissingExtraError), r.output
    assert "pip install 'cema-deploy[cluster]'" in str(r.exception)
    r = CliRunner().invoke(app, [*args, "--ray-address", "auto"])
    assert r.exit_code == 1 and "--ray-address auto needs --engine ray" in str(r.exception)


def test_cloud_serve_engine_ray_joins_the_cluster_and_a_new_ingress_serves_the_same_actor(
    cluster: Cluster, exported, teacher_ckpt, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    from cema_deploy.cloud.engines.ray_engine import NAMESPACE
    from cema_deploy.cloud.store.state import StateStore
    from cema_deploy.contract.manifest import manifest_from_dir
    from cema_deploy.runtime.link.client import CloudClient
    from tests.cloud.conftest import start_cloud

    edge = exported("gn")[0]  # a third fingerprint; fewer than B samples are sent, so it never steps
    m = manifest_from_dir(edge)
    state = tmp_path / "state"
    token = StateStore(state).add_token("cam-9")
    address = ray.get_runtime_context().gcs_address
    first = start_cloud(edge, teacher_ckpt, state, "--engine", "ray", "--ray-address", address)
    try:
        assert f"engine ray: deployments run as Ray actors on {address}" in first.log.read_text()
        with CloudClient(first.url, token, m.fingerprint) as client:
            ack = client.upload(batch(m, 4, seed=7), idempotency_key="before-the-ingress-died")
        assert ack.accepted == 4 and not ack.duplicate
        actor = ray.get_actor(f"deployment-{m.fingerprint}", namespace=NAMESPACE)
        pid = ray.get(actor.info.remote())["pid"]
        first.kill()  # SIGKILL: the ingress holds no state; the actor belongs to the cluster
        second = start_cloud(edge, teacher_ckpt, state, "--engine", "ray", "--ray-address", address)
        try:
            with CloudClient(second.url, token, m.fingerprint) as client:
                again = client.upload(batch(m, 4, seed=7), idempotency_key="before-the-ingress-died")
                assert again.duplicate and client.status().name == "test_efficientnet_gn"
            assert ray.get(actor.info.remote())["pid"] == pid  # the same actor, attached to
        finally:
            second.stop()
        assert _keys_on_disk(dep_dir(state, "test_efficientnet_gn")) == ["before-the-ingress-died"]
    finally:
        first.stop()
        with contextlib.suppress(ValueError):
            ray.kill(ray.get_actor(f"deployment-{m.fingerprint}", namespace=NAMESPACE), no_restart=True)


def test_while_an_actor_restarts_a_call_past_the_retry_bound_gets_503_with_retry_after(cluster: Cluster) -> None:
    import httpx

    from cema_deploy.contract.protocol import PROTOCOL_HEADER, PROTOCOL_VERSION, RETRY_AFTER_HEADER, model_url

    fp = cluster.manifests["doors"].fingerprint
    before = cluster.engine.status(fp).version
    headers = {"Authorization": f"Bearer {cluster.token}", PROTOCOL_HEADER: str(PROTOCOL_VERSION)}
    url = model_url(cluster.url, fp)
    retry_s, cluster.engine.retry_s = cluster.engine.retry_s, 0.0  # no retry: the first failure answers
    try:
        ray.kill(cluster.engine.handle(fp), no_restart=False)
        deadline = time.monotonic() + 20
        while (r := httpx.get(url, headers=headers, timeout=30)).status_code == 200:
            assert time.monotonic() < deadline, "the restart was never observed"
            time.sleep(0.02)
        assert r.status_code == 503 and int(r.headers[RETRY_AFTER_HEADER]) >= 1, r.text
        assert "is unavailable" in r.json()["detail"]
    finally:
        cluster.engine.retry_s = retry_s
    r = httpx.get(url, headers=headers, timeout=60)  # retried until the actor is back
    assert r.status_code == 200 and r.json()["version"] >= before


def test_operator_status_devices_pin_and_unpin_through_ray_actors(cluster: Cluster) -> None:
    import httpx

    from cema_deploy.cloud.service.lock import DEPLOYMENT_LOCK
    from cema_deploy.contract.protocol import PROTOCOL_VERSION, blob_url

    m = cluster.manifests["doors"]
    fp = m.fingerprint
    headers = {"Authorization": f"Bearer {cluster.token}", "X-Cema-Protocol": str(PROTOCOL_VERSION)}
    with cluster.client("doors") as client:
        ack = client.upload(batch(m, B, seed=70), idempotency_key="operator-1")
        # wait for the version this upload's ack promised (doors may already serve an earlier test's blob, and
        # its step may still be running: pinning then would race its publish)
        assert ack.target_version is not None
        assert client.fetch_blob(after=ack.target_version - 1, wait=60) is not None
    newest = cluster.engine.status(fp).version
    assert newest >= ack.target_version
    assert httpx.get(blob_url(cluster.url, fp), params={"after": newest}, headers=headers, timeout=30).status_code
    row = cluster.engine.operator_status(fp)  # flushes the polls the ingress buffered
    assert row["devices"]["cam-1"]["version"] == newest and row["devices"]["cam-1"]["uploads"] >= 1
    pinned = cluster.engine.admin("doors", "pin", 0)
    assert pinned.version == newest + 1 and pinned.frozen
    assert cluster.engine.operator_status(fp)["pinned"] == 0
    assert cluster.engine.admin("doors", "unpin").version >= newest + 1
    assert cluster.engine.operator_status(fp)["pinned"] is None
    # the actor holds its deployment state's lock, named in the file
    lock = json.loads((dep_dir(cluster.state, "doors") / DEPLOYMENT_LOCK).read_text())
    pid = ray.get(cluster.engine.handle(fp).info.remote())["pid"]
    assert lock["what"] == "Ray actor of doors" and lock["pid"] == pid


def test_an_ingress_with_another_table_is_refused_and_the_running_actor_keeps_serving(cluster: Cluster) -> None:
    import dataclasses

    from cema_deploy.cloud.config import CemaConfig, ServiceConfig
    from cema_deploy.cloud.engines import get_engine
    from cema_deploy.exceptions import CloudError

    fp = cluster.manifests["cams"].fingerprint
    pid = ray.get(cluster.engine.handle(fp).info.remote())["pid"]
    running = ray.get(cluster.engine.handle(fp).info.remote())["spec"]
    other = dataclasses.replace(
        running, method=CemaConfig.preset("cema", batch_size=2 * B)
    )  # another table for the same export
    with pytest.raises(CloudError, match="already runs with another deployment table"):
        get_engine("ray").from_config(ServiceConfig(deployments=(other,), state=cluster.state), keep_actors=True)
    # before: the second ingress killed the actor every other ingress used, and replaced it
    assert ray.get(cluster.engine.handle(fp).info.remote())["pid"] == pid
    assert cluster.engine.status(fp).name == "cams"
