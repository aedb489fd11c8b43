"""Where the edge's images come from: a folder of image files or a ``.npy`` array of uint8 ``[N, H, W, 3]``.

Folders are read in sorted path order (recursively), each file decoded with PIL and converted to RGB; a ``.npy``
file is memory-mapped, so a large stream is never loaded whole. Labels, when given, are a ``.npy`` of N integer
class indices in the same order.

Example:
    >>> for images in batches_from_source("stream.npy", 64):  # doctest: +SKIP
    ...     step = runtime.process(images)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cema_deploy._lazy import lazy_import
from cema_deploy.exceptions import CemaError

__all__ = ["IMAGE_SUFFIXES", "SourceError", "batches_from_source", "count_images", "labels_from_path"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class SourceError(CemaError):
    """A source of images (or labels) that cannot be read."""


def count_images(path: str | os.PathLike[str]) -> int:
    """Number of images in a folder or ``.npy`` source (without decoding any)."""
    path = Path(path)
    if path.suffix == ".npy":
        return int(_npy_images(path).shape[0])
    return len(_files(path))


def batches_from_source(path: str | os.PathLike[str], batch: int) -> Iterator[np.ndarray]:
    """uint8 RGB batches ``[<=batch, H, W, 3]`` in order.

    A folder's images may differ in size: within one batch, images are resized to the first one's size (the
    runtime then resizes each batch to the model's input size).
    """
    path = Path(path)
    if batch < 1:
        raise SourceError(f"batch must be >= 1, got {batch}.")
    if path.suffix == ".npy":
        arr = _npy_images(path)
        for i in range(0, arr.shape[0], batch):
            yield np.ascontiguousarray(arr[i : i + batch])
        return
    files = _files(path)
    image_mod = lazy_import("PIL.Image", extra="edge", purpose="reading image folders")
    for i in range(0, len(files), batch):
        imgs = []
        for f in files[i : i + batch]:
            try:
                with image_mod.open(f) as im:
                    imgs.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
            except Exception as exc:  # PIL raises many types on bad files
                raise SourceError(f"{f} is not a readable image ({exc}); remove it or convert it to PNG/JPEG.") from exc
        if len({im.shape for im in imgs}) > 1:
            h, w = imgs[0].shape[:2]
            imgs = [im if im.shape[:2] == (h, w) else np.asarray(image_mod.fromarray(im).resize((w, h))) for im in imgs]
        yield np.stack(imgs)


def labels_from_path(path: str | os.PathLike[str], count: int) -> np.ndarray:
    """Integer labels ``[count]`` from a ``.npy`` file, checked against the number of images."""
    path = Path(path)
    try:
        y = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise SourceError(f"Labels {path} are not a readable .npy array ({exc}).") from exc
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise SourceError(f"Labels {path} hold {y.dtype}{list(y.shape)}; expected a 1-D array of integer classes.")
    if y.shape[0] != count:
        raise SourceError(f"Labels {path} hold {y.shape[0]} labels but the source has {count} images; they must match.")
    labels: np.ndarray = y.astype(np.int64)
    return labels


def _npy_images(path: Path) -> np.ndarray:
    if not path.is_file():
        raise SourceError(f"{path} does not exist; expected a .npy file of uint8 [N, H, W, 3] images.")
    try:
        arr: np.ndarray = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise SourceError(f"{path} is not a readable .npy array ({exc}).") from exc
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise SourceError(
            f"{path} holds {arr.dtype}{list(arr.shape)}; expected uint8 [N, H, W, 3] RGB images "
            "(convert with np.asarray(x, np.uint8) and move channels last)."
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise SourceError(f"{path} holds no images (shape {list(arr.shape)}).")
    return arr


def _files(path: Path) -> list[Path]:
    if not path.is_dir():
        raise SourceError(f"{path} is neither a folder of images nor a .npy file of uint8 [N, H, W, 3] images.")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SourceError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    return files
