"""A load re-hashes ``model.onnx`` against the fingerprint, which binds the manifest's class count, preprocessing
and model arguments; ``check_export`` also hashes every file and compares the manifest with the graph.

Issue 19 item 6: before, the fingerprint was read from manifest.json and never re-checked, and a hand-edited
``num_classes`` or preprocessing went unnoticed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cema_deploy.contract.export_check import check_export
from cema_deploy.contract.manifest import binding, manifest_from_dir
from cema_deploy.contract.onnx_wire import model_from_path
from cema_deploy.exceptions import ExportIntegrityError, ManifestError
from tests.conftest import needs_torch

pytestmark = needs_torch


@pytest.fixture
def export_copy(exported, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    src, _ = exported("bn")
    return Path(shutil.copytree(src, tmp_path / "edge"))


def _edit_manifest(directory: Path, edit) -> None:  # type: ignore[no-untyped-def]
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_a_changed_frozen_weight_in_model_onnx_fails_the_load(export_copy: Path) -> None:
    from cema_deploy.runtime.backends.onnxrt import OnnxrtBackend

    recorded = manifest_from_dir(export_copy).fingerprint
    model = model_from_path(export_copy / "model.onnx")
    offset, _ = model.initializers["fc.weight"].raw  # a frozen (non-refittable) weight, stored inline
    data = bytearray((export_copy / "model.onnx").read_bytes())
    data[offset : offset + 4] = b"\x00\x00\x80\x3f"  # 1.0f: same size, other value
    (export_copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ExportIntegrityError, match="hash to fingerprint") as info:
        manifest_from_dir(export_copy)
    assert recorded in str(info.value) and "Export the model again" in str(info.value)
    with pytest.raises(ExportIntegrityError):
        OnnxrtBackend(export_copy)  # the edge refuses to serve it


@pytest.mark.parametrize(
    "field",
    ["num_classes", "preprocess.mean", "preprocess.size", "model_args", "refittable order"],
)
def test_a_hand_edited_manifest_no_longer_matches_its_fingerprint(export_copy: Path, field: str) -> None:
    def edit(d):  # type: ignore[no-untyped-def]
        if field == "num_classes":
            d["num_classes"] = 11
        elif field == "preprocess.mean":
            d["preprocess"]["mean"][0] += 0.125
        elif field == "preprocess.size":
            d["preprocess"]["size"] = [96, 96]
        elif field == "model_args":
            d["model_args"]["drop_rate"] = 0.5
        else:
            d["refittable"] = d["refittable"][::-1]

    _edit_manifest(export_copy, edit)
    with pytest.raises(ExportIntegrityError, match=r"hand-edited manifest\.json"):
        manifest_from_dir(export_copy)
    assert manifest_from_dir(export_copy, verify=False).fingerprint  # the file itself still parses


def test_a_truncated_model_onnx_fails_the_load(export_copy: Path) -> None:
    path = export_copy / "model.onnx"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ExportIntegrityError, match=r"model.onnx has [\d,]+ bytes; the manifest records"):
        manifest_from_dir(export_copy)
    _edit_manifest(export_copy, lambda d: d.update(files=[]))  # without the size record: the graph reader says it
    with pytest.raises(ExportIntegrityError, match="not a readable ONNX model"):
        manifest_from_dir(export_copy)


def test_check_export_hashes_every_file(export_copy: Path) -> None:
    # model.onnx, model.norms.bin, params.safetensors, stats_probe.onnx and stats_probe.json (the edge adapter's probe)
    assert check_export(export_copy).files_hashed == 5
    norms = export_copy / "model.norms.bin"  # refittable values: outside the fingerprint, inside the file hashes
    data = bytearray(norms.read_bytes())
    data[0] ^= 0xFF
    norms.write_bytes(bytes(data))
    manifest_from_dir(export_copy)  # a load checks sizes and the fingerprint only
    with pytest.raises(ExportIntegrityError, match=r"model.norms.bin has SHA-256 .* \(altered\)"):
        check_export(export_copy)


def test_check_export_compares_the_manifest_with_the_graph(export_copy: Path) -> None:
    """A forged manifest whose fingerprint was recomputed passes the load's re-hash; the graph says 10 classes."""
    from cema_deploy.contract.fingerprint import summarize_graph

    m = manifest_from_dir(export_copy)
    _edit_manifest(export_copy, lambda d: d.update(num_classes=11))
    forged = manifest_from_dir(export_copy, verify=False)
    fp = summarize_graph(
        (export_copy / "model.onnx").read_bytes(),
        base_dir=export_copy,
        refittable=[p.name for p in forged.refittable],
        binding=binding(forged),
    ).fingerprint
    _edit_manifest(export_copy, lambda d: d.update(fingerprint=fp))
    assert fp != m.fingerprint and manifest_from_dir(export_copy).num_classes == 11
    with pytest.raises(ExportIntegrityError, match=r"10 classes, the manifest says num_classes=11"):
        check_export(export_copy)


def test_an_export_of_the_previous_format_is_told_to_export_again(export_copy: Path) -> None:
    _edit_manifest(export_copy, lambda d: d.update(format="cema-manifest/1"))
    with pytest.raises(ManifestError, match=r"older cema-deploy .* export the model again"):
        manifest_from_dir(export_copy)


def test_the_checks_need_neither_torch_nor_onnx(export_copy: Path) -> None:
    code = (
        "import sys\n"
        "from cema_deploy.contract.export_check import check_export\n"
        "from cema_deploy.contract.manifest import manifest_from_dir\n"
        f"check_export({str(export_copy)!r}); manifest_from_dir({str(export_copy)!r})\n"
        "bad = sorted(m for m in ('torch', 'onnx', 'timm', 'onnxruntime') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
