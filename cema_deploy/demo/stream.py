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


class LazyImages:
    """Image files read on demand (memory bounded by what one index asks for): ``images[i:j]`` or
    ``images[index_array]`` -> uint8 ``[n, size, size, 3]``, each file converted to RGB and centre-cropped to a
    square of ``size`` (ImageNet-C's files are 224 x 224 already)."""

    def __init__(self, paths: Sequence[Path], size: int) -> None:
        self.paths = [Path(p) for p in paths]
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), self.size, self.size, 3)

    def __getitem__(self, index: slice | np.ndarray | list[int]) -> np.ndarray:
        picked = self.paths[index] if isinstance(index, slice) else [self.paths[int(i)] for i in index]
        if not picked:
            return np.zeros((0, self.size, self.size, 3), np.uint8)
        return np.stack([_read_square(p, self.size) for p in picked])

    def take(self, order: np.ndarray) -> LazyImages:
        return LazyImages([self.paths[int(i)] for i in order], self.size)


class ChainImages:
    """Several image sequences read as one (``images[i:j]`` across their seams), for a lazy continual stream."""

    def __init__(self, parts: Sequence[np.ndarray | LazyImages]) -> None:
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise DataError("ChainImages takes contiguous slices only.")
        out = []
        for k, part in enumerate(self.parts):
            lo, hi = max(start, int(self.starts[k])), min(stop, int(self.starts[k + 1]))
            if lo < hi:
                out.append(np.asarray(part[lo - int(self.starts[k]) : hi - int(self.starts[k])]))
        return np.concatenate(out) if out else np.zeros((0, 0, 0, 3), np.uint8)


Images = np.ndarray | LazyImages


def _read_square(path: Path, size: int) -> np.ndarray:
    image_mod = lazy_import("PIL.Image", extra="edge", purpose="reading ImageNet-C")
    with image_mod.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        if (w, h) != (size, size):
            side = min(w, h)
            im = im.crop(((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2)).resize((size, size))
        return np.asarray(im, dtype=np.uint8)


@dataclass(frozen=True)
class Segment:
    """One corruption's part of the stream."""

    name: str
    images: Images  # uint8 [N, H, W, 3], in memory or read on demand
    labels: np.ndarray  # int64 [N]

    def shuffled(self, rng: np.random.Generator) -> Segment:
        """The same samples in a random order (the paper's streams are shuffled within a corruption)."""
        order = rng.permutation(len(self.labels))
        images = self.images.take(order) if isinstance(self.images, LazyImages) else self.images[order]
        return Segment(self.name, images, self.labels[order])


@dataclass(frozen=True)
class Stream:
    """Segments in order; ``images``/``labels``/``segment_of`` give the flattened stream."""

    segments: tuple[Segment, ...]
    severity: int

    def __iter__(self) -> Iterator[Segment]:
        return iter(self.segments)

    def __len__(self) -> int:
        return sum(len(s.labels) for s in self.segments)

    @property
    def images(self) -> np.ndarray:
        """The whole stream in memory (in-memory segments only; use :attr:`chained` for a lazy stream)."""
        if self.lazy:
            raise DataError("This stream reads its images on demand; iterate over its segments instead.")
        return np.concatenate([np.asarray(s.images) for s in self.segments])

    @property
    def lazy(self) -> bool:
        return any(isinstance(s.images, LazyImages) for s in self.segments)

    @property
    def chained(self) -> np.ndarray | ChainImages:
        """The whole stream, sliceable by contiguous ranges; read on demand when the segments are lazy."""
        return ChainImages([s.images for s in self.segments]) if self.lazy else self.images

    @property
    def labels(self) -> np.ndarray:
        return np.concatenate([s.labels for s in self.segments])

    @property
    def segment_of(self) -> np.ndarray:
        """Index of the segment of every stream position."""
        return np.concatenate([np.full(len(s.labels), i) for i, s in enumerate(self.segments)])

    @property
    def boundaries(self) -> list[tuple[int, str]]:
        """``(first stream position, corruption name)`` of every segment (for plots)."""
        out, pos = [], 0
        for s in self.segments:
            out.append((pos, s.name))
            pos += len(s.labels)
        return out

    def shuffled(self, seed: int) -> Stream:
        """Each segment shuffled with its own seeded generator; the segment order stays."""
        return Stream(
            tuple(s.shuffled(np.random.default_rng([seed, i])) for i, s in enumerate(self.segments)), self.severity
        )


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


#: ImageNet-C's 15 corruptions in the benchmark's order (Hendrycks & Dietterich, ICLR 2019).
IMAGENET_C_CORRUPTIONS = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def imagenet_c_stream(
    root: str | Path,
    *,
    severity: int,
    corruptions: Sequence[str] | None = None,
    size: int = 224,
    limit: int | None = None,
    seed: int = 0,
) -> Stream:
    """ImageNet-C folders ``root/<corruption>/<severity>/<wnid>/*.JPEG`` as a :class:`Stream` read on demand.

    Class index = position of the wnid in sorted order (ImageNet's). Every corruption of
    :data:`IMAGENET_C_CORRUPTIONS` whose folder exists is used (all 15 on a full copy), unless ``corruptions``
    names some (then each must exist). Each corruption is shuffled with a generator seeded by ``seed`` and its
    index (a class-sorted stream is not what the paper runs, and no TTA method survives one), then cut to
    ``limit`` samples. Nothing is read until a batch is asked for: memory is bounded by a batch.
    """
    root = Path(root)
    if not 1 <= severity <= 5:
        raise DataError(f"severity must be 1..5, got {severity}")
    if corruptions is None:
        names = [c for c in IMAGENET_C_CORRUPTIONS if (root / c / str(severity)).is_dir()]
        if not names:
            raise DataError(
                f"{root} holds no ImageNet-C corruption folders for severity {severity}; expected "
                f"<corruption>/{severity}/<wnid>/*.JPEG for some of {', '.join(IMAGENET_C_CORRUPTIONS)}."
            )
    else:
        names = list(corruptions)
    segments = []
    for i, name in enumerate(names):
        folder = root / name / str(severity)
        if not folder.is_dir():
            raise DataError(f"{folder} does not exist; expected ImageNet-C's <corruption>/<severity>/<wnid>/ layout.")
        wnids = sorted(p.name for p in folder.iterdir() if p.is_dir())
        files = [
            (f, c)
            for c, w in enumerate(wnids)
            for f in sorted((folder / w).iterdir())
            if f.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not files:
            raise DataError(f"{folder} holds no images in <wnid>/ subfolders.")
        order = np.random.default_rng([seed, i]).permutation(len(files))
        if limit is not None:
            order = order[:limit]
        paths = [files[j][0] for j in order]
        labels = np.array([files[j][1] for j in order], np.int64)
        segments.append(Segment(name, LazyImages(paths, size), labels))
    return Stream(tuple(segments), severity)
