"""Backends by name. Modules are imported only when their backend is chosen, so TensorRT is never imported
unless asked for."""

from __future__ import annotations

import importlib
import os
from typing import Any

from cema_deploy.exceptions import BackendUnavailableError
from cema_deploy.runtime.base import Backend

#: name -> (module, class, keyword arguments)
_BACKENDS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "ort-cpu": ("cema_deploy.runtime.onnxrt", "OnnxrtBackend", {"provider": "ort-cpu"}),
    "ort-cuda": ("cema_deploy.runtime.onnxrt", "OnnxrtBackend", {"provider": "ort-cuda"}),
    "ort-trt": ("cema_deploy.runtime.onnxrt", "OnnxrtBackend", {"provider": "ort-trt"}),
    "trt": ("cema_deploy.runtime.trt", "TrtBackend", {}),
}


def list_backends() -> list[str]:
    """Every backend name (whether or not its package and device are present here)."""
    return list(_BACKENDS)


def get_backend(name: str, model_dir: str | os.PathLike[str], **options: Any) -> Backend:
    """Open backend ``name`` on an export directory.

    Example:
        >>> be = get_backend("ort-cpu", "out/r50")  # doctest: +SKIP
    """
    if name not in _BACKENDS:
        raise BackendUnavailableError(f"Unknown backend {name!r}; expected one of: {', '.join(_BACKENDS)}.")
    module_name, cls_name, kwargs = _BACKENDS[name]
    cls = getattr(importlib.import_module(module_name), cls_name)
    backend: Backend = cls(model_dir, **kwargs, **{k: v for k, v in options.items() if v is not None})
    return backend
