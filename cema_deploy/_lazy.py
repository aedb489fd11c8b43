"""Lazy imports of heavy optional dependencies, with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from cema_deploy.exceptions import MissingExtraError

#: Which extra brings which top-level package.
EXTRA_OF: dict[str, str] = {
    "torch": "export",
    "torchvision": "export",
    "timm": "export",
    "onnx": "export",
    "onnxscript": "export",
    "onnxruntime": "edge",
    "tensorrt": "trt",
    "fastapi": "cloud",
    "uvicorn": "cloud",
    "ray": "cluster",
    "httpx": "edge",
    "PIL": "edge",
    "sklearn": "demo",
    "imagecorruptions": "demo",
    "matplotlib": "demo",
}


def lazy_import(name: str, *, extra: str | None = None, purpose: str = "this feature") -> ModuleType:
    """Import ``name`` now, or raise :class:`MissingExtraError` naming the extra that provides it.

    Example:
        >>> np = lazy_import("numpy")
    """
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        top = name.split(".")[0]
        extra = extra or EXTRA_OF.get(top, "dev")
        raise MissingExtraError(
            f"{purpose} needs the Python package {top!r}, which is not installed (or failed to import: "
            f"{exc}). Install the '{extra}' extra: pip install 'cema-deploy[{extra}]'"
        ) from exc
