"""Transport security on the edge: TLS end to end on 127.0.0.1 (a CA and a server certificate this test creates,
the protocol fixture server wrapped in an ssl context, `edge run --cloud https://... --ca-file`), and the rule for
unsigned blobs: refused from a cloud that is not on a loopback address unless allowed, warned about when applied."""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import ssl
from pathlib import Path

import numpy as np
import pytest

from cema_deploy.contract.blob import RefitBlob, blob_from_path, blob_to_bytes
from cema_deploy.contract.messages import BatchAck, BatchReport, DeploymentStatus, EdgeReport, UploadAck
from cema_deploy.contract.samples import SampleBatch
from cema_deploy.exceptions import UplinkError
from cema_deploy.runtime.backends.registry import get_backend
from cema_deploy.runtime.edge import EdgeRuntime
from cema_deploy.runtime.link.client import CloudClient, EdgeConfigError, is_loopback_url
from cema_deploy.runtime.selection.rules import SampleSelector, SelectionConfig
from tests.conftest import needs_torch
from tests.runtime.conftest import images

FP = "ab" * 32


def _certs(tmp: Path) -> tuple[Path, ssl.SSLContext]:
    """A test CA (ca.pem) and a server certificate for 127.0.0.1 signed by it; returns (CA file, server ctx)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, srv_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cema-deploy test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    server = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(srv_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    pem = serialization.Encoding.PEM
    (tmp / "ca.pem").write_bytes(ca.public_bytes(pem))
    (tmp / "server.pem").write_bytes(server.public_bytes(pem))
    (tmp / "server.key").write_bytes(srv_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))  # fmt: skip
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp / "server.pem", tmp / "server.key")
    return tmp / "ca.pem", ctx


@pytest.mark.network
def test_the_client_speaks_tls_to_a_cloud_whose_ca_it_is_given(protocol_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ca, ctx = _certs(tmp_path)
    srv = protocol_server(FP, ssl_context=ctx)
    assert srv.url.startswith("https://127.0.0.1:")
    with CloudClient(srv.url, "t0k", FP, ca_file=str(ca), encoding="raw") as client:
        assert client.status().generation == 1
        ack = client.upload(SampleBatch(images=images(2, size=8), fingerprint=FP, edge_version=0), idempotency_key="k")
        assert ack.accepted == 2
        srv.state.publish(1, b"blob bytes")
        assert client.fetch_blob(after=0, wait=1.0) == (1, b"blob bytes")
    assert np.array_equal(srv.state.uploaded_images(), images(2, size=8))
    with (  # the system's CAs did not sign the test certificate
        CloudClient(srv.url, "t0k", FP) as untrusting,
        pytest.raises(UplinkError, match=r"certificate .* did not verify.*--ca-file"),
    ):
        untrusting.status()
    with pytest.raises(EdgeConfigError, match="as the CA bundle"):
        CloudClient(srv.url, "t0k", FP, ca_file=str(tmp_path / "missing.pem"))


@needs_torch
@pytest.mark.network
def test_edge_run_over_https_with_ca_file(exported, protocol_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from cema_deploy.cli import app
    from tests.runtime.test_edge import _publish_on_upload

    out, _ = exported("bn")
    v0 = blob_from_path(out / "params.safetensors")
    ca, ctx = _certs(tmp_path)
    srv = protocol_server(v0.fingerprint, ssl_context=ctx)
    _publish_on_upload(srv, v0)
    np.save(tmp_path / "s.npy", images(16, seed=4))
    r = CliRunner().invoke(app, [
        "edge", "run", str(out), "--selection", "cema",
        "--source", str(tmp_path / "s.npy"), "--cloud", srv.url, "--ca-file", str(ca),
        "--token", "t0k", "--batch", "8", "--sync", "--e0-ratio", "1.5", "--d-margin", "off", "--e-min-ratio", "0",
        "--json", str(tmp_path / "m.json"), "--quiet",
    ])  # fmt: skip
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["uplink"]["uploaded"] == 16 and m["version"] == 2 and m["blobs_applied"] == 2
    assert m["unsigned_applied"] == 2 and "UNSIGNED" in r.output  # loopback: applied, with a clear warning
    assert np.array_equal(srv.state.uploaded_images(), images(16, seed=4))


class _RemoteLink:
    """An in-process CloudLink that claims a non-loopback address and serves one unsigned blob."""

    def __init__(self, data: bytes, version: int) -> None:
        self.fingerprint, self.base_url, self.device_id = "", "https://cloud.example.org:8750", ""
        self.blob, self.version = (version, data), version
        self.reports: list[EdgeReport] = []

    def status(self) -> DeploymentStatus:
        return DeploymentStatus(name="cams", fingerprint=self.fingerprint, model="m", version=self.version,
                                generation=1, calibrated=True, frozen=False)  # fmt: skip

    def upload(self, batch: SampleBatch, *, idempotency_key: str) -> UploadAck:
        return UploadAck(accepted=len(batch), pending=0, buffered=0, version=self.version, target_version=self.version)

    def batch_report(self, report: BatchReport, *, idempotency_key: str) -> BatchAck:
        return BatchAck(version=self.version, target_version=self.version, generation=1, calibrated=True,
                        replay_step=False)  # fmt: skip

    def fetch_blob(self, after: int, wait: float = 0.0) -> tuple[int, bytes] | None:
        return self.blob if self.blob[0] > after else None

    def report(self, report: EdgeReport) -> None:
        self.reports.append(report)

    def close(self) -> None:
        pass


@needs_torch
@pytest.mark.parametrize("allow_unsigned", [False, True])
def test_unsigned_blobs_from_a_non_loopback_cloud(exported, allow_unsigned, caplog) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    v0 = blob_from_path(out / "params.safetensors")
    t = {k: v * 1.01 if k.endswith("weight") else v for k, v in v0.tensors.items()}
    link = _RemoteLink(blob_to_bytes(RefitBlob(tensors=t, fingerprint=v0.fingerprint, version=1)), 1)
    link.fingerprint = v0.fingerprint
    keep_all = SelectionConfig(num_classes=10, e0=np.log(10) + 1, e_min=None, d_margin=None)
    caplog.set_level(logging.WARNING, logger="cema_deploy.edge")
    with EdgeRuntime(get_backend("ort-cpu", out), SampleSelector(keep_all), client=link, poll_wait_s=0.1,  # type: ignore[arg-type]
                     allow_unsigned=allow_unsigned) as rt:  # fmt: skip
        assert rt.wait_for_version(1, timeout=20)
        assert rt.uplink is not None and rt.uplink.flush(timeout=20)
        m = rt.metrics()
    if allow_unsigned:
        assert m["version"] == 1 and m["unsigned_applied"] == 1 and m["refused"] == {}
        assert any("UNSIGNED" in rec.getMessage() for rec in caplog.records)
    else:
        # counted, reported once (the version the header announced), never remembered: the floor stays at 0
        assert m["version"] == 0 and m["refused"]["signature"] >= 1 and m["refused_upto"] == 0
        assert [(r.kind, r.version) for r in link.reports] == [("refused", 1)]
        assert "--allow-unsigned" in link.reports[0].reason and "loopback" in link.reports[0].reason


def test_what_counts_as_loopback() -> None:
    assert all(map(is_loopback_url, [None, "http://127.0.0.1:8750", "https://localhost", "http://[::1]:80",
                                     "http://127.3.4.5", "local:cams"]))  # fmt: skip
    assert not any(map(is_loopback_url, ["https://10.0.0.2:8750", "https://cloud.example.org", "http://0.0.0.0"]))


def test_plain_http_to_a_cloud_off_loopback_warns_once_at_start(caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.WARNING, logger="cema_deploy.edge")
    for url in ("http://127.0.0.1:8750", "https://10.1.2.3:8750", "http://localhost:8750"):
        CloudClient(url, "t0k", "ab" * 32).close()
    assert [r for r in caplog.records if "plain http://" in r.getMessage()] == []
    CloudClient("http://10.1.2.3:8750", "t0k", "ab" * 32).close()  # constructing it sends nothing
    said = [r.getMessage() for r in caplog.records if "plain http://" in r.getMessage()]
    assert len(said) == 1 and "http://10.1.2.3:8750" in said[0] and "token" in said[0]
