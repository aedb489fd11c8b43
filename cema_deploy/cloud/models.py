"""Load and place the cloud's two models: the foundation model (teacher) and the replica of the edge model.

Also decides where they run (:func:`resolve_device`) and how the teacher's input is made from an uploaded image
(:func:`teacher_input`): the edge uploads uint8 images at the *edge model's* size; the teacher gets them resized to
its own input size and normalised with its own mean/std.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cema_deploy.cloud.method import TeacherInput
from cema_deploy.contract.manifest import Manifest
from cema_deploy.exceptions import CloudError, ModelError


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


def resolve_device(spec: str) -> Any:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when torch sees a GPU, else the CPU) -> ``torch.device``.

    Example:
        >>> str(resolve_device("cpu"))
        'cpu'
    """
    import torch

    text = spec.strip().lower()
    if text == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        index = 0
        if text != "cuda":
            tail = text.split(":", 1)[1]
            if not tail.isdigit():
                raise CloudError(f"Device {spec!r}: expected cuda:N with N a GPU index, e.g. cuda:0.")
            index = int(tail)
        if not torch.cuda.is_available():
            raise CloudError(
                f"Device {spec!r} asked for CUDA, but torch {torch.__version__} sees no CUDA GPU here "
                "(torch.cuda.is_available() is False). Use --device cpu or auto, or install a CUDA build of torch."
            )
        count = torch.cuda.device_count()
        if index >= count:
            raise CloudError(f"Device {spec!r}: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}.")
        return torch.device("cuda", index)
    raise CloudError(f"Device {spec!r} is not one of cpu, cuda, cuda:N, auto.")


def _recorded_preprocess(weights: Path | None) -> tuple[dict[str, Any], str] | None:
    """Preprocessing recorded with a checkpoint: a ``preprocess`` object in the ``.json`` sidecar next to it, or
    a ``preprocess`` JSON string in the safetensors metadata."""
    if weights is None:
        return None
    sidecar = weights.with_suffix(".json")
    if sidecar.is_file():
        try:
            info = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CloudError(f"The teacher's sidecar {sidecar} is unreadable ({exc}); fix or remove it.") from exc
        if isinstance(info, dict) and isinstance(info.get("preprocess"), dict):
            return dict(info["preprocess"]), f"{sidecar} (preprocess)"
    if weights.suffix == ".safetensors" and weights.is_file():
        from safetensors import safe_open

        with safe_open(str(weights), framework="numpy") as f:
            meta = f.metadata() or {}
        if "preprocess" in meta:
            try:
                return dict(json.loads(meta["preprocess"])), f"{weights} (metadata 'preprocess')"
            except (ValueError, TypeError) as exc:
                raise CloudError(f"{weights}: metadata 'preprocess' is not a JSON object ({exc}).") from exc
    return None


def teacher_input(
    teacher: Any,
    manifest: Manifest,
    *,
    name: str,
    weights: Path | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    size: tuple[int, int] | None = None,
) -> TeacherInput:
    """How the teacher expects its input, first found wins per field: the explicit ``mean``/``std``/``size``
    (deployment settings), the preprocessing recorded with its checkpoint (:func:`_recorded_preprocess`), timm's
    pretrained config of the model. The size defaults to the edge's (the official code feeds both models one
    tensor; a CNN runs at any size) unless timm marks the teacher ``fixed_input_size``. Refused with a message
    naming both models when no consistent input can be made (not RGB, malformed values)."""
    recorded = _recorded_preprocess(weights)
    rec, rec_source = recorded if recorded is not None else ({}, "")
    cfg = dict(getattr(teacher, "pretrained_cfg", None) or {})
    edge = manifest.preprocess
    edge_desc = f"the edge model {manifest.model_name} (manifest: {tuple(edge.size)}, mean {edge.mean}, std {edge.std})"
    sources = []

    def pick(key: str, explicit: Any, timm_key: str) -> Any:
        if explicit is not None:
            sources.append(f"{key}: deployment settings")
            return explicit
        if rec.get(key) is not None:
            sources.append(f"{key}: {rec_source}")
            return rec[key]
        if cfg.get(timm_key) is not None:
            sources.append(f"{key}: timm pretrained_cfg of {name}")
            return cfg[timm_key]
        return None

    t_mean, t_std = pick("mean", mean, "mean"), pick("std", std, "std")
    t_size = pick("size", size, "input_size") if size is not None or rec.get("size") is not None else None
    if t_size is None and cfg.get("fixed_input_size") and cfg.get("input_size") is not None:
        t_size = cfg["input_size"]
        sources.append(f"size: timm pretrained_cfg of {name} (fixed_input_size)")
    if t_size is not None and len(t_size) == 3:  # timm's (C, H, W)
        if int(t_size[0]) != 3:
            raise CloudError(
                f"The teacher {name} expects {t_size[0]}-channel input, but {edge_desc} uploads RGB images; "
                "pick an RGB teacher or record a 3-channel preprocessing with its checkpoint."
            )
        t_size = t_size[1:]
    in_chans = cfg.get("in_chans", getattr(teacher, "in_chans", 3))
    if isinstance(in_chans, int) and in_chans != 3:
        raise CloudError(f"The teacher {name} takes {in_chans}-channel input, but {edge_desc} uploads RGB images.")
    if t_mean is None or t_std is None:
        t_mean, t_std = edge.mean, edge.std
        sources.append("mean/std: the edge manifest's (nothing recorded for the teacher)")
    try:
        t_mean = tuple(float(v) for v in t_mean)
        t_std = tuple(float(v) for v in t_std)
        t_size = tuple(int(v) for v in (t_size if t_size is not None else edge.size))
    except (TypeError, ValueError) as exc:
        raise CloudError(
            f"The teacher {name}'s preprocessing ({'; '.join(sources)}) is malformed ({exc}); {edge_desc}."
        ) from exc
    if len(t_mean) != 3 or len(t_std) != 3 or min(t_std) <= 0 or len(t_size) != 2 or min(t_size) < 1:
        raise CloudError(
            f"The teacher {name} would get mean {t_mean}, std {t_std}, size {t_size} ({'; '.join(sources)}), "
            f"which cannot be applied to the uploads of {edge_desc}; give teacher_mean/teacher_std/teacher_size "
            "(3 values, std > 0, 2 sizes) in the deployment settings."
        )
    interpolation = str(rec.get("interpolation", cfg.get("interpolation", edge.interpolation)))
    return TeacherInput(
        mean=t_mean,
        std=t_std,
        size=(t_size[0], t_size[1]),
        interpolation=interpolation,
        source="; ".join(sources) or "the edge manifest's",
    )
