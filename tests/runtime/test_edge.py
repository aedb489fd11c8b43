"""The edge runtime on a real ONNX Runtime session: refusals by reason, rollback, sources and `edge run`; and over
real HTTP against the protocol fixture server (tests/runtime/conftest.py): uploads on the wire, hot refit from the
cloud, an outage, rollback reports, sync and `edge run --cloud`."""

from __future__ import annotations

import csv
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest

from cema_deploy.contract.blob import RefitBlob, blob_from_path, blob_to_bytes
from cema_deploy.contract.manifest import manifest_from_dir
from cema_deploy.contract.samples import SampleBatch, samples_from_bytes
from cema_deploy.exceptions import CemaError, SignatureError
from cema_deploy.runtime.backends.onnxrt import session_from_onnx
from cema_deploy.runtime.backends.registry import get_backend
from cema_deploy.runtime.edge import EdgeRuntime, RollbackConfig
from cema_deploy.runtime.frames.preprocess import normalize
from cema_deploy.runtime.frames.sources import SourceError, batches_from_source, count_images, labels_from_path
from cema_deploy.runtime.link.client import CloudClient
from cema_deploy.runtime.selection.rules import SampleSelector, SelectionConfig
from cema_deploy.runtime.updates.rollback import information
from tests.conftest import needs_torch
from tests.runtime.conftest import images, until

pytestmark = needs_torch
KEEP_ALL = SelectionConfig(num_classes=10, e0=np.log(10) + 1, e_min=None, d_margin=None)


def _images(n: int, seed: int = 0) -> np.ndarray:
    return images(n, seed, size=64)


def _until(pred, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    return until(pred, timeout)


def _runtime(out, cfg=None, window: int = 32, hold_frames: int = 1024, **kw) -> EdgeRuntime:  # type: ignore[no-untyped-def]
    cfg = cfg or SelectionConfig.for_classes(10, d_margin=None)
    rollback = RollbackConfig(window=window, min_samples=min(window, 8), hold_frames=hold_frames)
    return EdgeRuntime(get_backend("ort-cpu", out), SampleSelector(cfg), rollback=rollback, **kw)


def _diverse(n: int, seed: int = 0) -> np.ndarray:
    """Images that differ in colour, gradient and noise (the tiny random model tells them apart a little)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, 64)[None, :, None]
    out = [np.clip(rng.integers(0, 256, 3) + ramp * rng.integers(-128, 128, 3)
                   + rng.normal(0, rng.uniform(0, 80), (64, 64, 3)), 0, 255) for _ in range(n)]  # fmt: skip
    return np.stack(out).astype(np.uint8)


def _client(out, srv, **kw) -> CloudClient:  # type: ignore[no-untyped-def]
    return CloudClient(srv.url, srv.state.token, manifest_from_dir(out).fingerprint, device_id="cam-1", **kw)


def _last_bn(tensors):  # type: ignore[no-untyped-def]
    return sorted(k for k in tensors if k.endswith("running_var"))[-1].rsplit(".", 1)[0]


def _perturbed(tensors, seed: int):  # type: ignore[no-untyped-def]
    """Every refittable tensor changed (variances kept positive), as the cloud's step would."""
    rng = np.random.default_rng(seed)
    new = {}
    for k, t in tensors.items():
        if k.endswith(("running_var", "weight")):
            new[k] = (t * rng.uniform(0.5, 1.5, t.shape)).astype(t.dtype)
        else:
            new[k] = (t + rng.normal(0, 0.2, t.shape)).astype(t.dtype)
    return new


def _sharp_and_flat(tensors):  # type: ignore[no-untyped-def]
    bn = _last_bn(tensors)
    sharp = dict(tensors)
    sharp[f"{bn}.weight"] = tensors[f"{bn}.weight"] * 30  # big features: confident, low-entropy logits
    flat = dict(tensors)
    flat[f"{bn}.weight"] = np.zeros_like(tensors[f"{bn}.weight"])  # gamma 0: no features, logits = fc bias
    flat[f"{bn}.bias"] = np.zeros_like(tensors[f"{bn}.bias"])
    return sharp, flat


def _blob(tensors, fp: str, version: int) -> bytes:  # type: ignore[no-untyped-def]
    return blob_to_bytes(RefitBlob(tensors=tensors, fingerprint=fp, version=version))


# ---- without a cloud ------------------------------------------------------------------------------------------
def test_bad_blobs_are_refused_by_reason_and_outputs_stay(exported) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    v0 = blob_from_path(out / "params.safetensors")
    fp = v0.fingerprint
    x = _images(8)
    trusted: set[str] = set()

    def verifier(data: bytes) -> None:
        if hashlib.sha256(data).hexdigest() not in trusted:
            raise SignatureError("not signed by a trusted key")

    with _runtime(out, verifier=verifier) as rt:
        before = rt.process(x).logits
        nan = dict(v0.tensors)
        k = next(iter(nan))
        nan[k] = np.full_like(nan[k], np.nan)
        cases = {  # a refused version is never accepted again: each case has its own
            "fingerprint": _blob(v0.tensors, "ff" * 32, 5),
            "value": _blob(nan, fp, 6),
            "schema": _blob({k: v0.tensors[k]}, fp, 7),
            "stale": _blob(v0.tensors, fp, 0),
            "format": b"not a blob at all",
        }
        for reason, data in cases.items():
            trusted.add(hashlib.sha256(data).hexdigest())
            assert not rt.apply_blob_bytes(data)
            assert rt.refused[reason] == 1, reason
        assert not rt.apply_blob_bytes(_blob(_perturbed(v0.tensors, 1), fp, 8))  # valid, but not trusted
        assert rt.refused["signature"] == 1 and sum(rt.refused.values()) == 6
        assert rt.refused_upto == 7 and sorted(rt.intake.refused_versions) == [5, 6, 7]  # untrusted: not remembered
        assert rt.version == 0 and np.array_equal(rt.process(x).logits, before)
        assert rt.metrics()["refused"] == dict(rt.refused) and rt.metrics()["blobs_applied"] == 0


def test_rollback_on_identical_inputs_when_the_information_drops(exported) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    v0 = blob_from_path(out / "params.safetensors")
    sharp, flat = _sharp_and_flat(v0.tensors)
    x = _diverse(32, seed=3)
    with _runtime(out, window=32, hold_frames=0) as rt:  # no hold after a rollback: the next blob is judged
        rt.process(x)
        assert rt.apply_blob_bytes(_blob(sharp, v0.fingerprint, 1)) and rt.monitor.wait_judged(20)
        sharp_logits = rt.process(x).logits
        assert rt.rollbacks == 0 and rt.version == 1  # more information than v0 on the same frames: kept
        j1 = rt.monitor.last
        assert j1 is not None and not j1.rollback and j1.score_new > j1.score_previous
        assert rt.apply_blob_bytes(_blob(flat, v0.fingerprint, 2)) and rt.monitor.wait_judged(20)
        # judged on the ring (the frames served by v1), before any frame was served by v2
        assert rt.rollbacks == 1 and rt.version == 1 and rt.refused_upto == 2
        j2 = rt.monitor.last
        assert j2 is not None and (j2.version, j2.previous_version, j2.n) == (2, 1, 32) and j2.rollback
        assert j2.score_previous == pytest.approx(information(sharp_logits), abs=1e-6)
        assert np.array_equal(rt.process(x).logits, sharp_logits)
        m = rt.metrics()
        assert m["rollbacks_by_reason"] == {"information_drop": 1} and m["rolled_back"] == [2]
        # the rolled-back version, and every older one, is refused from now on; a newer one is accepted
        assert not rt.apply_blob_bytes(_blob(flat, v0.fingerprint, 2))
        assert rt.refused["stale"] == 1
        assert rt.apply_blob_bytes(_blob(sharp, v0.fingerprint, 3)) and rt.monitor.wait_judged(20)
        assert rt.version == 3 and rt.rollbacks == 1


def test_an_update_that_fixes_a_collapse_is_kept_although_entropy_rises(exported) -> None:  # type: ignore[no-untyped-def]
    # The edge's predictions collapsed onto one confident class (the severity-5 blur failure); the cloud's update
    # spreads them again. Mean entropy rises sharply (the old rule rolled this back), the information rises too.
    out, _ = exported("bn")
    v0 = blob_from_path(out / "params.safetensors")
    bn = _last_bn(v0.tensors)
    collapsed = dict(v0.tensors)
    collapsed[f"{bn}.weight"] = np.zeros_like(v0.tensors[f"{bn}.weight"])
    collapsed[f"{bn}.bias"] = np.full_like(v0.tensors[f"{bn}.bias"], 50.0)
    fixed = dict(v0.tensors)
    fixed[f"{bn}.weight"] = v0.tensors[f"{bn}.weight"] * 10
    x = _diverse(32, seed=4)
    with _runtime(out, window=32) as rt:
        rt.process(x)
        assert rt.apply_blob_bytes(_blob(collapsed, v0.fingerprint, 1)) and rt.monitor.wait_judged(20)
        before = rt.process(x)
        assert len(set(before.predictions.tolist())) == 1  # collapsed: one class for every frame
        assert rt.apply_blob_bytes(_blob(fixed, v0.fingerprint, 2)) and rt.monitor.wait_judged(20)
        after = rt.process(x)
        assert rt.version == 2 and rt.rollbacks == 0
    h_before, h_after = float(before.selection.entropy.mean()), float(after.selection.entropy.mean())
    assert h_after - h_before > 0.15 * np.log(10)  # what the mean-entropy rule would have rolled back
    assert information(after.logits) > information(before.logits)


def test_a_stream_change_at_a_refit_is_not_a_rollback(exported) -> None:  # type: ignore[no-untyped-def]
    # The rule this replaces compared entropies of different frames before and after a refit, so a corruption
    # boundary that coincides with a refit looked like a bad blob. Here v2 equals v1 in all but its version, and
    # the frames change from structured images to a flat grey view (fog, a covered lens) right at the refit.
    out, _ = exported("bn")
    v0 = blob_from_path(out / "params.safetensors")
    sharp, _ = _sharp_and_flat(v0.tensors)
    with _runtime(out, window=32) as rt:
        rt.process(_diverse(32, seed=5))
        assert rt.apply_blob_bytes(_blob(sharp, v0.fingerprint, 1)) and rt.monitor.wait_judged(20)
        easy = rt.process(_diverse(32, seed=6))
        assert rt.apply_blob_bytes(_blob(sharp, v0.fingerprint, 2))
        hard = rt.process(np.full((32, 64, 64, 3), 128, np.uint8))  # another distribution, served by v2
        assert rt.monitor.wait_judged(20)
        assert rt.rollbacks == 0 and rt.version == 2
    assert hard.selection.entropy.mean() - easy.selection.entropy.mean() > 0.15 * np.log(10)


def test_empty_batch_and_any_input_size(exported) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    with _runtime(out) as rt:
        step = rt.process(np.zeros((0, 64, 64, 3), np.uint8))
        assert step.logits.shape == (0, 10) and step.predictions.shape == (0,) and rt.frames == 0
        assert rt.process(_images(2)[:, :40, :50]).logits.shape == (2, 10)  # resized to 64x64


def test_sources_npy_folder_and_labels(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    arr = _images(5)
    np.save(tmp_path / "s.npy", arr)
    assert count_images(tmp_path / "s.npy") == 5
    got = list(batches_from_source(tmp_path / "s.npy", 2))
    assert [len(b) for b in got] == [2, 2, 1] and np.array_equal(np.concatenate(got), arr)
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i, im in enumerate(arr):
        Image.fromarray(im).save(folder / ("sub" if i == 4 else "") / f"{i:03d}.png")
    (folder / "notes.txt").write_text("not an image")
    assert count_images(folder) == 5
    assert np.array_equal(np.concatenate(list(batches_from_source(folder, 3))), arr)
    Image.fromarray(arr[0, :32, :48]).convert("L").save(folder / "sub" / "zz.jpg")  # grey, other size: RGB, resized
    last = list(batches_from_source(folder, 3))[-1]
    assert last.shape == (3, 64, 64, 3) and last.dtype == np.uint8
    np.save(tmp_path / "y.npy", np.arange(5))
    assert np.array_equal(labels_from_path(tmp_path / "y.npy", 5), np.arange(5))
    with pytest.raises(SourceError, match="5 labels but the source has 6"):
        labels_from_path(tmp_path / "y.npy", 6)
    np.save(tmp_path / "bad.npy", arr.astype(np.float32))
    with pytest.raises(SourceError, match="expected uint8"):
        list(batches_from_source(tmp_path / "bad.npy", 2))
    np.save(tmp_path / "empty.npy", arr[:0])
    with pytest.raises(SourceError, match="holds no images"):
        count_images(tmp_path / "empty.npy")
    with pytest.raises(SourceError, match="does not exist"):
        count_images(tmp_path / "missing.npy")
    with pytest.raises(SourceError, match="neither a folder"):
        list(batches_from_source(tmp_path / "missing", 2))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(SourceError, match="not a readable image"):
        list(batches_from_source(tmp_path / "broken", 2))


def test_edge_run_cli_offline(exported, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from cema_deploy.cli import app

    out, _ = exported("bn")
    np.save(tmp_path / "s.npy", _images(20))
    np.save(tmp_path / "y.npy", np.arange(20) % 10)
    args = ["edge", "run", str(out), "--source", str(tmp_path / "s.npy"), "--batch", "8", "--quiet"]
    r = CliRunner().invoke(app, [*args, "--labels", str(tmp_path / "y.npy"), "--predictions",
                                 str(tmp_path / "p.npz"), "--json", str(tmp_path / "m.json")])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "20 frames" in r.output and "parameter version 0" in r.output
    m = json.loads((tmp_path / "m.json").read_text())
    s = m["selection"]
    assert m["frames"] == 20 and s["seen"] == 20 and m["uplink"] == {} and m["uploaded_pct"] == 0.0
    assert s["seen"] == s["selected"] + s["unreliable"] + s["low_info"] + s["redundant"] + s["not_drawn"]
    with get_backend("ort-cpu", out) as be:
        want = be.infer(normalize(_images(20), manifest_from_dir(out).preprocess)).argmax(1)
    with np.load(tmp_path / "p.npz") as p:
        assert np.array_equal(p["predictions"], want) and p["selected"].sum() == s["selected"]
    assert m["accuracy"] == pytest.approx(float((want == np.arange(20) % 10).mean()))
    r = CliRunner().invoke(app, [*args, "--predictions", str(tmp_path / "p.csv")])
    assert r.exit_code == 0, r.output
    with open(tmp_path / "p.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["prediction"]) for row in rows] == want.tolist()
    # bad input fails with our error, before any work
    for extra, msg in (
        (["--cloud", "http://127.0.0.1:9"], "needs a device token"),
        (["--labels", str(tmp_path / "s.npy")], "expected a 1-D array"),
        (["--predictions", str(tmp_path / "p.txt")], "--predictions must end in"),
        (["--d-margin", "2"], "--d-margin must be"),
        (["--encoding", "gif"], "--encoding must be one of"),
    ):
        r = CliRunner().invoke(app, [*args, *extra])
        assert r.exit_code != 0 and isinstance(r.exception, CemaError), extra
        assert msg in str(r.exception)


# ---- over HTTP, against the protocol fixture server ------------------------------------------------------------
@pytest.mark.network
@pytest.mark.parametrize("encoding", ["png", "raw"])
def test_uploads_on_the_wire_are_exactly_the_selected_images(exported, protocol_server, encoding) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    manifest = manifest_from_dir(out)
    srv = protocol_server(manifest.fingerprint)
    x = _images(48, seed=7)
    with get_backend("ort-cpu", out) as be:  # thresholds from this stream's own entropies: a real mix of decisions
        from cema_deploy.runtime.selection.entropy import softmax_entropy

        ent = softmax_entropy(be.infer(normalize(x, manifest.preprocess)))
    cfg = SelectionConfig(num_classes=10, e0=float(np.quantile(ent, 0.75)), e_min=float(np.quantile(ent, 0.2)),
                          warmup=10**6, d_margin=None)  # fmt: skip
    with _runtime(out, cfg, client=_client(out, srv, encoding=encoding), upload_batch=8, poll_wait_s=0.5) as rt:
        steps = [rt.process(x[i : i + 16]) for i in range(0, 48, 16)]
        assert rt.uplink is not None and rt.uplink.flush(timeout=20)
        m = rt.metrics()
    selected = np.concatenate([x[i * 16 : (i + 1) * 16][s.selection.mask] for i, s in enumerate(steps)])
    sel_ent = np.concatenate([s.selection.entropy[s.selection.mask] for s in steps])
    assert 0 < len(selected) < 48
    decoded = [samples_from_bytes(body, image_hw=manifest.preprocess.size) for body in srv.state.uploads]
    assert all(len(d) <= 8 for d in decoded)
    assert np.array_equal(np.concatenate([d.images for d in decoded]), selected)  # bit-exact, in order
    assert np.array_equal(np.concatenate([d.entropy for d in decoded]), sel_ent.astype(np.float32))  # type: ignore[misc]
    assert {(d.fingerprint, d.edge_version, d.device_id) for d in decoded} == {(manifest.fingerprint, 0, "cam-1")}
    assert m["uplink"]["uploaded"] == len(selected) == m["selection"]["selected"]
    assert m["uploaded_pct"] == pytest.approx(100 * len(selected) / 48)


@pytest.mark.network
def test_blob_from_the_cloud_is_applied_and_outputs_follow_it(exported, protocol_server) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    v0 = blob_from_path(out / "params.safetensors")
    srv = protocol_server(v0.fingerprint)
    x = _images(8, seed=1)
    xn = normalize(x, manifest_from_dir(out).preprocess)
    new = _perturbed(v0.tensors, seed=2)
    with _runtime(out, client=_client(out, srv), poll_wait_s=0.5) as rt:
        before = rt.process(x).logits
        # refused ones first: wrong model, NaN, a replay of an older version announced as new
        nan = dict(new)
        k = sorted(nan)[0]
        nan[k] = np.full_like(nan[k], np.nan)
        for version, data, reason in (
            (1, _blob(new, "ff" * 32, 1), "fingerprint"),
            (2, _blob(nan, v0.fingerprint, 2), "value"),
            (3, _blob(new, v0.fingerprint, 0), "stale"),
        ):
            srv.state.publish(version, data)
            assert _until(lambda r=reason: rt.refused[r] >= 1), reason  # type: ignore[misc]
            assert rt.version == 0 and np.array_equal(rt.process(x).logits, before)
        # the replay's header said v3, its own metadata v0: the header is not believed, the floor stays at v2 and
        # the poller backs off and asks again; a sync wait for v3 ends (nothing it can apply came)
        assert rt.wait_for_version(3, timeout=20) and rt.refused_upto == 2
        with srv.state.lock:
            del srv.state.blobs[3]
        srv.state.publish(4, _blob(new, v0.fingerprint, 4))
        assert rt.wait_for_version(4, timeout=20) and rt.version == 4
        got = rt.process(x)
        m = rt.metrics()
    want = session_from_onnx(out / "model.onnx", tensors=new).run(xn)  # a fresh engine built with the new tensors
    assert got.version == 4 and np.allclose(got.logits, want, atol=1e-5) and not np.allclose(got.logits, before)
    assert m["blobs_applied"] == 1 and m["refused"]["fingerprint"] == m["refused"]["value"] == 1
    assert set(m["refused"]) == {"fingerprint", "value", "stale"}
    # each refused verified version was fetched once: the poller then asks only for newer ones
    assert [srv.state.blob_requests.count(a) > 0 for a in (0, 1, 2, 3, 4)] == [True, True, True, False, True]
    assert srv.state.blob_requests == sorted(srv.state.blob_requests)


@pytest.mark.network
def test_outage_keeps_serving_bounds_the_queue_and_recovers(exported, protocol_server) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    v0 = blob_from_path(out / "params.safetensors")
    srv = protocol_server(v0.fingerprint)
    srv.stop()
    rt = _runtime(out, KEEP_ALL, client=_client(out, srv, connect_timeout_s=0.5), poll_wait_s=0.5, upload_batch=8,
                  max_queue_samples=16, backoff_base_s=0.05, backoff_cap_s=0.2)  # fmt: skip
    failures, slowest = 0, 0.0
    with rt:
        for i in range(8):
            t0 = time.perf_counter()
            try:
                assert rt.process(_images(8, seed=i)).logits.shape == (8, 10)
            except Exception:
                failures += 1
            slowest = max(slowest, time.perf_counter() - t0)
        assert rt.uplink is not None
        m = rt.metrics()
        assert failures == 0 and slowest < 2.0  # never waits on the network
        assert m["uplink"]["uploaded"] == 0 and rt.uplink.queued_now <= 16 + 8
        assert m["uplink"]["dropped_queue"] == 64 - rt.uplink.queued_now and m["uplink"]["dropped_queue"] > 0
        assert _until(lambda: rt.metrics()["uplink"]["retries"] > 0 and rt.poll_errors > 0, timeout=5)
        srv.start()  # the cloud is back on the same port
        assert rt.uplink.flush(timeout=20)
        m = rt.metrics()
        assert m["uplink"]["uploaded"] + m["uplink"]["dropped_queue"] == 64
        srv.state.publish(1, _blob(_perturbed(v0.tensors, 3), v0.fingerprint, 1))
        assert rt.wait_for_version(1, timeout=20)  # the poller recovered too
    got, sent = srv.state.uploaded_images(), np.concatenate([_images(8, seed=i) for i in range(8)])
    assert len(got) == m["uplink"]["uploaded"] and np.array_equal(got[-16:], sent[-16:])  # the newest survived


@pytest.mark.network
def test_rollback_is_reported_and_the_version_never_returns(exported, protocol_server) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    v0 = blob_from_path(out / "params.safetensors")
    srv = protocol_server(v0.fingerprint)
    sharp, flat = _sharp_and_flat(v0.tensors)
    x = _diverse(32, seed=3)
    with _runtime(out, client=_client(out, srv), poll_wait_s=0.5, window=32) as rt:
        rt.process(x)
        srv.state.publish(1, _blob(sharp, v0.fingerprint, 1))
        assert rt.wait_for_version(1, timeout=20) and rt.monitor.wait_judged(20)
        sharp_logits = rt.process(x).logits
        srv.state.publish(2, _blob(flat, v0.fingerprint, 2))
        assert rt.wait_for_version(2, timeout=20)
        assert _until(lambda: rt.rollbacks == 1) and rt.version == 1  # judged off the serving path
        assert np.array_equal(rt.process(x).logits, sharp_logits)
        assert rt.uplink is not None and rt.uplink.flush(timeout=20)
        assert len(srv.state.reports) == 1
        time.sleep(0.3)  # let the poller ask again: it must not fetch v2 back
        assert rt.version == 1 and rt.metrics()["blobs_applied"] == 2
    report = srv.state.reports[0]
    assert report["kind"] == "rollback" and report["version"] == 2 and "mutual information" in report["reason"]
    assert min(srv.state.blob_requests[srv.state.blob_requests.index(2) :]) == 2


def _publish_on_upload(srv, v0) -> None:  # type: ignore[no-untyped-def]
    """A cloud that runs one 'step' per upload: publish version+1 and acknowledge with that target."""

    def on_upload(batch: SampleBatch) -> int:
        with srv.state.lock:
            v = srv.state.version + 1
        scale = 1 + 0.01 * v
        scaled = {k: (t * scale).astype(t.dtype) if k.endswith(".weight") else t for k, t in v0.tensors.items()}
        srv.state.publish(v, _blob(scaled, v0.fingerprint, v))
        return v

    srv.state.on_upload = on_upload


@pytest.mark.network
def test_sync_waits_until_the_target_version_serves(exported, protocol_server) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    v0 = blob_from_path(out / "params.safetensors")
    srv = protocol_server(v0.fingerprint)
    _publish_on_upload(srv, v0)
    with _runtime(out, KEEP_ALL, client=_client(out, srv), poll_wait_s=0.5, upload_batch=8) as rt:
        versions = []
        for i in range(3):
            versions.append(rt.process(_images(8, seed=i)).version)
            assert rt.sync(timeout=20)
            assert rt.uplink is not None and rt.uplink.last_ack is not None
            assert rt.version == rt.uplink.last_ack.target_version == i + 1
        assert versions == [0, 1, 2]  # each batch ran on the parameters adapted on all earlier uploads
        assert rt.sync(timeout=1)  # nothing new to wait for
    assert [b.edge_version for b in srv.state.batches] == [0, 1, 2]


def _publishing_cloud(exported, protocol_server, tmp_path, *, n: int, seed: int):  # type: ignore[no-untyped-def]
    """The bn export, a protocol server that publishes a blob per upload, ``s.npy`` with ``n`` images and the
    device's ``token`` file in ``tmp_path``."""
    out, _ = exported("bn")
    v0 = blob_from_path(out / "params.safetensors")
    srv = protocol_server(v0.fingerprint)
    _publish_on_upload(srv, v0)
    np.save(tmp_path / "s.npy", _images(n, seed=seed))
    Path(tmp_path / "token").write_text(srv.state.token + "\n")
    return out, srv


@pytest.mark.network
def test_edge_run_cli_with_a_cloud(exported, protocol_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from cema_deploy.cli import app

    out, srv = _publishing_cloud(exported, protocol_server, tmp_path, n=24, seed=4)
    r = CliRunner().invoke(app, [
        "edge", "run", str(out), "--selection", "cema",
        "--source", str(tmp_path / "s.npy"), "--cloud", srv.url, "--token-file",
        str(tmp_path / "token"), "--batch", "8", "--sync", "--encoding", "raw", "--e0-ratio", "1.5", "--e-min-ratio",
        "0", "--d-margin", "off", "--device-id", "cam-9", "--predictions", str(tmp_path / "p.npz"),
        "--json", str(tmp_path / "m.json"), "--quiet",
    ])  # fmt: skip
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["selection"]["selected"] == 24 and m["uplink"]["uploaded"] == 24 and m["uploaded_pct"] == 100.0
    assert m["version"] == 3 and m["blobs_applied"] == 3 and m["sync_timeouts"] == 0
    assert np.array_equal(srv.state.uploaded_images(), _images(24, seed=4))
    assert {b.device_id for b in srv.state.batches} == {"cam-9"}
    with np.load(tmp_path / "p.npz") as p:
        assert p["version"].tolist() == [0] * 8 + [1] * 8 + [2] * 8


@pytest.mark.network
def test_edge_run_cli_refuses_unsigned_blobs_with_a_public_key(exported, protocol_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from cema_deploy.cli import app

    signing = pytest.importorskip("cema_deploy.contract.signing")
    _, pub = signing.new_key_pair(tmp_path / "keys")
    out, _ = exported("bn")
    v0 = blob_from_path(out / "params.safetensors")
    srv = protocol_server(v0.fingerprint)
    _publish_on_upload(srv, v0)  # this cloud publishes unsigned blobs
    np.save(tmp_path / "s.npy", _images(16, seed=5))
    r = CliRunner().invoke(app, [
        "edge", "run", str(out), "--selection", "cema",
        "--source", str(tmp_path / "s.npy"), "--cloud", srv.url, "--token", "t0k",
        "--batch", "8", "--sync", "--sync-timeout", "20", "--e0-ratio", "1.5", "--d-margin", "off",
        "--public-key", str(pub), "--json", str(tmp_path / "m.json"), "--quiet",
    ])  # fmt: skip
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["version"] == 0 and m["blobs_applied"] == 0 and set(m["refused"]) == {"signature"}
    assert m["refused_upto"] == 0 and m["unverified"] == m["refused"]["signature"] >= 1  # counted, not remembered
    assert m["sync_timeouts"] == 0  # an answer that cannot be verified ends the wait


@pytest.mark.network
def test_edge_run_works_where_torch_cannot_be_imported(exported, protocol_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # The edge process of the demo and of a deployment: infer, select, upload, refit, with torch and timm
    # unimportable (sys.modules[name] = None makes `import name` raise ImportError).
    import subprocess
    import sys

    out, srv = _publishing_cloud(exported, protocol_server, tmp_path, n=16, seed=6)
    args = ["edge", "run", str(out), "--selection", "cema",
            "--source", str(tmp_path / "s.npy"), "--cloud", srv.url, "--token-file",
            str(tmp_path / "token"), "--batch", "8", "--sync", "--e0-ratio", "1.5", "--e-min-ratio", "0",
            "--d-margin", "off", "--json", str(tmp_path / "m.json"), "--quiet"]  # fmt: skip
    code = (
        "import sys\n"
        "for name in ('torch', 'timm', 'torchvision', 'onnx', 'onnxscript', 'fastapi'):\n"
        "    sys.modules[name] = None\n"
        f"sys.argv = ['cema-deploy', *{args!r}]\n"
        "from cema_deploy.cli import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "assert sys.modules['torch'] is None  # never replaced by a real import\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["uplink"]["uploaded"] == 16 and m["version"] == 2 and m["blobs_applied"] == 2
