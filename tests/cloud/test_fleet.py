"""Several deployments in one service over HTTP on 127.0.0.1: `cloud serve --config` with TLS, scoped tokens,
revocation without a restart, isolation, the pending cap, idempotent uploads across a restart, the operator's
reset / freeze from the CLI."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import threading
from pathlib import Path

import numpy as np
import pytest

from cema_deploy.contract.protocol import IDEMPOTENCY_HEADER, PROTOCOL_HEADER, PROTOCOL_VERSION
from tests.cloud.conftest import batch, dep_dir, images, make_deployment, serve_deployments
from tests.conftest import needs_torch

pytestmark = [needs_torch, pytest.mark.network]


def _headers(token: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", PROTOCOL_HEADER: str(PROTOCOL_VERSION), **extra}


def _body(manifest, n: int = 8, seed: int = 0, **kw) -> bytes:  # type: ignore[no-untyped-def]
    from cema_deploy.contract.samples import samples_to_bytes

    return samples_to_bytes(batch(manifest, n, seed, **kw), encoding="png")


def _self_signed(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_two_deployments_in_one_service_over_tls(cloud_factory, exported, teacher_ckpt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import httpx
    from typer.testing import CliRunner

    from cema_deploy.cli import app
    from cema_deploy.cloud.store.state import StateStore
    from cema_deploy.contract.blob import blob_from_bytes
    from cema_deploy.contract.manifest import manifest_from_dir
    from cema_deploy.contract.protocol import MODELS_PATH, blob_url, model_url, samples_url

    edge_a, _ = exported("bn")
    edge_b, _ = exported("gn")
    ma, mb = manifest_from_dir(edge_a), manifest_from_dir(edge_b)
    cert, key = _self_signed(tmp_path)
    toml = tmp_path / "cloud.toml"
    toml.write_text(
        f"""
[service]
ssl_certfile = "{cert}"
ssl_keyfile = "{key}"

[deployments.cams]
edge = "{edge_a}"
teacher = "test_resnet"
teacher_weights = "{teacher_ckpt}"
pending_cap = 64
[deployments.cams.method]
batch_size = 8

[deployments.doors]
edge = "{edge_b}"
teacher = "test_resnet"
teacher_weights = "{teacher_ckpt}"
state = "elsewhere/doors"
[deployments.doors.method]
batch_size = 8
"""
    )
    state = tmp_path / "state"
    store = StateStore(state)
    tok_a = store.add_token("cam-1", deployments=["cams"])
    tok_all = store.add_token("hub", deployments=None)
    cloud = cloud_factory("--config", str(toml), state=state, one=False, https=True)
    assert cloud.url.startswith("https://")
    with httpx.Client(timeout=60, verify=ssl.create_default_context(cafile=str(cert))) as http:
        listed = http.get(cloud.url + MODELS_PATH, headers=_headers(tok_a)).json()["models"]
        assert [m["name"] for m in listed] == ["cams"]
        listed = http.get(cloud.url + MODELS_PATH, headers=_headers(tok_all)).json()["models"]
        assert sorted((m["name"], m["fingerprint"]) for m in listed) == sorted(
            [("cams", ma.fingerprint), ("doors", mb.fingerprint)]
        )
        st = http.get(model_url(cloud.url, mb.fingerprint), headers=_headers(tok_all)).json()
        assert st == {**st, "name": "doors", "version": 0, "generation": 1, "calibrated": False, "frozen": False}
        # cam-1 may not touch doors (it is not even told doors exists)
        r = http.post(samples_url(cloud.url, mb.fingerprint), content=_body(mb), headers=_headers(tok_a))
        assert r.status_code == 404 and "is served to this token" in r.json()["detail"]
        for i in range(2):
            r = http.post(samples_url(cloud.url, ma.fingerprint), content=_body(ma, 8, seed=i), headers=_headers(tok_a))
            assert r.status_code == 202, r.text
        r = http.get(blob_url(cloud.url, ma.fingerprint), params={"after": 1, "wait": 30}, headers=_headers(tok_a))
        assert r.status_code == 200 and blob_from_bytes(r.content).version == 2
        # one deployment's uploads never touch the other's state
        assert len(list((dep_dir(state, "cams") / "uploads").glob("*.safetensors"))) == 2
        assert not list((state / "elsewhere" / "doors" / "uploads").glob("*.safetensors"))
        assert not list((state / "elsewhere" / "doors" / "blobs").glob("*"))
        st = http.get(model_url(cloud.url, mb.fingerprint), headers=_headers(tok_all)).json()
        assert st["version"] == 0
        metrics = http.get(cloud.url + "/metrics").text
        assert 'cema_blob_version{deployment="cams"' in metrics and 'cema_blob_version{deployment="doors"' in metrics
        assert 'cema_upload_to_blob_p99_seconds{deployment="cams"' in metrics
        assert 'cema_upload_to_blob_seconds_bucket{deployment="cams",model="' in metrics and 'le="+Inf"} 2' in metrics
        # revoked while serving: refused from the next request on, no restart
        r = CliRunner().invoke(app, ["cloud", "token", "revoke", "cam-1", "--state", str(state)])
        assert r.exit_code == 0, r.output
        r = http.get(model_url(cloud.url, ma.fingerprint), headers=_headers(tok_a))
        assert r.status_code == 401 and "revoked" in r.json()["detail"]
        assert http.get(model_url(cloud.url, ma.fingerprint), headers=_headers(tok_all)).status_code == 200
    assert cloud.proc.poll() is None


def test_the_pending_cap_answers_429_with_retry_after_then_recovers(exported, teacher_ckpt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import httpx

    from cema_deploy.cloud.store.state import StateStore
    from cema_deploy.contract.protocol import samples_url
    from cema_deploy.exceptions import UplinkError
    from cema_deploy.runtime.link.client import CloudClient

    edge, _ = exported("bn")
    state = tmp_path / "state"
    token = StateStore(state).add_token("cam-1")
    dep = make_deployment(edge, teacher_ckpt, state, batch_size=8, spec={"pending_cap": 16})
    with serve_deployments([dep], state, start=False) as cloud:
        url = samples_url(cloud.url, dep.fingerprint)
        with httpx.Client(timeout=60) as http:
            for i in range(2):
                assert (
                    http.post(url, content=_body(dep.manifest, 8, seed=i), headers=_headers(token)).status_code == 202
                )
            r = http.post(url, content=_body(dep.manifest, 8, seed=2), headers=_headers(token))
            assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
            assert "holds 16 pending samples, its cap is 16" in r.json()["detail"]
        client = CloudClient(cloud.url, token, dep.fingerprint)
        with pytest.raises(UplinkError) as exc:
            client.upload(batch(dep.manifest, 8, seed=2), idempotency_key="k")
        assert exc.value.retryable and exc.value.status == 429 and exc.value.retry_after >= 1
        assert len(list((dep_dir(state) / "uploads").glob("*.safetensors"))) == 2  # the refused ones stored nothing
        dep.start()  # training absorbs the backlog: uploads are accepted again
        assert dep.wait_idle(60) and dep.metrics()["pending"] == 0
        ack = client.upload(batch(dep.manifest, 8, seed=2), idempotency_key="k")
        assert ack.accepted == 8 and not ack.duplicate
        client.close()
        text = httpx.get(cloud.url + "/metrics").text
        assert 'cema_requests_refused_total{deployment="test_resnet",status="429"} 2' in text


def test_an_upload_retried_after_its_202_was_lost_is_stored_once_also_after_a_restart(
    exported, teacher_ckpt, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    import httpx

    from cema_deploy.cloud.store.state import StateStore
    from cema_deploy.contract.protocol import batches_url, samples_url

    edge, _ = exported("bn")
    state = tmp_path / "state"
    token = StateStore(state).add_token("cam-1")
    uploads = dep_dir(state) / "uploads"

    def post(url: str, body: bytes, key: str) -> httpx.Response:
        with httpx.Client(timeout=60) as http:
            return http.post(url, content=body, headers=_headers(token, **{IDEMPOTENCY_HEADER: key}))

    body = _body(__import__("cema_deploy.contract.manifest", fromlist=["m"]).manifest_from_dir(edge), 5, seed=3)
    with serve_deployments([make_deployment(edge, teacher_ckpt, state, batch_size=8)], state) as cloud:
        url = samples_url(cloud.url, cloud.service.fingerprint)
        first = post(url, body, "key-1")  # its 202 "lost": the edge never read it and sends the same again
        assert first.status_code == 202
        again = post(url, body, "key-1")
        assert again.status_code == 202 and again.json() == {**first.json(), "duplicate": True}
        assert len(list(uploads.glob("*.safetensors"))) == 1
        # concurrent retries of one key: stored once too
        answers = []
        threads = [threading.Thread(target=lambda: answers.append(post(url, body, "key-2").json())) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(a["duplicate"] for a in answers) == [False, True, True, True]
        assert len(list(uploads.glob("*.safetensors"))) == 2 and cloud.service.samples.adapt_total == 10
        report = json.dumps({"seen": 64, "selected": 5, "uploaded": 5, "generation": 0})
        r1 = post(batches_url(cloud.url, cloud.service.fingerprint), report.encode(), "report-1").json()
        r2 = post(batches_url(cloud.url, cloud.service.fingerprint), report.encode(), "report-1").json()
        assert r1 == r2 and cloud.service.counters["batch_reports"] == 1
    with serve_deployments([make_deployment(edge, teacher_ckpt, state, batch_size=8)], state) as cloud:  # restarted
        url = samples_url(cloud.url, cloud.service.fingerprint)
        again = post(url, body, "key-1")
        assert again.status_code == 202 and again.json() == {**first.json(), "duplicate": True}
        assert len(list(uploads.glob("*.safetensors"))) == 2 and cloud.service.samples.adapt_total == 10
        r = post(url, b"", "x" * 200)
        assert r.status_code == 400 and IDEMPOTENCY_HEADER in r.json()["detail"]


def test_operator_reset_and_freeze_from_the_cli(exported, teacher_ckpt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import httpx
    from typer.testing import CliRunner

    from cema_deploy.cli import app
    from cema_deploy.cloud.store.state import StateStore
    from cema_deploy.contract.blob import blob_from_path
    from cema_deploy.contract.protocol import admin_url, samples_url

    edge, _ = exported("bn")
    state = tmp_path / "state"
    store = StateStore(state)
    token = store.add_token("cam-1", deployments=["test_resnet"])
    ops = tmp_path / "ops.token"
    r = CliRunner().invoke(app, ["cloud", "token", "add", "ops", "--admin", "--state", str(state)])
    assert r.exit_code == 0, r.output
    ops.write_text(r.output.strip().splitlines()[-1])
    r = CliRunner().invoke(app, ["cloud", "token", "add", "cam-9", "--state", str(state)])
    assert r.exit_code == 1 and "--deployment NAME (repeatable), --all, or --admin" in str(r.exception)
    dep = make_deployment(edge, teacher_ckpt, state, batch_size=8)
    with serve_deployments([dep], state) as cloud:
        url = samples_url(cloud.url, dep.fingerprint)
        with httpx.Client(timeout=60) as http:
            for i in range(2):
                assert (
                    http.post(url, content=_body(dep.manifest, 8, seed=i), headers=_headers(token)).status_code == 202
                )
            r = http.post(url, content=_body(dep.manifest, 3, seed=7), headers=_headers(token))
            assert r.status_code == 202
        assert dep.wait_idle(60) and dep.version == 2
        # a device token cannot reset
        r = httpx.post(admin_url(cloud.url, "test_resnet", "reset"), headers=_headers(token))
        assert r.status_code == 403 and "needs an admin token" in r.json()["detail"]
        cli = ["--cloud", cloud.url, "--token-file", str(ops)]
        r = CliRunner().invoke(app, ["cloud", "reset", "test_resnet", *cli, "--yes"])
        assert r.exit_code == 0, r.output
        assert "generation 2, version 3, uncalibrated" in r.output
        # the reset blob is the state at start (the export's own tensors); replay and pending were deleted
        reset = blob_from_path(dep.store.blob_path(3)).tensors
        export = blob_from_path(edge / "params.safetensors").tensors
        assert all(np.array_equal(reset[k], v) for k, v in export.items())
        assert not list((dep_dir(state) / "uploads").glob("*.safetensors")) and dep.metrics()["pending"] == 0
        assert dep.metrics()["replay_window"] == 0 and dep.cema.steps == 0
        with httpx.Client(timeout=60) as http:
            r = http.post(url, content=_body(dep.manifest, 4, generation=1), headers=_headers(token))
            assert r.status_code == 409 and r.json()["generation"] == 2 and r.json()["name"] == "test_resnet"
            for gen in (2, 0):
                r = http.post(url, content=_body(dep.manifest, 4, generation=gen), headers=_headers(token))
                assert r.status_code == 202 and r.json()["generation"] == 2
        assert dep.wait_idle(60) and dep.version == 4  # versions keep rising across the reset
        r = CliRunner().invoke(app, ["cloud", "freeze", "test_resnet", *cli])
        assert r.exit_code == 0 and "frozen" in r.output
        with httpx.Client(timeout=60) as http:
            assert http.post(url, content=_body(dep.manifest, 8, seed=9), headers=_headers(token)).status_code == 202
        assert dep.wait_idle(60) and dep.version == 4 and dep.counters["steps"] >= 4
        r = CliRunner().invoke(app, ["cloud", "unfreeze", "test_resnet", *cli])
        assert r.exit_code == 0 and "publishing" in r.output
        assert dep.wait_idle(60) and dep.version == 5
        r = CliRunner().invoke(app, ["cloud", "status", *cli])
        assert r.exit_code == 0 and r.output.startswith("test_resnet: ") and "version 5, generation 2" in r.output
    assert images(1).shape == (1, 64, 64, 3)
