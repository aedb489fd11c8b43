"""``cema-deploy inspect`` checks an export before describing it; the unknown-model hint names close models.

Issue 19 items 6 and 9: ``inspect`` passed a truncated model.onnx and a hand-edited num_classes (exit 0), and the
hint for an unknown model always said ``list_models('resnet*')``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cema_deploy.cli import app
from tests.conftest import needs_torch

pytestmark = needs_torch
runner = CliRunner()


@pytest.fixture
def export_copy(exported, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    src, _ = exported("bn")
    return Path(shutil.copytree(src, tmp_path / "edge"))


def _inspect(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["cema-deploy", "inspect", str(directory)], capture_output=True, text=True, timeout=120)


def test_inspect_reports_what_it_checked(export_copy: Path) -> None:
    r = runner.invoke(app, ["inspect", str(export_copy), "--json"])
    assert r.exit_code == 0, r.output
    checked = json.loads(r.output)["checked"]
    # model, norms, params, the statistics probe and its sidecar
    assert checked["files_hashed"] == 5 and checked["onnxruntime_load"] == "loads, logits [1, 10]"


def test_inspect_fails_on_a_truncated_model_onnx(export_copy: Path) -> None:
    path = export_copy / "model.onnx"
    path.write_bytes(path.read_bytes()[:-100])
    r = _inspect(export_copy)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "model.onnx has" in r.stderr and "truncated or replaced" in r.stderr and "Export the model" in r.stderr


def test_inspect_fails_on_a_hand_edited_num_classes(export_copy: Path) -> None:
    path = export_copy / "manifest.json"
    path.write_text(path.read_text().replace('"num_classes": 10', '"num_classes": 1000'))
    r = _inspect(export_copy)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "hand-edited manifest.json" in " ".join(r.stderr.split())


def test_the_unknown_model_hint_names_close_models_and_their_family(tmp_path: Path) -> None:
    from cema_deploy.exceptions import ModelError
    from cema_deploy.export.to_onnx import create_timm_model

    with pytest.raises(ModelError, match=r"Did you mean: vit_tiny_patch16_224.*list_models\('vit\*'\)"):
        create_timm_model("vit_tiny")
    with pytest.raises(ModelError, match=r"Did you mean: convnext_atto.*list_models\('convnext\*'\)"):
        create_timm_model("convnext_ato")
