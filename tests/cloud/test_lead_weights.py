"""The cloud's lead weights (issue 22 item 4, beyond the paper): per class the replica predicts, how often the
teacher disagrees on the episode's uploads; sent with each published blob when ``lead_frames`` > 0."""

from __future__ import annotations

import numpy as np
import pytest

from tests.cloud.conftest import batch, make_deployment
from tests.conftest import needs_torch


def test_lead_weights_of_a_hand_built_case() -> None:
    from cema_deploy.cloud.deployment.lead import lead_weights

    # replica predicts class 0 ten times (teacher says 1 on five of them), class 1 ten times (teacher agrees on
    # all), class 3 ten times (teacher says 2 on all); class 2 never: it gets the overall rate 15/30 = 0.5
    replica = np.array([0] * 10 + [1] * 10 + [3] * 10)
    teacher = np.array([0] * 5 + [1] * 5 + [1] * 10 + [2] * 10)
    w = lead_weights(teacher, replica, 4, prior=2.0, mix=0.0)
    # d = (k + 2 * 0.5) / (n + 2) = [6/12, 1/12, 0.5, 11/12], mean 0.5
    np.testing.assert_allclose(w, [1.0, 1 / 6, 1.0, 11 / 6])
    np.testing.assert_allclose(lead_weights(teacher, replica, 4, prior=2.0, mix=0.1), 0.9 * w + 0.1)
    assert lead_weights(teacher, replica, 4, prior=2.0, mix=0.3).mean() == pytest.approx(1.0)
    # no smoothing: the raw rates, class 2 (no upload) at the overall rate
    np.testing.assert_allclose(lead_weights(teacher, replica, 4, prior=0.0, mix=0.0), np.array([0.5, 0, 0.5, 1]) / 0.5)
    assert lead_weights(replica, replica, 4, prior=2.0, mix=0.0).tolist() == [1.0] * 4  # never disagree: uniform


@needs_torch
def test_a_published_blob_carries_the_lead_weights_of_its_own_replica(exported, teacher_ckpt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cema_deploy.cloud.deployment.lead import lead_weights
    from cema_deploy.contract.blob import blob_from_bytes, validate_blob

    edge, _ = exported("bn")
    dep = make_deployment(  # a teacher that does not move (lr ~0, statistics from statistics samples only): the labels
        edge,  # it gave the older uploads at the first publish are the ones it gives now
        teacher_ckpt,
        tmp_path / "s",
        batch_size=8,
        lead_frames=12,
        lead_prior=1.0,
        teacher_lr=1e-12,
        statistics="samples",
    )
    dep.start()
    try:
        from cema_deploy.contract.samples import SampleBatch
        from tests.runtime.test_edge import _diverse  # frames the tiny models tell apart (noise: one class each)

        frames = _diverse(16, seed=5)
        for i in (0, 1):
            dep.upload(
                SampleBatch(images=frames[8 * i : 8 * i + 8], fingerprint=dep.manifest.fingerprint, edge_version=0)
            )
            assert dep.wait_idle(60) and dep.version == i + 1
        blob = blob_from_bytes(dep.latest(1)[1])  # type: ignore[index]
        assert blob.lead is not None and len(blob.lead) == dep.manifest.num_classes
        validate_blob(blob, dep.manifest)
        teacher, replica = dep.cema.predict(
            frames[-12:]
        )  # on the episode's newest 12 uploads  # the state that was published (nothing ran since)
        want = lead_weights(teacher.argmax(1), replica.argmax(1), 10, prior=1.0, mix=0.1)
        np.testing.assert_allclose(blob.lead, want, rtol=1e-6)
        assert max(blob.lead) > min(blob.lead)  # the two models disagree on some classes more than on others
        assert np.mean(blob.lead) == pytest.approx(1.0)
        assert sorted(dep._lead_teacher) == list(range(4, 16))  # the teacher's labels of the window, no older
        last = dep.lead_last()
        assert last is not None and last["frames"] == 12 and len(last["weights"]) == 10
    finally:
        dep.stop()


@needs_torch
def test_no_lead_weights_unless_asked(exported, teacher_ckpt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cema_deploy.contract.blob import blob_from_bytes

    edge, _ = exported("bn")
    dep = make_deployment(edge, teacher_ckpt, tmp_path / "s", batch_size=8)
    dep.start()
    try:
        dep.upload(batch(dep.manifest, 8, seed=1))
        assert dep.wait_idle(60) and dep.version == 1
        assert blob_from_bytes(dep.latest(0)[1]).lead is None and dep.lead_last() is None  # type: ignore[index]
    finally:
        dep.stop()
