"""ONNX Runtime's in-place refit path (two sessions on the prepared graph, the idle one rewritten, then a swap):
no torn output under refits hammered while serving, parity with a fresh session for BN, GN and LN models, the
self-test's fallback, rollback by a swap, and memory that does not grow with the number of refits."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest

from cema_deploy.contract import RefitBlob, blob_from_bytes, blob_to_bytes, manifest_from_dir
from cema_deploy.exceptions import BackendError, RefitError
from cema_deploy.runtime import get_backend
from cema_deploy.runtime.backends.onnxrt_inplace import SELF_TEST_ENV
from tests.conftest import needs_torch
from tests.runtime.backends.test_onnxrt_backend import _perturbed, _ref

pytestmark = needs_torch


def _x(manifest, n: int = 2, seed: int = 0) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.random.default_rng(seed).standard_normal((n, *manifest.input.shape[1:])).astype(np.float32)


PATHS = [("bn", "hybrid"), ("bn", "inplace"), ("gn", "inplace"), ("ln", "inplace")]


def test_the_default_path_is_hybrid_for_batchnorm_and_inplace_for_group_and_layer_norm(exported) -> None:  # type: ignore[no-untyped-def]
    for kind, path in (("bn", "hybrid"), ("gn", "inplace"), ("ln", "inplace")):
        with get_backend("ort-cpu", exported(kind)[0]) as be:
            assert be.refit_path == path, (kind, be.inplace_error)


@pytest.mark.parametrize(("kind", "path"), PATHS)
def test_refits_hammered_while_serving_never_tear_an_output(exported, kind, path) -> None:  # type: ignore[no-untyped-def]
    """Four threads infer while refits follow each other (back to back, with a pause after every fifth, so the
    hybrid's promotions to fused engines happen under load too): every output equals the logits of the version
    it was served with (a fresh plain session of that version's tensors); torn outputs: 0."""
    import time

    out, model = exported(kind)
    manifest = manifest_from_dir(out)
    x = _x(manifest)
    sets = [_perturbed(model, manifest, 20 + i)[1] for i in range(3)]  # three tensor sets, reused in turn
    with get_backend("ort-cpu", out, refit_path=path) as be:
        assert be.refit_path == path
        refs = [np.asarray(be.build_plain(t).run(x)) for t in sets]
        by_version = {0: be.infer(x)}
        served: list[tuple[int, np.ndarray]] = []
        errors: list[BaseException] = []
        stop = threading.Event()

        def worker() -> None:
            try:
                while not stop.is_set():
                    served.append(be.infer_versioned(x)[::-1])
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            for v in range(1, 31):
                by_version[v] = refs[v % 3]
                be.refit(
                    blob_from_bytes(
                        blob_to_bytes(RefitBlob(tensors=sets[v % 3], fingerprint=manifest.fingerprint, version=v))
                    )
                )
                if v % 5 == 0:
                    time.sleep(0.6)  # quiet: the hybrid promotes the serving version to a fused engine
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        assert not errors, errors[0]
        torn = [v for v, logits in served if np.abs(logits - by_version[v]).max() > 1e-4]
        assert torn == [] and len(served) > 30
        assert len({v for v, _ in served}) > 3  # outputs came from many versions, not from one
        assert min(np.abs(refs[i] - refs[(i + 1) % 3]).max() for i in range(3)) > 1e-3  # a mix would show
        if path == "hybrid":
            assert be._promoter is not None and be._promoter.promotions >= 3


@pytest.mark.parametrize(("kind", "path"), PATHS)
def test_rollback_is_a_swap_to_the_engine_still_holding_the_previous_parameters(exported, kind, path) -> None:  # type: ignore[no-untyped-def]
    out, model = exported(kind)
    manifest = manifest_from_dir(out)
    x = _x(manifest)
    m1, t1 = _perturbed(model, manifest, 31)
    with get_backend("ort-cpu", out, refit_path=path) as be:
        assert be.refit_path == path
        first = be._state.engine
        arrays = [dict(s.engine.arrays) for s in be._pair.slots]
        be.refit(RefitBlob(tensors=t1, fingerprint=manifest.fingerprint, version=1))
        assert be._state.engine is not first and be.previous_version == 0
        np.testing.assert_allclose(be.infer_previous(x), _ref(model, x), atol=1e-4, rtol=0)  # still runnable
        np.testing.assert_allclose(be.infer(x), _ref(m1, x), atol=1e-4, rtol=0)
        assert be.rollback() == 0
        assert be._state.engine is first  # a swap back, nothing rebuilt or rewritten
        np.testing.assert_allclose(be.infer(x), _ref(model, x), atol=1e-4, rtol=0)
        assert be.infer_previous(x) is None
        for slot, before in zip(be._pair.slots, arrays, strict=True):  # the same buffers throughout
            assert all(slot.engine.arrays[n] is a for n, a in before.items())


@pytest.mark.parametrize("path", ["hybrid", "inplace"])
def test_rollback_after_a_local_statistics_refit_keeps_the_local_statistics(exported, path) -> None:  # type: ignore[no-untyped-def]
    """A cloud blob, then the edge's own statistics (``refit_local``), then a rollback, which is never refused. On
    the in-place pair the previous cloud parameters serve with the edge's statistics (the local refit rewrites both
    slots; it used to overwrite the rollback target's slot, so the rollback was refused as "left invalid"); the
    hybrid keeps the previous engine untouched and serves it as it was (the adapter merges its statistics into
    whatever serves at its next batch)."""
    out, model = exported("bn")
    manifest = manifest_from_dir(out)
    x = _x(manifest)
    _, t1 = _perturbed(model, manifest, 41)
    with get_backend("ort-cpu", out, refit_path=path) as be:
        assert be.refit_path == path
        v0 = dict(be.tensors)
        be.refit(RefitBlob(tensors=t1, fingerprint=manifest.fingerprint, version=1, epoch=2))
        stats = {k: v * np.float32(1.3) for k, v in be.tensors.items() if k.endswith(("running_mean", "running_var"))}
        assert stats
        report = be.refit_local(stats)
        assert (report.old_version, report.new_version) == (1, 1) and be.stamp == (2, 1)
        np.testing.assert_allclose(be.infer(x), be.build_plain({**t1, **stats}).run(x), atol=1e-4, rtol=0)
        assert be.rollback() == 0
        want = {**v0, **stats} if path == "inplace" else v0
        np.testing.assert_allclose(be.infer(x), be.build_plain(want).run(x), atol=1e-4, rtol=0)


def test_a_failing_self_test_falls_back_to_building_sessions_with_one_log_line(  # type: ignore[no-untyped-def]
    exported, monkeypatch, caplog
) -> None:
    """With ORT handed copies (as if it stopped reading the arrays in place) the self-test fails, one warning
    names the reason, and the prepared session-build path serves correct outputs after a refit."""
    out, model = exported("bn")
    manifest = manifest_from_dir(out)
    x = _x(manifest)
    m1, t1 = _perturbed(model, manifest, 41)
    monkeypatch.setenv(SELF_TEST_ENV, "copy")
    with caplog.at_level(logging.WARNING, logger="cema_deploy.runtime.backends.onnxrt"):
        be = get_backend("ort-cpu", out)
    with be:
        assert be.refit_path == "prepared" and "not seen" in (be.inplace_error or "")
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and "in-place self-test" in lines[0] and "not seen" in lines[0]
        np.testing.assert_allclose(be.infer(x), _ref(model, x), atol=1e-4, rtol=0)
        be.refit(RefitBlob(tensors=t1, fingerprint=manifest.fingerprint, version=1))
        np.testing.assert_allclose(be.infer(x), _ref(m1, x), atol=1e-4, rtol=0)
        np.testing.assert_allclose(be.infer_previous(x), _ref(model, x), atol=1e-4, rtol=0)
    with pytest.raises(BackendError, match=r"inplace refit path failed its self-test.*not seen"):
        get_backend("ort-cpu", out, refit_path="inplace")


def test_many_refits_keep_two_engines_and_the_same_buffers(exported) -> None:  # type: ignore[no-untyped-def]
    """Memory is bounded: however many refits, two engines and the arrays they were made with, nothing else."""
    out, model = exported("bn")
    manifest = manifest_from_dir(out)
    x = _x(manifest)
    with get_backend("ort-cpu", out) as be:
        slots = list(be._pair.slots)
        arrays = [{n: id(a) for n, a in s.engine.arrays.items()} for s in slots]
        size = be.engine_bytes
        m = model
        for v in range(1, 9):
            m, t = _perturbed(m, manifest, 50 + v)
            be.refit(RefitBlob(tensors=t, fingerprint=manifest.fingerprint, version=v))
        np.testing.assert_allclose(be.infer(x), _ref(m, x), atol=1e-4, rtol=0)
        assert be._pair.slots == slots and be.engine_bytes == size > 0
        assert [{n: id(a) for n, a in s.engine.arrays.items()} for s in slots] == arrays


def test_rollback_and_the_edge_swap_lock_never_wait_behind_a_build(exported) -> None:  # type: ignore[no-untyped-def]
    """While a refit's engine build runs (held here on purpose), a rollback swaps at once and the edge's swap
    lock (poller, state saves, rollback decisions) is free; the build then lands on top (issue 20, item 6)."""
    from cema_deploy.runtime.backends.onnxrt import OnnxrtBackend
    from cema_deploy.runtime.edge import EdgeRuntime
    from cema_deploy.runtime.selection.rules import SampleSelector, SelectionConfig

    out, model = exported("bn")
    manifest = manifest_from_dir(out)
    x = _x(manifest)
    entered, release = threading.Event(), threading.Event()

    class HeldBuild(OnnxrtBackend):
        def _build(self, tensors):  # type: ignore[no-untyped-def]
            if getattr(self, "_state", None) is not None and self.version == 1:
                entered.set()
                assert release.wait(60)
            return super()._build(tensors)

    be = HeldBuild(out, refit_path="plain")
    m1, t1 = _perturbed(model, manifest, 61)
    m2, t2 = _perturbed(m1, manifest, 62)
    with EdgeRuntime(be, SampleSelector(SelectionConfig.for_classes(10, d_margin=None))) as rt, be:
        be.refit(RefitBlob(tensors=t1, fingerprint=manifest.fingerprint, version=1))
        rt.intake.submit(RefitBlob(tensors=t2, fingerprint=manifest.fingerprint, version=2))
        try:
            assert entered.wait(60)
            assert rt._swap_lock.acquire(timeout=10)  # not held across the build
            rt._swap_lock.release()
            assert be.rollback(only_if_serving=1) == 0  # not behind the build either
            np.testing.assert_allclose(be.infer(x), _ref(model, x), atol=1e-4, rtol=0)
        finally:
            release.set()
        assert rt.intake.scheduler.wait_idle(timeout=60)
        assert (be.version, be.previous_version) == (2, 0)
        np.testing.assert_allclose(be.infer(x), _ref(m2, x), atol=1e-4, rtol=0)
        with pytest.raises(RefitError, match="v1 no longer serves"):
            be.rollback(only_if_serving=1)


def test_hybrid_serves_a_refit_unfused_then_the_same_version_fused(exported) -> None:  # type: ignore[no-untyped-def]
    """A refit lands on an unfused engine; once refits pause the fused engine takes over with the same version
    and the same logits (within the parity tolerance), and the previous parameters stay runnable throughout."""
    from tests.runtime.conftest import until

    out, model = exported("bn")
    manifest = manifest_from_dir(out)
    x = _x(manifest)
    m1, t1 = _perturbed(model, manifest, 71)
    with get_backend("ort-cpu", out, refit_path="hybrid") as be:
        assert be.serving_fused
        be.refit(RefitBlob(tensors=t1, fingerprint=manifest.fingerprint, version=1))
        unfused = be.infer(x)
        assert be.version == 1 and not be.serving_fused  # (the promoter waits 0.25 s without a swap)
        assert until(lambda: be.serving_fused, timeout=30)
        assert be.version == 1 and be.previous_version == 0 and be._promoter.promotions == 1
        np.testing.assert_allclose(be.infer(x), unfused, atol=1e-4, rtol=0)
        np.testing.assert_allclose(be.infer(x), _ref(m1, x), atol=1e-4, rtol=0)
        np.testing.assert_allclose(be.infer_previous(x), _ref(model, x), atol=1e-4, rtol=0)
        assert be.rollback() == 0 and be.serving_fused
        np.testing.assert_allclose(be.infer(x), _ref(model, x), atol=1e-4, rtol=0)
