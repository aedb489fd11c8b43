"""The edge owns its statistics, the cloud the affine parameters (issue 21, items 3 and 4), over real HTTP on
127.0.0.1 with real ONNX Runtime edges: two devices with different corruptions on one deployment each serve the
statistics of their own stream; the replica's student step normalises each device's uploads with that device's
statistics; calibration uploads are skipped; a bad statistics report is refused and changes nothing; a protocol-2
edge is refused naming both versions."""

from __future__ import annotations

import base64
import copy
from typing import Any

import numpy as np
import pytest

from cema_deploy.contract.protocol import PROTOCOL_HEADER, PROTOCOL_VERSION
from tests.cloud.conftest import images, make_deployment, serve_deployments
from tests.conftest import needs_torch

pytestmark = [needs_torch, pytest.mark.network]


def _brightened(n: int, seed: int) -> np.ndarray:
    """Frames of a bright scene: the random frames lifted toward white."""
    return (128 + images(n, seed) // 2).astype(np.uint8)


def _noisy(n: int, seed: int) -> np.ndarray:
    """Frames of a dark scene under heavy sensor noise."""
    rng = np.random.default_rng(1000 + seed)
    dark = images(n, seed) // 4
    return np.clip(dark.astype(np.int16) + rng.normal(0, 60, dark.shape), 0, 255).astype(np.uint8)


def _edge(out: Any, url: str, token: str) -> Any:
    from cema_deploy.contract.manifest import manifest_from_dir
    from cema_deploy.runtime.backends.registry import get_backend
    from cema_deploy.runtime.edge import EdgeRuntime, RollbackConfig
    from cema_deploy.runtime.link.client import CloudClient
    from cema_deploy.runtime.selection.rules import SampleSelector, SelectionConfig
    from cema_deploy.runtime.stats.adapter import StatsConfig, stats_adapter_from_dir

    be = get_backend("ort-cpu", out)
    adapter, why = stats_adapter_from_dir(be, out, StatsConfig(mode="ema", every=1, reset_on_shift=False))
    assert adapter is not None, why
    keep_all = SelectionConfig(num_classes=10, e0=np.log(10) + 1, e_min=None, d_margin=None)  # every sample goes up
    return EdgeRuntime(
        be,
        SampleSelector(keep_all),
        client=CloudClient(url, token, manifest_from_dir(out).fingerprint, encoding="png"),
        rollback=RollbackConfig(window=16, min_samples=8),
        poll_wait_s=1.0,
        upload_batch=8,
        sync=True,
        sync_timeout_s=60.0,
        stats=adapter,
    )


def _stats_of(tensors: Any) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in tensors.items() if k.endswith(("running_mean", "running_var"))}


def test_two_devices_each_serve_their_own_statistics_and_the_replica_learns_under_them(
    exported, teacher_ckpt, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    from cema_deploy.cloud.store.edge_stats import EdgeStatsBook
    from cema_deploy.cloud.store.state import StateStore
    from cema_deploy.contract.blob import blob_from_path

    out, _ = exported("bn")
    state = tmp_path / "state"
    dep = make_deployment(out, teacher_ckpt, state, batch_size=8, replay_min=8)
    export_stats = _stats_of(blob_from_path(out / "params.safetensors").tensors)
    replica_before = {k: v.clone() for k, v in dep.cema.student.state_dict().items() if "running" in k}
    tokens = {d: StateStore(state).add_token(d) for d in ("cam-bright", "cam-noisy")}
    frames = {"cam-bright": _brightened, "cam-noisy": _noisy}
    with serve_deployments([dep], state) as srv:
        edges = {d: _edge(out, srv.url, tokens[d]) for d in tokens}
        try:
            for i in range(4):  # interleaved: each device's batches go up while the other's are adapted on
                for d, rt in edges.items():
                    rt.process(frames[d](8, seed=10 * i + len(d)))
            for rt in edges.values():
                assert rt.sync(timeout=60)
            served = {d: _stats_of(rt.backend.tensors) for d, rt in edges.items()}
            own = {d: rt.stats.tensors() for d, rt in edges.items()}  # type: ignore[union-attr]
            metrics = {d: rt.metrics() for d, rt in edges.items()}
        finally:
            for rt in edges.values():
                rt.close()
        book = dep.edge_stats.snapshot()
        used, last = dict(dep.edge_stats_used), dep.last_student_groups
        blob = blob_from_path(dep.store.blob_path(dep.version))
    for d, m in metrics.items():
        # cloud blobs serve (affine parameters from the cloud), with this device's statistics, not the blob's
        assert m["version"] >= 2 and m["blobs_applied"] >= 1, m
        assert m["uploaded"]["calibration"] == 0 and m["uploaded"]["statistics"] == 0 and m["calibrations"] == {}
        assert m["rollbacks"] == 0
        for k, v in own[d].items():
            np.testing.assert_array_equal(served[d][k], v)
            assert not np.allclose(v, export_stats[k])
    # each device's statistics come from its own stream: the two differ, and neither is the other's
    first = next(k for k in own["cam-bright"] if k.endswith("running_mean"))
    assert not np.allclose(served["cam-bright"][first], served["cam-noisy"][first], atol=1e-2)
    assert not np.allclose(served["cam-bright"][first], blob.tensors[first])  # nor the published replica's
    # the cloud keeps each device's latest report (float16 on the wire) ...
    assert set(book) == set(tokens)
    for d in tokens:
        for k, v in own[d].items():
            np.testing.assert_allclose(book[d].tensors[k], v, rtol=2e-3, atol=1e-3)
    # ... durably: a restarted cloud reads the same book
    again = EdgeStatsBook(dep.store.directory / "edge-stats").snapshot()
    assert {d: s.local_generation for d, s in again.items()} == {d: s.local_generation for d, s in book.items()}
    # the student steps normalised both devices' uploads with their own statistics, and never moved the replica's
    # running statistics (every sample came from a device that owns its statistics)
    assert used.get("cam-bright", 0) >= 8 and used.get("cam-noisy", 0) >= 8, used
    assert last is not None and set(last.devices) <= set(tokens) and (last.index >= 0).all()
    for g, d in enumerate(last.devices):
        assert last.generations[g] <= book[d].local_generation
    for k, v in dep.cema.student.state_dict().items():
        if k in replica_before:
            assert (v == replica_before[k]).all(), k


def test_the_student_loss_on_a_devices_samples_uses_that_devices_statistics(exported, teacher_ckpt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Exact: the loss of a replay-only step under groups equals Eqn. 7 computed by a replica copy in eval mode
    whose running statistics are each device's (TBR's forward value is the running-statistics normalisation)."""
    import torch

    from cema_deploy.cloud.edge_statistics import groups_for
    from cema_deploy.cloud.method import distill_loss, set_bn_training
    from cema_deploy.cloud.store.edge_stats import EdgeStatsBook

    out, _ = exported("bn")
    dep = make_deployment(
        out, teacher_ckpt, tmp_path / "state", batch_size=4, channels_last=False, replay_moves_stats=False
    )
    cema = dep.cema
    cema.calibrate(images(8, seed=1))  # the replica's own statistics are set (a sample without a device uses them)
    rng = np.random.default_rng(0)
    base = {k: v.detach().numpy() for k, v in cema.student.state_dict().items() if k.endswith(("mean", "var"))}
    per_device = {
        d: {
            k: (v + rng.normal(0, 0.3, v.shape) if k.endswith("mean") else v * rng.uniform(0.5, 2.0, v.shape)).astype(
                np.float32
            )
            for k, v in base.items()
        }
        for d in ("a", "b")
    }
    book = EdgeStatsBook(tmp_path / "book")
    for d, s in per_device.items():
        book.put(d, s, local_generation=1)
    x = images(6, seed=3)
    devices = ["a", "b", "a", "", "b", "a"]  # "" : a device without statistics keeps the replica's own

    def expected() -> float:
        parts = []
        xs, xt = cema._inputs(x)
        with torch.no_grad():
            t_logits = cema.teacher(xt).float()
            for i, d in enumerate(devices):
                m = copy.deepcopy(cema.student)
                set_bn_training(m, False)
                if d:
                    m.load_state_dict({k: torch.from_numpy(v) for k, v in per_device[d].items()}, strict=False)
                parts.append(m(xs[i : i + 1]).float())
        c = cema.config
        return float(distill_loss(torch.cat(parts), t_logits, e0=cema.e0, alpha=c.alpha, beta=c.beta, gamma=c.gamma,
                                  temperature=c.temperature))  # fmt: skip

    want = expected()
    running = {k: v.clone() for k, v in cema.student.state_dict().items() if "running" in k}
    groups = groups_for(devices, book)
    assert groups is not None and groups.index.tolist() == [0, 1, 0, -1, 1, 0]
    got = cema.replay_step(x, groups=groups).student_loss
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert dict(groups.used) == {"a": 3, "b": 2}
    # a device's statistics are fixed in the step: only the "" sample's TBR could move the replica's own, and
    # replay_moves_stats=False keeps those still too
    for k, v in cema.student.state_dict().items():
        if k in running and not k.endswith("num_batches_tracked"):
            assert torch.equal(v, running[k]), k
    # under the other device's statistics the loss differs (the groups matter)
    swapped = groups_for(["b" if d == "a" else "a" if d == "b" else d for d in devices], book)
    assert cema.replay_step(x, groups=swapped).student_loss != pytest.approx(got, rel=1e-3)


def test_a_bad_statistics_report_is_refused_and_changes_nothing(exported, teacher_ckpt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import httpx

    from cema_deploy.cloud.store.state import StateStore
    from cema_deploy.contract.blob import blob_from_path
    from cema_deploy.contract.edge_statistics import statistics_to_text
    from cema_deploy.contract.messages import BatchReport
    from cema_deploy.contract.protocol import batches_url
    from cema_deploy.contract.safetensors_io import tensors_to_bytes

    out, _ = exported("bn")
    state = tmp_path / "state"
    dep = make_deployment(out, teacher_ckpt, state, batch_size=8)
    good = _stats_of(blob_from_path(out / "params.safetensors").tensors)
    token = StateStore(state).add_token("cam-1")
    headers = {"Authorization": f"Bearer {token}", PROTOCOL_HEADER: str(PROTOCOL_VERSION)}
    name = sorted(good)[0]
    var_name = next(k for k in good if k.endswith("running_var"))

    def raw(tensors: dict[str, np.ndarray]) -> str:  # as a faulty edge would send them (no clipping)
        return base64.b64encode(tensors_to_bytes({k: v.astype(np.float16) for k, v in tensors.items()}, {})).decode()

    bad = {
        "negative variance": raw({**good, var_name: -good[var_name] - 1}),
        "not finite": raw({**good, name: np.full_like(good[name], np.nan)}),
        "a name missing": raw({k: v for k, v in good.items() if k != name}),
        "an unknown name": raw({**good, "head.fc.running_mean": good[name]}),
        "another shape": raw({**good, name: np.zeros(3, np.float32)}),
        "not base64": "%%%",
        "not safetensors": "AAAA",
    }
    report = {"seen": 8, "selected": 0, "uploaded": 0, "generation": 0}
    with serve_deployments([dep], state) as srv, httpx.Client(timeout=30) as http:
        url = batches_url(srv.url, dep.fingerprint)
        for why, text in bad.items():
            r = http.post(url, json={**report, "statistics": text}, headers=headers)
            assert r.status_code == 400, (why, r.text)
            assert "edge statistics" in r.json()["detail"].lower(), r.text
        assert len(dep.edge_stats) == 0 and dep.counters["batch_reports"] == 0
        assert not (dep.store.directory / "edge-stats").exists() or not any(
            (dep.store.directory / "edge-stats").iterdir()
        )
        r = http.post(url, json={**report, "statistics": statistics_to_text(good, local_generation=4)}, headers=headers)
        assert r.status_code == 202, r.text
        assert dep.edge_stats.get("cam-1").local_generation == 4  # type: ignore[union-attr]
        assert dep.counters["batch_reports"] == 1 and dep.counters["edge_stats_reports"] == 1
        metrics = http.get(srv.url + "/metrics").text
        assert 'cema_edge_statistics_reports_total{deployment="test_resnet"' in metrics
        assert 'cema_requests_refused_total{deployment="test_resnet",status="400"} 7' in metrics
    # the book is part of the deployment's durable state: a restarted cloud has it
    again = make_deployment(out, teacher_ckpt, state, batch_size=8)
    kept = again.edge_stats.get("cam-1")
    assert kept is not None and kept.local_generation == 4
    for k, v in good.items():
        np.testing.assert_allclose(kept.tensors[k], v, rtol=1e-3, atol=1e-3)
    # a report of an edge whose adapter is now off (stats_generation 0) makes the cloud forget its statistics
    again.batch_report(BatchReport(seen=8, selected=0, uploaded=0, generation=0, stats_generation=5), device="cam-1")
    assert again.edge_stats.get("cam-1") is not None
    again.batch_report(BatchReport(seen=8, selected=0, uploaded=0, generation=0), device="cam-1")
    assert again.edge_stats.get("cam-1") is None and not any((again.store.directory / "edge-stats").iterdir())


def test_an_edge_of_protocol_2_is_refused_naming_both_versions(exported, teacher_ckpt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import httpx

    from cema_deploy.cloud.store.state import StateStore
    from cema_deploy.contract.protocol import batches_url, model_url

    assert PROTOCOL_VERSION == 3
    out, _ = exported("bn")
    state = tmp_path / "state"
    dep = make_deployment(out, teacher_ckpt, state, batch_size=8)
    token = StateStore(state).add_token("old-cam")
    old = {"Authorization": f"Bearer {token}", PROTOCOL_HEADER: "2"}
    with serve_deployments([dep], state) as srv, httpx.Client(timeout=30) as http:
        for r in (
            http.get(model_url(srv.url, dep.fingerprint), headers=old),
            http.post(
                batches_url(srv.url, dep.fingerprint),
                json={"seen": 1, "selected": 0, "uploaded": 0, "generation": 0},
                headers=old,
            ),
        ):
            assert r.status_code == 400, r.text
            assert "speaks cema protocol '2'; this side speaks protocol 3" in r.text
            assert r.headers[PROTOCOL_HEADER] == "3"
    assert dep.counters["batch_reports"] == 0


def test_each_of_k_student_steps_normalises_its_own_samples_with_their_devices_statistics(  # type: ignore[no-untyped-def]
    exported, teacher_ckpt, tmp_path
) -> None:
    """``student_steps = 3`` with the edges' statistics: every step sees the new samples plus its share of the
    replay, and the groups follow the samples (the new ones' devices three times, each replayed one's once)."""
    from cema_deploy.cloud.edge_statistics import groups_for
    from cema_deploy.cloud.store.edge_stats import EdgeStatsBook

    out, _ = exported("bn")
    dep = make_deployment(out, teacher_ckpt, tmp_path / "state", batch_size=4, channels_last=False, student_steps=3)
    cema = dep.cema
    cema.calibrate(images(8, seed=1))
    stats = {k: v.detach().numpy().copy() for k, v in cema.student.state_dict().items() if k.endswith(("mean", "var"))}
    book = EdgeStatsBook(tmp_path / "book")
    book.put("a", stats, local_generation=1)
    book.put("b", {k: v * 1.5 for k, v in stats.items()}, local_generation=1)
    new, replayed = images(2, seed=2), images(7, seed=3)
    devices = ["a", "b", "a", "a", "b", "b", "b", "", "a"]  # the 2 new samples, then the 7 replayed
    groups = groups_for(devices, book)
    assert groups is not None
    before = cema.distill_steps
    cema.adapt(new, replayed, groups=groups)
    assert cema.distill_steps - before == 3
    # replay shares 3, 2, 2 (np.array_split): "a","a","b" | "b","b" | "","a"; the new "a","b" in every step
    assert dict(groups.used) == {"a": 3 + 2 + 0 + 1, "b": 3 + 1 + 2}
