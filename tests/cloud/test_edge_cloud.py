"""Edge and cloud together over real HTTP on 127.0.0.1: uploads, refit parity with the replica, an outage, and
signed blobs."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from tests.cloud.conftest import dep_dir, images
from tests.conftest import needs_torch

pytestmark = [needs_torch, pytest.mark.network]


def _edge(out, url, token, **kw):  # type: ignore[no-untyped-def]
    from cema_deploy.contract.manifest import manifest_from_dir
    from cema_deploy.runtime.backends.registry import get_backend
    from cema_deploy.runtime.edge import EdgeRuntime
    from cema_deploy.runtime.link.client import CloudClient
    from cema_deploy.runtime.selection.rules import SampleSelector, SelectionConfig

    fp = manifest_from_dir(out).fingerprint
    keep_all = SelectionConfig(num_classes=10, e0=np.log(10) + 1, e_min=None, d_margin=None)  # every sample goes up
    verifier = kw.pop("verifier", None)
    return EdgeRuntime(
        get_backend("ort-cpu", out),
        SampleSelector(keep_all),
        client=CloudClient(url, token, fp, encoding="png"),
        verifier=verifier,
        poll_wait_s=2.0,
        upload_batch=8,
        **kw,
    )


def test_edge_uploads_refits_and_matches_the_replica(cloud_factory, exported) -> None:  # type: ignore[no-untyped-def]
    import torch

    from cema_deploy.cloud.models import replica_from_export
    from cema_deploy.cloud.store.replay import SampleStore
    from cema_deploy.cloud.store.state import StateStore
    from cema_deploy.contract.blob import blob_from_path
    from cema_deploy.contract.manifest import manifest_from_dir
    from cema_deploy.runtime.frames.preprocess import normalize

    out, _ = exported("bn")
    manifest = manifest_from_dir(out)
    cloud = cloud_factory()
    token = StateStore(cloud.state).add_token("cam-01")
    x = images(24, seed=5)
    with _edge(out, cloud.url, token) as rt:
        for i in range(3):
            rt.process(x[8 * i : 8 * (i + 1)])
            assert rt.sync(timeout=60)
        assert rt.version >= 3 and rt.blobs_applied >= 1
        probe = images(6, seed=9)
        got = rt.process(probe).logits
        m = rt.metrics()
        version = rt.version
    # bytes on the wire: the cloud holds exactly the uint8 images the edge selected (PNG is lossless)
    assert np.array_equal(SampleStore(dep_dir(cloud.state) / "uploads").read_adapt(0, 24), x)
    assert m["uplink"]["uploaded"] == 24 + 6 or m["uplink"]["uploaded"] >= 24
    # the refitted edge equals the replica (eval mode) with the published parameters
    replica = replica_from_export(out, manifest)
    blob = blob_from_path(dep_dir(cloud.state) / "blobs" / f"v{version:08d}.safetensors")
    state = replica.state_dict()
    state.update({k: torch.from_numpy(v) for k, v in blob.tensors.items()})
    replica.load_state_dict(state)
    with torch.no_grad():
        want = replica.eval()(torch.from_numpy(normalize(probe, manifest.preprocess))).numpy()
    assert np.abs(got - want).max() <= 1e-4


def _wait_until(cond, timeout: float) -> None:  # type: ignore[no-untyped-def]
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_outage_keeps_serving_bounds_the_queue_then_resumes(cloud_factory, exported, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cema_deploy.cloud.store.state import StateStore

    out, _ = exported("bn")
    port = _free_port()
    state = tmp_path / "state"
    token = StateStore(state).add_token("cam-02")
    with _edge(out, f"http://127.0.0.1:{port}", token, max_queue_samples=20) as rt:
        for i in range(6):  # cloud down: 48 samples selected, queue holds 20
            assert rt.process(images(8, seed=i)).logits.shape == (8, 10)
            if i == 0:  # the worker takes the first batch in flight (and fails to send it) before the queue fills
                _wait_until(lambda: rt.metrics()["uplink"]["retries"] >= 1, timeout=30)
        m = rt.metrics()["uplink"]
        # bounded: the queue cap plus the one batch being retried
        assert m["uploaded"] == 0 and m["dropped_queue"] == 48 - 20 - 8 and rt.uplink.queued_now == 20 + 8
        cloud = cloud_factory(state=state, port=port)  # the cloud comes up: uploads resume, a blob arrives
        assert rt.uplink.flush(timeout=60)
        assert rt.wait_for_version(1, timeout=60)
        m = rt.metrics()
        assert m["uplink"]["uploaded"] >= 8 and m["uplink"]["retries"] >= 1 and m["version"] >= 1
    assert cloud.proc.poll() is None


def test_signed_blobs_from_the_cloud(cloud_factory, exported, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cema_deploy.cloud.store.state import StateStore
    from cema_deploy.contract.signing import BlobVerifier, load_public_key, new_key_pair

    out, _ = exported("bn")
    priv, pub = new_key_pair(tmp_path / "keys")
    _, other_pub = new_key_pair(tmp_path / "other")
    cloud = cloud_factory("--signing-key", str(priv))
    token = StateStore(cloud.state).add_token("cam-03")
    with (
        _edge(out, cloud.url, token, verifier=BlobVerifier([load_public_key(pub)])) as good,
        _edge(out, cloud.url, token, verifier=BlobVerifier([load_public_key(other_pub)])) as bad,
    ):
        good.process(images(8, seed=1))
        assert good.sync(timeout=60) and good.version >= 1
        assert bad.uplink is not None and bad.uplink.flush(timeout=30)
        deadline = __import__("time").time() + 30
        while bad.refused["signature"] == 0 and __import__("time").time() < deadline:
            __import__("time").sleep(0.05)
        assert bad.refused["signature"] >= 1 and bad.version == 0
