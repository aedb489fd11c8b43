"""Issue 22's delivery levers, off by default (the ``cema`` preset stays the paper's): replay that keeps to the
current episode (``replay_scope = "episode"``: what the replay window holds after a shift calibration) and
replay-only steps that leave the running statistics alone (``replay_moves_stats = False``)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.cloud.conftest import batch, images, make_deployment
from tests.conftest import needs_torch


def _append(store, kind, imgs, **kw):  # type: ignore[no-untyped-def]
    up = store.new_upload(kind, imgs, generation=1, **kw)
    store.write(up)
    store.add(up)
    return up


def test_the_paper_replays_from_the_window_the_default_from_the_episode_and_bad_scopes_are_refused() -> None:
    from cema_deploy.cloud.config import CemaConfig
    from cema_deploy.exceptions import CloudError

    assert CemaConfig.preset("cema").replay_scope == "window" and CemaConfig.preset("cema").replay_moves_stats is True
    assert CemaConfig().replay_scope == "episode" and CemaConfig().replay_moves_stats is True  # issue 22's default
    with pytest.raises(CloudError, match="replay_scope = 'recent' must be one of"):
        CemaConfig(replay_scope="recent")


def test_a_window_start_keeps_draws_inside_the_episode(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cema_deploy.cloud.store.replay import SampleStore

    store = SampleStore(tmp_path / "u", capacity=100)
    old = [_append(store, "selected", np.full((4, 2, 2, 3), i, np.uint8)) for i in range(5)]  # 20 samples, values 0-4
    new = _append(store, "selected", np.full((6, 2, 2, 3), 9, np.uint8))  # the episode: 6 samples of value 9
    assert store.window(26) == (0, 26) and store.window(26, new.adapt_start) == (20, 26) == (old[-1].adapt_end, 26)
    assert store.window_len(26, 20) == 6
    whole = store.sample(26, np.random.default_rng(0), end=26)
    episode = store.sample(26, np.random.default_rng(0), end=26, start=20)
    assert len(whole) == 26 and set(np.unique(whole)) == {0, 1, 2, 3, 4, 9}
    assert len(episode) == 6 and set(np.unique(episode)) == {9}


@needs_torch
@pytest.mark.parametrize("scope", ["window", "episode"])
def test_episode_replay_starts_at_the_last_shift_calibration(exported, teacher_ckpt, tmp_path, scope) -> None:  # type: ignore[no-untyped-def]
    from cema_deploy.contract.messages import BatchReport

    edge, _ = exported("bn")
    dep = make_deployment(edge, teacher_ckpt, tmp_path / "s", batch_size=8, replay_min=8, replay_scope=scope)
    dep.start()
    try:
        sel = np.zeros(8, bool)
        sel[:4] = True
        dep.upload(batch(dep.manifest, 8, seed=1, kind="calibration", calibration="start", selected=sel))
        for i in range(3):
            dep.upload(batch(dep.manifest, 8, seed=10 + i))
        assert dep.wait_idle(60) and dep.samples.adapt_total == 28
        assert dep.replay_start == 0  # the first episode began at the start calibration, adapt index 0
        dep.upload(batch(dep.manifest, 8, seed=2, kind="calibration", calibration="shift", selected=sel))
        assert dep.wait_idle(60) and dep.samples.adapt_total == 32
        # the window after the shift: the whole history, or only the shift batch's 4 selected samples
        want = (0, 32) if scope == "window" else (28, 32)
        assert dep.samples.window(dep.samples.adapt_total, dep.replay_start) == want
        dep.batch_report(BatchReport(seen=64, selected=8, uploaded=8, generation=0))  # the steps so far
        # a batch report with no step: a replay-only step only where the window holds > replay_min (8)
        ack = dep.batch_report(BatchReport(seen=64, selected=0, uploaded=0, generation=0))
        assert ack.replay_step is (scope == "window")
        assert dep.wait_idle(60) and dep.counters["replay_steps"] == (1 if scope == "window" else 0)
        assert dep.metrics()["replay_window"] == want[1] - want[0]
    finally:
        dep.stop()


@needs_torch
@pytest.mark.parametrize("moves", [True, False])
def test_a_replay_only_step_moves_statistics_only_where_configured(exported, moves) -> None:  # type: ignore[no-untyped-def]
    import torch

    from cema_deploy.cloud.config import CemaConfig
    from cema_deploy.cloud.method import Cema
    from cema_deploy.cloud.models import replica_from_export
    from cema_deploy.contract.manifest import manifest_from_dir
    from tests.cloud.test_method import _bn_stats
    from tests.conftest import tiny_model

    out, _ = exported("bn")
    manifest = manifest_from_dir(out)
    cfg = CemaConfig.preset("cema", replay_moves_stats=moves)
    cema = Cema(tiny_model("bn", seed=7), replica_from_export(out, manifest), manifest=manifest, config=cfg)
    cema.adapt(images(8, seed=0))  # a normal step: statistics move under both settings
    stats = {side: _bn_stats(m) for side, m in (("student", cema.student), ("teacher", cema.teacher))}
    affine = {k: v.clone() for k, v in cema.student.state_dict().items() if k.endswith(("weight", "bias"))}
    cema.replay_step(images(16, seed=3))
    for side, m in (("student", cema.student), ("teacher", cema.teacher)):
        same = all(
            torch.equal(mu, stats[side][n][0]) and torch.equal(var, stats[side][n][1])
            for n, (mu, var) in _bn_stats(m).items()
        )
        assert same is (not moves or side == "teacher"), side  # the replay step never runs the teacher in TBR
    assert any(not torch.equal(v, affine[k]) for k, v in cema.student.state_dict().items() if k in affine)
    # the normal step afterwards still moves them: the switch is restored
    before = _bn_stats(cema.student)
    cema.adapt(images(8, seed=4))
    assert any(not torch.equal(v[0], before[n][0]) for n, v in _bn_stats(cema.student).items())
