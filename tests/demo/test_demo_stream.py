"""The demo's data: digits splits, the 13 ImageNet-C corruptions, the .npz cache, the ImageNet-C folder reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cema_deploy.demo.stream import (
    BROKEN_ON_NUMPY2,
    CORRUPTIONS,
    QUICK_CORRUPTIONS,
    DataError,
    corrupted_stream,
    digits_splits,
    imagenet_c_stream,
)


def test_digits_splits_shapes_and_determinism(splits) -> None:  # type: ignore[no-untyped-def]
    x_tr, y_tr, x_te, y_te = splits
    assert x_tr.shape[1:] == (32, 32, 3) and x_tr.dtype == np.uint8 and len(x_tr) + len(x_te) == 1797
    assert y_tr.dtype == np.int64 and abs(len(x_tr) - len(x_te)) <= 1
    assert np.abs(np.bincount(y_tr) - np.bincount(y_te)).max() <= 1  # stratified
    assert np.array_equal(x_tr[..., 0], x_tr[..., 2])  # grey replicated to 3 channels
    again = digits_splits(0)
    assert all(np.array_equal(a, b) for a, b in zip(splits, again, strict=True))
    assert not np.array_equal(digits_splits(1)[3], y_te)
    assert digits_splits(0, size=48)[0].shape[1:] == (48, 48, 3)


def test_every_corruption_changes_images_and_is_cached(cache: Path, splits) -> None:  # type: ignore[no-untyped-def]
    x, y = splits[2][:16], splits[3][:16]
    s = corrupted_stream(x, y, severity=5)
    assert len(CORRUPTIONS) == 13 and not set(BROKEN_ON_NUMPY2) & set(CORRUPTIONS)
    assert [seg.name for seg in s] == list(CORRUPTIONS) and s.severity == 5
    assert s.images.shape == (13 * 16, 32, 32, 3) and s.images.dtype == np.uint8
    assert np.array_equal(s.labels, np.tile(y, 13)) and np.array_equal(s.segment_of, np.repeat(np.arange(13), 16))
    for seg in s:
        assert seg.images.shape == x.shape and np.abs(seg.images.astype(int) - x).mean() > 1.0, seg.name
    assert len(list((cache / "streams").glob("*.npz"))) == 13
    again = corrupted_stream(x, y, severity=5)  # read back from the cache
    assert np.array_equal(again.images, s.images)
    fresh = corrupted_stream(x, y, severity=5, cache=False)  # recomputed: deterministic
    assert np.array_equal(fresh.images, s.images)
    s3 = corrupted_stream(x, y, severity=3, corruptions=QUICK_CORRUPTIONS)
    assert [seg.name for seg in s3] == list(QUICK_CORRUPTIONS)
    assert not np.array_equal(s3.segments[0].images, s.segments[0].images)
    other_seed = corrupted_stream(x, y, severity=5, corruptions=("gaussian_noise",), seed=1, cache=False)
    assert not np.array_equal(other_seed.images, s.segments[0].images)


def test_broken_corruptions_still_fail_on_numpy2() -> None:
    """If imagecorruptions is fixed, this fails: then add glass_blur and fog back to CORRUPTIONS."""
    from imagecorruptions import corrupt

    for name in BROKEN_ON_NUMPY2:
        with pytest.raises((TypeError, AttributeError)):
            corrupt(np.zeros((32, 32, 3), np.uint8), corruption_name=name, severity=3)


def test_stream_refuses_bad_input(cache: Path, splits) -> None:  # type: ignore[no-untyped-def]
    x, y = splits[2][:4], splits[3][:4]
    with pytest.raises(DataError, match="glass_blur"):
        corrupted_stream(x, y, severity=3, corruptions=("glass_blur",))
    with pytest.raises(DataError, match=r"severity must be 1\.\.5"):
        corrupted_stream(x, y, severity=6)
    small = digits_splits(0, size=16)
    with pytest.raises(DataError, match="at least 32 x 32"):
        corrupted_stream(small[2][:4], small[3][:4], severity=3)


def _imagenet_c_tree(root: Path, corruptions: tuple[str, ...], severities: tuple[int, ...] = (5,), n: int = 3) -> None:
    """An ImageNet-C-shaped folder tree: <corruption>/<severity>/<wnid>/*.JPEG, each image's mean pixel value
    encoding (class, index) so that order and labels can be checked after shuffling."""
    from PIL import Image

    for corruption in corruptions:
        for sev in severities:
            for c, wnid in enumerate(("n01440764", "n01443537")):
                d = root / corruption / str(sev) / wnid
                d.mkdir(parents=True)
                for i in range(n):
                    Image.fromarray(np.full((40, 50, 3), 40 * c + 10 * i, np.uint8)).save(d / f"{i}.png")


def test_imagenet_c_folders_are_read_lazily_shuffled_and_all_present_corruptions_used(tmp_path: Path) -> None:
    from cema_deploy.demo.stream import IMAGENET_C_CORRUPTIONS, LazyImages

    _imagenet_c_tree(tmp_path, ("gaussian_noise", "fog", "glass_blur"))
    s = imagenet_c_stream(tmp_path, severity=5, size=32, seed=0)
    # every corruption whose folder exists, in the benchmark's order (fog and glass_blur included: real files)
    assert [seg.name for seg in s] == [
        c for c in IMAGENET_C_CORRUPTIONS if c in ("gaussian_noise", "fog", "glass_blur")
    ]
    seg = s.segments[0]
    assert isinstance(seg.images, LazyImages) and len(seg.images) == 6  # nothing read yet
    batch = seg.images[0:4]
    assert batch.shape == (4, 32, 32, 3) and batch.dtype == np.uint8
    means = seg.images[0:6].mean(axis=(1, 2, 3))
    expected = 40 * seg.labels + 10 * np.array([int(p.stem) for p in seg.images.paths])
    assert np.allclose(means, expected, atol=1)  # each label belongs to its image
    assert sorted(seg.labels.tolist()) == [0, 0, 0, 1, 1, 1] and seg.labels.tolist() != [0, 0, 0, 1, 1, 1]
    again = imagenet_c_stream(tmp_path, severity=5, size=32, seed=0)
    assert again.segments[0].images.paths == seg.images.paths  # seeded
    other = imagenet_c_stream(tmp_path, severity=5, size=32, seed=1)
    assert other.segments[0].images.paths != seg.images.paths
    limited = imagenet_c_stream(tmp_path, severity=5, corruptions=("fog",), size=32, limit=4)
    assert len(limited) == 4 and sorted(limited.segments[0].labels.tolist()) != [0, 0, 0, 1]  # a shuffled subset
    with pytest.raises(DataError, match="does not exist"):
        imagenet_c_stream(tmp_path, severity=5, corruptions=("zoom_blur",))
    with pytest.raises(DataError, match="no ImageNet-C corruption folders for severity 3"):
        imagenet_c_stream(tmp_path, severity=3)
    with pytest.raises(DataError, match="reads its images on demand"):
        _ = s.images
    chained = s.chained
    assert len(chained) == 18 and chained[4:8].shape == (4, 32, 32, 3)  # across the seam of two corruptions


def test_shuffle_is_seeded_within_corruptions_and_keeps_labels(splits) -> None:  # type: ignore[no-untyped-def]
    from cema_deploy.demo.stream import Segment, Stream

    x, y = splits[2][:50], splits[3][:50]
    stream = Stream((Segment("a", x, y), Segment("b", x[::-1].copy(), y[::-1].copy())), severity=5)
    a, b = stream.shuffled(0), stream.shuffled(0)
    assert np.array_equal(a.labels, b.labels) and not np.array_equal(a.labels[:50], y)
    assert not np.array_equal(stream.shuffled(1).labels, a.labels)
    for seg, orig in zip(a.segments, stream.segments, strict=True):
        order = [int(np.flatnonzero((orig.images == im).all(axis=(1, 2, 3)))[0]) for im in seg.images[:5]]
        assert np.array_equal(orig.labels[order], seg.labels[:5])
    assert a.boundaries == [(0, "a"), (50, "b")]
