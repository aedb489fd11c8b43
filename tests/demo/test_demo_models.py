"""The demo's models: quick training is accurate and bit-deterministic, cached, resolvable from CLI arguments, and
normalised exactly as the export's manifest says."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import needs_torch

pytestmark = needs_torch


def test_quick_edge_is_accurate_and_cached(quick_edge, splits) -> None:  # type: ignore[no-untyped-def]
    from cema_deploy.demo.models import accuracy

    tm, model = quick_edge
    assert tm.name == "resnet10t" and tm.checkpoint.suffix == ".safetensors" and not tm.cached
    assert tm.clean_accuracy > 0.9  # measured 0.97 after 4 epochs; chance is 0.1
    assert accuracy(model, splits[2], splits[3]) == pytest.approx(tm.clean_accuracy)
    meta = json.loads(tm.checkpoint.with_suffix(".json").read_text())
    assert meta["name"] == "resnet10t" and meta["clean_accuracy"] == tm.clean_accuracy


def test_training_is_deterministic_and_cache_hits(cache: Path, splits) -> None:  # type: ignore[no-untyped-def]
    from safetensors.numpy import load_file

    from cema_deploy.demo.models import EDGE_DEFAULT, train_model

    spec = replace(EDGE_DEFAULT, epochs=1)
    small = (splits[0][:192], splits[1][:192], splits[2][:64], splits[3][:64])
    a = train_model(spec, small, seed=3, role="edge")
    first = load_file(str(a.checkpoint))
    hit = train_model(spec, small, seed=3, role="edge")
    assert hit.cached and not a.cached and hit.checkpoint == a.checkpoint
    assert hit.clean_accuracy == a.clean_accuracy and hit.train_seconds == a.train_seconds
    b = train_model(spec, small, seed=3, role="edge", cache=False)  # trained again into the same file
    second = load_file(str(b.checkpoint))
    assert b.checkpoint == a.checkpoint and b.clean_accuracy == a.clean_accuracy
    assert first.keys() == second.keys() and all(np.array_equal(first[k], second[k]) for k in first)
    assert len(list((cache / "models").glob("*.safetensors"))) == 1


def test_augment_keeps_range_and_shape() -> None:
    import torch

    from cema_deploy.demo.models import augment

    x = torch.rand(8, 3, 32, 32)
    y = augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and float(y.min()) >= 0.0 and float(y.max()) <= 1.0 and not torch.equal(x, y)


def test_resolve_models_from_checkpoints(quick_edge, splits, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from cema_deploy.demo.models import resolve_models
    from cema_deploy.exceptions import ModelError

    tm, _ = quick_edge
    by_path = resolve_models(str(tm.checkpoint), f"resnet10t={tm.checkpoint}", splits)
    assert by_path.edge.name == by_path.teacher.name == "resnet10t"
    assert by_path.edge.clean_accuracy == pytest.approx(tm.clean_accuracy) and by_path.edge.train_seconds == 0.0
    assert by_path.mean == (0.485, 0.456, 0.406) and by_path.std == (0.229, 0.224, 0.225)
    lone = tmp_path / "w.safetensors"
    lone.write_bytes(tm.checkpoint.read_bytes())
    with pytest.raises(ModelError, match="NAME="):
        resolve_models(str(lone), f"resnet10t={tm.checkpoint}", splits)
    with pytest.raises(ModelError, match="do not fit"):
        resolve_models(f"resnet18={tm.checkpoint}", f"resnet10t={tm.checkpoint}", splits)
    with pytest.raises(ModelError, match="Unknown timm model"):
        resolve_models("resnet10tt", f"resnet10t={tm.checkpoint}", splits)


def test_training_normalisation_is_the_manifests(quick_edge, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from cema_deploy.demo.models import mean_std
    from cema_deploy.export.to_onnx import export_timm

    tm, model = quick_edge
    result = export_timm(tm.name, tmp_path / "edge", model=model, img_size=32)
    pre = result.manifest.preprocess
    assert (pre.mean, pre.std) == mean_std(model) and tuple(pre.size) == (32, 32)
