"""The demo's data: scikit-learn's digits as 32x32 RGB, and a corrupted test stream in the paper's continual order.

ImageNet-C's corruption functions come from the ``imagecorruptions`` package (1.1.2). Of its 15 ImageNet-C
corruptions, ``glass_blur`` and ``fog`` fail under NumPy 2 (``gaussian()`` got the removed ``multichannel``
keyword; ``np.float_`` was removed), so the stream uses the 13 that run (:data:`CORRUPTIONS`, measured on every
severity), one after the other, each over the whole test split (899 x 13 = 11,687 samples per severity).

Image size (measured): ``imagecorruptions.corrupt`` refuses images under 32 x 32 pixels, and at exactly 32 x 32
all 13 run at severities 1-5 without its fallbacks (no zoom-blur shape mismatch; frost crops a 32 x 32 window
from its frost texture, upscaled by 1.1). The corruptions' parameters are ImageNet-C's, in pixels for 224-pixel
images, so at 32 pixels the blurs (motion blur radius 15-20, defocus radius 6-10) are much stronger relative to
the digit than on ImageNet, and zoom blur, pixelate and JPEG much milder. Users with ImageNet-C point
:func:`imagenet_c_stream` at its folders instead; everything downstream takes a :class:`Stream`.

Example:
    >>> x_tr, y_tr, x_te, y_te = digits_splits(0)  # doctest: +SKIP
    >>> stream = corrupted_stream(x_te, y_te, severity=5, corruptions=QUICK_CORRUPTIONS)  # doctest: +SKIP
    >>> [(seg.name, seg.images.shape) for seg in stream]  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cema_deploy._lazy import lazy_import
from cema_deploy.exceptions import CemaError

#: The ImageNet-C corruptions that run on NumPy 2, in the benchmark's order.
CORRUPTIONS = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
#: Fail on NumPy 2 inside imagecorruptions 1.1.2.
BROKEN_ON_NUMPY2 = ("glass_blur", "fog")
#: Quick mode: one noise, one blur, one digital and the compression corruption.
#: ``--quick``: the first four corruptions of the sequence (the noise family and defocus blur).
QUICK_CORRUPTIONS = CORRUPTIONS[:4]
#: ``imagecorruptions.corrupt`` refuses smaller images.
MIN_SIZE = 32


class DataError(CemaError):
    """The demo's data could not be built or read."""


def cache_dir() -> Path:
    """``$CEMA_DEPLOY_CACHE`` or ``~/.cache/cema-deploy``."""
    path = Path(os.environ.get("CEMA_DEPLOY_CACHE", Path.home() / ".cache" / "cema-deploy"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class Segment:
    """One corruption's part of the stream."""

    name: str
    images: np.ndarray  # uint8 [N, H, W, 3]
    labels: np.ndarray  # int64 [N]


@dataclass(frozen=True)
class Stream:
    """Segments in order; ``images``/``labels``/``segment_of`` give the flattened stream."""

    segments: tuple[Segment, ...]
    severity: int

    def __iter__(self) -> Iterator[Segment]:
        return iter(self.segments)

    @property
    def images(self) -> np.ndarray:
        return np.concatenate([s.images for s in self.segments])

    @property
    def labels(self) -> np.ndarray:
        return np.concatenate([s.labels for s in self.segments])

    @property
    def segment_of(self) -> np.ndarray:
        """Index of the segment of every stream position."""
        return np.concatenate([np.full(len(s.labels), i) for i, s in enumerate(self.segments)])


def digits_splits(seed: int = 0, size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits as uint8 RGB ``size`` x ``size``, split 50/50 stratified by ``seed``:
    ``(train_images, train_labels, test_images, test_labels)``."""
    datasets = lazy_import("sklearn.datasets", extra="demo", purpose="the demo's digits data")
    selection = lazy_import("sklearn.model_selection", extra="demo", purpose="the demo's digits data")
    image_mod = lazy_import("PIL.Image", extra="demo", purpose="upscaling the digits")
    d = datasets.load_digits()
    gray = np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    big = np.stack([np.asarray(image_mod.fromarray(g).resize((size, size), resample=2)) for g in gray])
    rgb = np.repeat(big[..., None], 3, axis=-1)
    labels = d.target.astype(np.int64)
    tr, te = selection.train_test_split(np.arange(len(labels)), test_size=0.5, random_state=seed, stratify=labels)
    return rgb[tr], labels[tr], rgb[te], labels[te]


def corrupted_stream(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    severity: int,
    corruptions: Sequence[str] = CORRUPTIONS,
    seed: int = 0,
    cache: bool = True,
) -> Stream:
    """Each corruption applied to every image at ``severity`` (1-5), segments in order (continual protocol).
    Cached as .npz under :func:`cache_dir` keyed by the inputs."""
    bad = [c for c in corruptions if c not in CORRUPTIONS]
    if bad:
        raise DataError(f"Unknown or unsupported corruptions {bad}; choose from {CORRUPTIONS}.")
    if not 1 <= severity <= 5:
        raise DataError(f"severity must be 1..5, got {severity}")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) != len(labels):
        raise DataError(
            f"Expected uint8 images [N, H, W, 3] and N labels, got {images.dtype}{list(images.shape)} "
            f"and {len(labels)} labels."
        )
    if min(images.shape[1:3]) < MIN_SIZE:
        raise DataError(
            f"imagecorruptions needs images of at least {MIN_SIZE} x {MIN_SIZE} pixels, got "
            f"{images.shape[1]} x {images.shape[2]}; build the digits with digits_splits(size={MIN_SIZE})."
        )
    segments = []
    for name in corruptions:
        tag = f"{name}/{severity}/{seed}/{list(images.shape)}/imagecorruptions-{_ic_version()}"
        key = hashlib.sha256(images.tobytes() + tag.encode()).hexdigest()[:16]
        path = cache_dir() / "streams" / f"{name}-s{severity}-{key}.npz"
        if cache and path.exists():
            corrupted = np.load(path)["images"]
        else:
            corrupted = corrupt_images(images, name, severity, seed=seed)
            if cache:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp.npz")
                np.savez(tmp, images=corrupted)
                os.replace(tmp, path)
        segments.append(Segment(name, corrupted, labels.copy()))
    return Stream(tuple(segments), severity)


def _ic_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("imagecorruptions")
    except PackageNotFoundError:
        return "missing"


def corrupt_images(images: np.ndarray, name: str, severity: int, *, seed: int = 0) -> np.ndarray:
    """``imagecorruptions.corrupt`` on every image (numpy's global RNG seeded for reproducibility)."""
    with warnings.catch_warnings():  # imagecorruptions 1.1.2 imports pkg_resources, which warns on import
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
        ic = lazy_import("imagecorruptions", extra="demo", purpose="ImageNet-C corruptions")
    sk_util = lazy_import("skimage.util", extra="demo", purpose="ImageNet-C corruptions")
    state = np.random.get_state()
    np.random.seed(seed)
    original = getattr(sk_util, "random_noise")  # noqa: B009

    def seeded_noise(*args: object, **kwargs: object) -> object:
        # impulse_noise calls skimage's random_noise, which has its own unseeded generator
        return original(*args, rng=np.random.randint(2**31), **kwargs)

    setattr(sk_util, "random_noise", seeded_noise)  # noqa: B010
    try:
        out = np.stack(
            [np.asarray(ic.corrupt(im, corruption_name=name, severity=severity), dtype=np.float64) for im in images]
        )
    finally:
        setattr(sk_util, "random_noise", original)  # noqa: B010
        np.random.set_state(state)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(images.shape)


def imagenet_c_stream(
    root: str | Path,
    *,
    severity: int,
    corruptions: Sequence[str] = CORRUPTIONS,
    size: int = 224,
    limit: int | None = None,
) -> Stream:
    """ImageNet-C folders ``root/<corruption>/<severity>/<wnid>/*.JPEG`` as a :class:`Stream` (class index =
    position of the wnid in sorted order; centre crop to ``size``)."""
    image_mod = lazy_import("PIL.Image", extra="edge", purpose="reading ImageNet-C")
    segments = []
    for name in corruptions:
        folder = Path(root) / name / str(severity)
        if not folder.is_dir():
            raise DataError(f"{folder} does not exist; expected ImageNet-C's <corruption>/<severity>/<wnid>/ layout.")
        wnids = sorted(p.name for p in folder.iterdir() if p.is_dir())
        files = [
            (f, i)
            for i, w in enumerate(wnids)
            for f in sorted((folder / w).iterdir())
            if f.suffix.lower() in (".jpeg", ".jpg", ".png")
        ]
        if limit is not None:
            files = [files[i] for i in np.random.default_rng(0).permutation(len(files))[:limit]]
        imgs = []
        for f, _ in files:
            with image_mod.open(f) as im:
                im = im.convert("RGB")
                w, h = im.size
                s = min(w, h)
                im = im.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2)).resize((size, size))
                imgs.append(np.asarray(im))
        segments.append(Segment(name, np.stack(imgs), np.array([i for _, i in files], np.int64)))
    return Stream(tuple(segments), severity)
