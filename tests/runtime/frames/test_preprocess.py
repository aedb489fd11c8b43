"""The edge's preprocessing is timm's eval transform, in numpy + PIL.

Parity runs timm's own ``resolve_data_config`` + ``create_transform`` on real non-square photos that
scikit-image ships (``chelsea`` 300 x 451, ``coffee`` 400 x 600, and chelsea turned to portrait), for data
configs that differ in crop_pct, interpolation, crop mode and input shape. timm's transform resizes PIL images
with PIL (torchvision hands PIL images to ``Image.resize``), so the uint8 crops are identical and the normalised
tensors differ only by float rounding: measured max abs difference after de-normalisation 1.6e-7 (limit 1/255).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from cema_deploy.contract.manifest import Preprocess
from cema_deploy.runtime.frames.preprocess import InputError, crop_geometry, images_at_model_size, normalize
from tests.conftest import needs_torch

#: (timm pretrained config, overrides): bilinear 0.875, bicubic 0.95, 299 px, squash crop, a non-square input
#: (timm's ResizeKeepRatio path), nearest with crop_pct 1.0, crop_pct > 1 (zero padding), lanczos on 100 x 257.
PARITY_CASES = [
    ("resnet50.tv_in1k", {}),
    ("resnet50.a1_in1k", {}),
    ("inception_v3.tv_in1k", {}),
    ("convnext_tiny.fb_in22k_ft_in1k_384", {}),
    ("resnet50.a1_in1k", {"input_size": (3, 224, 192)}),
    ("resnet50.a1_in1k", {"interpolation": "nearest", "crop_pct": 1.0}),
    ("resnet50.a1_in1k", {"crop_pct": 1.3}),
    ("resnet50.a1_in1k", {"interpolation": "lanczos", "crop_pct": 0.9, "input_size": (3, 100, 257)}),
]


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    data = pytest.importorskip("skimage.data")
    chelsea = data.chelsea()
    portrait = np.ascontiguousarray(chelsea.swapaxes(0, 1))
    return {"chelsea": chelsea, "coffee": data.coffee(), "chelsea_portrait": portrait}


def _pre(cfg: dict) -> Preprocess:  # type: ignore[type-arg]
    return Preprocess(
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        size=tuple(cfg["input_size"][1:]),
        interpolation=cfg["interpolation"],
        crop_pct=cfg["crop_pct"],
    )


@needs_torch
@pytest.mark.parametrize(("name", "overrides"), PARITY_CASES)
def test_matches_timm_eval_transform(photos: dict[str, np.ndarray], name: str, overrides: dict) -> None:  # type: ignore[type-arg]
    import timm
    from PIL import Image

    cfg = timm.data.resolve_data_config(overrides, pretrained_cfg=timm.models.get_pretrained_cfg(name).to_dict())
    transform = timm.data.create_transform(**cfg)  # is_training=False: transforms_imagenet_eval
    pre = _pre(cfg)
    mean = np.asarray(cfg["mean"], np.float64).reshape(3, 1, 1)
    std = np.asarray(cfg["std"], np.float64).reshape(3, 1, 1)
    for photo_name, photo in photos.items():
        want = transform(Image.fromarray(photo)).numpy().astype(np.float64)
        crop = images_at_model_size(photo[None], pre, crop_mode=cfg["crop_mode"])
        got = normalize(crop, pre)[0].astype(np.float64)
        assert got.shape == want.shape == (3, *pre.size)
        diff = np.abs((got * std + mean) - (want * std + mean)).max()
        assert diff <= 1 / 255, f"{name} {overrides} on {photo_name}: {diff}"
        # the uploaded uint8 crop is timm's image, pixel for pixel
        assert np.array_equal(np.rint((want * std + mean) * 255).transpose(1, 2, 0), crop[0])


def test_model_size_frames_are_used_as_they_are() -> None:
    """The demo's frames are at the model size: no resize, no crop, the same tensor as before crop_pct counted."""
    pre = Preprocess(mean=(0.2, 0.3, 0.4), std=(0.5, 0.6, 0.7), size=(32, 32), interpolation="bicubic", crop_pct=0.875)
    x = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    assert images_at_model_size(x, pre) is x
    want = (x.transpose(0, 3, 1, 2) / 255.0 - np.array(pre.mean).reshape(1, 3, 1, 1)) / np.array(pre.std).reshape(
        1, 3, 1, 1
    )
    assert np.abs(normalize(images_at_model_size(x, pre), pre) - want).max() < 1e-6


def test_center_crop_keeps_the_middle_and_the_aspect_ratio() -> None:
    """A 40 x 80 image, model 16 x 16, crop_pct 0.5: shorter edge -> 32, so 32 x 64, and the crop is its middle."""
    pre = Preprocess(mean=(0.0,) * 3, std=(1.0,) * 3, size=(16, 16), interpolation="nearest", crop_pct=0.5)
    assert crop_geometry((40, 80), (16, 16), 0.5) == ((32, 64), (8, 24))
    img = np.zeros((1, 40, 80, 3), np.uint8)
    img[:, 10:30, 30:50] = 255  # a white centre square of 20 x 20 -> 16 x 16 after the 0.8 resize: the whole crop
    img[:, :, :20] = 100  # the left quarter is cropped away
    out = images_at_model_size(img, pre)
    assert out.shape == (1, 16, 16, 3) and (out == 255).all()
    # squash at crop_pct 1.0 (timm's squash models) keeps the whole width: the left quarter shows up
    assert (images_at_model_size(img, replace(pre, crop_pct=1.0), crop_mode="squash") == 100).any()


def test_bad_preprocess_is_refused() -> None:
    x = np.zeros((1, 20, 30, 3), np.uint8)
    pre = Preprocess(mean=(0.0,) * 3, std=(1.0,) * 3, size=(8, 8), interpolation="bogus")
    with pytest.raises(InputError, match="interpolation 'bogus' is not one of"):
        images_at_model_size(x, pre)
    with pytest.raises(InputError, match="Crop mode 'border'"):
        images_at_model_size(x, Preprocess(mean=(0.0,) * 3, std=(1.0,) * 3, size=(8, 8)), crop_mode="border")
    with pytest.raises(InputError, match=r"Expected uint8 images \[N, H, W, 3\]"):
        images_at_model_size(x[..., :2], pre)


@needs_torch
def test_export_records_timms_interpolation_and_crop_pct(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """export_timm writes the model's pretrained data config (here changed away from every default)."""
    from cema_deploy.export.to_onnx import export_timm
    from tests.conftest import tiny_model

    model = tiny_model("bn")
    model.pretrained_cfg = {**model.pretrained_cfg, "interpolation": "bicubic", "crop_pct": 0.9}
    pre = export_timm("test_resnet", tmp_path, model=model, img_size=32).manifest.preprocess
    assert (pre.interpolation, pre.crop_pct, tuple(pre.size)) == ("bicubic", 0.9, (32, 32))
