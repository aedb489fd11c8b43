"""Rebuild the PyTorch model of an export from its ``model.onnx`` (every weight is named as in the state dict)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cema_deploy._lazy import lazy_import
from cema_deploy.contract.manifest import Manifest, manifest_from_dir
from cema_deploy.exceptions import ModelError


def torch_model_from_export(model_dir: str | os.PathLike[str], manifest: Manifest | None = None) -> Any:
    """``timm.create_model(manifest.model_name, **manifest.model_args)`` in eval mode with the weights of
    ``model_dir/model.onnx``: the constructor arguments the export used (``img_size`` of a ViT-style model, the
    class count), so the replica has the edge model's shapes.

    Example:
        >>> model = torch_model_from_export("out/r50")  # doctest: +SKIP
    """
    torch = lazy_import("torch", extra="export", purpose="rebuilding the PyTorch model of an export")
    onnx = lazy_import("onnx", extra="export", purpose="rebuilding the PyTorch model of an export")
    from onnx import numpy_helper

    from cema_deploy.export.to_onnx import build_timm_model

    model_dir = Path(model_dir)
    manifest = manifest or manifest_from_dir(model_dir)
    model, _ = build_timm_model(
        manifest.model_name, model_args={"num_classes": manifest.num_classes, **manifest.model_args}
    )
    proto = onnx.load(str(model_dir / manifest.model_file))
    inits = {i.name: i for i in proto.graph.initializer}
    state = model.state_dict()
    missing = [k for k, v in state.items() if v.is_floating_point() and k not in inits]
    if missing:
        raise ModelError(
            f"{model_dir / manifest.model_file} lacks {len(missing)} weights of {manifest.model_name} "
            f"(e.g. {missing[:3]}); it was not written by `cema-deploy export`."
        )
    new_state = {
        k: torch.from_numpy(numpy_helper.to_array(inits[k]).copy()) if k in inits else v for k, v in state.items()
    }
    try:
        model.load_state_dict(new_state)
    except RuntimeError as exc:  # a shape differs: the constructor arguments do not rebuild the exported model
        raise ModelError(
            f"{manifest.model_name} built with {dict(manifest.model_args)} does not take the weights of "
            f"{model_dir / manifest.model_file}: {str(exc).splitlines()[-1].strip()[:300]}. "
            "Export the model again with this version of cema-deploy (it records the constructor arguments)."
        ) from exc
    return model.eval()
