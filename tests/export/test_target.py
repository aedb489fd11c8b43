"""Export writes into a work folder and renames on success; it replaces an existing export only of the same
fingerprint unless forced. Issue 19 item 6: a failed export left a folder that ``inspect`` accepted ("0
refittable tensors", exit 0), and an export silently overwrote an export of another model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cema_deploy.cli import app
from cema_deploy.exceptions import ExportError, VerificationError
from cema_deploy.export.to_onnx import export_timm
from tests.conftest import needs_torch, tiny_model

pytestmark = needs_torch
runner = CliRunner()


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_an_export_that_fails_after_writing_leaves_no_folder_inspect_accepts(tmp_path: Path) -> None:
    out = tmp_path / "edge"
    with pytest.raises(VerificationError, match="Logits differ"):  # fails in the last check, after every write
        export_timm("test_resnet", out, model=tiny_model("bn"), img_size=64, atol=-1.0)
    assert not out.exists() and _leftovers(tmp_path) == []
    r = runner.invoke(app, ["inspect", str(out)])
    assert r.exit_code != 0


def test_an_export_killed_mid_way_leaves_no_folder_and_the_next_export_cleans_up(tmp_path: Path) -> None:
    out = tmp_path / "edge"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cema_deploy", "export", "test_resnet", "--num-classes", "10", "--img-size", "64",
         "--out", str(out), "--json"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ},
    )  # fmt: skip
    partial = tmp_path / f".edge.partial-{proc.pid}"
    while not partial.exists() and proc.poll() is None:  # the work folder exists once the model is built
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the export finished before it could be killed"
    assert not out.exists()
    r = runner.invoke(app, ["inspect", str(out)])
    assert r.exit_code != 0
    export_timm("test_resnet", out, model=tiny_model("bn"), img_size=64)
    assert _leftovers(tmp_path) == []  # the dead process's work folder was removed
    assert runner.invoke(app, ["inspect", str(out)]).exit_code == 0


def test_an_export_of_another_model_is_replaced_only_with_force(tmp_path: Path) -> None:
    out = tmp_path / "edge"
    first = export_timm("test_resnet", out, model=tiny_model("bn"), img_size=64).manifest
    with pytest.raises(ExportError, match=r"holds an export of test_resnet .* Pass --force"):
        export_timm("test_efficientnet_gn", out, model=tiny_model("gn"), img_size=64)
    assert (out / "manifest.json").read_text().count(first.fingerprint) == 1 and _leftovers(tmp_path) == []
    r = runner.invoke(app, ["export", "test_efficientnet_gn", "--img-size", "64", "--out", str(out)])
    assert r.exit_code == 1 and "--force" in str(r.exception)
    second = export_timm("test_efficientnet_gn", out, model=tiny_model("gn"), img_size=64, force=True).manifest
    assert second.model_name == "test_efficientnet_gn" and _leftovers(tmp_path) == []


def test_the_same_model_replaces_its_own_fingerprint_but_not_other_weights(tmp_path: Path) -> None:
    out = tmp_path / "edge"
    first = export_timm("test_resnet", out, model=tiny_model("bn", seed=0), img_size=64).manifest
    again = export_timm("test_resnet", out, model=tiny_model("bn", seed=0), img_size=64).manifest
    assert again.fingerprint == first.fingerprint
    with pytest.raises(ExportError, match="holds another export of test_resnet: fingerprint"):
        export_timm("test_resnet", out, model=tiny_model("bn", seed=1), img_size=64)
    assert (out / "manifest.json").read_text().count(first.fingerprint) == 1 and _leftovers(tmp_path) == []


def test_a_folder_that_is_not_an_export_is_never_replaced(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"holds no manifest\.json"):
        export_timm("test_resnet", tmp_path, model=tiny_model("bn"), img_size=64, force=True)
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / "model.onnx").exists()
