"""The edge runtime without a cloud: refusals by reason, automatic rollback, sources and `edge run`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cema_deploy.contract.blob import RefitBlob, blob_from_path, blob_to_bytes
from cema_deploy.contract.manifest import manifest_from_dir
from cema_deploy.runtime.edge import EdgeRuntime, RollbackConfig
from cema_deploy.runtime.registry import get_backend
from cema_deploy.runtime.selection import SampleSelector, SelectionConfig
from cema_deploy.runtime.sources import SourceError, batches_from_source
from tests.conftest import needs_torch

pytestmark = needs_torch


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


def _runtime(out, window: int = 32) -> EdgeRuntime:  # type: ignore[no-untyped-def]
    be = get_backend("ort-cpu", out)
    return EdgeRuntime(be, SampleSelector(SelectionConfig.for_classes(10, d_margin=None)),
                       rollback=RollbackConfig(window=window, margin_ratio=0.05))


def _last_bn(tensors):  # type: ignore[no-untyped-def]
    return sorted(k for k in tensors if k.endswith("running_var"))[-1].rsplit(".", 1)[0]


def test_bad_blobs_are_refused_by_reason_and_outputs_stay(exported) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    v0 = blob_from_path(out / "params.safetensors")
    fp = v0.fingerprint
    x = _images(8)
    with _runtime(out) as rt:
        before = rt.process(x).logits
        nan = dict(v0.tensors)
        k = next(iter(nan))
        nan[k] = np.full_like(nan[k], np.nan)
        cases = {
            "fingerprint": blob_to_bytes(RefitBlob(tensors=v0.tensors, fingerprint="ff" * 32, version=5)),
            "value": blob_to_bytes(RefitBlob(tensors=nan, fingerprint=fp, version=5)),
            "schema": blob_to_bytes(RefitBlob(tensors={k: v0.tensors[k]}, fingerprint=fp, version=5)),
            "stale": blob_to_bytes(RefitBlob(tensors=v0.tensors, fingerprint=fp, version=0)),
            "format": b"not a blob at all",
        }
        for reason, data in cases.items():
            assert not rt.apply_blob_bytes(data)
            assert rt.refused[reason] == 1, reason
        assert rt.version == 0 and np.array_equal(rt.process(x).logits, before)


def test_rollback_when_entropy_rises_after_a_refit(exported) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    v0 = blob_from_path(out / "params.safetensors")
    bn = _last_bn(v0.tensors)
    sharp = dict(v0.tensors)
    sharp[f"{bn}.weight"] = v0.tensors[f"{bn}.weight"] * 30  # big features: confident, low-entropy logits
    flat = dict(v0.tensors)
    flat[f"{bn}.weight"] = np.zeros_like(v0.tensors[f"{bn}.weight"])  # no features: logits = fc bias
    flat[f"{bn}.bias"] = np.zeros_like(v0.tensors[f"{bn}.bias"])
    x = _images(32, seed=3)
    with _runtime(out, window=32) as rt:
        rt.process(x)
        assert rt.apply_blob_bytes(blob_to_bytes(RefitBlob(tensors=sharp, fingerprint=v0.fingerprint, version=1)))
        sharp_logits = rt.process(x).logits
        assert rt.rollbacks == 0 and rt.version == 1
        assert rt.apply_blob_bytes(blob_to_bytes(RefitBlob(tensors=flat, fingerprint=v0.fingerprint, version=2)))
        flat_step = rt.process(x)  # entropy jumps: the window after v2 triggers the rollback
        assert flat_step.version == 2
        assert rt.rollbacks == 1 and rt.version == 1 and rt.refused_upto == 2
        assert np.array_equal(rt.process(x).logits, sharp_logits)
        # the rolled-back version is refused from now on; a newer one is accepted
        assert not rt.apply_blob_bytes(blob_to_bytes(RefitBlob(tensors=flat, fingerprint=v0.fingerprint, version=2)))
        assert rt.refused["stale"] == 1
        assert rt.apply_blob_bytes(blob_to_bytes(RefitBlob(tensors=sharp, fingerprint=v0.fingerprint, version=3)))


def test_sources_npy_and_folder(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    arr = _images(5)
    np.save(tmp_path / "s.npy", arr)
    got = np.concatenate(list(batches_from_source(tmp_path / "s.npy", 2)))
    assert np.array_equal(got, arr)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(arr):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    assert np.array_equal(np.concatenate(list(batches_from_source(folder, 3))), arr)
    np.save(tmp_path / "bad.npy", arr.astype(np.float32))
    with pytest.raises(SourceError, match="expected uint8"):
        list(batches_from_source(tmp_path / "bad.npy", 2))
    with pytest.raises(SourceError, match="neither a folder"):
        list(batches_from_source(tmp_path / "missing", 2))


def test_edge_run_cli_offline(exported, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from cema_deploy.cli import app

    out, _ = exported("bn")
    np.save(tmp_path / "s.npy", _images(20))
    np.save(tmp_path / "y.npy", np.arange(20) % 10)
    r = CliRunner().invoke(app, ["edge", "run", str(out), "--source", str(tmp_path / "s.npy"), "--labels",
                                 str(tmp_path / "y.npy"), "--batch", "8", "--predictions", str(tmp_path / "p.npz"),
                                 "--json", str(tmp_path / "m.json"), "--quiet"])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "m.json").read_text())
    s = m["selection"]
    assert m["frames"] == 20 and s["seen"] == 20
    assert s["seen"] == s["selected"] + s["unreliable"] + s["low_info"] + s["redundant"]
    p = np.load(tmp_path / "p.npz")
    with get_backend("ort-cpu", out) as be:
        from cema_deploy.runtime.preprocess import normalize

        want = be.infer(normalize(_images(20), manifest_from_dir(out).preprocess)).argmax(1)
    assert np.array_equal(p["predictions"], want)
    assert m["accuracy"] == pytest.approx(float((want == np.arange(20) % 10).mean()))
