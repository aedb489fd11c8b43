"""The whole demo loop in quick mode, end to end through the real service (slow, network)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import needs_torch


@needs_torch
@pytest.mark.network
@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "demo"
    env = {**os.environ, "CEMA_DEPLOY_CACHE": str(tmp_path / "cache")}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "cema_deploy",
            "demo",
            "--quick",
            "--severity",
            "5",
            "--methods",
            "no_adapt,bn_adapt,eata_style,cema,random",
            "--out",
            str(out),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res == json.loads((out / "results.json").read_text())
    assert res["protocol"] == "reset" and res["seeds"] == [0]
    m = res["severities"]["5"]["methods"]
    for method in ("eata_style", "cema", "random"):
        c = m[method]
        assert set(c) >= {"accuracy", "uploaded", "rollbacks", "per_seed", "per_corruption"}
        s = c["per_seed"][0]
        assert s["blobs_applied"] >= 4 and s["final_version"] >= 4  # a calibration blob per corruption at least
        assert s["seen"] == s["samples"] == 4 * 300
        assert s["seen"] == s["selected"] + s["unreliable"] + s["low_info"] + s["redundant"] + s["not_drawn"]
        # every corruption starts with a whole calibration batch (reset protocol), counted as uploaded
        assert s["calibration_frames"] == 4 * 64
        assert s["uploaded_samples"] == s["uploaded_frames"] and s["bytes_up"] > 0 and s["bytes_down"] > 0
        assert c["uploaded"] == pytest.approx(100 * s["uploaded_frames"] / s["samples"])
    assert m["eata_style"]["per_seed"][0]["low_info"] == 0  # EATA-style: no E_min rule
    assert m["cema"]["accuracy"] > m["no_adapt"]["accuracy"]
    assert (out / "stream_severity5.png").stat().st_size > 10_000 and (out / "results.md").exists()
