"""A real `cema-deploy cloud serve` and a real `cema-deploy edge run` on 127.0.0.1: the operator revokes the edge's
token mid-run (issue 19, finding 4: 81 of 119 queued samples were dropped and the edge exited 0). The refused
samples stay in the edge's spool, the edge says once what is wrong and what to do, and exits 3."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.cli.edge_process import free_port, start_edge, wait_metric, write_frames
from tests.conftest import needs_torch

pytestmark = [needs_torch, pytest.mark.network]


def test_a_token_revoked_mid_run_keeps_the_samples_spooled_and_exits_3(cloud_factory, exported, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    cloud = cloud_factory()
    add = subprocess.run([sys.executable, "-m", "cema_deploy", "cloud", "token", "add", "cam-01", "--deployment",
                          "test_resnet", "--state", str(cloud.state)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert add.returncode == 0, add.stderr
    (tmp_path / "cam.token").write_text(add.stdout.strip())
    frames = write_frames(tmp_path / "frames", 60)
    port, state, js = free_port(), tmp_path / "edge-state", tmp_path / "m.json"
    proc = start_edge(str(out), "--source", str(frames), "--batch", "4", "--fps", "6", "--cloud", cloud.url,
                      "--token-file", str(tmp_path / "cam.token"), "--upload-share", "1", "--state", str(state),
                      "--metrics-port", str(port), "--quiet", "--json", str(js), "--device-id", "cam-01")  # fmt: skip
    try:
        assert wait_metric(proc, port, "uploaded_frames_total", 4), proc.communicate(timeout=60)
        revoke = subprocess.run([sys.executable, "-m", "cema_deploy", "cloud", "token", "revoke", "cam-01", "--state",
                                 str(cloud.state)], capture_output=True, text=True, timeout=120)  # fmt: skip
        assert revoke.returncode == 0, revoke.stderr
        assert wait_metric(proc, port, "cloud_refused", 1)
        _, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 3, stderr
    m = json.loads(js.read_text())
    assert m["exit_code"] == 3 and m["refusal"]["status"] == 401
    assert m["uplink"]["rejected"] == 0 and m["uplink"]["dropped_spool"] == 0 and m["lost"] == 0
    held = m["undelivered"]
    assert held > 0 and m["uplink"]["uploaded"] + held == 60  # every frame went up or waits in the spool
    spooled = [p for p in (state / "spool").rglob("*") if p.is_file()]
    assert spooled, "the refused samples must be in the spool"
    assert stderr.count("the cloud refuses this device (401") == 1 and "cloud token add" in stderr
    assert "error: the cloud refused this device (401)" in stderr and "in the spool" in stderr
