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
            "no_adapt,bn_adapt,eata_style,cema",
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
