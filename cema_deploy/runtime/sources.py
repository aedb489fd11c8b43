"""Where the edge's images come from: a folder of image files or a ``.npy`` array of uint8 ``[N, H, W, 3]``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cema_deploy._lazy import lazy_import
from cema_deploy.exceptions import CemaError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class SourceError(CemaError):
    """A source of images that cannot be read."""


def count_images(path: str | Path) -> int:
    path = Path(path)
    if path.suffix == ".npy":
        return int(np.load(path, mmap_mode="r").shape[0])
    return len(_files(path))


def batches_from_source(path: str | Path, batch: int) -> Iterator[np.ndarray]:
    """uint8 RGB batches ``[<=batch, H, W, 3]`` in order. Folders must hold images of one size (or the model
    resizes each batch)."""
    path = Path(path)
    if batch < 1:
        raise SourceError(f"batch must be >= 1, got {batch}")
    if path.suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise SourceError(f"{path} is not a readable .npy array ({exc}).") from exc
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
            raise SourceError(f"{path} holds {arr.dtype}{list(arr.shape)}; expected uint8 [N, H, W, 3].")
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
                    imgs.append(np.asarray(im.convert("RGB")))
            except Exception as exc:  # PIL raises many types on bad files
                raise SourceError(f"{f} is not a readable image ({exc}).") from exc
        if len({im.shape for im in imgs}) > 1:
            size = imgs[0].shape[:2]
            imgs = [np.asarray(image_mod.fromarray(im).resize((size[1], size[0]))) for im in imgs]
        yield np.stack(imgs)


def _files(path: Path) -> list[Path]:
    if not path.is_dir():
        raise SourceError(f"{path} is neither a folder of images nor a .npy file.")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SourceError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    return files
