"""Shared fixtures: tiny timm models (BatchNorm, GroupNorm, LayerNorm) exported once per session."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from hypothesis import settings

# CI runs the property tests on a fixed example sequence (a red build is then reproducible and never a coin
# flip); `HYPOTHESIS_PROFILE=explore python -m pytest tests/contract` searches afresh with 10x the examples.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

HAS_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("timm") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="needs the export extra (torch, timm)")

#: (timm name, constructor kwargs, export image size)
TINY_MODELS = {
    "bn": ("test_resnet", {"num_classes": 10}, 64),
    "gn": ("test_efficientnet_gn", {"num_classes": 10}, 64),
    "ln": ("test_efficientnet_ln", {"num_classes": 10}, 64),
}


def tiny_model(kind: str, seed: int = 0):  # type: ignore[no-untyped-def]
    """A random-init tiny timm model with non-trivial BN statistics (so stats matter for parity)."""
    import timm
    import torch

    name, kwargs, _ = TINY_MODELS[kind]
    torch.manual_seed(seed)
    model = timm.create_model(name, **kwargs).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=gen) * 0.1)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=gen) + 0.5)
    return model


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """``exported(kind)`` -> (export dir, torch model); each kind exported once per test session."""
    cache: dict[str, tuple[Path, object]] = {}

    def get(kind: str) -> tuple[Path, object]:
        if kind not in cache:
            from cema_deploy.export.to_onnx import export_timm

            name, _, size = TINY_MODELS[kind]
            model = tiny_model(kind)
            out = tmp_path_factory.mktemp(f"export-{kind}")
            export_timm(name, out, model=model, img_size=size)
            cache[kind] = (out, model)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def exported_head(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """``exported_head(kind)`` -> (export dir, torch model): the ``exported`` model made with ``refit="head"``
    (its classifier's weight and bias refittable, beyond the paper); each kind exported once per test session."""
    cache: dict[str, tuple[Path, object]] = {}

    def get(kind: str) -> tuple[Path, object]:
        if kind not in cache:
            from cema_deploy.export.to_onnx import export_timm

            name, _, size = TINY_MODELS[kind]
            model = tiny_model(kind)
            out = tmp_path_factory.mktemp(f"export-head-{kind}")
            export_timm(name, out, model=model, img_size=size, refit="head")
            cache[kind] = (out, model)
        return cache[kind]

    return get
