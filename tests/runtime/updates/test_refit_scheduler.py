"""RefitScheduler on a real ORT backend: submit never blocks, the newest waiting blob wins, outcomes and
counters, refused blobs, close, and responses that stay whole while refits run under load."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from cema_deploy.contract import RefitBlob, manifest_from_dir
from cema_deploy.exceptions import BlobValueError, RefitError, StaleBlobError
from cema_deploy.runtime import get_backend
from cema_deploy.runtime.updates.scheduler import RefitOutcome, RefitScheduler
from tests.conftest import needs_torch

pytestmark = needs_torch


@pytest.fixture(params=["inplace", "prepared"])
def backend(exported, request):  # type: ignore[no-untyped-def]
    """Coalescing and back-pressure hold on both paths: writing the idle engine in place, building a session."""
    out, _ = exported("bn")
    with get_backend("ort-cpu", out, refit_path=request.param) as be:
        assert be.refit_path == request.param
        yield be


def _blob(be, version: int, scale: float = 1.0) -> RefitBlob:  # type: ignore[no-untyped-def]
    tensors = {k: (v * np.float32(scale) if k.endswith(".weight") else v) for k, v in be.tensors.items()}
    return RefitBlob(tensors=tensors, fingerprint=be.manifest.fingerprint, version=version)


class Gate:
    """An on_done callback that records outcomes and can hold the worker inside the callback."""

    def __init__(self) -> None:
        self.outcomes: list[RefitOutcome] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def hold(self) -> None:
        self.entered.clear()
        self.release.clear()

    def __call__(self, outcome: RefitOutcome) -> None:
        self.outcomes.append(outcome)
        self.entered.set()
        assert self.release.wait(30)


def test_newest_waiting_blob_wins_and_older_ones_are_coalesced(backend) -> None:  # type: ignore[no-untyped-def]
    gate = Gate()
    with RefitScheduler(backend, on_done=gate) as refits:
        gate.hold()
        refits.submit(_blob(backend, 1, 1.01))
        assert gate.entered.wait(30)  # v1 applied; the worker is held in its callback
        assert not refits.wait_idle(timeout=0.01)
        for v in (2, 3, 4):
            refits.submit(_blob(backend, v, 1.0 + v / 100))  # returns at once although the worker is busy
        refits.submit(_blob(backend, 3, 1.5))  # older than the one waiting: dropped
        gate.release.set()
        assert refits.wait_idle(timeout=60)
        assert backend.version == 4 and backend.previous_version == 1
        assert [(o.version, o.applied, o.error) for o in gate.outcomes] == [(1, True, None), (4, True, None)]
        assert all(o.report is not None and o.report.build_s > 0 for o in gate.outcomes)
        assert (refits.submitted, refits.applied, refits.coalesced, refits.failed) == (5, 2, 3, 0)


def test_refused_blobs_are_failed_outcomes_and_change_nothing(backend) -> None:  # type: ignore[no-untyped-def]
    x = np.random.default_rng(0).standard_normal((2, *backend.manifest.input.shape[1:])).astype(np.float32)
    before = backend.infer(x)
    gate = Gate()
    with RefitScheduler(backend, min_interval_s=0.05, on_done=gate) as refits:
        refits.submit(_blob(backend, 0))  # not newer than the serving version
        assert refits.wait_idle(timeout=60)
        bad = _blob(backend, 1)
        refits.submit(
            RefitBlob(tensors={k: v * np.nan for k, v in bad.tensors.items()}, fingerprint=bad.fingerprint, version=1)
        )
        assert refits.wait_idle(timeout=60)
    assert [type(o.error) for o in gate.outcomes] == [StaleBlobError, BlobValueError]
    assert not any(o.applied for o in gate.outcomes)
    assert (refits.applied, refits.failed) == (0, 2) and backend.version == 0
    np.testing.assert_array_equal(backend.infer(x), before)


def test_close_drops_the_waiting_blob_and_reports_it(backend) -> None:  # type: ignore[no-untyped-def]
    gate = Gate()
    refits = RefitScheduler(backend, on_done=gate)
    gate.hold()
    refits.submit(_blob(backend, 1, 1.01))
    assert gate.entered.wait(30)
    refits.submit(_blob(backend, 2, 1.02))
    closer = threading.Thread(target=refits.close)
    closer.start()
    gate.release.set()
    closer.join(timeout=60)
    assert not closer.is_alive()
    assert [(o.version, o.applied, o.error) for o in gate.outcomes] == [(1, True, None), (2, False, None)]
    assert (refits.submitted, refits.applied, refits.coalesced) == (2, 1, 1) and backend.version == 1
    refits.close()  # idempotent
    with pytest.raises(RefitError, match="after close"):
        refits.submit(_blob(backend, 3))


def test_a_failing_callback_does_not_stop_the_refits(backend) -> None:  # type: ignore[no-untyped-def]
    def boom(outcome: RefitOutcome) -> None:
        raise ValueError("callback bug")

    with RefitScheduler(backend, on_done=boom) as refits:
        for v in (1, 2):
            refits.submit(_blob(backend, v, 1.0 + v / 100))
            assert refits.wait_idle(timeout=60)
    assert refits.applied == 2 and backend.version == 2


def test_responses_stay_whole_while_the_scheduler_refits_under_load(exported) -> None:  # type: ignore[no-untyped-def]
    """Three threads infer while blobs arrive faster than they are built: every response equals the logits
    of the version it reports (from a plain session of that version), none fails, the newest version wins."""
    out, _ = exported("bn")
    manifest = manifest_from_dir(out)
    x = np.random.default_rng(1).standard_normal((2, *manifest.input.shape[1:])).astype(np.float32)
    with get_backend("ort-cpu", out) as be:
        blobs = [_blob(be, v, 1.0 + 0.05 * v) for v in range(1, 7)]
        refs = {0: be.infer(x)}
        for b in blobs:
            refs[b.version] = np.asarray(be.build_plain(b.tensors).run(x))
        errors: list[BaseException] = []
        stop = threading.Event()

        def worker() -> None:
            try:
                while not stop.is_set():
                    logits, version = be.infer_versioned(x)
                    np.testing.assert_allclose(logits, refs[version], atol=1e-4, rtol=0)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(3)]
        for t in threads:
            t.start()
        with RefitScheduler(be) as refits:
            for b in blobs:
                refits.submit(b)
            assert refits.wait_idle(timeout=120)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        assert not errors, errors[0]
        assert be.version == 6
        assert refits.applied + refits.coalesced == 6 and refits.failed == 0 and refits.applied >= 1
