"""uint8 RGB images -> the model's float32 NCHW input, as the manifest says (numpy; PIL only to resize).

The edge uploads the uint8 image *after* resizing (``images_at_model_size``), so the cloud, applying
:func:`normalize` with the same manifest, sees exactly the tensor the edge ran.
"""

from __future__ import annotations

import numpy as np

from cema_deploy._lazy import lazy_import
from cema_deploy.contract.manifest import Preprocess
from cema_deploy.exceptions import CemaError

_PIL_FILTERS = {"bilinear": 2, "bicubic": 3, "nearest": 0, "lanczos": 1}


class InputError(CemaError):
    """Images that cannot be turned into the model's input."""


def images_at_model_size(images: np.ndarray, pre: Preprocess) -> np.ndarray:
    """uint8 [N, H, W, 3] at ``pre.size``: returned as-is when already that size, else resized (PIL)."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise InputError(f"Expected uint8 images [N, H, W, 3], got {images.dtype}{list(images.shape)}.")
    h, w = pre.size
    if images.shape[1:3] == (h, w):
        return images
    image_mod = lazy_import("PIL.Image", extra="edge", purpose="resizing input images")
    resample = _PIL_FILTERS.get(pre.interpolation, 2)
    return np.stack([np.asarray(image_mod.fromarray(im).resize((w, h), resample=resample)) for im in images])


def normalize(images: np.ndarray, pre: Preprocess) -> np.ndarray:
    """uint8 [N, H, W, 3] at model size -> float32 [N, 3, H, W]: ``(x / 255 - mean) / std``."""
    mean = np.asarray(pre.mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(pre.std, np.float32).reshape(1, 3, 1, 1)
    x = images.transpose(0, 3, 1, 2).astype(np.float32) * np.float32(1.0 / 255.0)
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)
