"""The real service on 127.0.0.1: uploads in, blobs out, refusals change nothing, a SIGKILL loses nothing."""

from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest

from cema_deploy.contract.protocol import PROTOCOL_HEADER, PROTOCOL_VERSION
from tests.cloud.conftest import dep_dir, images
from tests.conftest import needs_torch

pytestmark = [needs_torch, pytest.mark.network]


def _setup(cloud_factory, exported, *extra):  # type: ignore[no-untyped-def]
    from cema_deploy.cloud.store.state import StateStore
    from cema_deploy.contract.manifest import manifest_from_dir

    edge, _ = exported("bn")
    manifest = manifest_from_dir(edge)
    cloud = cloud_factory(*extra)
    token = StateStore(cloud.state).add_token("cam-01")  # added while serving: picked up on first use
    return cloud, manifest, {"Authorization": f"Bearer {token}", PROTOCOL_HEADER: str(PROTOCOL_VERSION)}


def _body(manifest, n, seed=0, fingerprint=None, encoding="png"):  # type: ignore[no-untyped-def]
    from cema_deploy.contract.samples import SampleBatch, samples_to_bytes

    return samples_to_bytes(
        SampleBatch(images=images(n, seed), fingerprint=fingerprint or manifest.fingerprint, edge_version=0),
        encoding=encoding,
    )


def test_uploads_in_blob_out(cloud_factory, exported) -> None:  # type: ignore[no-untyped-def]
    import httpx

    from cema_deploy.contract.blob import blob_from_bytes, validate_blob
    from cema_deploy.contract.protocol import SAMPLES_MEDIA_TYPE, blob_url, reports_url, samples_url

    cloud, manifest, auth = _setup(cloud_factory, exported)
    fp = manifest.fingerprint
    with httpx.Client(timeout=60) as http:
        assert http.get(blob_url(cloud.url, fp), params={"after": 0}, headers=auth).status_code == 204
        r = http.post(
            samples_url(cloud.url, fp), content=_body(manifest, 5), headers={**auth, "Content-Type": SAMPLES_MEDIA_TYPE}
        )
        assert r.status_code == 202, r.text
        ack = {"generation": 1, "calibrated": False, "duplicate": False}
        assert r.json() == {"accepted": 5, "pending": 5, "buffered": 5, "version": 0, "target_version": 0, **ack}
        r = http.post(samples_url(cloud.url, fp), content=_body(manifest, 6, seed=1, encoding="raw"), headers=auth)
        assert r.status_code == 202 and r.json()["target_version"] == 1  # 11 pending: one step of B=8
        r = http.get(blob_url(cloud.url, fp), params={"after": 0, "wait": 30}, headers=auth)
        assert r.status_code == 200 and r.headers["X-Cema-Version"] == "1"
        blob = blob_from_bytes(r.content)
        validate_blob(blob, manifest)
        assert blob.version == 1 and blob.fingerprint == fp
        v0 = blob_from_bytes((exported("bn")[0] / "params.safetensors").read_bytes())
        assert any(np.abs(blob.tensors[k] - v0.tensors[k]).max() > 0 for k in blob.tensors)
        r = http.post(samples_url(cloud.url, fp), content=_body(manifest, 5, seed=2), headers=auth)
        assert r.json() == {"accepted": 5, "pending": 8, "buffered": 16, "version": 1, "target_version": 2, **ack}
        r = http.get(blob_url(cloud.url, fp), params={"after": 1, "wait": 30}, headers=auth)
        blob2 = blob_from_bytes(r.content)
        validate_blob(blob2, manifest, newer_than=1)
        assert r.headers["X-Cema-Version"] == "2" and blob2.version == 2
        assert http.get(blob_url(cloud.url, fp), params={"after": 2}, headers=auth).status_code == 204
        r = http.post(
            reports_url(cloud.url, fp), json={"kind": "rollback", "version": 2, "reason": "entropy"}, headers=auth
        )
        # the only device the deployment knows rolled v2 back: its line is restored (the state of v1, as v3)
        assert r.status_code == 202 and r.json()["outcome"] == "restoring the state of version 1"
        r = http.get(blob_url(cloud.url, fp), params={"after": 2, "wait": 30}, headers=auth)
        assert r.status_code == 200 and r.headers["X-Cema-Version"] == "3"
        metrics = http.get(cloud.url + "/metrics").text
        assert f'cema_blob_version{{deployment="test_resnet",model="{fp[:16]}"}} 3' in metrics
        assert "cema_samples_total" in metrics and "cema_upload_to_blob_seconds_count" in metrics
        assert 'kind="rollback"} 1' in metrics
        assert http.get(cloud.url + "/v1/health", headers=auth).json()["models"] == {fp: 3}
        assert "/v1/models/{fingerprint}/samples" in http.get(cloud.url + "/openapi.json").json()["paths"]


def test_refused_requests_change_nothing(exported, teacher_ckpt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import httpx

    from cema_deploy.cloud.store.state import StateStore
    from cema_deploy.contract.manifest import manifest_from_dir
    from cema_deploy.contract.protocol import blob_url, reports_url, samples_url
    from tests.cloud.conftest import serve_in_thread

    edge, _ = exported("bn")
    manifest = manifest_from_dir(edge)
    fp = manifest.fingerprint
    auth = {
        "Authorization": f"Bearer {StateStore(tmp_path / 'state').add_token('cam-01')}",
        PROTOCOL_HEADER: str(PROTOCOL_VERSION),
    }
    with serve_in_thread(edge, teacher_ckpt, tmp_path / "state", max_upload_bytes=200_000, batch_size=2) as cloud:
        url = samples_url(cloud.url, fp)
        good = _body(manifest, 2)
        big = _body(manifest, 40, encoding="raw")
        cases = [
            ({PROTOCOL_HEADER: "3"}, good, url, 401, "Missing bearer token"),
            ({**auth, PROTOCOL_HEADER: "1"}, good, url, 400, "speaks cema protocol '1'; this side speaks protocol 3"),
            ({"Authorization": auth["Authorization"]}, good, url, 400, "sent no X-Cema-Protocol header"),
            (
                {"Authorization": "Bearer not-a-token", PROTOCOL_HEADER: "3"},
                good,
                url,
                401,
                "Unknown or revoked bearer token",
            ),
            (auth, good, samples_url(cloud.url, "ab" * 32), 404, "No deployment with fingerprint"),
            (auth, b"\x00" * 100, url, 400, "Malformed sample upload"),
            (auth, good[:-10], url, 400, "Malformed sample upload"),
            (auth, _body(manifest, 2, fingerprint="cd" * 32), url, 400, "bound to fingerprint"),
            (auth, big, url, 413, "exceeds the limit of 200000 bytes"),  # Content-Length says so
            (auth, (big[i : i + 65536] for i in range(0, len(big), 65536)), url, 413, "exceeds the limit"),  # chunked
        ]
        with httpx.Client(timeout=60) as http:
            for headers, body, target, status, message in cases:
                r = http.post(target, content=body, headers=headers)
                assert r.status_code == status, (status, r.text)
                assert message in r.json()["detail"]
            r = http.post(reports_url(cloud.url, fp), content=b"{not json", headers=auth)
            assert r.status_code == 400 and "Malformed report" in r.json()["detail"]
            for params in ({"after": -1}, {"after": "abc"}, {"wait": 99}):
                r = http.get(blob_url(cloud.url, fp), params=params, headers=auth)
                assert r.status_code == 400 and r.json()["detail"], params
            assert http.get(cloud.url + "/v1/health", headers=auth).json()["models"] == {fp: 0}
            assert not list((dep_dir(cloud.state) / "uploads").glob("*"))
            assert cloud.service.version == 0 and cloud.service.samples.adapt_total == 0
            # the first accepted upload finds nothing left behind by the refusals
            r = http.post(url, content=_body(manifest, 1), headers=auth)
            assert r.status_code == 202 and r.json() == {
                "accepted": 1,
                "pending": 1,
                "buffered": 1,
                "version": 0,
                "target_version": 0,
                "generation": 1,
                "calibrated": False,
                "duplicate": False,
            }
            metrics = http.get(cloud.url + "/metrics").text
            assert 'status="413"} 2' in metrics and 'status="401"} 2' in metrics


def test_sigkill_loses_no_acknowledged_upload_and_never_reuses_a_version(cloud_factory, exported) -> None:  # type: ignore[no-untyped-def]
    import httpx

    from cema_deploy.cloud.store.replay import SampleStore
    from cema_deploy.contract.blob import blob_from_bytes
    from cema_deploy.contract.protocol import blob_url, samples_url

    cloud, manifest, auth = _setup(cloud_factory, exported)
    fp = manifest.fingerprint
    acked = []
    with httpx.Client(timeout=60) as http:
        for i in range(6):
            r = http.post(
                samples_url(cloud.url, fp), content=_body(manifest, 4, seed=10 + i, encoding="raw"), headers=auth
            )
            assert r.status_code == 202
            acked.append(images(4, seed=10 + i))
        r = http.get(blob_url(cloud.url, fp), params={"after": 0, "wait": 30}, headers=auth)
        first = int(r.headers["X-Cema-Version"])
    cloud.kill()  # SIGKILL, possibly mid-step
    stored = SampleStore(dep_dir(cloud.state) / "uploads").read_adapt(0, 24)
    assert np.array_equal(stored, np.concatenate(acked))  # every acknowledged sample survived, in order
    before = {p.name for p in (dep_dir(cloud.state) / "blobs").glob("v*.safetensors")}
    newest_before = max(int(n[1:9]) for n in before)
    cloud2 = cloud_factory(state=cloud.state)
    with httpx.Client(timeout=60) as http:
        for i in range(3):
            assert (
                http.post(
                    samples_url(cloud2.url, fp),
                    content=_body(manifest, 8, seed=50 + i),
                    headers=auth,
                ).status_code
                == 202
            )
        versions = [first]
        after = newest_before
        while after < newest_before + 3:
            r = http.get(blob_url(cloud2.url, fp), params={"after": after, "wait": 30}, headers=auth)
            assert r.status_code == 200
            after = blob_from_bytes(r.content).version
            versions.append(after)
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    after_names = sorted(p.name for p in (dep_dir(cloud.state) / "blobs").glob("v*.safetensors"))
    assert set(before) <= set(after_names)  # nothing overwritten; new versions continue past the old newest
    assert int(after_names[-1][1:9]) >= newest_before + 3
    # SIGTERM with a long poll in flight: the poll ends at once (204) and the process exits 0 within seconds
    poll: list[int] = []

    def long_poll() -> None:
        with httpx.Client(timeout=60) as http:
            poll.append(
                http.get(
                    blob_url(cloud2.url, fp),
                    params={"after": 10**6, "wait": 30},
                    headers=auth,
                ).status_code
            )

    t = threading.Thread(target=long_poll)
    t.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    cloud2.proc.send_signal(signal.SIGTERM)
    assert cloud2.proc.wait(timeout=20) == 0 and time.monotonic() - t0 < 10
    t.join(30)
    assert poll == [204]


def test_token_cli_prints_the_token_once_and_stores_only_its_hash(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import hashlib

    from typer.testing import CliRunner

    from cema_deploy.cli import app

    state = tmp_path / "state"
    r = CliRunner().invoke(app, ["cloud", "token", "add", "cam-07", "--all", "--state", str(state)])
    assert r.exit_code == 0, r.output
    token = r.output.strip().splitlines()[-1]
    stored = (state / "tokens.json").read_text()
    assert len(token) >= 40 and token not in stored and hashlib.sha256(token.encode()).hexdigest() in stored
    r = CliRunner().invoke(app, ["cloud", "token", "list", "--state", str(state)])
    assert r.exit_code == 0 and r.output.split() == ["cam-07", "*"]
    r = CliRunner().invoke(app, ["cloud", "token", "add", "bad id!", "--all", "--state", str(state)])
    assert r.exit_code == 1 and "must be 1-128 letters" in str(r.exception)  # main() prints it as one line
