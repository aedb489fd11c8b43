"""The two-slot discipline of the TensorRT backend, on a plain-Python engine (no TensorRT, no GPU).

The engine below is not a stand-in for TensorRT's behaviour: it is a small linear model whose refit writes its
tensors one by one, so a refit that fails half way really leaves mixed weights, and a request that ran during a
refit would really be computed with them. The tests pin what the backend promises on top of any such engine:
no request ever sees mixed weights, a failed refit changes nothing that serves, and rollback never returns to
an engine that does not hold the previous parameters exactly.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from cema_deploy.contract import RefitBlob, blob_from_path, manifest_from_dir
from cema_deploy.exceptions import RefitError
from cema_deploy.runtime.backends.trt_slots import INVALID, READY, DoubleBufferedBackend
from tests.conftest import needs_torch
from tests.runtime.conftest import until

pytestmark = needs_torch


class LinearEngine:
    """logits = x.mean over pixels (per channel) * sum of every refittable tensor; refit writes tensor by tensor."""

    def __init__(self, names: list[str], tensors: Mapping[str, np.ndarray], fail: dict[str, int]) -> None:
        self.names = names
        self.weights = {n: np.array(tensors[n], dtype=np.float64) for n in names}
        self.fail = fail  # {"refit": k}: the next refit raises after writing k tensors; {"restore": 1}: also the next
        self.refitting = False
        self.ran_during_refit = 0
        self.refits = 0
        self.delay_s = 0.0

    def run(self, x: np.ndarray) -> np.ndarray:
        if self.refitting:
            self.ran_during_refit += 1
        return logits(x, self.weights)

    def refit(self, tensors: Mapping[str, np.ndarray]) -> None:
        self.refitting = True
        try:
            self.refits += 1
            for i, n in enumerate(self.names):
                if self.fail.get("refit") == i:
                    self.fail.pop("refit")
                    raise RuntimeError(f"weights {n!r} rejected")
                if self.fail.get("restore_fails") and self.refits > 1 and i == 1:
                    raise RuntimeError("restore rejected too")
                self.weights[n] = np.array(tensors[n], dtype=np.float64)
                time.sleep(self.delay_s)
        finally:
            self.refitting = False

    def close(self) -> None:
        self.weights = {}


def logits(x: np.ndarray, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
    scale = sum(float(np.sum(np.asarray(v, dtype=np.float64))) for v in tensors.values())
    return (x.reshape(x.shape[0], -1).mean(axis=1, keepdims=True) * np.arange(1, 4) * scale).astype(np.float32)


class SlotBackend(DoubleBufferedBackend):
    name = "slots"

    def __init__(self, model_dir: Path, fail: dict[str, int]) -> None:
        self.engines: list[LinearEngine] = []
        self.fail = fail
        super().__init__(model_dir)

    def _new_engine(self, tensors: Mapping[str, np.ndarray]) -> LinearEngine:
        e = LinearEngine([p.name for p in self.manifest.refittable], tensors, self.fail)
        self.engines.append(e)
        return e


@pytest.fixture
def model_dir(exported) -> Path:
    out, _ = exported("bn")
    return Path(out)


def _blob(be: DoubleBufferedBackend, version: int, factor: float) -> RefitBlob:
    tensors = {k: (v * np.float32(factor) if k.endswith(".weight") else v) for k, v in be.tensors.items()}
    return RefitBlob(tensors=tensors, fingerprint=be.manifest.fingerprint, version=version)


def _x(model_dir: Path) -> np.ndarray:
    shape = manifest_from_dir(model_dir).input.shape[1:]
    return np.random.default_rng(0).standard_normal((2, *shape)).astype(np.float32) + 1.0


def test_refit_swaps_slots_and_rollback_returns_to_the_exact_previous_parameters(model_dir: Path) -> None:
    with SlotBackend(model_dir, {}) as be:
        x = _x(model_dir)
        v0 = dict(be.tensors)
        blob = _blob(be, 1, 1.5)
        be.refit(blob)
        assert be.version == 1 and be.slot_states == [READY, READY]
        np.testing.assert_allclose(be.infer(x), logits(x, blob.tensors), rtol=1e-6)
        assert be.rollback() == 0
        np.testing.assert_allclose(be.infer(x), logits(x, v0), rtol=1e-6)
        assert be.infer_versioned(x)[1] == 0


def test_refit_failing_half_way_restores_the_standby_so_rollback_serves_no_mixed_weights(model_dir: Path) -> None:
    fail: dict[str, int] = {}
    with SlotBackend(model_dir, fail) as be:
        x = _x(model_dir)
        v0 = dict(be.tensors)
        v1 = _blob(be, 1, 1.5)
        be.refit(v1)  # slot 1 serves v1, slot 0 holds v0 (the rollback target)
        fail["refit"] = 3  # the next refit (of slot 0) dies after writing 3 tensors: mixed weights
        with pytest.raises(RefitError, match="rejected"):
            be.refit(_blob(be, 2, 3.0))
        assert be.version == 1 and be.slot_states == [READY, READY]
        np.testing.assert_allclose(be.infer(x), logits(x, v1.tensors), rtol=1e-6)
        assert be.rollback() == 0  # slot 0 was restored from v0, exactly
        np.testing.assert_allclose(be.infer(x), logits(x, v0), rtol=1e-6)


def test_when_the_restore_fails_too_the_slot_is_invalid_and_rollback_is_refused(model_dir: Path) -> None:
    fail: dict[str, int] = {}
    with SlotBackend(model_dir, fail) as be:
        x = _x(model_dir)
        v1 = _blob(be, 1, 1.5)
        be.refit(v1)
        fail.update({"refit": 2, "restore_fails": 1})
        with pytest.raises(RefitError):
            be.refit(_blob(be, 2, 3.0))
        assert be.slot_states == [INVALID, READY]
        with pytest.raises(RefitError, match="Nothing to roll back to"):
            be.rollback()
        np.testing.assert_allclose(be.infer(x), logits(x, v1.tensors), rtol=1e-6)  # v1 keeps serving
        fail.clear()
        v3 = _blob(be, 3, 0.5)
        be.refit(v3)  # a successful refit makes the invalid slot valid again
        assert be.slot_states == [READY, READY] and be.version == 3
        np.testing.assert_allclose(be.infer(x), logits(x, v3.tensors), rtol=1e-6)
        assert be.rollback() == 1


def test_no_request_runs_on_a_slot_while_it_is_refitted(model_dir: Path) -> None:
    with SlotBackend(model_dir, {}) as be:
        x = _x(model_dir)
        expected = {0: logits(x, be.tensors)}
        for e in be.engines:
            e.delay_s = 0.002  # slow refits: a long window for a request to slip in
        stop = threading.Event()
        seen: list[tuple[int, np.ndarray]] = []

        def load() -> None:
            while not stop.is_set():
                out, version = be.infer_versioned(x)
                seen.append((version, out))

        workers = [threading.Thread(target=load) for _ in range(3)]
        for w in workers:
            w.start()
        try:
            for v in range(1, 5):
                blob = _blob(be, v, 1.0 + 0.25 * v)
                be.refit(blob)
                expected[v] = logits(x, blob.tensors)
            assert until(lambda: any(v == 4 for v, _ in seen[-50:]), timeout=10)
        finally:
            stop.set()
            for w in workers:
                w.join()
        assert sum(e.ran_during_refit for e in be.engines) == 0
        assert {v for v, _ in seen} >= {0, 4}
        for version, out in seen:  # every response is exactly one version's output, labelled with that version
            np.testing.assert_allclose(out, expected[version], rtol=1e-6)


def test_a_standby_that_does_not_drain_is_left_unchanged(model_dir: Path) -> None:
    with SlotBackend(model_dir, {}) as be:
        be.drain_timeout_s = 0.05
        v1 = _blob(be, 1, 1.5)
        be.refit(v1)
        standby = be._slots[0]
        assert standby.try_acquire()  # a request stuck on the standby
        try:
            with pytest.raises(RefitError, match="still had 1 request"):
                be.refit(_blob(be, 2, 2.0))
        finally:
            standby.release()
        assert be.slot_states == [READY, READY] and be.version == 1
        assert be.rollback() == 0


def test_start_refits_nothing_and_both_slots_hold_the_serving_blob(model_dir: Path) -> None:
    with SlotBackend(model_dir, {}) as be:
        blob = blob_from_path(model_dir / be.manifest.params_file)
        assert [e.refits for e in be.engines] == [0, 0]
        x = _x(model_dir)
        np.testing.assert_allclose(be.infer(x), logits(x, blob.tensors), rtol=1e-6)
        with pytest.raises(RefitError, match="no refit has been applied"):
            be.rollback()


def test_a_slot_being_refitted_refuses_requests_and_waits_for_those_running() -> None:
    from cema_deploy.runtime.backends.trt_slots import REFITTING, Slot

    slot = Slot(LinearEngine(["w"], {"w": np.ones(2)}, {}), {"w": np.ones(2)}, 0)
    assert slot.try_acquire()
    started = threading.Event()

    def refit() -> None:
        started.set()
        slot.begin_refit(timeout=10)

    t = threading.Thread(target=refit)
    t.start()
    started.wait()
    assert until(lambda: slot.state == REFITTING, timeout=5)
    assert t.is_alive()  # waits for the request still running
    assert not slot.try_acquire()  # and admits no new one
    slot.release()
    t.join(5)
    assert not t.is_alive()
    slot.end_refit(None)
    assert slot.state == INVALID and not slot.try_acquire() and not slot.holds(slot.tensors)


def test_infer_previous_and_the_refit_warm_up_run_on_their_own_slot(model_dir: Path) -> None:
    """infer_previous runs the slot that holds the previous parameters (not the serving one), and a refit's
    warm-up runs the refitted standby: issue 18 item 2 (both ran the serving slot before)."""
    with SlotBackend(model_dir, {}) as be:
        x = _x(model_dir)
        v0 = dict(be.tensors)
        v1 = _blob(be, 1, 1.5)
        be.refit(v1)
        previous, serving = be.infer_previous(x), be.infer(x)
        assert previous is not None
        np.testing.assert_allclose(previous, logits(x, v0), rtol=1e-6)
        np.testing.assert_allclose(serving, logits(x, v1.tensors), rtol=1e-6)
        assert np.abs(previous - serving).max() > 1e-3
        runs = [0, 0]
        for i, e in enumerate(be.engines):
            run = e.run

            def counted(x: np.ndarray, i: int = i, run=run) -> np.ndarray:  # type: ignore[no-untyped-def]
                runs[i] += 1
                return run(x)

            e.run = counted  # type: ignore[method-assign]
        be.refit(_blob(be, 2, 2.0))  # slot 0 is refitted and warmed up, slot 1 serves
        assert runs == [1, 0]


# ---- local statistics refits (issue 21 item 6): the edge owns the statistics, rollback the cloud's parameters ----
def _local_stats(be: DoubleBufferedBackend, factor: float) -> dict[str, np.ndarray]:
    return {k: v * np.float32(factor) for k, v in be.tensors.items() if k.endswith(("running_mean", "running_var"))}


def test_rollback_after_a_local_refit_returns_to_the_previous_cloud_parameters_with_the_local_statistics(
    model_dir: Path,
) -> None:
    with SlotBackend(model_dir, {}) as be:
        x = _x(model_dir)
        v0 = dict(be.tensors)
        blob = RefitBlob(tensors=_blob(be, 1, 1.5).tensors, fingerprint=be.manifest.fingerprint, version=1, epoch=3)
        be.refit(blob)
        stats = _local_stats(be, 1.25)
        report = be.refit_local(stats)
        assert (report.old_version, report.new_version) == (1, 1) and be.stamp == (3, 1)
        assert be.previous_version == 0 and be.slot_states == [READY, READY]
        np.testing.assert_allclose(be.infer(x), logits(x, {**blob.tensors, **stats}), rtol=1e-6)
        previous = be.infer_previous(x)
        assert previous is not None
        np.testing.assert_allclose(previous, logits(x, {**v0, **stats}), rtol=1e-6)
        assert be.rollback() == 0  # no error: the slot that served v1 was refitted to v0 + the local statistics
        np.testing.assert_allclose(be.infer(x), logits(x, {**v0, **stats}), rtol=1e-6)
        for k, v in be.tensors.items():
            np.testing.assert_array_equal(v, stats.get(k, v0[k]))


def test_a_local_refit_without_a_cloud_blob_refits_one_slot_and_leaves_nothing_to_roll_back_to(model_dir: Path) -> None:
    with SlotBackend(model_dir, {}) as be:
        x = _x(model_dir)
        stats = _local_stats(be, 0.5)
        be.refit_local(stats)
        assert [e.refits for e in be.engines] == [0, 1] and be.version == 0
        np.testing.assert_allclose(be.infer(x), logits(x, {**be.tensors, **stats}), rtol=1e-6)
        with pytest.raises(RefitError, match="no refit has been applied"):
            be.rollback()


def test_a_bad_local_refit_changes_nothing_and_rollback_still_works(model_dir: Path) -> None:
    from cema_deploy.exceptions import BlobError

    with SlotBackend(model_dir, {}) as be:
        x = _x(model_dir)
        be.refit(_blob(be, 1, 1.5))
        name = next(k for k in be.tensors if k.endswith("running_var"))
        with pytest.raises(BlobError, match="negative"):
            be.refit_local({name: -np.abs(be.tensors[name]) - 1})
        assert be.slot_states == [READY, READY] and [e.refits for e in be.engines] == [0, 1]
        assert be.rollback() == 0
        np.testing.assert_allclose(be.infer(x), logits(x, blob_from_path(model_dir / "params.safetensors").tensors),
                                   rtol=1e-6)  # fmt: skip


def test_when_refitting_the_rollback_target_fails_the_statistics_serve_and_rollback_is_refused_cleanly(
    model_dir: Path,
) -> None:
    with SlotBackend(model_dir, {}) as be:
        x = _x(model_dir)
        blob = _blob(be, 1, 1.5)
        be.refit(blob)  # slot 1 serves v1, slot 0 holds v0
        stats = _local_stats(be, 1.25)
        real = be.engines[1].refit
        calls = [0]

        def first_fails(tensors: Mapping[str, np.ndarray]) -> None:  # the refit to v0 + stats fails, the restore not
            calls[0] += 1
            if calls[0] == 1:
                raise RuntimeError("weights rejected")
            real(tensors)

        be.engines[1].refit = first_fails  # type: ignore[method-assign]
        be.refit_local(stats)  # slot 0 takes v1 + stats and serves; slot 1 fails to take v0 + stats
        np.testing.assert_allclose(be.infer(x), logits(x, {**blob.tensors, **stats}), rtol=1e-6)
        assert be.previous_version is None and be.slot_states == [READY, READY]
        with pytest.raises(RefitError, match="Nothing to roll back to"):
            be.rollback()
        np.testing.assert_allclose(be.infer(x), logits(x, {**blob.tensors, **stats}), rtol=1e-6)
