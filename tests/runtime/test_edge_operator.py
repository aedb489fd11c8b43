"""The operator's view of the edge runtime over real HTTP on 127.0.0.1 (the protocol fixture server): a refused
token holds the uploads instead of dropping them, an unreachable cloud is said once and its return too, a reset's
blob is a new start rather than a refit to roll back, and a pinned edge applies nothing newer (issue 19)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from cema_deploy.contract.blob import RefitBlob, blob_from_path, blob_to_bytes
from cema_deploy.contract.manifest import manifest_from_dir
from cema_deploy.runtime.backends.registry import get_backend
from cema_deploy.runtime.edge import EdgeRuntime
from cema_deploy.runtime.link.client import CloudClient
from cema_deploy.runtime.metrics import prometheus_text
from cema_deploy.runtime.selection.rules import SampleSelector, SelectionConfig
from cema_deploy.runtime.updates.rollback import RollbackConfig
from tests.conftest import needs_torch
from tests.runtime.conftest import images, until

pytestmark = [needs_torch, pytest.mark.network]
KEEP_ALL = SelectionConfig(num_classes=10, e0=np.log(10) + 1, e_min=None, d_margin=None)


def _runtime(out, url, token, **kw) -> EdgeRuntime:  # type: ignore[no-untyped-def]
    client = CloudClient(url, token, manifest_from_dir(out).fingerprint, device_id="cam-1", encoding="raw",
                         connect_timeout_s=0.5)  # fmt: skip
    kw = {"poll_wait_s": 0.5, "upload_batch": 4, "flush_interval_s": 0.0, "backoff_base_s": 0.02,
          "backoff_cap_s": 0.1, **kw}  # fmt: skip
    return EdgeRuntime(get_backend("ort-cpu", out), SampleSelector(KEEP_ALL), client=client, **kw)


def _blob(v0: RefitBlob, version: int, *, flat: bool = False) -> bytes:
    """An informative blob (every norm's scale x10: the tiny random model's outputs then depend on the input,
    mutual information 0.69 nats on random frames, against ~0 for the export's own), or a ``flat`` one: every
    norm's affine parameters zero, so every input gets the same logits (no information at all)."""
    t = {}
    for k, v in v0.tensors.items():
        affine = k.endswith((".weight", ".bias")) and "running" not in k
        if flat and affine:
            t[k] = np.zeros_like(v)
        elif k.endswith(".weight") and "running" not in k:
            t[k] = (v * 10).astype(v.dtype)
        else:
            t[k] = (v * (1 + 0.01 * version)).astype(v.dtype) if "running_var" in k else v
    return blob_to_bytes(RefitBlob(tensors=t, fingerprint=v0.fingerprint, version=version))


def test_a_revoked_token_holds_the_uploads_says_what_to_do_and_counts_it(exported, protocol_server, tmp_path, caplog):  # type: ignore[no-untyped-def]
    """401 from the cloud is not a loss: the samples stay spooled, nothing is counted as rejected, /metrics and
    the metrics say the cloud refuses this device; a valid token later delivers them all."""
    out, _ = exported("bn")
    fp = manifest_from_dir(out).fingerprint
    srv = protocol_server(fp)
    caplog.set_level(logging.WARNING, logger="cema_deploy.edge")
    with _runtime(out, srv.url, "t0k", state_dir=tmp_path / "state") as rt:
        rt.process(images(8, 0))
        assert until(lambda: rt.metrics()["uplink"]["uploaded"] == 8)
        srv.state.token = "rotated"  # the operator revoked cam-1's token
        rt.process(images(8, 1))
        assert until(lambda: rt.cloud_refusal() is not None)
        rt.process(images(8, 2))
        assert not rt.uplink.flush(timeout=1.0)  # nothing goes while refused; flush says so at once
        m = rt.metrics()
        assert m["cloud_refusal"]["status"] == 401 and m["cloud_refusal"]["samples_held"] == 16
        assert m["uplink"]["rejected"] == 0 and m["uplink"]["dropped_spool"] == 0
        assert m["uplink"]["refusals"] >= 1
        text = prometheus_text(m)
        assert 'cema_edge_cloud_refused{status="401"} 1' in text
    said = [r.getMessage() for r in caplog.records if "refuses this device" in r.getMessage()]
    assert len(said) == 1 and "cloud token add" in said[0] and "nothing is dropped" in said[0]
    assert len(srv.state.uploaded_images()) == 8
    # the spool kept them: a restart with a valid token delivers every held sample
    srv.state.token = "rotated"
    with _runtime(out, srv.url, "rotated", state_dir=tmp_path / "state") as rt:
        assert rt.uplink.flush(timeout=20)
        assert rt.metrics()["uplink"]["uploaded"] == 16
    assert np.array_equal(srv.state.uploaded_images()[8:], np.concatenate([images(8, 1), images(8, 2)]))


def test_an_unreachable_cloud_is_said_once_and_its_return_with_the_backlog(exported, protocol_server, caplog):  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    srv = protocol_server(manifest_from_dir(out).fingerprint)
    srv.stop()
    caplog.set_level(logging.WARNING, logger="cema_deploy.edge")
    with _runtime(out, srv.url, "t0k") as rt:
        rt.process(images(8, 0))
        assert until(lambda: rt.metrics()["cloud_up"] is False)
        rt.process(images(8, 1))
        assert until(lambda: rt.uplink.counters.retries >= 3)
        m = rt.metrics()
        assert m["cloud_outages"] == 1 and "cema_edge_cloud_up 0" in prometheus_text(m)
        srv.start()
        assert rt.uplink.flush(timeout=20)
        assert rt.metrics()["cloud_up"] is True and "cema_edge_cloud_up 1" in prometheus_text(rt.metrics())
    lines = [r.getMessage() for r in caplog.records]
    down = [x for x in lines if "is unreachable" in x]
    back = [x for x in lines if "answers again" in x]
    assert len(down) == 1 and len(back) == 1
    assert "samples wait to be uploaded" in back[0]


def test_the_blob_of_a_reset_is_a_new_start_not_a_refit_to_roll_back(exported, protocol_server) -> None:  # type: ignore[no-untyped-def]
    """Issue 19 (7): after `cloud reset` the edge judged the reset's blob against the previous generation's
    parameters, rolled it back and kept serving the old generation. A blob that arrives once the deployment's
    generation rose is accepted unjudged; within one generation the same blob is rolled back."""
    out, _ = exported("bn")
    v0 = blob_from_path(out / "params.safetensors")
    srv = protocol_server(v0.fingerprint)
    with _runtime(out, srv.url, "t0k", rollback=RollbackConfig(window=16, min_samples=8)) as rt:
        srv.state.publish(1, _blob(v0, 1))
        assert rt.wait_for_version(1, timeout=20) and rt.version == 1
        rt.process(images(16, 0))
        assert rt.monitor.wait_judged(20) and rt.rollbacks == 0
        # within the same generation a flat blob is rolled back (the rule works)
        srv.state.publish(2, _blob(v0, 2, flat=True))
        assert rt.wait_for_version(2, timeout=20)
        rt.process(images(16, 1))
        assert until(lambda: rt.rollbacks == 1) and rt.version == 1
        # the operator resets: generation 2; the cloud publishes the reset's parameters as v3 at once
        with srv.state.lock:
            srv.state.generation += 1  # calibrated stays True: no calibration batch opens an exemption here
        srv.state.publish(3, _blob(v0, 3, flat=True))
        assert until(lambda: rt.version == 3 or 3 in rt.metrics()["rolled_back"])
        rt.process(images(16, 2))
        assert rt.monitor.wait_judged(20)
        m = rt.metrics()
        assert rt.version == 3 and m["rollbacks"] == 1 and m["unjudged_refits"] == 1 and m["generation"] == 2


def test_a_pinned_edge_applies_nothing_newer_until_unpinned(exported, protocol_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    v0 = blob_from_path(out / "params.safetensors")
    srv = protocol_server(v0.fingerprint)
    srv.state.publish(1, _blob(v0, 1))
    state = tmp_path / "state"
    with _runtime(out, srv.url, "t0k", state_dir=state, pin_version=1) as rt:
        assert rt.wait_for_version(1, timeout=20)
        srv.state.publish(2, _blob(v0, 2))
        assert until(lambda: rt.intake.held_by_pin == 2)
        rt.process(images(8, 0))
        assert rt.version == 1 and rt.metrics()["held_by_pin"] == 2
    with _runtime(out, srv.url, "t0k", state_dir=state, pin_version=1) as rt:  # a restart stays pinned
        assert rt.restored_version == 1
        assert until(lambda: rt.intake.held_by_pin == 2) and rt.version == 1
    with _runtime(out, srv.url, "t0k", state_dir=state) as rt:  # unpinned: takes the newest
        assert rt.wait_for_version(2, timeout=20) and rt.version == 2
