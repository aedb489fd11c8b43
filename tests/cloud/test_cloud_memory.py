"""Cloud memory bounded by configuration (issue 18, item 5), over HTTP on 127.0.0.1: the pending cap and the decode
budget are checked from an upload's header before anything is decoded, JSON bodies are refused while they stream
in, and no frame stays in RAM once its upload is acknowledged (the frames are read back from disk)."""

from __future__ import annotations

import json
import socket
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest

from cema_deploy.contract.protocol import PROTOCOL_HEADER, PROTOCOL_VERSION
from tests.cloud.conftest import images, make_deployment, serve_deployments
from tests.conftest import needs_torch

pytestmark = [needs_torch, pytest.mark.network]


def _headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", PROTOCOL_HEADER: str(PROTOCOL_VERSION)}


def _png_body(manifest: Any, n: int, seed: int = 0, *, garbage: bool = False) -> bytes:
    """A PNG upload of n images; with ``garbage`` the images' bytes are not PNG (only the header is valid)."""
    from cema_deploy.contract.safetensors_io import tensors_from_bytes, tensors_to_bytes
    from cema_deploy.contract.samples import SampleBatch, samples_to_bytes

    body = samples_to_bytes(
        SampleBatch(images=images(n, seed), fingerprint=manifest.fingerprint, edge_version=0), encoding="png"
    )
    if not garbage:
        return body
    tensors, meta = tensors_from_bytes(body)
    tensors["encoded"] = np.full_like(tensors["encoded"], 7)
    return tensors_to_bytes(tensors, meta)


def test_an_upload_over_the_decode_budget_is_refused_from_its_header(exported, teacher_ckpt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import httpx

    from cema_deploy.cloud.store.state import StateStore
    from cema_deploy.contract.protocol import samples_url

    edge, _ = exported("bn")
    state = tmp_path / "state"
    token = StateStore(state).add_token("cam-1")
    # 64x64 images are 12,288 bytes: a budget of 1 MiB holds 85 of them
    dep = make_deployment(edge, teacher_ckpt, state, batch_size=8, spec={"decode_budget_mb": 1})
    with serve_deployments([dep], state, start=False) as cloud, httpx.Client(timeout=60) as http:
        url = samples_url(cloud.url, dep.fingerprint)
        r = http.post(url, content=_png_body(dep.manifest, 100, garbage=True), headers=_headers(token))
        assert r.status_code == 413 and "decode budget" in r.json()["detail"]  # its images were never decoded
        assert http.post(url, content=_png_body(dep.manifest, 80), headers=_headers(token)).status_code == 202
        assert dep.samples.adapt_total == 80


def test_the_pending_cap_is_checked_from_the_header_before_decoding(exported, teacher_ckpt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import httpx

    from cema_deploy.cloud.store.state import StateStore
    from cema_deploy.contract.protocol import samples_url

    edge, _ = exported("bn")
    state = tmp_path / "state"
    token = StateStore(state).add_token("cam-1")
    dep = make_deployment(edge, teacher_ckpt, state, batch_size=8, spec={"pending_cap": 16})
    with serve_deployments([dep], state, start=False) as cloud, httpx.Client(timeout=60) as http:
        url = samples_url(cloud.url, dep.fingerprint)
        assert http.post(url, content=_png_body(dep.manifest, 16), headers=_headers(token)).status_code == 202
        # the cap is full (the worker is not started): an upload whose images are not even decodable is refused
        # by its header's count alone (before: decoded first, and answered 400)
        r = http.post(url, content=_png_body(dep.manifest, 8, garbage=True), headers=_headers(token))
        assert r.status_code == 429 and "pending samples" in r.json()["detail"]
        assert dep.samples.adapt_total == 16 and dep.counters["uploads"] == 1


def test_a_json_body_is_refused_while_it_streams_in(exported, teacher_ckpt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cema_deploy.cloud.store.state import StateStore
    from cema_deploy.contract.protocol import reports_url

    edge, _ = exported("bn")
    state = tmp_path / "state"
    token = StateStore(state).add_token("cam-1")
    dep = make_deployment(edge, teacher_ckpt, state)
    with serve_deployments([dep], state, start=False) as cloud:
        where = urlsplit(reports_url(cloud.url, dep.fingerprint))
        head = (
            f"POST {where.path} HTTP/1.1\r\nHost: {where.netloc}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {token}\r\n{PROTOCOL_HEADER}: {PROTOCOL_VERSION}\r\n"
            "Content-Length: 100000000\r\n\r\n"
        )
        with socket.create_connection((where.hostname, where.port), timeout=30) as sock:
            sock.sendall(head.encode() + b'{"kind": "rollback", ')  # 100 MB announced, a few bytes sent
            answer = sock.recv(65536).decode(errors="replace")  # before: waited for the whole body (timeout)
            while answer.endswith("\r\n\r\n"):  # the head came alone: its body follows
                answer += sock.recv(65536).decode(errors="replace")
        status, _, rest = answer.partition("\r\n")
        from cema_deploy.contract.protocol import MAX_JSON_BYTES

        assert " 413 " in status and f"exceeds the limit of {MAX_JSON_BYTES} bytes" in rest
        assert dep.counters["report:rollback"] == 0


def test_no_frame_stays_in_memory_once_acknowledged(exported, teacher_ckpt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.cloud.conftest import batch

    edge, _ = exported("bn")
    dep = make_deployment(edge, teacher_ckpt, tmp_path / "s", batch_size=8)
    sent = [batch(dep.manifest, 8, seed=i) for i in range(3)]
    for b in sent:
        dep.upload(b)
    assert all(u.frames is None for u in dep.samples.uploads.values())  # before: every frame in RAM
    assert np.array_equal(dep.samples.read_adapt(0, 24), np.concatenate([b.images for b in sent]))
    dep.start()
    try:
        assert dep.wait_idle(60) and dep.version == 3
        assert all(u.frames is None for u in dep.samples.uploads.values())
        drawn = dep.samples.sample(16, np.random.default_rng(0), end=24)
        pool = {img.tobytes() for b in sent for img in b.images}
        assert drawn.shape == (16, 64, 64, 3) and all(img.tobytes() in pool for img in drawn)
    finally:
        dep.stop()
    assert json.loads((tmp_path / "s" / "deployments" / "test_resnet" / "state.json").read_text())["version"] == 3
