"""The refusal floor and the cloud epoch, against hostile and restarted clouds on real HTTP (127.0.0.1).

Whoever answers for the cloud's address can send any bytes with any ``X-Cema-Version`` header; only a blob whose
signature verified may move what the edge remembers (issue 18, finding 1). A cloud restarted on a new state mints a
newer epoch and publishes (epoch, 1): an edge with kept state follows it, and refuses blobs of an older epoch
(finding 4).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from cema_deploy.contract.blob import RefitBlob, blob_from_path, blob_to_bytes
from cema_deploy.runtime.link.client import CloudClient
from cema_deploy.runtime.updates.state import STATE_FILE, EdgeState, EdgeStateStore
from tests.conftest import needs_torch
from tests.runtime.conftest import until
from tests.runtime.test_edge import _last_bn
from tests.runtime.updates.test_edge_state import _rt

signing = pytest.importorskip("cema_deploy.contract.signing")
pytestmark = [needs_torch, pytest.mark.network]

FORGED = 10**15  # the version a forged answer announces
EPOCH_A = 1_764_000_000_000  # milliseconds since the Unix epoch, as the cloud mints them
EPOCH_B = EPOCH_A + 60_000  # the state a restarted cloud creates a minute later


def _signed(v0: RefitBlob, key, version: int, *, epoch: int = 0, scale: float = 30.0) -> bytes:  # type: ignore[no-untyped-def]
    bn = _last_bn(v0.tensors)
    t = dict(v0.tensors)
    t[f"{bn}.weight"] = v0.tensors[f"{bn}.weight"] * np.float32(scale + version)
    epoch_kw = {"epoch": epoch} if epoch else {}  # (so that the epoch-free tests also run on a tree without epochs)
    blob = RefitBlob(tensors=t, fingerprint=v0.fingerprint, version=version, **epoch_kw)
    return blob_to_bytes(signing.sign_blob(blob, key))


@pytest.fixture
def keys(tmp_path: Path):  # type: ignore[no-untyped-def]
    priv, pub = signing.new_key_pair(tmp_path / "keys")
    return signing.load_private_key(priv), signing.BlobVerifier.from_files([pub])


def _edge(out, state: Path, srv, verifier):  # type: ignore[no-untyped-def]
    client = CloudClient(srv.url, srv.state.token, srv.state.fingerprint)
    return _rt(out, state, client=client, verifier=verifier, poll_wait_s=0.3)


def _forge(srv) -> None:  # type: ignore[no-untyped-def]
    srv.state.publish(FORGED, b"not a blob")  # the poll is answered: X-Cema-Version 10**15, a garbage body


def _unforge(srv) -> None:  # type: ignore[no-untyped-def]
    with srv.state.lock:
        srv.state.blobs.pop(FORGED, None)
        srv.state.version = max([0, *srv.state.blobs])


def test_a_forged_answer_is_counted_and_backed_off_then_a_signed_v1_applies(exported, protocol_server, keys,
                                                                            tmp_path) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    out, _ = exported("bn")
    v0 = blob_from_path(out / "params.safetensors")
    key, verifier = keys
    srv = protocol_server(v0.fingerprint)
    _forge(srv)
    with _edge(out, tmp_path / "state", srv, verifier) as rt:
        assert until(lambda: rt.refused["signature"] >= 2, 60)  # answered twice: asked again, after a back-off
        m = rt.metrics()
        assert m["refused_upto"] == 0 and rt.intake.floor == 0 and m["refused_versions"] == []
        assert set(m["refused"]) == {"signature"} and m["version"] == 0
        assert all(after == 0 for after in srv.state.blob_requests)  # the header never moved what it asks for
        _unforge(srv)
        srv.state.publish(1, _signed(v0, key, 1))
        assert until(lambda: rt.version == 1, 60)
    st = json.loads((tmp_path / "state" / STATE_FILE).read_text())
    assert st["serving_version"] == 1 and st["refused_upto"] == 0 and st["refused"] == {}


def test_a_forged_answer_is_not_remembered_across_a_restart(exported, protocol_server, keys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    v0 = blob_from_path(out / "params.safetensors")
    key, verifier = keys
    srv = protocol_server(v0.fingerprint)
    _forge(srv)
    state = tmp_path / "state"
    with _edge(out, state, srv, verifier) as rt:
        assert until(lambda: rt.refused["signature"] >= 1, 60)
    st = json.loads((state / STATE_FILE).read_text())
    assert st["refused_upto"] == 0 and st["refused"] == {}  # --state saved nothing of it
    _unforge(srv)
    srv.state.publish(1, _signed(v0, key, 1))
    with _edge(out, state, srv, verifier) as rt:
        assert until(lambda: rt.version == 1, 60)
        assert rt.metrics()["refused"] == {}


def test_a_state_an_older_release_poisoned_is_healed_on_restore(exported, protocol_server, keys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    v0 = blob_from_path(out / "params.safetensors")
    key, verifier = keys
    srv = protocol_server(v0.fingerprint)
    srv.state.publish(1, _signed(v0, key, 1))
    state = tmp_path / "state"
    # what the base release saved after one forged answer: the header's version as a refused "signature" version
    EdgeStateStore(state).save(
        EdgeState(fingerprint=v0.fingerprint, refused_upto=FORGED, refused={str(FORGED): "signature"}), None
    )
    with _edge(out, state, srv, verifier) as rt:
        assert rt.refused_upto == 0
        assert until(lambda: rt.version == 1, 60)


def test_an_edge_with_kept_state_follows_a_new_cloud_epoch_and_refuses_an_older_one(
    exported, protocol_server, keys, tmp_path, caplog
) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    v0 = blob_from_path(out / "params.safetensors")
    key, verifier = keys
    state = tmp_path / "state"
    old_cloud = protocol_server(v0.fingerprint)
    old_cloud.state.publish(5, _signed(v0, key, 5, epoch=EPOCH_A))
    with _edge(out, state, old_cloud, verifier) as rt:
        assert until(lambda: rt.version == 5, 60) and rt.epoch == EPOCH_A
    old_cloud.stop()
    # the cloud restarted on an empty state: a new epoch, versions from 1 again (below the edge's v5)
    new_cloud = protocol_server(v0.fingerprint)
    new_cloud.state.publish(1, _signed(v0, key, 1, epoch=EPOCH_B))
    caplog.set_level(logging.INFO, logger="cema_deploy.edge")
    caplog.clear()
    with _edge(out, state, new_cloud, verifier) as rt:
        # restored as v5 of epoch A (the poller may already have followed the new epoch: it starts with the edge)
        restored = [r.getMessage() for r in caplog.records if r.getMessage().startswith("restored from")]
        assert rt.restored_version == 5 and len(restored) == 1 and f"serving v5 (epoch {EPOCH_A})" in restored[0]
        assert until(lambda: rt.version == 1, 60)
        assert rt.epoch == EPOCH_B and rt.backend.stamp == (EPOCH_B, 1)
        # a signed blob of an older cloud state (a replay, or a cloud restored from an old backup): refused
        new_cloud.state.publish(9, _signed(v0, key, 9, epoch=EPOCH_A - 1))
        assert until(lambda: rt.refused["stale epoch"] >= 1, 60)
        assert rt.version == 1 and rt.refused_upto == 0  # not remembered: the epoch's own line is untouched
        with new_cloud.state.lock:
            del new_cloud.state.blobs[9]
        new_cloud.state.publish(2, _signed(v0, key, 2, epoch=EPOCH_B))
        assert until(lambda: rt.version == 2, 60)
        m = rt.metrics()
    assert m["epoch"] == EPOCH_B and m["rebaselines"] == 1
    said = [r.getMessage() for r in caplog.records if "re-baselined" in r.getMessage()]
    assert len(said) == 1 and f"cloud epoch {EPOCH_A} -> {EPOCH_B}" in said[0]  # one line says so
    st = json.loads((state / STATE_FILE).read_text())
    assert (st["epoch"], st["serving_epoch"], st["serving_version"]) == (EPOCH_B, EPOCH_B, 2)
    assert sorted(p.name for p in state.glob("serving-*")) == [f"serving-e{EPOCH_B}-v00000002.safetensors"]
    with _edge(out, state, new_cloud, verifier) as rt:  # and once more from the state: (B, 2) serves at once
        assert rt.backend.stamp == (EPOCH_B, 2) and rt.epoch == EPOCH_B
