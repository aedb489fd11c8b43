"""One deployment's loop, in process: the official loop's step counts on a constructed stream, calibration and
recalibration, statistics samples, safe publishing, rollbacks, freeze, retention, and the in-process link."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from tests.cloud.conftest import batch, dep_dir, images, make_deployment
from tests.conftest import needs_torch

pytestmark = needs_torch


def _blob(dep, version):  # type: ignore[no-untyped-def]
    from cema_deploy.contract.blob import blob_from_path

    return blob_from_path(dep.store.blob_path(version))


def _official(stream: list[int], *, b: int, replay_min: int, capacity: int) -> dict[str, int]:
    """The official ``CEMA.infer`` loop's step rule (chenyaofo/CEMA), counting steps of each kind."""
    queue = history = full = mixed = replay = 0
    for k in stream:
        queue += k
        history = min(history + k, capacity)
        executed = False
        while queue >= b:
            queue -= b
            full += 1
            mixed += history >= replay_min  # `len(history) < 256` -> no replay
            executed = True
        if not executed and history > replay_min:  # `not is_excuted and len(history) > 256`
            replay += 1
    return {"steps": full, "mixed_steps": mixed, "replay_steps": replay}


def test_step_counts_follow_the_official_loop_on_a_constructed_stream(exported, teacher_ckpt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cema_deploy.contract.messages import BatchReport

    edge, _ = exported("bn")
    b, replay_min = 8, 24
    rng = np.random.default_rng(5)
    stream = [int(k) for k in rng.choice([0, 0, 0, 1, 3, 5, 8, 13, 20], size=24)]
    want = _official(stream, b=b, replay_min=replay_min, capacity=1000)
    assert want["replay_steps"] > 3 and 0 < want["mixed_steps"] < want["steps"]  # the stream exercises every rule
    dep = make_deployment(edge, teacher_ckpt, tmp_path / "s", batch_size=b, replay_min=replay_min, replay_size=1000)
    dep.start()
    try:
        for i, k in enumerate(stream):  # one upload per edge batch (its kept samples), then its report
            if k:
                dep.upload(batch(dep.manifest, k, seed=i))
            ack = dep.batch_report(BatchReport(seen=64, selected=k, uploaded=k, generation=0))
            assert dep.wait_idle(60)
            assert dep.version == ack.target_version  # the ack named the version this report's steps end at
        got = {key: dep.counters[key] for key in want}
    finally:
        dep.stop()
    assert got == want


def test_replay_due_is_a_flag_never_a_queue(exported, teacher_ckpt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cema_deploy.contract.messages import BatchReport

    edge, _ = exported("bn")
    dep = make_deployment(edge, teacher_ckpt, tmp_path / "s", batch_size=8, replay_min=8)
    for i in range(2):  # 16 samples, not started: no step runs, the window is empty
        dep.upload(batch(dep.manifest, 8, seed=i))
    dep.start()
    assert dep.wait_idle(60) and dep.counters["steps"] == 2
    dep.stop()
    dep = make_deployment(edge, teacher_ckpt, tmp_path / "s", batch_size=8, replay_min=8)  # restarted, idle worker
    acks = [dep.batch_report(BatchReport(seen=64, selected=0, uploaded=0, generation=0)) for _ in range(5)]
    assert all(a.replay_step for a in acks) and {a.target_version for a in acks} == {3}
    dep.start()
    try:
        assert dep.wait_idle(60)
        assert dep.counters["replay_steps"] == 1 and dep.version == 3  # five reports, one replay-only step
    finally:
        dep.stop()


def test_calibration_sets_merges_and_recalibrates_and_publishes_at_once(exported, teacher_ckpt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import torch

    from cema_deploy.runtime.frames.preprocess import normalize
    from tests.cloud.test_method import _bn_stats, _first_forward_stats

    edge, _ = exported("bn")
    dep = make_deployment(edge, teacher_ckpt, tmp_path / "s", batch_size=8)
    plain = __import__("cema_deploy.cloud.models", fromlist=["x"]).replica_from_export(edge, dep.manifest).eval()
    ref = {}
    x = {n: images(n, seed=n) for n in (12, 6, 10)}
    for n, imgs in x.items():
        ref[n] = _first_forward_stats(plain, torch.from_numpy(normalize(imgs, dep.manifest.preprocess)))
    teacher0 = _bn_stats(dep.cema.teacher)
    dep.start()
    try:
        assert not dep.status().calibrated
        sel = np.zeros(12, bool)
        sel[:3] = True
        ack = dep.upload(batch(dep.manifest, 12, seed=12, kind="calibration", calibration="start", selected=sel))
        assert ack.target_version == 1 and dep.wait_idle(60) and dep.version == 1 and dep.status().calibrated
        blob = _blob(dep, 1).tensors
        for name, (mu, var) in ref[12].items():
            assert np.allclose(blob[f"{name}.running_mean"], mu.numpy(), atol=1e-4), name
            assert np.allclose(blob[f"{name}.running_var"], var.numpy(), atol=1e-4), name
        assert all(torch.equal(v[0], teacher0[n][0]) for n, v in _bn_stats(dep.cema.teacher).items())
        # another device's start batch of the same generation: merged by sample count, published at once
        ack = dep.upload(batch(dep.manifest, 6, seed=6, kind="calibration", calibration="start"))
        assert ack.target_version == 2 and dep.wait_idle(60) and dep.version == 2
        blob = _blob(dep, 2).tensors
        for name in ref[12]:
            want = (12 * ref[12][name][0] + 6 * ref[6][name][0]) / 18
            assert np.allclose(blob[f"{name}.running_mean"], want.numpy(), atol=1e-4), name
        assert dep.samples.adapt_total == 3 and len(dep.samples.uploads) == 1  # only the 3 selected are kept
        # a shift: both models' statistics replaced, not merged
        dep.upload(batch(dep.manifest, 10, seed=10, kind="calibration", calibration="shift"))
        assert dep.wait_idle(60) and dep.version == 3
        blob = _blob(dep, 3).tensors
        for name in ref[10]:
            assert np.allclose(blob[f"{name}.running_mean"], ref[10][name][0].numpy(), atol=1e-4), name
        assert any(not torch.equal(v[0], teacher0[n][0]) for n, v in _bn_stats(dep.cema.teacher).items())
        # a second device's shift batch fewer than 2 steps later merges into that episode
        dep.upload(batch(dep.manifest, 6, seed=6, kind="calibration", calibration="shift"))
        assert dep.wait_idle(60) and dep.version == 4
        blob = _blob(dep, 4).tensors
        for name in ref[10]:
            want = (10 * ref[10][name][0] + 6 * ref[6][name][0]) / 16
            assert np.allclose(blob[f"{name}.running_mean"], want.numpy(), atol=1e-4), name
        assert dep.counters["calibrations"] == 4 and dep.counters["steps"] == 0
    finally:
        dep.stop()


def test_statistics_samples_move_statistics_are_never_replayed_and_are_deleted_once_used(
    exported, teacher_ckpt, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    edge, _ = exported("bn")
    dep = make_deployment(edge, teacher_ckpt, tmp_path / "s", batch_size=8, statistics="samples")
    dep.start()
    try:
        ack = dep.upload(batch(dep.manifest, 5, seed=1, kind="statistics"))
        assert ack.target_version == 0  # fewer than B: nothing scheduled yet
        ack = dep.upload(batch(dep.manifest, 5, seed=2, kind="statistics"))
        assert ack.target_version == 1 and dep.wait_idle(60) and dep.version == 1
        assert dep.counters["statistics_updates"] == 1 and dep.counters["steps"] == 0
        assert dep.samples.window_len(dep.samples.adapt_total) == 0  # never in the replay window
        assert len(dep.samples.uploads) == 1  # the first upload was used whole and deleted; 2 of 5 left
        m = dep.metrics()
        assert m["pending"] == 2 and m["held"] == 5
    finally:
        dep.stop()


def test_a_diverged_step_is_never_published_and_the_last_good_state_comes_back(
    exported, teacher_ckpt, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    edge, _ = exported("bn")
    state = tmp_path / "s"
    dep = make_deployment(edge, teacher_ckpt, state, batch_size=8)
    dep.start()
    dep.upload(batch(dep.manifest, 8, seed=1))
    assert dep.wait_idle(60) and dep.version == 1
    dep.stop()
    good = _blob(dep, 1).tensors
    # the same deployment restarted with an infinite learning rate: its next step makes the replica non-finite
    dep = make_deployment(edge, teacher_ckpt, state, batch_size=8, student_lr=math.inf)
    dep.start()
    try:
        dep.upload(batch(dep.manifest, 8, seed=2))
        assert dep.wait_idle(60)
        assert dep.counters["diverged"] == 1 and dep.counters["promised_publishes"] == 1
        # the diverged state was never published; the version its ack promised (2) carries the last good state
        assert dep.version == 2 and dep.store.blob_versions() == [1, 2]
        now, v2 = dep.cema.blob_tensors(), _blob(dep, 2).tensors
        assert all(np.array_equal(now[k], v) and np.array_equal(v2[k], v) for k, v in good.items())
        assert dep.cema.problem() is None and dep.cursor == 16  # the batch counts as used
    finally:
        dep.stop()


def test_rollback_reports_mark_a_version_bad_and_return_to_the_last_good_state(
    exported, teacher_ckpt, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    from cema_deploy.contract.messages import EdgeReport

    edge, _ = exported("bn")
    dep = make_deployment(edge, teacher_ckpt, tmp_path / "s", batch_size=8, spec={"rollback_devices": 2})
    dep.start()
    try:
        for i in range(4):
            dep.upload(batch(dep.manifest, 8, seed=i))
            assert dep.wait_idle(60)
        assert dep.version == 4
        rollback = EdgeReport(kind="rollback", version=3, reason="entropy rose")
        dep.edge_report(rollback, device="cam-a")
        dep.edge_report(rollback, device="cam-a")  # one device twice is not two devices
        assert dep.wait_idle(60) and dep.version == 4 and dep.counters["restores"] == 0
        dep.edge_report(rollback, device="cam-b")
        assert dep.wait_idle(60) and dep.version == 5 and dep.counters["restores"] == 1
        assert dep.bad == [3, 4]  # v3 and what was built on it
        v2, v5 = _blob(dep, 2).tensors, _blob(dep, 5).tensors
        assert all(np.array_equal(v5[k], v) for k, v in v2.items())  # published anew: the state behind v2
        dep.edge_report(EdgeReport(kind="rollback", version=4), device="cam-c")
        dep.edge_report(EdgeReport(kind="rollback", version=4), device="cam-d")
        assert dep.wait_idle(60) and dep.counters["restores"] == 1  # already bad: nothing more to do
        dep.upload(batch(dep.manifest, 8, seed=9))
        assert dep.wait_idle(60) and dep.version == 6
        lines = (dep_dir(tmp_path / "s") / "reports.jsonl").read_text().splitlines()
        assert len(lines) == 5 and '"device": "cam-b"' in lines[2]
    finally:
        dep.stop()


def test_freeze_stops_publishing_and_unfreeze_publishes_what_was_learnt(exported, teacher_ckpt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    edge, _ = exported("bn")
    dep = make_deployment(edge, teacher_ckpt, tmp_path / "s", batch_size=8)
    dep.start()
    try:
        assert dep.admin("freeze").frozen
        ack = dep.upload(batch(dep.manifest, 16, seed=1))
        assert ack.target_version == 0 and dep.wait_idle(60)
        assert dep.counters["steps"] == 2 and dep.version == 0 and dep.latest(0) is None
        st = dep.admin("unfreeze")
        assert not st.frozen and dep.wait_idle(60) and dep.version == 1
        assert dep.counters["publishes"] == 1
    finally:
        dep.stop()


def test_retention_deletes_old_frames_even_before_they_are_used(exported, teacher_ckpt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    edge, _ = exported("bn")
    dep = make_deployment(edge, teacher_ckpt, tmp_path / "s", batch_size=8, spec={"retention_s": 0.2})
    uploads = dep_dir(tmp_path / "s") / "uploads"
    dep.upload(batch(dep.manifest, 4, seed=1))
    assert len(list(uploads.glob("*.safetensors"))) == 1
    dep.start()
    try:
        deadline = time.time() + 30
        while list(uploads.glob("*.safetensors")) and time.time() < deadline:
            time.sleep(0.05)
        assert not list(uploads.glob("*.safetensors"))
        assert dep.counters["expired_samples"] == 4 and dep.metrics()["pending"] == 0 and dep.cursor == 4
    finally:
        dep.stop()


def test_two_deployments_with_one_fingerprint_are_refused(exported, teacher_ckpt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cema_deploy.cloud.engines import get_engine
    from cema_deploy.exceptions import CloudError

    edge, _ = exported("bn")
    a = make_deployment(edge, teacher_ckpt, tmp_path / "s", name="a")
    b = make_deployment(edge, teacher_ckpt, tmp_path / "s", name="b")
    with pytest.raises(CloudError, match="Deployments 'a' and 'b' serve one export"):
        get_engine("local")([a, b])
    with pytest.raises(CloudError, match="Unknown engine 'nope'; valid engines: local"):
        get_engine("nope")


def test_the_edge_runtime_adapts_through_the_in_process_link(exported, teacher_ckpt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cema_deploy.cloud.engines.local import LocalEngine
    from cema_deploy.cloud.local_link import LocalLink
    from cema_deploy.exceptions import StaleGenerationError, UplinkError
    from cema_deploy.runtime.backends.registry import get_backend
    from cema_deploy.runtime.edge import EdgeRuntime
    from cema_deploy.runtime.selection.rules import SampleSelector, SelectionConfig

    edge, _ = exported("bn")
    dep = make_deployment(edge, teacher_ckpt, tmp_path / "s", batch_size=8, spec={"pending_cap": 24})
    engine = LocalEngine([dep])
    engine.start()
    keep_all = SelectionConfig(num_classes=10, e0=np.log(10) + 1, e_min=None, d_margin=None)
    link = LocalLink(engine, dep.fingerprint, "cam-local")
    x = images(24, seed=5)
    try:
        with EdgeRuntime(
            get_backend("ort-cpu", edge), SampleSelector(keep_all), client=link, poll_wait_s=1.0, upload_batch=8
        ) as rt:
            for i in range(3):
                rt.process(x[8 * i : 8 * (i + 1)])
                assert rt.sync(timeout=60)
            # the first batch goes up whole as calibration (its blob: v1), then one step per batch (v2..v4)
            assert rt.version == 4 and rt.metrics()["uplink"]["uploaded"] == 24
        assert np.array_equal(dep.samples.read_adapt(0, 24), x)  # no encoding: the very arrays
        assert {u.device for u in dep.samples.uploads.values()} == {"cam-local"}
        # refusals map to the errors the HTTP client raises
        link2 = LocalLink(engine, dep.fingerprint, "cam-2")
        engine.admin(dep.name, "reset")
        with pytest.raises(StaleGenerationError) as stale:
            link2.upload(batch(dep.manifest, 4, generation=1), idempotency_key="a")
        assert stale.value.current.generation == 2
        dep.stop()  # no worker: pending samples stay
        link2.upload(batch(dep.manifest, 24, seed=1), idempotency_key="b")
        with pytest.raises(UplinkError) as full:
            link2.upload(batch(dep.manifest, 1, seed=2), idempotency_key="c")
        assert full.value.status == 429 and full.value.retryable and full.value.retry_after >= 1
    finally:
        engine.stop()


def test_a_group_norm_deployment_adapts_with_the_default_layout(exported, teacher_ckpt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The default config (channels_last) on a GroupNorm export: torch's CPU GroupNorm backward in channels_last
    crashed the whole process here; the method trains such models in the plain layout and publishes a step."""
    edge, _ = exported("gn")
    dep = make_deployment(edge, teacher_ckpt, tmp_path / "s", batch_size=8)
    assert dep.cema.config.channels_last  # the default, kept; the layout falls back for GroupNorm only
    dep.start()
    try:
        for i in range(2):
            dep.upload(batch(dep.manifest, 4, seed=i))
        assert dep.wait_idle(60)
        assert dep.version >= 1
        assert all(np.isfinite(t).all() for t in _blob(dep, dep.version).tensors.values())
    finally:
        dep.stop()
