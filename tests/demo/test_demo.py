"""The demo's data and the whole loop in quick mode, end to end through the real service."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import needs_torch


@pytest.fixture
def cache(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("CEMA_DEPLOY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_digits_and_the_13_corruptions(cache) -> None:  # type: ignore[no-untyped-def]
    from cema_deploy.demo.stream import BROKEN_ON_NUMPY2, CORRUPTIONS, corrupted_stream, digits_splits

    x_tr, y_tr, x_te, y_te = digits_splits(0)
    assert x_tr.shape[1:] == (32, 32, 3) and x_tr.dtype == np.uint8 and len(x_tr) + len(x_te) == 1797
    assert sorted(np.bincount(y_te)) == sorted(np.bincount(y_tr)) or abs(len(x_tr) - len(x_te)) <= 1
    assert len(CORRUPTIONS) == 13 and not set(BROKEN_ON_NUMPY2) & set(CORRUPTIONS)
    s = corrupted_stream(x_te[:20], y_te[:20], severity=5)
    assert [seg.name for seg in s] == list(CORRUPTIONS) and len(s.labels) == 13 * 20
    for seg in s:
        assert seg.images.shape == (20, 32, 32, 3) and not np.array_equal(seg.images, x_te[:20]), seg.name
    files = sorted((cache / "streams").glob("*.npz"))
    assert len(files) == 13
    again = corrupted_stream(x_te[:20], y_te[:20], severity=5)  # from the cache, identical
    assert np.array_equal(again.images, s.images)
    fresh = corrupted_stream(x_te[:20], y_te[:20], severity=5, cache=False)  # recomputed: deterministic
    assert np.array_equal(fresh.images, s.images)
    assert not np.array_equal(corrupted_stream(x_te[:20], y_te[:20], severity=3).images, s.images)


def test_imagenet_c_folder_layout(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    from cema_deploy.demo.stream import DataError, imagenet_c_stream

    rng = np.random.default_rng(0)
    for wnid in ("n01440764", "n01443537"):
        d = tmp_path / "gaussian_noise" / "5" / wnid
        d.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(d / f"{i}.JPEG")
    s = imagenet_c_stream(tmp_path, severity=5, corruptions=("gaussian_noise",), size=32)
    assert s.images.shape == (6, 32, 32, 3) and list(s.labels) == [0, 0, 0, 1, 1, 1]
    with pytest.raises(DataError, match="does not exist"):
        imagenet_c_stream(tmp_path, severity=3, corruptions=("gaussian_noise",))


@needs_torch
@pytest.mark.network
@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "demo"
    env = {**os.environ, "CEMA_DEPLOY_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "cema_deploy", "demo", "--quick", "--severity", "5", "--methods",
                        "no_adapt,bn_adapt,eata_style,cema", "--out", str(out), "--json"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res == json.loads((out / "results.json").read_text())
    m = res["severities"]["5"]["methods"]
    for method in ("eata_style", "cema"):
        c = m[method]
        assert c["blobs_applied"] >= 1 and c["final_version"] >= 1  # refits happened over real HTTP
        assert c["seen"] == c["samples"] == 4 * 300
        assert c["seen"] == c["selected"] + c["excluded_unreliable"] + c["excluded_low_info"] + c["excluded_redundant"]
        assert c["uploaded_samples"] == c["selected"] and c["bytes_up"] > 0 and c["bytes_down"] > 0
    assert m["eata_style"]["excluded_low_info"] == 0  # EATA-style: no E_min rule
    assert m["cema"]["accuracy"] > m["no_adapt"]["accuracy"]
    assert (out / "stream_severity5.png").stat().st_size > 10_000 and (out / "results.md").exists()
