"""Load the cloud's two models: the foundation model (teacher) and the replica of the edge model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cema_deploy.contract.manifest import Manifest
from cema_deploy.exceptions import ModelError


def teacher_from_name(name: str, *, num_classes: int, weights: str | Path | None = None) -> Any:
    """``timm.create_model(name, num_classes=...)`` with ``weights`` (a local state dict) loaded, in eval mode."""
    from cema_deploy.export.to_onnx import create_timm_model, load_weights

    model = create_timm_model(name, num_classes=num_classes)
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def replica_from_export(edge_dir: str | Path, manifest: Manifest) -> Any:
    """The edge model in PyTorch with exactly the exported weights (names match the ONNX initializers)."""
    from cema_deploy.export.reload import torch_model_from_export

    model = torch_model_from_export(edge_dir, manifest)
    state = model.state_dict()
    missing = [p.name for p in manifest.refittable if p.name not in state]
    if missing:
        raise ModelError(
            f"The replica of {manifest.model_name} lacks refittable tensors {missing[:3]}; "
            "export the edge model again with this version of cema-deploy."
        )
    return model
