"""Faults: the cloud is SIGKILLed mid-stream and restarted; the edge keeps serving and converges."""

from __future__ import annotations

import socket
import time

import pytest

from tests.cloud.conftest import dep_dir, images
from tests.cloud.test_edge_cloud import _edge
from tests.conftest import needs_torch

pytestmark = [needs_torch, pytest.mark.network]


def test_cloud_killed_mid_stream(cloud_factory, exported, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cema_deploy.cloud.store.replay import SampleStore
    from cema_deploy.cloud.store.state import DeploymentStore, StateStore

    out, _ = exported("bn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    state = tmp_path / "state"
    token = StateStore(state).add_token("cam-09")
    cloud = cloud_factory(state=state, port=port)
    failures, versions = 0, []
    with _edge(out, cloud.url, token) as rt:

        def stream(n: int, seed: int) -> None:
            nonlocal failures
            for i in range(n):
                try:
                    versions.append(rt.process(images(8, seed=seed + i)).version)
                except Exception:  # counted: the invariant is that there are none
                    failures += 1
                time.sleep(0.05)

        stream(10, 0)
        assert rt.uplink is not None and rt.uplink.flush(timeout=60)
        cloud.kill()  # SIGKILL, with steps possibly in flight
        acked_before_kill = rt.uplink.counters.uploaded
        stream(10, 100)  # cloud down: serving continues at full speed
        assert failures == 0
        cloud = cloud_factory(state=state, port=port)
        stream(10, 200)
        assert rt.uplink.flush(timeout=60)
        newest = DeploymentStore(dep_dir(state)).newest_blob_version()
        deadline = time.time() + 60
        while time.time() < deadline and (
            rt.version < newest or newest < DeploymentStore(dep_dir(state)).newest_blob_version()
        ):
            newest = DeploymentStore(dep_dir(state)).newest_blob_version()
            time.sleep(0.1)
        assert (
            rt.version == DeploymentStore(dep_dir(state)).newest_blob_version()
        )  # the edge converged to the newest blob
        acked = rt.uplink.counters.uploaded
        m = rt.metrics()
    assert failures == 0 and acked >= acked_before_kill + 80
    # no acknowledged upload lost; a retry whose ack was lost is answered from its idempotency key, never stored twice
    assert SampleStore(dep_dir(state) / "uploads").adapt_total == acked
    assert versions == sorted(versions)  # the edge's parameter version never went back
    versions = DeploymentStore(dep_dir(state)).blob_versions()
    newest = versions[-1]  # none reused or skipped; the newest 16 kept (retention)
    assert versions == list(range(newest - len(versions) + 1, newest + 1)) and len(versions) == min(newest, 16)
    assert m["refused"] == {}
