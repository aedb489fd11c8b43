"""Backends by name. Modules are imported only when their backend is chosen, so TensorRT is never imported
unless asked for."""

from __future__ import annotations

import importlib
import os
from typing import Any

from cema_deploy.exceptions import BackendUnavailableError
from cema_deploy.runtime.backends.base import Backend

#: name -> (module, class, keyword arguments)
_BACKENDS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "ort-cpu": ("cema_deploy.runtime.backends.onnxrt", "OnnxrtBackend", {"provider": "ort-cpu"}),
    "ort-cuda": ("cema_deploy.runtime.backends.onnxrt", "OnnxrtBackend", {"provider": "ort-cuda"}),
    "ort-trt": ("cema_deploy.runtime.backends.ort_trt", "OrtTrtBackend", {}),
    "trt": ("cema_deploy.runtime.backends.trt", "TrtBackend", {}),
}


#: Options that only some backends take. Elsewhere a performance option is dropped (``--threads`` means nothing
#: to TensorRT, ``--max-batch`` nothing to a dynamic-shape ORT session); a result-changing one is refused unless
#: it asks for what the backend does anyway (``precision="fp32"`` on ORT CPU/CUDA).
OPTION_BACKENDS: dict[str, tuple[str, ...]] = {
    "intra_op_threads": ("ort-cpu", "ort-cuda", "ort-trt"),
    "max_batch": ("trt", "ort-trt"),
    "precision": ("trt", "ort-trt"),
    "refit_mode": ("trt",),
}
_DROPPED_ELSEWHERE = {"intra_op_threads": None, "max_batch": None, "precision": "fp32"}


def backend_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` minus None values and minus those ``name`` does not take (see :data:`OPTION_BACKENDS`)."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        if value is None:
            continue
        if name in OPTION_BACKENDS.get(key, (name,)):
            out[key] = value
            continue
        harmless = _DROPPED_ELSEWHERE.get(key, ...)
        if harmless is None or harmless == value:
            continue
        flag = "--" + key.replace("_", "-")
        raise BackendUnavailableError(
            f"Backend {name!r} does not take {flag} {value!r}; it is for {', '.join(OPTION_BACKENDS[key])}."
        )
    return out


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
    backend: Backend = cls(model_dir, **kwargs, **backend_options(name, options))
    return backend
