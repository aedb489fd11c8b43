"""Protocol 2 on the edge, over real HTTP against the protocol fixture server (tests/runtime/conftest.py): a batch
report after every edge batch and after its uploads, calibration batches (start, shift), statistics uploads, a
reset (409, new generation, fresh selector, calibration), sync on batch acknowledgements, an older cloud."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from cema_deploy.contract.blob import RefitBlob, blob_from_path, blob_to_bytes
from cema_deploy.contract.manifest import manifest_from_dir
from cema_deploy.contract.samples import SampleBatch
from cema_deploy.runtime.backends.onnxrt import session_from_onnx
from cema_deploy.runtime.backends.registry import get_backend
from cema_deploy.runtime.edge import EdgeRuntime
from cema_deploy.runtime.frames.preprocess import normalize
from cema_deploy.runtime.link.client import CloudClient
from cema_deploy.runtime.selection.rules import SampleSelector, SelectionConfig, SelectionResult
from cema_deploy.runtime.updates.rollback import RollbackConfig
from tests.conftest import needs_torch
from tests.runtime.conftest import images

pytestmark = [needs_torch, pytest.mark.network]
KEEP_ALL = SelectionConfig(num_classes=10, e0=np.log(10) + 1, e_min=None, d_margin=None)


class _Plan(SampleSelector):
    """A stand-in for the selection rules (the lead's side): the real gate runs, then a scripted plan per batch
    sets ``mask``, ``stats_mask`` and ``shift``, the fields the runtime must honour."""

    def __init__(self, config: SelectionConfig, plan: list[dict[str, Any]] | None = None) -> None:
        super().__init__(config)
        self.plan, self.i = plan or [], 0

    def select(
        self,
        logits: np.ndarray,
        *,
        images: np.ndarray | None = None,
        calibration: bool = False,
        lead: Sequence[float] | None = None,
    ) -> SelectionResult:
        r = super().select(logits, images=images, calibration=calibration, lead=lead)
        p = self.plan[self.i] if self.i < len(self.plan) else {}
        self.i += 1
        n = len(logits)
        mask = np.zeros(n, bool)
        mask[p.get("selected", [])] = True
        stats = None
        if "stats" in p:
            stats = np.zeros(n, bool)
            stats[p["stats"]] = True
        return replace(r, mask=mask, stats_mask=stats, shift=bool(p.get("shift", False)))


def _setup(exported, protocol_server):  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    v0 = blob_from_path(out / "params.safetensors")
    return out, v0, protocol_server(v0.fingerprint)


def _runtime(out, srv, selector, **kw) -> EdgeRuntime:  # type: ignore[no-untyped-def]
    client = CloudClient(srv.url, srv.state.token, manifest_from_dir(out).fingerprint, device_id="cam-1",
                         encoding="raw")  # fmt: skip
    kw = {"poll_wait_s": 0.5, "upload_batch": 4, "flush_interval_s": 60.0, **kw}
    return EdgeRuntime(get_backend("ort-cpu", out), selector, client=client, **kw)


def _scaled(v0: RefitBlob, version: int) -> bytes:
    """A blob as a calibration would publish: every BN's statistics moved."""
    t = {k: (v * (1 + 0.05 * version)).astype(v.dtype) if "running" in k else v for k, v in v0.tensors.items()}
    return blob_to_bytes(RefitBlob(tensors=t, fingerprint=v0.fingerprint, version=version))


def _publish_on_calibration(srv, v0: RefitBlob) -> None:  # type: ignore[no-untyped-def]
    """A cloud that publishes at once after a calibration batch (its ack names that version) and runs no other
    step (other acks name the version serving)."""

    def on_upload(batch: SampleBatch) -> int:
        with srv.state.lock:
            v = srv.state.version
        if batch.kind != "calibration":
            return v
        srv.state.publish(v + 1, _scaled(v0, v + 1))
        return v + 1

    srv.state.on_upload = on_upload


def test_a_batch_report_follows_every_batch_after_its_uploads(exported, protocol_server) -> None:  # type: ignore[no-untyped-def]
    out, _, srv = _setup(exported, protocol_server)
    x = [images(8, seed=i) for i in range(4)]
    plan = [{"selected": [0, 1, 2]}, {}, {"selected": list(range(8))}, {"selected": [0], "stats": [5, 6]}]
    with _runtime(out, srv, _Plan(KEEP_ALL, plan)) as rt:
        assert rt.deployment.read_status(timeout=10) and rt.deployment.generation == 1
        for xi in x:
            rt.process(xi)
        assert rt.uplink is not None and rt.uplink.flush(timeout=20)
        m = rt.metrics()
    posts = [(kind, key) for kind, key, _ in srv.state.posts]
    assert [k for k, _ in posts] == [
        "upload",
        "batch",
        "batch",
        "upload",
        "upload",
        "batch",
        "upload",
        "upload",
        "batch",
    ]
    assert all(key for _, key in posts) and len({key for _, key in posts}) == len(posts)  # one key each
    assert [(r["seen"], r["selected"], r["uploaded"], r["generation"]) for r in srv.state.batch_reports] == [
        (8, 3, 3, 1), (8, 0, 0, 1), (8, 8, 8, 1), (8, 1, 3, 1)
    ]  # fmt: skip
    assert srv.state.kinds() == [("selected", "", 3), ("selected", "", 4), ("selected", "", 4), ("selected", "", 1),
                                 ("statistics", "", 2)]  # fmt: skip
    stats = srv.state.batches[-1]
    assert np.array_equal(stats.images, x[3][[5, 6]]) and stats.generation == 1
    assert m["uploaded"] == {"selected": 12, "calibration": 0, "statistics": 2}
    assert m["uploaded_pct"] == pytest.approx(100 * 14 / 32)
    assert m["uplink"]["reports_sent"] == 4


def test_calibration_at_start_and_its_rerun_in_sync_mode(exported, protocol_server) -> None:  # type: ignore[no-untyped-def]
    out, v0, srv = _setup(exported, protocol_server)
    srv.state.calibrated = False  # a deployment after its start: no statistics yet
    _publish_on_calibration(srv, v0)
    x0, x1 = images(8, seed=1), images(8, seed=2)
    with _runtime(out, srv, _Plan(KEEP_ALL, [{"selected": [1, 3]}, {"selected": [0]}]), sync=True) as rt:
        s0 = rt.process(x0)
        s1 = rt.process(x1)
        m = rt.metrics()
    assert srv.state.status_requests >= 1
    # the whole first batch went up as calibration, with the rule's mask; nothing went up twice
    first, second = srv.state.batches
    assert (first.kind, first.calibration, first.generation) == ("calibration", "start", 1)
    assert np.array_equal(first.images, x0) and first.selected is not None
    assert first.selected.tolist() == [False, True, False, True, False, False, False, False]
    assert (second.kind, len(second)) == ("selected", 1) and np.array_equal(second.images, x1[[0]])
    # sync: the calibration blob serves, and the batch's predictions are those of a re-run on it
    want = session_from_onnx(out / "model.onnx", tensors=blob_from_bytes_tensors(_scaled(v0, 1))).run(
        normalize(x0, manifest_from_dir(out).preprocess)
    )
    assert (s0.calibration, s0.version) == ("start", 1) and np.allclose(s0.logits, want, atol=1e-5)
    assert s0.selection.mask.tolist() == first.selected.tolist()  # judged before calibration
    assert (s1.calibration, s1.version) == ("", 1)
    assert [(r["selected"], r["uploaded"]) for r in srv.state.batch_reports] == [(2, 8), (1, 1)]
    assert m["uploaded"] == {"selected": 1, "calibration": 8, "statistics": 0}
    assert m["calibrations"] == {"start": 1} and m["calibrated"] is True and m["sync_timeouts"] == 0


def test_answers_made_before_the_cloud_applied_a_calibration_do_not_undo_it(exported, protocol_server) -> None:  # type: ignore[no-untyped-def]
    out, v0, srv = _setup(exported, protocol_server)
    srv.state.calibrated = False
    srv.state.calibrate_on_upload = False  # every answer of this cloud says "uncalibrated", even after it
    _publish_on_calibration(srv, v0)
    with _runtime(out, srv, SampleSelector(KEEP_ALL), sync=True) as rt:
        steps = [rt.process(images(8, seed=i)) for i in range(3)]
        m = rt.metrics()
    assert [s.calibration for s in steps] == ["start", "", ""] and m["calibrations"] == {"start": 1}
    assert [b.kind for b in srv.state.batches] == ["calibration", "selected", "selected", "selected", "selected"]


def blob_from_bytes_tensors(data: bytes) -> dict[str, np.ndarray]:
    from cema_deploy.contract.blob import blob_from_bytes

    return dict(blob_from_bytes(data).tensors)


@pytest.mark.parametrize("recalibrate", [True, False])
def test_a_detected_shift_sends_that_batch_as_a_recalibration(exported, protocol_server, recalibrate) -> None:  # type: ignore[no-untyped-def]
    out, v0, srv = _setup(exported, protocol_server)
    _publish_on_calibration(srv, v0)
    plan = [{"selected": [0]}, {"selected": [2], "shift": True}, {"selected": [4]}]
    xs = [images(8, seed=10 + i) for i in range(3)]
    with _runtime(out, srv, _Plan(KEEP_ALL, plan), sync=True, recalibrate=recalibrate) as rt:
        steps = [rt.process(x) for x in xs]
        m = rt.metrics()
    if recalibrate:
        assert srv.state.kinds() == [("selected", "", 1), ("calibration", "shift", 8), ("selected", "", 1)]
        assert np.array_equal(srv.state.batches[1].images, xs[1]) and steps[1].calibration == "shift"
        assert m["calibrations"] == {"shift": 1} and steps[2].version == 1
    else:
        assert srv.state.kinds() == [("selected", "", 1)] * 3 and m["calibrations"] == {}
        assert [s.calibration for s in steps] == ["", "", ""] and steps[2].version == 0


def test_a_reset_drops_stale_uploads_starts_a_fresh_selector_and_calibrates(exported, protocol_server) -> None:  # type: ignore[no-untyped-def]
    out, v0, srv = _setup(exported, protocol_server)
    _publish_on_calibration(srv, v0)
    with _runtime(out, srv, SampleSelector(KEEP_ALL), sync=True, upload_batch=8) as rt:
        rt.process(images(8, seed=1))
        assert rt.selector.counters.seen == 8 and rt.deployment.generation == 1
        srv.state.reset()  # the operator resets the deployment: generation 2, uncalibrated
        rt.process(images(8, seed=2))  # made for generation 1: refused with 409, dropped
        assert rt.deployment.generation == 2 and rt.deployment.calibrated is False
        step = rt.process(images(8, seed=3))  # a fresh selector; the whole batch calibrates generation 2
        m = rt.metrics()
        assert rt.selector.counters.seen == 8 and m["selector_resets"] == 1
    assert m["uplink"]["stale_generation"] == 8 and m["uploaded"]["selected"] == 8
    assert [(b.kind, b.calibration, b.generation) for b in srv.state.batches] == [
        ("selected", "", 1), ("calibration", "start", 2)
    ]  # fmt: skip
    assert step.calibration == "start" and step.version == 1 and m["calibrations"] == {"start": 1}
    assert [r["generation"] for r in srv.state.batch_reports] == [1, 1, 2]


def test_sync_waits_for_the_step_a_batch_report_caused(exported, protocol_server) -> None:  # type: ignore[no-untyped-def]
    # A batch that selected nothing still reports; the cloud may run a replay-only step for it, and the ack's
    # target_version names the blob of that step.
    out, v0, srv = _setup(exported, protocol_server)

    def on_batch(report: dict[str, Any]) -> int:
        with srv.state.lock:
            v = srv.state.version + 1
        srv.state.publish(v, _scaled(v0, v))
        return v

    srv.state.on_batch = on_batch
    with _runtime(out, srv, _Plan(KEEP_ALL), sync=True) as rt:
        assert [rt.process(images(4, seed=i)).version for i in range(3)] == [0, 1, 2]
        assert rt.version == 3 and not srv.state.batches


def test_an_older_cloud_without_the_status_route(exported, protocol_server) -> None:  # type: ignore[no-untyped-def]
    out, _, srv = _setup(exported, protocol_server)
    srv.state.status_failures = [404]  # no status route
    srv.state.generation = 0  # and acknowledgements that name no generation
    srv.state.on_upload = lambda batch: srv.state.version  # no steps: acks name the serving version
    with _runtime(out, srv, SampleSelector(KEEP_ALL), sync=True, sync_timeout_s=5) as rt:
        for i in range(2):
            assert rt.process(images(4, seed=i)).calibration == ""
        m = rt.metrics()
    assert srv.state.status_requests == 1 and m["calibrations"] == {} and m["uploaded"]["selected"] == 8


def test_the_blob_that_answers_a_calibration_is_not_judged(exported, protocol_server) -> None:  # type: ignore[no-untyped-def]
    # A calibration re-initialises the statistics by design; the previous parameters are no reference for it.
    # Here it carries no information at all, after an informative blob: judged, it would be rolled back.
    from tests.runtime.test_edge import _diverse
    from tests.runtime.updates.test_edge_state import _gamma_blob

    out, v0, srv = _setup(exported, protocol_server)

    def on_upload(batch: SampleBatch) -> int:
        with srv.state.lock:
            v = srv.state.version + 1
        srv.state.publish(v, _gamma_blob(v0, v, 0 if batch.kind == "calibration" else 30))
        return v

    srv.state.on_upload = on_upload
    with _runtime(out, srv, SampleSelector(KEEP_ALL), sync=True, upload_batch=16,
                  rollback=RollbackConfig(window=32, min_samples=8)) as rt:  # fmt: skip
        rt.process(_diverse(16, seed=1))
        assert rt.version == 1 and rt.monitor.last is not None and rt.monitor.last.version == 1
        srv.state.reset()
        rt.process(_diverse(16, seed=2))  # 409: generation 2, uncalibrated
        assert rt.process(_diverse(16, seed=3)).calibration == "start"
        assert rt.version == 2 and rt.rollbacks == 0 and rt.monitor.last.version == 1  # accepted unjudged
        rt.process(_diverse(16, seed=4))
        assert rt.version == 3 and rt.monitor.last.version == 3 and rt.rollbacks == 0  # the next one is judged
