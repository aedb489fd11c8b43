"""Issue 22 items 2 and 6 (cloud half): the distillation effort per upload (student steps per cloud batch, each with
its own replay draw) and the cloud-side gate before publishing, both beyond the paper; the ``cema`` preset stays the
paper's whatever the defaults become."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from tests.cloud.conftest import batch, images, make_deployment
from tests.conftest import needs_torch

#: The paper's values (arXiv 2402.17316 Sec. 3.3; official chenyaofo/CEMA conf/cema.conf and core/tta/cema.py).
PAPER = {
    "batch_size": 32,
    "teacher_lr": 2.5e-4,
    "student_lr": 2.5e-3,
    "momentum": 0.9,
    "alpha": 3.0,
    "beta": 3.0,
    "gamma": 1.0,
    "temperature": 1.0,
    "e0_ratio": 0.4,
    "replay_size": 10_000,
    "replay_min": 256,
    "replay_factor": 3,
    "idle_factor": 4,
    "replay_steps": True,
    "replay_scope": "window",
    "replay_moves_stats": True,
    "publish_every": 1,
    "bn_momentum": 0.1,
    "statistics": "training",
    "student_steps": 1,
    "calibration_distils": False,
    "gate": False,
}


def test_the_cema_preset_is_the_papers() -> None:
    from cema_deploy.cloud.config import CemaConfig

    cfg = CemaConfig.preset("cema").as_dict()
    assert {k: cfg[k] for k in PAPER} == PAPER
    assert CemaConfig.preset("cema", gate=True).gate is True  # overrides win over the preset


def test_cloud_settings_parse_to_their_field_types_and_bad_ones_are_refused() -> None:
    from cema_deploy.cloud.config import CemaConfig, parse_method_settings
    from cema_deploy.exceptions import CloudError

    got = parse_method_settings(["student_steps=4", "gate=off", "gate_margin=1.5", "replay_scope=episode"])
    assert got == {"student_steps": 4, "gate": False, "gate_margin": 1.5, "replay_scope": "episode"}
    for bad, match in (("steps=4", "not KEY=VALUE"), ("student_steps=four", "is not a int"), ("gate=maybe", "bool")):
        with pytest.raises(CloudError, match=match):
            parse_method_settings([bad])
    with pytest.raises(CloudError, match="student_steps = 0 must be >= 1"):
        CemaConfig(student_steps=0)
    with pytest.raises(CloudError, match="Unknown cloud preset 'paper'"):
        CemaConfig.preset("paper")


@needs_torch
@pytest.mark.parametrize("k", [1, 3])
def test_student_steps_take_k_distillation_steps_each_on_its_share_of_the_replay(exported, k) -> None:  # type: ignore[no-untyped-def]
    from cema_deploy.cloud.config import CemaConfig
    from cema_deploy.cloud.method import Cema
    from cema_deploy.cloud.models import replica_from_export
    from cema_deploy.contract.manifest import manifest_from_dir
    from tests.conftest import tiny_model

    out, _ = exported("bn")
    manifest = manifest_from_dir(out)
    cfg = CemaConfig(student_steps=k)
    cema = Cema(tiny_model("bn", seed=7), replica_from_export(out, manifest), manifest=manifest, config=cfg)
    report = cema.adapt(images(8, seed=0), images(3 * 8 * k, seed=1))
    # one cloud step (the counter publish_every and replay seeding read), k SGD steps, each on 8 new + 24 replayed
    assert (cema.steps, cema.distill_steps, report.replayed) == (1, k, 24 * k)
    assert cema.distilled_samples == k * (8 + 24)
    cema.adapt(images(8, seed=2))  # no replay: k steps on the new samples alone
    assert (cema.steps, cema.distill_steps, cema.distilled_samples) == (2, 2 * k, k * (8 + 24) + k * 8)


@needs_torch
def test_the_deployment_draws_the_replay_of_every_student_step(exported, teacher_ckpt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    edge, _ = exported("bn")
    dep = make_deployment(
        edge, teacher_ckpt, tmp_path / "s", batch_size=8, replay_min=16, replay_factor=1, student_steps=2
    )
    dep.start()
    try:
        dep.upload(batch(dep.manifest, 8, seed=1))
        assert dep.wait_idle(60) and dep.counters["steps"] == 1
        dep.upload(batch(dep.manifest, 8, seed=2))  # the window holds 16 from this upload on
        assert dep.wait_idle(60) and dep.counters["steps"] == 2
        # the first step: the window (8 samples) is below replay_min, so 2 steps x 8 new; the second: 16 >= 16,
        # so 2 steps x (8 new + 1 x 8 replayed each), 2 x 8 = 16 drawn at once
        assert dep.counters["mixed_steps"] == 1 and dep.cema.distill_steps == 4
        assert dep.cema.distilled_samples == 2 * 8 + 2 * (8 + 8)
    finally:
        dep.stop()


def _same_model_teacher(tmp_path: Path) -> Path:
    """A teacher checkpoint of the export's own weights: the teacher and the untouched replica agree on every frame."""
    from safetensors.torch import save_file

    from tests.conftest import tiny_model

    path = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model("bn").state_dict().items()}, str(path))
    return path


@needs_torch
def test_the_gate_publishes_a_candidate_that_agrees_more_and_refuses_one_that_agrees_less(exported, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cema_deploy.contract.blob import blob_from_bytes

    edge, _ = exported("bn")
    pre = __import__("cema_deploy.contract.manifest", fromlist=["x"]).manifest_from_dir(edge).preprocess
    dep = make_deployment(
        edge,
        _same_model_teacher(tmp_path),
        tmp_path / "s",
        spec={"teacher_mean": tuple(pre.mean), "teacher_std": tuple(pre.std)},
        batch_size=8,
        statistics="samples",  # training forwards leave the statistics: only the constructed tensors differ
        student_lr=1e-12,
        teacher_lr=1e-12,
        gate=True,
        gate_frames=64,
    )
    rng = np.random.default_rng(0)
    sel = np.zeros(8, bool)
    sel[:4] = True
    dep.start()
    try:
        dep.upload(batch(dep.manifest, 8, seed=1))  # nothing published yet: the candidate passes (no reference)
        assert dep.wait_idle(60) and dep.version == 1
        # the first training forward set both models' statistics from that batch (the teacher is the export's model)
        good = dep.cema.blob_tensors()
        bad = {
            n: v + rng.normal(0, 3, v.shape).astype(np.float32) if n.endswith("bias") else v for n, v in good.items()
        }
        dep.cema.load_replica(bad)  # then a calibration (never gated) publishes a reference that agrees less
        dep.upload(batch(dep.manifest, 8, seed=2, kind="calibration", calibration="start", selected=sel))
        assert dep.wait_idle(60) and dep.counters["calibrations"] == 1 and not dep.counters["gate_refused"]
        ref = dep.version
        dep.cema.load_replica(good)  # a candidate that agrees more than the reference: published
        dep.upload(batch(dep.manifest, 8, seed=3))
        assert dep.wait_idle(60) and dep.version == ref + 1 and dep.counters["gate_passed"] == 2
        dep.cema.load_replica(bad)  # one that agrees less than the good one now published: refused
        dep.upload(batch(dep.manifest, 8, seed=4))
        assert dep.wait_idle(60) and dep.counters["steps"] == 3 and dep.counters["gate_refused"] == 1
        # the replica is back at the published parameters; the upload's ack named the next version, so the
        # promise publishes it holding them (an edge waiting for it does not wait in vain)
        assert dep.version == ref + 2 and dep.counters["promised_publishes"] == 1
        served = blob_from_bytes(dep.latest(ref + 1)[1]).tensors  # type: ignore[index]
        for name, value in good.items():
            np.testing.assert_allclose(dep.cema.blob_tensors()[name], value, atol=1e-5)
            np.testing.assert_allclose(served[name], value, atol=1e-5)
        first, better, worse = dep.gate_decisions()
        assert first["reference"] is None and first["passed"] and first["version"] == 1
        assert better["reference"] == ref and better["passed"] and better["version"] == ref + 1
        assert better["candidate_agreement"] > better["reference_agreement"] and better["frames"] == 12
        assert worse["reference"] == ref + 1 and not worse["passed"] and worse["version"] is None
        assert worse["candidate_agreement"] < worse["reference_agreement"] and worse["frames"] == 20
        assert dep.metrics()["gate_last"] == worse
    finally:
        dep.stop()


@needs_torch
def test_without_the_gate_nothing_is_judged(exported, teacher_ckpt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    edge, _ = exported("bn")
    dep = make_deployment(edge, teacher_ckpt, tmp_path / "s", batch_size=8)
    dep.start()
    try:
        dep.upload(batch(dep.manifest, 16, seed=1))
        assert dep.wait_idle(60) and dep.version == 2
        assert dep.gate_decisions() == [] and "gate_last" not in dep.metrics() and not dep.counters["gate_passed"]
    finally:
        dep.stop()


@needs_torch
@pytest.mark.network
def test_cloud_serve_takes_the_effort_and_gate_options(cloud_factory, exported) -> None:  # type: ignore[no-untyped-def]
    import httpx

    from cema_deploy.cloud.store.state import StateStore
    from cema_deploy.contract.manifest import manifest_from_dir
    from cema_deploy.contract.protocol import PROTOCOL_HEADER, PROTOCOL_VERSION, blob_url, samples_url
    from cema_deploy.contract.samples import SampleBatch, samples_to_bytes

    manifest = manifest_from_dir(exported("bn")[0])
    cloud = cloud_factory("--student-steps", "2", "--gate", "--cloud-set", "gate_frames=16", "--cloud-preset", "cema")
    token = StateStore(cloud.state).add_token("cam-01")
    auth = {"Authorization": f"Bearer {token}", PROTOCOL_HEADER: str(PROTOCOL_VERSION)}
    fp = manifest.fingerprint
    with httpx.Client(timeout=60) as http:
        for seed in (1, 2):
            body = samples_to_bytes(SampleBatch(images=images(8, seed), fingerprint=fp, edge_version=0), encoding="raw")
            assert http.post(samples_url(cloud.url, fp), content=body, headers=auth).status_code == 202
        for _ in range(4):  # published, or promised unchanged where the gate refused the second candidate
            r = http.get(blob_url(cloud.url, fp), params={"after": 1, "wait": 30}, headers=auth)
            if r.status_code == 200:
                break
        assert r.status_code == 200 and r.headers["X-Cema-Version"] == "2"
        for _ in range(100):  # the counters follow the publish within the same job
            metrics = http.get(cloud.url + "/metrics").text
            gate = [x for x in metrics.splitlines() if x.startswith(("cema_gate_passed_total{", "cema_gate_refused"))]
            if sum(float(line.rsplit(" ", 1)[1]) for line in gate) == 2:
                break
            time.sleep(0.2)
    # the first step had no published reference (passed), the second was judged; 2 steps of 2 SGD steps each
    assert sum(float(line.rsplit(" ", 1)[1]) for line in gate) == 2, gate
    assert 'cema_steps_total{deployment="test_resnet"' in metrics
    for line in metrics.splitlines():
        if line.startswith("cema_steps_total{"):
            assert float(line.rsplit(" ", 1)[1]) == 2  # cloud steps, not SGD steps


@needs_torch
@pytest.mark.parametrize("distils", [False, True])
def test_a_calibration_batch_distils_before_its_blob_only_with_calibration_distils(  # type: ignore[no-untyped-def]
    exported, teacher_ckpt, tmp_path, distils
) -> None:
    """Beyond the paper (issue 22, delivery): with ``calibration_distils`` the blob answering a calibration batch
    already carries the cloud step on its frames, B at a time (teacher, then replica); without it (the paper's) the
    calibration sets the running statistics and leaves every affine parameter at the export's."""
    from cema_deploy.contract.blob import blob_from_bytes

    edge, _ = exported("bn")
    dep = make_deployment(edge, teacher_ckpt, tmp_path / "s", batch_size=8, calibration_distils=distils)
    before = dep.cema.blob_tensors()
    dep.start()
    try:
        sel = np.zeros(16, bool)
        dep.upload(batch(dep.manifest, 16, seed=5, kind="calibration", calibration="start", selected=sel))
        assert dep.wait_idle(60) and dep.counters["calibrations"] == 1 and dep.version == 1
        served = blob_from_bytes(dep.latest(0)[1]).tensors  # type: ignore[index]
        affine = [n for n in served if n.endswith(("weight", "bias"))]
        stats = [n for n in served if n.endswith(("running_mean", "running_var"))]
        assert affine and stats
        moved = [n for n in affine if not np.allclose(served[n], before[n])]
        assert all(not np.allclose(served[n], before[n]) for n in stats)  # the calibration set the statistics
        # two cloud steps of 8 on the 16 calibration frames, no other upload: steps counts only the full steps
        assert (dep.cema.steps, dep.counters["calibration_steps"], dep.counters["steps"]) == (
            (2, 1, 0) if distils else (0, 0, 0)
        )
        assert bool(moved) is distils
    finally:
        dep.stop()


def test_a_fleet_table_takes_a_preset_and_sets_fields_over_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cema_deploy.cloud.config import CemaConfig, spec_from_table
    from cema_deploy.exceptions import CloudError

    def method(m: dict) -> CemaConfig:  # type: ignore[type-arg]
        return spec_from_table("cams", {"edge": "e", "method": m}, base=tmp_path, where="t").method

    paper = method({"preset": "cema", "gate": True})
    assert {k: paper.as_dict()[k] for k in PAPER if k != "gate"} == {k: v for k, v in PAPER.items() if k != "gate"}
    assert paper.gate is True
    assert method({}) == CemaConfig() and CemaConfig().student_steps == 8 and CemaConfig().calibration_distils
    with pytest.raises(CloudError, match="Unknown cloud preset 'paper'"):
        method({"preset": "paper"})
