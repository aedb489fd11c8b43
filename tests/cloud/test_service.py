"""The real service on 127.0.0.1: uploads in, blobs out, refusals change nothing, a SIGKILL loses nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.cloud.conftest import images
from tests.conftest import needs_torch

pytestmark = [needs_torch, pytest.mark.network]


def _setup(cloud_factory, exported, *extra):  # type: ignore[no-untyped-def]
    from cema_deploy.cloud.state import StateStore
    from cema_deploy.contract.manifest import manifest_from_dir

    edge, _ = exported("bn")
    manifest = manifest_from_dir(edge)
    cloud = cloud_factory(*extra)
    token = StateStore(cloud.state).add_token("cam-01")  # added while serving: picked up on first use
    return cloud, manifest, {"Authorization": f"Bearer {token}"}


def _body(manifest, n, seed=0, fingerprint=None, encoding="png"):  # type: ignore[no-untyped-def]
    from cema_deploy.contract.samples import SampleBatch, samples_to_bytes

    return samples_to_bytes(SampleBatch(images=images(n, seed), fingerprint=fingerprint or manifest.fingerprint,
                                        edge_version=0), encoding=encoding)


def test_uploads_in_blob_out(cloud_factory, exported) -> None:  # type: ignore[no-untyped-def]
    import httpx

    from cema_deploy.contract.blob import blob_from_bytes, validate_blob
    from cema_deploy.contract.protocol import SAMPLES_MEDIA_TYPE, blob_url, samples_url

    cloud, manifest, auth = _setup(cloud_factory, exported)
    fp = manifest.fingerprint
    with httpx.Client(timeout=60) as http:
        assert http.get(blob_url(cloud.url, fp), params={"after": 0}, headers=auth).status_code == 204
        r = http.post(samples_url(cloud.url, fp), content=_body(manifest, 5),
                      headers={**auth, "Content-Type": SAMPLES_MEDIA_TYPE})
        assert r.status_code == 202, r.text
        assert r.json() == {"accepted": 5, "pending": 5, "buffered": 5, "version": 0, "target_version": 0}
        r = http.post(samples_url(cloud.url, fp), content=_body(manifest, 6, seed=1, encoding="raw"), headers=auth)
        assert r.status_code == 202 and r.json()["target_version"] == 1  # 11 pending: one step of B=8
        r = http.get(blob_url(cloud.url, fp), params={"after": 0, "wait": 30}, headers=auth)
        assert r.status_code == 200 and r.headers["X-Cema-Version"] == "1"
        blob = blob_from_bytes(r.content)
        validate_blob(blob, manifest)
        assert blob.version == 1 and blob.fingerprint == fp
        v0 = blob_from_bytes((exported("bn")[0] / "params.safetensors").read_bytes())
        assert any(np.abs(blob.tensors[k] - v0.tensors[k]).max() > 0 for k in blob.tensors)
        metrics = http.get(cloud.url + "/metrics").text
        assert 'cema_blob_version{model="' in metrics and "cema_samples_total" in metrics
        assert http.get(cloud.url + "/v1/health").json()["models"] == {fp: 1}
        assert "/v1/models/{fingerprint}/samples" in http.get(cloud.url + "/openapi.json").json()["paths"]


def test_refused_requests_change_nothing(cloud_factory, exported) -> None:  # type: ignore[no-untyped-def]
    import httpx

    from cema_deploy.contract.protocol import blob_url, reports_url, samples_url

    cloud, manifest, auth = _setup(cloud_factory, exported, "--max-upload-bytes", "200000")
    fp = manifest.fingerprint
    url = samples_url(cloud.url, fp)
    good = _body(manifest, 2)
    cases = [
        ({}, good, url, 401, "Missing bearer token"),
        ({"Authorization": "Bearer not-a-token"}, good, url, 401, "Unknown bearer token"),
        (auth, good, samples_url(cloud.url, "ab" * 32), 404, "No model with fingerprint"),
        (auth, b"\x00" * 100, url, 400, "Malformed sample upload"),
        (auth, good[:-10], url, 400, "Malformed sample upload"),
        (auth, _body(manifest, 2, fingerprint="cd" * 32), url, 400, "bound to fingerprint"),
        (auth, _body(manifest, 40, encoding="raw"), url, 413, "exceeds the limit"),
    ]
    with httpx.Client(timeout=60) as http:
        for headers, body, target, status, message in cases:
            r = http.post(target, content=body, headers=headers)
            assert r.status_code == status, (status, r.text)
            assert message in r.json()["detail"]
        r = http.post(reports_url(cloud.url, fp), content=b"{not json", headers=auth)
        assert r.status_code == 400
        assert http.get(blob_url(cloud.url, fp), params={"after": -1}, headers=auth).status_code == 400
        assert http.get(cloud.url + "/v1/health").json()["models"] == {fp: 0}
    assert not list((cloud.state / "replay").glob("*.npy"))
    state = json.loads((cloud.state / "state.json").read_text()) if (cloud.state / "state.json").exists() else {}
    assert state.get("version", 0) == 0


def test_sigkill_loses_no_acknowledged_upload_and_never_reuses_a_version(cloud_factory, exported) -> None:  # type: ignore[no-untyped-def]
    import httpx

    from cema_deploy.cloud.replay import ReplayStore
    from cema_deploy.contract.blob import blob_from_bytes
    from cema_deploy.contract.protocol import blob_url, samples_url

    cloud, manifest, auth = _setup(cloud_factory, exported)
    fp = manifest.fingerprint
    acked = []
    with httpx.Client(timeout=60) as http:
        for i in range(6):
            r = http.post(samples_url(cloud.url, fp), content=_body(manifest, 4, seed=10 + i, encoding="raw"),
                          headers=auth)
            assert r.status_code == 202
            acked.append(images(4, seed=10 + i))
        r = http.get(blob_url(cloud.url, fp), params={"after": 0, "wait": 30}, headers=auth)
        first = int(r.headers["X-Cema-Version"])
    cloud.kill()  # SIGKILL, possibly mid-step
    stored = ReplayStore(cloud.state / "replay").read(0, 24)
    assert np.array_equal(stored, np.concatenate(acked))  # every acknowledged sample survived, in order
    before = {p.name for p in (cloud.state / "blobs").glob("v*.safetensors")}
    newest_before = max(int(n[1:9]) for n in before)
    cloud2 = cloud_factory(state=cloud.state)
    with httpx.Client(timeout=60) as http:
        for i in range(3):
            assert http.post(samples_url(cloud2.url, fp), content=_body(manifest, 8, seed=50 + i), headers=auth,
                             ).status_code == 202
        versions = [first]
        after = newest_before
        while after < newest_before + 3:
            r = http.get(blob_url(cloud2.url, fp), params={"after": after, "wait": 30}, headers=auth)
            assert r.status_code == 200
            after = blob_from_bytes(r.content).version
            versions.append(after)
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    after_names = sorted(p.name for p in (cloud.state / "blobs").glob("v*.safetensors"))
    assert set(before) <= set(after_names)  # nothing overwritten; new versions continue past the old newest
    assert int(after_names[-1][1:9]) >= newest_before + 3
