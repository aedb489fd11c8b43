"""CloudClient and Uplink against the protocol fixture server on 127.0.0.1 (no model, no torch)."""

from __future__ import annotations

import socket
import time
from typing import Any

import numpy as np
import pytest

from cema_deploy.contract import protocol
from cema_deploy.contract.messages import BatchReport, EdgeReport, UploadAck
from cema_deploy.contract.samples import SampleBatch, samples_from_bytes, samples_to_bytes
from cema_deploy.exceptions import CemaError, UplinkError
from cema_deploy.runtime.link.client import CloudClient, EdgeConfigError, StaleGenerationError
from cema_deploy.runtime.link.uplink import Uplink, UplinkListener
from tests.runtime.conftest import images, until

pytestmark = pytest.mark.network

FP = "ab" * 32


def _images(n: int, seed: int = 0) -> np.ndarray:
    return images(n, seed, size=8)


def _until(pred, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    return until(pred, timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_client_upload_fetch_report(protocol_server) -> None:  # type: ignore[no-untyped-def]
    srv = protocol_server(FP)
    x = _images(3)
    with CloudClient(srv.url, "t0k", FP, device_id="cam-7", encoding="raw") as client:
        ack = client.upload(
            SampleBatch(images=x, fingerprint=FP, edge_version=0, device_id="cam-7"), idempotency_key="k"
        )
        assert ack == UploadAck(accepted=3, pending=0, buffered=3, version=0, target_version=1, generation=1)
        assert np.array_equal(srv.state.batches[0].images, x) and srv.state.batches[0].device_id == "cam-7"
        assert client.fetch_blob(after=0, wait=0.0) is None  # 204
        srv.state.publish(4, b"raw blob bytes, not parsed by the client")
        assert client.fetch_blob(after=0, wait=1.0) == (4, b"raw blob bytes, not parsed by the client")
        assert client.fetch_blob(after=4, wait=0.1) is None
        assert srv.state.blob_requests == [0, 0, 4]
        client.report(EdgeReport(kind="rollback", version=4, reason="entropy rose"))
        assert srv.state.reports == [{"kind": "rollback", "version": 4, "reason": "entropy rose"}]


def test_client_errors_say_what_failed_and_whether_to_retry(protocol_server) -> None:  # type: ignore[no-untyped-def]
    srv = protocol_server(FP)
    batch = SampleBatch(images=_images(1), fingerprint=FP, edge_version=0)
    with CloudClient(srv.url, "wrong", FP) as bad_token:
        with pytest.raises(UplinkError, match=r"refused POST .*\(401\): Unknown device token") as e:
            bad_token.upload(batch, idempotency_key="k")
        assert not e.value.retryable and e.value.status == 401
    with CloudClient(srv.url, "t0k", "cd" * 32) as other_model, pytest.raises(UplinkError, match="404") as e:
        other_model.fetch_blob(after=0)
    assert not e.value.retryable
    with CloudClient(srv.url, "t0k", FP) as client:
        srv.state.upload_failures = [503, 429, 413]
        for status, retryable in ((503, True), (429, True), (413, False)):
            with pytest.raises(UplinkError, match=f"injected failure {status}") as e:
                client.upload(batch, idempotency_key="k")
            assert e.value.retryable is retryable and e.value.status == status
    with CloudClient(f"http://127.0.0.1:{_free_port()}", "t0k", FP, connect_timeout_s=1.0) as down:
        with pytest.raises(UplinkError, match="Cannot reach the cloud") as e:
            down.fetch_blob(after=0)
        assert e.value.retryable and e.value.status is None
    with pytest.raises(UplinkError, match="must start with http"):
        CloudClient("127.0.0.1:8750", "t0k", FP)


def test_uplink_batches_and_the_bytes_on_the_wire_are_the_images(protocol_server) -> None:  # type: ignore[no-untyped-def]
    srv = protocol_server(FP)
    x = _images(70, seed=1)
    ent = np.linspace(0.1, 2.0, 70)
    with CloudClient(srv.url, "t0k", FP) as client:
        up = Uplink(client, fingerprint=FP, device_id="cam", upload_batch=32, flush_interval_s=60)
        try:
            up.put(x[:40], ent[:40], version=3)
            up.put(x[40:], ent[40:], version=3)
            assert _until(lambda: up.counters.uploaded == 64)  # two full batches go without a flush
            assert up.queued_now == 6  # the rest waits for the flush interval (60 s) or a flush
            assert up.flush(timeout=10)
            c = up.counters
        finally:
            up.close()
    assert [len(b) for b in srv.state.batches] == [32, 32, 6]
    assert (c.queued, c.uploaded, c.dropped_queue, c.upload_errors, c.retries) == (70, 70, 0, 0, 0)
    assert c.bytes_sent == sum(len(b) for b in srv.state.uploads)
    decoded = [samples_from_bytes(body) for body in srv.state.uploads]  # what really went over the socket
    assert np.array_equal(np.concatenate([d.images for d in decoded]), x)
    assert np.allclose(np.concatenate([d.entropy for d in decoded]), ent.astype(np.float32))  # type: ignore[misc]
    assert {(d.edge_version, d.device_id, d.fingerprint) for d in decoded} == {(3, "cam", FP)}
    assert isinstance(up.last_ack, UploadAck) and up.last_ack.buffered == 70


def test_flush_interval_and_one_version_per_upload(protocol_server) -> None:  # type: ignore[no-untyped-def]
    srv = protocol_server(FP)
    with CloudClient(srv.url, "t0k", FP) as client:
        up = Uplink(client, fingerprint=FP, upload_batch=32, flush_interval_s=0.2)
        try:
            up.put(_images(2), np.zeros(2), version=1)
            up.put(_images(3), np.zeros(3), version=2)
            assert _until(lambda: up.counters.uploaded == 5)  # no flush: the interval sends them
        finally:
            up.close()
    assert [(len(b), b.edge_version) for b in srv.state.batches] == [(2, 1), (3, 2)]


def test_put_never_blocks_and_the_queue_is_bounded(protocol_server) -> None:  # type: ignore[no-untyped-def]
    srv = protocol_server(FP)
    srv.state.upload_delay_s = 1.0  # a slow cloud
    x = _images(200, seed=2)
    with CloudClient(srv.url, "t0k", FP) as client:
        up = Uplink(client, fingerprint=FP, upload_batch=8, max_queue_samples=20, flush_interval_s=0)
        try:
            up.put(x[:4], np.zeros(4))
            assert _until(lambda: not up._q)  # the worker took them: that upload now takes 1 s
            t0 = time.perf_counter()
            for i in range(4, 200, 4):
                up.put(x[i : i + 4], np.zeros(4))
            assert time.perf_counter() - t0 < 0.5  # 49 puts while one upload takes 1 s
            assert up.queued_now == 20 + 4  # queue cap + the batch in flight
            srv.state.upload_delay_s = 0.0
            assert up.flush(timeout=10)
            c = up.counters
        finally:
            up.close()
    assert c.queued == 200 and c.uploaded + c.dropped_queue == 200 and c.dropped_queue == 200 - 24
    got = srv.state.uploaded_images()
    assert np.array_equal(got[-20:], x[-20:])  # drop-OLDEST: the newest samples survive


def test_byte_cap_drops_oldest(protocol_server) -> None:  # type: ignore[no-untyped-def]
    srv = protocol_server(FP)
    srv.stop()  # nothing gets through while we fill the queue
    with CloudClient(srv.url, "t0k", FP, connect_timeout_s=0.5) as client:
        up = Uplink(client, fingerprint=FP, upload_batch=100, flush_interval_s=60,
                    max_queue_bytes=5 * 8 * 8 * 3)  # fmt: skip
        try:
            up.put(_images(12), np.zeros(12))
            assert up.queued_now == 5 and up.counters.dropped_queue == 7
        finally:
            up.close()


def test_4xx_is_not_retried_and_5xx_is_with_backoff(protocol_server) -> None:  # type: ignore[no-untyped-def]
    srv = protocol_server(FP)
    with CloudClient(srv.url, "t0k", FP) as client:
        up = Uplink(client, fingerprint=FP, upload_batch=4, flush_interval_s=0,
                    backoff_base_s=0.02, backoff_cap_s=0.05)  # fmt: skip
        try:
            srv.state.upload_failures = [413]
            up.put(_images(4), np.zeros(4))
            assert up.flush(timeout=10)
            c = up.counters
            assert (c.uploaded, c.rejected, c.upload_errors, c.retries) == (0, 4, 1, 0)
            srv.state.upload_failures = [503, 502, 500]
            up.put(_images(4), np.zeros(4))
            assert up.flush(timeout=10)
            c = up.counters
            assert (c.uploaded, c.rejected, c.upload_errors, c.retries) == (4, 4, 4, 3)
        finally:
            up.close()
    assert len(srv.state.batches) == 1


def test_outage_then_uploads_resume(protocol_server) -> None:  # type: ignore[no-untyped-def]
    srv = protocol_server(FP)
    srv.stop()
    with CloudClient(srv.url, "t0k", FP, connect_timeout_s=0.5) as client:
        up = Uplink(client, fingerprint=FP, upload_batch=4, flush_interval_s=0,
                    backoff_base_s=0.05, backoff_cap_s=0.2)  # fmt: skip
        try:
            up.put(_images(6), np.zeros(6))
            assert not up.flush(timeout=0.5)  # the cloud is down: flush gives up, samples stay queued
            assert up.counters.retries >= 1 and up.counters.uploaded == 0 and up.queued_now == 6
            srv.start()
            assert up.flush(timeout=10)
            assert up.counters.uploaded == 6
        finally:
            up.close()
        assert not up._thread.is_alive()
    assert np.array_equal(srv.state.uploaded_images(), _images(6))


def test_backoff_is_jittered_exponential_and_capped() -> None:
    class _NoClient:
        device_id = ""

        def upload(self, batch: SampleBatch, *, idempotency_key: str) -> UploadAck:
            raise AssertionError("not called")

    up = Uplink(_NoClient(), fingerprint=FP, seed=0)  # type: ignore[arg-type]
    try:
        for attempt in range(12):
            full = min(30.0, 0.5 * 2**attempt)
            d = [up.backoff_delay(attempt) for _ in range(50)]
            assert all(0.5 * full <= v <= full for v in d)
            assert max(d) - min(d) > 0.1 * full  # jitter, not a constant
        assert up.backoff_delay(10**6) <= 30.0
    finally:
        up.close()


def test_bad_options_are_cema_errors() -> None:
    with pytest.raises(EdgeConfigError, match="encoding 'gif'"):
        CloudClient("http://127.0.0.1:1", "t0k", FP, encoding="gif")
    with pytest.raises(CemaError, match="upload_batch"):
        Uplink(None, fingerprint=FP, upload_batch=0)  # type: ignore[arg-type]


def test_a_malformed_ack_is_an_uplink_error(protocol_server) -> None:  # type: ignore[no-untyped-def]
    srv = protocol_server(FP)
    srv.state.on_upload = lambda batch: "not a version"  # type: ignore[assignment,return-value]
    with (
        CloudClient(srv.url, "t0k", FP) as client,
        pytest.raises(UplinkError, match="does not follow the protocol") as e,
    ):
        client.upload(SampleBatch(images=_images(1), fingerprint=FP, edge_version=0), idempotency_key="k")
    assert not e.value.retryable


def test_long_poll_wait_is_capped_at_the_protocol_limit(protocol_server) -> None:  # type: ignore[no-untyped-def]
    srv = protocol_server(FP)
    srv.state.publish(1, b"x")
    with CloudClient(srv.url, "t0k", FP) as client:
        assert client.fetch_blob(after=0, wait=1e6) == (1, b"x")
        assert client.fetch_blob(after=0, wait=-5) == (1, b"x")
    assert srv.state.blob_waits == [protocol.MAX_WAIT_S, 0.0]


@pytest.mark.parametrize(("header", "said"), [(None, "1 \\(it sent no X-Cema-Protocol header\\)"), ("2", "'2'")])
def test_a_cloud_of_another_protocol_version_is_refused_naming_both(protocol_server, header, said) -> None:  # type: ignore[no-untyped-def]
    srv = protocol_server(FP)
    srv.state.protocol_header = header
    with CloudClient(srv.url, "t0k", FP) as client:
        with pytest.raises(
            UplinkError, match=rf"The cloud at {srv.url} speaks cema protocol {said}; this side speaks protocol 3"
        ) as e:
            client.fetch_blob(after=0)
        assert not e.value.retryable
        with pytest.raises(UplinkError, match="speaks cema protocol"):
            client.upload(SampleBatch(images=_images(1), fingerprint=FP, edge_version=0), idempotency_key="k")


def test_requests_carry_the_protocol_version_and_one_idempotency_key_per_upload(protocol_server) -> None:  # type: ignore[no-untyped-def]
    srv = protocol_server(FP)
    seen: list[tuple[str | None, str | None]] = []
    srv.state.on_request = lambda h: seen.append((h.get(protocol.PROTOCOL_HEADER), h.get(protocol.IDEMPOTENCY_HEADER)))
    with CloudClient(srv.url, "t0k", FP) as client:
        srv.state.upload_failures = [503]
        up = Uplink(client, fingerprint=FP, upload_batch=2, flush_interval_s=0, backoff_base_s=0.01, backoff_cap_s=0.02)
        try:
            up.put(_images(2), np.zeros(2), version=0)
            assert up.flush(timeout=20)
        finally:
            up.close()
    uploads = [s for s in seen if s[1] is not None]
    assert len(uploads) == 2 and uploads[0] == uploads[1]  # the failed attempt and its retry: one key
    assert all(p == str(protocol.PROTOCOL_VERSION) for p, _ in seen)
    assert len(srv.state.batches) == 1


def test_429_waits_retry_after_and_retries_with_the_same_key(protocol_server) -> None:  # type: ignore[no-untyped-def]
    srv = protocol_server(FP)
    srv.state.upload_failures = [(429, {protocol.RETRY_AFTER_HEADER: "0.4"})]
    srv.state.batch_failures = [(429, {protocol.RETRY_AFTER_HEADER: "0.4"})]
    with CloudClient(srv.url, "t0k", FP) as client:
        up = Uplink(client, fingerprint=FP, upload_batch=2, flush_interval_s=0, backoff_base_s=0.01, backoff_cap_s=0.02)
        try:
            up.put(_images(2), np.zeros(2))
            up.put_report(BatchReport(seen=2, selected=2, uploaded=2, generation=1))
            assert up.flush(timeout=20)
            c = up.counters
        finally:
            up.close()
    (k1, key1, t1), (k2, key2, t2), (k3, key3, t3), (k4, key4, t4) = srv.state.posts
    assert (k1, k2, k3, k4) == ("upload", "upload", "batch", "batch")
    assert key1 == key2 and key3 == key4 and key1 != key3  # each retried with its own key
    assert t2 - t1 >= 0.4 and t4 - t3 >= 0.4  # the back-off alone is <= 0.02 s: Retry-After was honoured
    assert (c.uploaded, c.retries, c.reports_sent, c.rejected) == (2, 2, 1, 0)
    assert len(srv.state.batches) == 1 and len(srv.state.batch_reports) == 1


def test_a_lost_acknowledgement_is_retried_with_the_same_key_and_stored_once(protocol_server) -> None:  # type: ignore[no-untyped-def]
    srv = protocol_server(FP)
    srv.state.upload_failures = ["lost_ack"]  # stored, then 503: the edge cannot know it arrived
    with CloudClient(srv.url, "t0k", FP) as client:
        up = Uplink(client, fingerprint=FP, upload_batch=3, flush_interval_s=0, backoff_base_s=0.01, backoff_cap_s=0.02)
        try:
            up.put(_images(3), np.zeros(3))
            assert up.flush(timeout=20)
            c = up.counters
        finally:
            up.close()
    assert len(srv.state.batches) == 1 and srv.state.duplicates == 1  # the retry was recognised by its key
    assert c.uploaded == 3 and c.retries == 1 and up.last_ack is not None and up.last_ack.duplicate


def test_409_drops_the_upload_and_tells_the_listener(protocol_server) -> None:  # type: ignore[no-untyped-def]
    srv = protocol_server(FP)
    seen: list[Any] = []

    class Listener(UplinkListener):
        def on_stale_generation(self, exc: StaleGenerationError) -> None:
            seen.append(exc.current)

        def on_dropped(self, kind: str, calibration: str) -> None:
            seen.append((kind, calibration))

    srv.state.reset()  # generation 2: uploads made for generation 1 are stale
    with CloudClient(srv.url, "t0k", FP) as client:
        up = Uplink(client, fingerprint=FP, upload_batch=4, flush_interval_s=0, listener=Listener())
        try:
            up.put(_images(4), np.zeros(4), generation=1)
            up.put_calibration(_images(4), np.zeros(4), np.zeros(4, bool), version=0, generation=1, reason="start")
            up.put(_images(2), np.zeros(2), generation=2)
            assert up.flush(timeout=20)
            c = up.counters
        finally:
            up.close()
    assert (c.stale_generation, c.uploaded, c.rejected) == (8, 2, 0)
    assert seen[0] == ("selected", "") and seen[1].generation == 2 and seen[1].calibrated is False
    assert seen[2] == ("calibration", "start")
    assert [b.generation for b in srv.state.batches] == [2]


def test_the_spool_keeps_uploads_and_reports_across_a_restart(protocol_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    srv = protocol_server(FP)
    srv.stop()  # an outage longer than the memory queue would hold (max_queue_samples=4)
    x = _images(12, seed=3)
    with CloudClient(srv.url, "t0k", FP, connect_timeout_s=0.5) as client:
        up = Uplink(client, fingerprint=FP, upload_batch=4, flush_interval_s=0, max_queue_samples=4,
                    backoff_base_s=0.05, backoff_cap_s=0.1, spool_dir=tmp_path / "spool")  # fmt: skip
        up.put(x[:6], np.arange(6.0), version=1, generation=1)
        up.put_report(BatchReport(seen=6, selected=6, uploaded=6, generation=1))
        up.put(x[6:], np.arange(6.0, 12.0), version=1, generation=1)
        up.put_report(BatchReport(seen=6, selected=6, uploaded=6, generation=1))
        assert up.queued_now == 12 and up.counters.dropped_queue == 0 and up.spool_bytes > x.nbytes
        assert not up.flush(timeout=0.3)
        up.close()  # the edge stops (or is killed) while the cloud is away
    assert len(list((tmp_path / "spool").iterdir())) == 6  # 4 uploads of <= 4 samples, 2 reports
    srv.start()
    with CloudClient(srv.url, "t0k", FP) as client:
        up = Uplink(client, fingerprint=FP, upload_batch=4, flush_interval_s=0, spool_dir=tmp_path / "spool")
        try:
            assert up.counters.restored == 12
            assert up.flush(timeout=20)
            c = up.counters
        finally:
            up.close()
    assert np.array_equal(srv.state.uploaded_images(), x)  # nothing lost, in order
    assert [k for k, _, _ in srv.state.posts if k != "report"][-6:] == ["upload", "upload", "batch"] * 2
    assert len(srv.state.batch_reports) == 2 and c.uploaded == 12 and c.reports_sent == 2
    assert not list((tmp_path / "spool").iterdir())  # acknowledged entries are deleted


def test_a_retry_after_a_restart_carries_the_key_of_the_first_attempt(protocol_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    srv = protocol_server(FP)
    srv.state.upload_failures = ["lost_ack"]  # the first attempt is stored but its ack never arrives
    with CloudClient(srv.url, "t0k", FP) as client:
        up = Uplink(client, fingerprint=FP, upload_batch=4, flush_interval_s=0, backoff_base_s=5.0,
                    backoff_cap_s=5.0, spool_dir=tmp_path / "spool")  # fmt: skip
        up.put(_images(3), np.zeros(3))
        assert until(lambda: len(srv.state.batches) == 1)
        up.close()  # stopped while waiting to retry: the entry stays spooled
    with CloudClient(srv.url, "t0k", FP) as client:
        up = Uplink(client, fingerprint=FP, upload_batch=4, flush_interval_s=0, spool_dir=tmp_path / "spool")
        try:
            assert up.flush(timeout=20)
        finally:
            up.close()
    keys = [key for kind, key, _ in srv.state.posts if kind == "upload"]
    assert len(keys) == 2 and keys[0] == keys[1] and len(srv.state.batches) == 1 and srv.state.duplicates == 1


def test_the_spool_is_bounded_and_drops_the_oldest(protocol_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    srv = protocol_server(FP)
    srv.stop()
    x = _images(10, seed=4)
    with CloudClient(srv.url, "t0k", FP, connect_timeout_s=0.5) as client:
        b = SampleBatch(images=x[:2], fingerprint=FP, edge_version=0, entropy=np.zeros(2, np.float32))
        one = len(samples_to_bytes(b, encoding="raw"))  # one spooled entry
        up = Uplink(client, fingerprint=FP, upload_batch=2, flush_interval_s=0, backoff_base_s=0.05,
                    backoff_cap_s=0.1, spool_dir=tmp_path / "spool", max_spool_bytes=3 * one + 10)  # fmt: skip
        try:
            for i in range(0, 10, 2):
                up.put(x[i : i + 2], np.zeros(2))
            assert until(lambda: len(list((tmp_path / "spool").iterdir())) == 3)  # written off the caller's thread
            c = up.counters
            assert c.dropped_spool == 4 and up.queued_now == 6 and up.spool_bytes <= 3 * one + 10
        finally:
            up.close()
    srv.start()
    with CloudClient(srv.url, "t0k", FP) as client:
        up = Uplink(client, fingerprint=FP, upload_batch=2, flush_interval_s=0, spool_dir=tmp_path / "spool")
        try:
            assert up.flush(timeout=20)
        finally:
            up.close()
    got = srv.state.uploaded_images()
    assert len(got) == 6 and np.array_equal(got[-4:], x[-4:])  # the oldest went first; the in-flight one survived
