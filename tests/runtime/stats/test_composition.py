"""The edge's statistics and the cloud's blobs together on a real ONNX Runtime edge (issue 21, item 4): a cloud blob
serves with the edge's statistics from its first batch and is judged under them; local statistics refits are never
judged as cloud blobs."""

from __future__ import annotations

from typing import Any

import numpy as np

from cema_deploy.contract.blob import RefitBlob, blob_from_bytes, blob_from_path, blob_to_bytes
from cema_deploy.runtime.backends.registry import get_backend
from cema_deploy.runtime.edge import EdgeRuntime, RollbackConfig
from cema_deploy.runtime.frames.preprocess import normalize
from cema_deploy.runtime.selection.rules import SampleSelector, SelectionConfig
from cema_deploy.runtime.stats.adapter import StatsConfig, stats_adapter_from_dir
from tests.conftest import needs_torch
from tests.runtime.conftest import images

pytestmark = needs_torch

_STATS = ("running_mean", "running_var")


def _runtime(out: Any, state_dir: Any = None, **cfg: Any) -> tuple[EdgeRuntime, Any]:
    be = get_backend("ort-cpu", out)
    adapter, why = stats_adapter_from_dir(be, out, StatsConfig(**{"mode": "ema", "every": 1, **cfg}))
    assert adapter is not None, why
    sel = SampleSelector(SelectionConfig.for_classes(10, d_margin=None))
    rollback = RollbackConfig(window=16, min_samples=8)
    return EdgeRuntime(be, sel, rollback=rollback, stats=adapter, state_dir=state_dir), be


def _blob(
    out: Any, version: int, *, affine: float = 1.0, mean_shift: float = 0.0, var_scale: float = 1.0, epoch: int = 0
) -> bytes:
    v0 = blob_from_path(out / "params.safetensors")
    tensors = {}
    for k, v in v0.tensors.items():
        if k.endswith("running_mean"):
            tensors[k] = (v + mean_shift).astype(v.dtype)
        elif k.endswith("running_var"):
            tensors[k] = (v * var_scale).astype(v.dtype)
        else:
            tensors[k] = (v * affine if k.endswith("weight") else v).astype(v.dtype)
    return blob_to_bytes(RefitBlob(tensors=tensors, fingerprint=v0.fingerprint, version=version, epoch=epoch))


def test_a_cloud_blob_serves_with_the_edges_statistics_from_its_first_batch(exported) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    rt, be = _runtime(out)
    with rt, be:
        for i in range(3):
            rt.process(images(4, i, size=64))
        own = rt.stats.tensors()  # type: ignore[union-attr]
        generation = rt.stats.local_generation  # type: ignore[union-attr]
        data = _blob(out, 1, affine=1.1, mean_shift=0.5, var_scale=3.0)
        assert rt.apply_blob_bytes(data)
        # no batch ran since: the engine already serves the cloud's affine parameters with the edge's statistics
        for k, v in be.tensors.items():
            if k.endswith(_STATS):
                np.testing.assert_array_equal(v, own[k])
            else:
                np.testing.assert_array_equal(v, blob_from_bytes(data).tensors[k])
        assert be.version == 1 and rt.stats.local_generation == generation  # type: ignore[union-attr]
        assert rt.intake.blob_bytes[(0, 1)] == data  # what the state folder keeps: the blob as signed


def test_a_blob_whose_statistics_do_not_suit_this_edge_is_judged_under_the_edges_own(exported) -> None:  # type: ignore[no-untyped-def]
    """The cloud's statistics never reach this edge's engine, so they cannot make its blob look bad: same affine
    parameters, statistics far off -> the engine serves what it served, the judgement keeps the blob."""
    out, _ = exported("bn")
    rt, be = _runtime(out, every=1000, dense_frames=16)
    with rt, be:
        for i in range(6):
            rt.process(images(4, i, size=64))  # 16 frames dense, then no more probes
        x = normalize(images(4, 99, size=64), be.manifest.preprocess)
        before = be.infer(x)
        assert rt.apply_blob_bytes(_blob(out, 1, mean_shift=3.0, var_scale=40.0))
        np.testing.assert_allclose(be.infer(x), before, rtol=1e-5, atol=1e-5)
        for i in range(8):
            rt.process(images(4, 10 + i, size=64))
        assert rt.monitor.wait_judged(30)
        assert rt.monitor.judged >= 1 and rt.monitor.last is not None and rt.monitor.last.version == 1
        assert not rt.monitor.last.rollback and rt.metrics()["rollbacks"] == 0 and be.version == 1


def test_local_statistics_refits_are_never_judged_as_cloud_blobs(exported) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    rt, be = _runtime(out)
    with rt, be:
        for i in range(12):  # 12 local refits, no cloud blob
            rt.process(images(4, i, size=64))
        assert rt.stats.local_generation == 12  # type: ignore[union-attr]
        assert rt.monitor.wait_judged(10)
        assert rt.monitor.judged == 0 and rt.monitor.last is None and rt.version == 0
        assert rt.metrics()["rollbacks"] == 0 and rt.metrics()["refused"] == {}
        assert rt.apply_blob_bytes(_blob(out, 1, affine=1.05))
        for i in range(12):  # one cloud blob, then local refits on top of it
            rt.process(images(4, 20 + i, size=64))
        assert rt.monitor.wait_judged(30)
        assert rt.monitor.judged == 1 and rt.monitor.last is not None and rt.monitor.last.version == 1
        assert be.version == 1 and be.previous_version == 0  # the rollback target is still the cloud's previous


def test_a_local_refit_keeps_the_cloud_stamp_so_sync_waits_end(exported) -> None:  # type: ignore[no-untyped-def]
    """A local refit serves under the same (epoch, version) as the cloud blob it merged into: an edge waiting for
    that version (``--sync``, an ack naming the version already served) is done, and the state saves that stamp."""
    out, _ = exported("bn")
    rt, be = _runtime(out)
    epoch = 1_796_000_000_000
    with rt, be:
        assert rt.apply_blob_bytes(_blob(out, 3, affine=1.05, epoch=epoch))
        assert be.stamp == (epoch, 3)
        rt.process(images(4, 0, size=64))  # probed and refitted locally
        assert rt.stats.local_generation >= 1  # type: ignore[union-attr]
        assert be.stamp == (epoch, 3) and rt.ledger.done(3)
        assert rt.wait_for_version(3, timeout=1.0)
        assert (rt.state().serving_epoch, rt.state().serving_version) == (epoch, 3)


def test_a_restart_serves_the_saved_cloud_blob_with_the_saved_edge_statistics(exported, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    rt, be = _runtime(out, state_dir=tmp_path / "state")
    with rt, be:
        for i in range(3):
            rt.process(images(4, i, size=64))
        assert rt.apply_blob_bytes(_blob(out, 2, affine=1.1, mean_shift=1.0, epoch=7))
        saved = rt.stats.tensors()  # type: ignore[union-attr]
    rt2, be2 = _runtime(out, state_dir=tmp_path / "state")
    with rt2, be2:  # before any batch: the saved blob's affine parameters under the saved statistics
        assert be2.stamp == (7, 2) and rt2.restored_version == 2
        cloud = blob_from_bytes(_blob(out, 2, affine=1.1, mean_shift=1.0, epoch=7)).tensors
        for k, v in be2.tensors.items():
            np.testing.assert_array_equal(v, saved[k] if k.endswith(_STATS) else cloud[k])
