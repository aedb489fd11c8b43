"""uint8 RGB images -> the model's float32 NCHW input, as timm's eval transform does it (numpy; PIL to resize).

For an image that is not at the model size, :func:`images_at_model_size` reproduces timm's
``transforms_imagenet_eval`` (timm/data/transforms_factory.py) with the manifest's ``interpolation`` and
``crop_pct``, in the default crop mode ``center``:

1. scale size ``(floor(H / crop_pct), floor(W / crop_pct))`` for the model size ``(H, W)`` (timm uses ``math.floor``);
2. resize keeping the aspect ratio: when the two scale sizes are equal, the shorter edge becomes that size and the
   longer ``int(size * long / short)`` (torchvision ``Resize(int)``); otherwise both edges are divided by
   ``min(h / scale_h, w / scale_w)`` and rounded (timm ``ResizeKeepRatio``); PIL resamples, as torchvision does
   for PIL images, so the pixels are the same;
3. center crop to ``(H, W)``: offsets ``int(round((h - H) / 2))`` (Python's round), zero padding first when the
   resized image is smaller (torchvision ``CenterCrop``).

:func:`normalize` then scales to [0, 1] and applies mean/std. The crop mode ``squash`` (resize both edges to the
scale size, then center crop) is implemented too; the manifest does not record timm's ``crop_mode`` yet, so
``center`` is used unless the caller passes another.

One deliberate difference from timm: an image that is *already* at the model size is used as it is (timm would
upscale it by ``1 / crop_pct`` and crop back). The edge uploads exactly that model-size uint8 crop, so the cloud,
applying :func:`normalize` with the same manifest, sees the tensor the edge ran, and frames a caller prepared at
the model size (the demo's 32 x 32 digits) run unchanged.

Example:
    >>> pre = Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3, size=(224, 224), crop_pct=0.875)
    >>> x = normalize(images_at_model_size(np.zeros((2, 300, 451, 3), np.uint8), pre), pre)
    >>> x.shape
    (2, 3, 224, 224)
"""

from __future__ import annotations

import math

import numpy as np

from cema_deploy._lazy import lazy_import
from cema_deploy.contract.manifest import Preprocess
from cema_deploy.exceptions import CemaError

__all__ = ["CROP_MODES", "INTERPOLATIONS", "InputError", "crop_geometry", "images_at_model_size", "normalize"]

#: timm's interpolation names (``str_to_interp_mode``) -> PIL resampling filter names.
INTERPOLATIONS = {
    "nearest": "NEAREST",
    "bilinear": "BILINEAR",
    "bicubic": "BICUBIC",
    "box": "BOX",
    "hamming": "HAMMING",
    "lanczos": "LANCZOS",
}
#: timm's eval crop modes implemented here (``border`` is not).
CROP_MODES = ("center", "squash")


class InputError(CemaError):
    """Images that cannot be turned into the model's input."""


def crop_geometry(
    image_hw: tuple[int, int], size: tuple[int, int], crop_pct: float, crop_mode: str = "center"
) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((resized_h, resized_w), (top, left))`` of timm's eval transform for one image size.

    ``top``/``left`` are where the model-size crop starts in the resized image; negative when the resized image
    is smaller than the crop on that axis (zero padding, as torchvision's ``CenterCrop``).
    """
    if crop_mode not in CROP_MODES:
        raise InputError(f"Crop mode {crop_mode!r} is not supported; expected one of {', '.join(CROP_MODES)}.")
    if not (crop_pct > 0 and math.isfinite(crop_pct)):
        raise InputError(f"crop_pct must be a positive number, got {crop_pct}; export the model again.")
    ih, iw = image_hw
    th, tw = size
    sh, sw = math.floor(th / crop_pct), math.floor(tw / crop_pct)
    if sh < 1 or sw < 1 or ih < 1 or iw < 1:
        raise InputError(f"No crop of {th}x{tw} at crop_pct {crop_pct} from a {ih}x{iw} image.")
    if crop_mode == "squash":
        rh, rw = sh, sw
    elif sh == sw:  # torchvision Resize(int): the shorter edge becomes sh, the longer is truncated
        short, long = (iw, ih) if iw <= ih else (ih, iw)
        new_short, new_long = sh, int(sh * long / short)
        rw, rh = (new_short, new_long) if iw <= ih else (new_long, new_short)
    else:  # timm ResizeKeepRatio(longest=0): both edges divided by the smaller ratio, rounded
        ratio = min(ih / sh, iw / sw)
        rh, rw = round(ih / ratio), round(iw / ratio)
    top, left = round((rh - th) / 2.0), round((rw - tw) / 2.0)  # Python round: halves to even, as torchvision
    # torchvision pads a too-small image first ((d // 2) before, (d + 1) // 2 after), then crops at 0.
    if rh < th:
        top = -((th - rh) // 2)
    if rw < tw:
        left = -((tw - rw) // 2)
    return (rh, rw), (top, left)


def images_at_model_size(images: np.ndarray, pre: Preprocess, *, crop_mode: str = "center") -> np.ndarray:
    """uint8 [N, H, W, 3] at ``pre.size``: as-is when already that size, else timm's eval resize + center crop.

    This is the array the edge feeds (after :func:`normalize`) and uploads.
    """
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise InputError(f"Expected uint8 images [N, H, W, 3], got {images.dtype}{list(images.shape)}.")
    th, tw = (int(v) for v in pre.size)
    ih, iw = int(images.shape[1]), int(images.shape[2])
    if (ih, iw) == (th, tw):
        return images
    if pre.interpolation not in INTERPOLATIONS:
        raise InputError(
            f"Manifest interpolation {pre.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}; "
            "export the model again or fix manifest.json."
        )
    image_mod = lazy_import("PIL.Image", extra="edge", purpose="resizing input images")
    resample = image_mod.Resampling[INTERPOLATIONS[pre.interpolation]]
    (rh, rw), (top, left) = crop_geometry((ih, iw), (th, tw), pre.crop_pct, crop_mode)
    out = np.zeros((len(images), th, tw, 3), np.uint8)
    # the part of the crop window that lies inside the resized image (all of it unless it had to be padded)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + th, rh), min(left + tw, rw)
    for i, im in enumerate(images):
        resized = im if (rh, rw) == (ih, iw) else np.asarray(image_mod.fromarray(im).resize((rw, rh), resample))
        out[i, y0 - top : y1 - top, x0 - left : x1 - left] = resized[y0:y1, x0:x1]
    return out


def normalize(images: np.ndarray, pre: Preprocess) -> np.ndarray:
    """uint8 [N, H, W, 3] at model size -> float32 [N, 3, H, W]: ``(x / 255 - mean) / std``."""
    mean = np.asarray(pre.mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(pre.std, np.float32).reshape(1, 3, 1, 1)
    x = images.transpose(0, 3, 1, 2).astype(np.float32) * np.float32(1.0 / 255.0)
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)
