"""``export --refit head`` (issue 22 item 3, beyond the paper): the classifier's tensors are refittable, listed in
the manifest, bound by the fingerprint, carried by blob v0, kept as graph initializers of the head's Gemm; a
1,000-class head is bias only, so a ResNet-50 blob stays under 0.5 % of the model."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import onnx
import pytest
import timm
import torch
from typer.testing import CliRunner

from cema_deploy.cli import app
from cema_deploy.contract import blob_from_path, manifest_from_dir
from cema_deploy.contract.manifest import MANIFEST_FILE, Manifest
from cema_deploy.exceptions import ExportError, ExportIntegrityError
from cema_deploy.export.head import HEAD_WEIGHT_MAX_CLASSES, collect_head_params
from cema_deploy.export.norms import collect_norm_params
from cema_deploy.export.to_onnx import export_timm
from tests.conftest import tiny_model


def test_head_export_lists_the_classifier_and_blob_v0_carries_it(exported_head) -> None:  # type: ignore[no-untyped-def]
    out, model = exported_head("bn")
    m = manifest_from_dir(out)
    assert m.refit_scope == "head"
    assert [(p.name, p.shape, p.layer_type) for p in m.head_refittable] == [
        ("fc.weight", (10, 96), "Classifier"),
        ("fc.bias", (10,), "Classifier"),
    ]
    norms = [p.name for p in collect_norm_params(model)]
    assert [p.name for p in m.refittable] == [*norms, "fc.weight", "fc.bias"]  # norms first, as before
    blob = blob_from_path(out / m.params_file)
    state = model.state_dict()
    assert set(blob.tensors) == set(m.refittable_by_name)
    assert np.array_equal(blob.tensors["fc.weight"], state["fc.weight"].numpy())
    assert np.array_equal(blob.tensors["fc.bias"], state["fc.bias"].numpy())
    # the head stays a pair of graph initializers read by the Gemm itself: never folded into another constant
    graph = onnx.load(str(out / m.model_file), load_external_data=False).graph
    head_nodes = [n for n in graph.node if "fc.weight" in n.input]
    assert [n.op_type for n in head_nodes] == ["Gemm"] and list(head_nodes[0].input[1:]) == ["fc.weight", "fc.bias"]


def test_the_fingerprint_binds_the_refittable_set_not_the_head_values(exported, exported_head, tmp_path) -> None:  # type: ignore[no-untyped-def]
    norms_dir, _ = exported("bn")
    head_dir, _ = exported_head("bn")  # the same model and weights (tiny_model("bn"))
    norms, head = manifest_from_dir(norms_dir), manifest_from_dir(head_dir)
    assert norms.refit_scope == "norms" and not norms.head_refittable
    assert norms.fingerprint != head.fingerprint  # the refittable list is part of the binding
    # a hand-edited manifest that drops the head from the refittable list no longer matches model.onnx
    edited = tmp_path / "edited"
    shutil.copytree(head_dir, edited)
    data = json.loads((edited / MANIFEST_FILE).read_text())
    data["refittable"] = [p for p in data["refittable"] if p["layer_type"] != "Classifier"]
    (edited / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(ExportIntegrityError, match="hash to fingerprint"):
        manifest_from_dir(edited)
    # the head's values are what a blob replaces: two head exports that differ only there share a fingerprint
    other = tiny_model("bn")
    with torch.no_grad():
        other.fc.bias.add_(1.0)
        other.fc.weight.mul_(2.0)
    again = export_timm("test_resnet", tmp_path / "other", model=other, img_size=64, refit="head").manifest
    assert again.fingerprint == head.fingerprint


def test_a_classifier_layer_type_is_accepted_and_an_unknown_one_refused(exported_head) -> None:  # type: ignore[no-untyped-def]
    from cema_deploy.exceptions import ManifestError

    data = manifest_from_dir(exported_head("bn")[0]).to_dict()
    assert Manifest.from_dict(data).refit_scope == "head"
    data["refittable"][-1]["layer_type"] = "Dense"
    with pytest.raises(ManifestError, match="layer type 'Dense'"):
        Manifest.from_dict(data)


@pytest.mark.parametrize(
    ("classes", "names"), [(HEAD_WEIGHT_MAX_CLASSES, ["fc.weight", "fc.bias"]), (101, ["fc.bias"])]
)
def test_heads_above_100_classes_are_bias_only(classes: int, names: list[str]) -> None:
    model = timm.create_model("test_resnet", num_classes=classes)
    assert [p.name for p in collect_head_params(model)] == names


def test_a_resnet50_blob_with_its_1000_class_head_stays_under_half_a_percent_of_the_model() -> None:
    """The share ``cema-deploy export resnet50 --refit head`` prints, from the same parameter lists (float32)."""
    model = timm.create_model("resnet50")
    state = model.state_dict()
    params = [*collect_norm_params(model), *collect_head_params(model)]
    assert [p.name for p in collect_head_params(model)] == ["fc.bias"]
    blob = sum(state[p.name].numel() for p in params) * 4
    total = sum(v.numel() * v.element_size() for k, v in state.items() if not k.endswith("num_batches_tracked"))
    assert blob / total <= 0.005, blob / total
    assert math.isclose(blob - 4 * 1000, sum(state[p.name].numel() for p in collect_norm_params(model)) * 4)


def test_refit_scopes_that_cannot_be_made_are_refused_and_leave_nothing(tmp_path) -> None:
    with pytest.raises(ExportError, match="--refit 'all' is not one of"):
        export_timm("test_resnet", tmp_path / "a", model=tiny_model("bn"), img_size=64, refit="all")
    headless = timm.create_model("test_resnet", num_classes=0)  # the classifier is an nn.Identity
    with pytest.raises(ExportError, match=r"classifier is one nn\.Linear"):
        export_timm("test_resnet", tmp_path / "b", model=headless, img_size=64, refit="head")
    assert not any(tmp_path.iterdir())


def test_cli_export_refit_head_reports_the_head_and_the_blob_share(tmp_path) -> None:
    out = tmp_path / "m"
    args = ["export", "test_resnet", "--num-classes", "10", "--img-size", "64", "--out", str(out), "--refit", "head"]
    r = CliRunner().invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    assert got["refit"] == "head" and got["head_refittable"] == ["fc.weight", "fc.bias"]
    m = manifest_from_dir(out)
    assert got["blob_payload_bytes"] == m.refittable_bytes
    assert m.refittable_bytes - 4 * (10 * 96 + 10) == sum(
        p.numel * 4 for p in m.refittable if p.layer_type != "Classifier"
    )
    r = CliRunner().invoke(app, [*args, "--force"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())  # the console wraps lines
    assert "+ the head ['fc.weight', 'fc.bias'], blob 20.0 KiB" in text and "% of the model)" in text
