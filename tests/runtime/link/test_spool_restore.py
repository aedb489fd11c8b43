"""What a restart finds in the upload spool: a bound lowered since (``--spool-mb``) is enforced at once, oldest
first and counted; a calibration batch left there is the deployment's calibration, not one of two (issue 18,
finding 7). Real files, the protocol fixture server on 127.0.0.1."""

from __future__ import annotations

import threading
import uuid

import numpy as np
import pytest

from cema_deploy.contract.blob import blob_from_path
from cema_deploy.contract.samples import KIND_CALIBRATION, SampleBatch, samples_to_bytes
from cema_deploy.runtime.backends.registry import get_backend
from cema_deploy.runtime.edge import EdgeRuntime
from cema_deploy.runtime.link.client import CloudClient
from cema_deploy.runtime.link.spool import Spool
from cema_deploy.runtime.link.uplink import Uplink
from cema_deploy.runtime.selection.rules import SampleSelector, SelectionConfig
from tests.conftest import needs_torch
from tests.runtime.conftest import images

pytestmark = pytest.mark.network

FP = "ab" * 32


def test_a_lowered_spool_bound_drops_the_oldest_entries_on_restore(protocol_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    srv = protocol_server(FP)
    srv.stop()  # the cloud is down: everything stays spooled
    x = images(10, seed=4, size=8)
    spool = Spool(tmp_path / "spool")
    for i in range(0, 10, 2):  # five entries of two samples, as an earlier run with a larger --spool-mb left them
        b = SampleBatch(images=x[i : i + 2], fingerprint=FP, edge_version=0, entropy=np.zeros(2, np.float32))
        spool.write_samples(b, key=str(uuid.uuid4()))
    one = len(samples_to_bytes(b, encoding="raw"))
    bound = 2 * one + 10
    with CloudClient(srv.url, "t0k", FP, connect_timeout_s=0.5) as client:
        up = Uplink(client, fingerprint=FP, upload_batch=2, flush_interval_s=0, backoff_base_s=0.05,
                    backoff_cap_s=0.1, spool_dir=tmp_path / "spool", max_spool_bytes=bound)  # fmt: skip
        try:
            c = up.counters
            assert up.spool_bytes <= bound and c.dropped_spool == 6 and c.restored == 10
            assert len(list((tmp_path / "spool").iterdir())) == 2
        finally:
            up.close()
    srv.start()
    with CloudClient(srv.url, "t0k", FP) as client:
        up = Uplink(client, fingerprint=FP, upload_batch=2, flush_interval_s=0, spool_dir=tmp_path / "spool")
        try:
            assert up.flush(timeout=20)
        finally:
            up.close()
    assert np.array_equal(srv.state.uploaded_images(), x[-4:])  # the newest two entries, in order


@needs_torch
def test_a_calibration_batch_restored_from_the_spool_is_the_only_calibration(
    exported, protocol_server, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    fp = blob_from_path(out / "params.safetensors").fingerprint
    srv = protocol_server(fp)
    srv.state.calibrated = False  # the deployment waits for its calibration batch
    gate = threading.Event()

    def hold(batch: SampleBatch) -> None:  # the cloud answers uploads only once the test lets it
        gate.wait(30)

    srv.state.on_upload = hold
    state = tmp_path / "state"
    n = 8
    calib = SampleBatch(images=images(n, seed=1), fingerprint=fp, edge_version=0, entropy=np.zeros(n, np.float32),
                        kind=KIND_CALIBRATION, generation=1, selected=np.zeros(n, bool),
                        calibration="start")  # fmt: skip
    Spool(state / "spool").write_samples(calib, key=str(uuid.uuid4()))  # queued by the run before a crash
    cfg = SelectionConfig.for_classes(10, d_margin=None)
    with EdgeRuntime(get_backend("ort-cpu", out), SampleSelector(cfg), client=CloudClient(srv.url, "t0k", fp),
                     state_dir=state, poll_wait_s=0.3) as rt:  # fmt: skip
        assert rt.deployment.read_status(10) and rt.deployment.calibrated is False
        step = rt.process(images(8, seed=2))  # while the restored calibration batch is on its way
        gate.set()
        assert rt.uplink is not None and rt.uplink.flush(timeout=30)
        m = rt.metrics()
    assert step.calibration == "" and m["calibrations"] == {}
    assert [k for k in srv.state.kinds() if k[0] == KIND_CALIBRATION] == [(KIND_CALIBRATION, "start", n)]
