"""Fixtures of the demo's tests: a private cache directory and one quickly trained edge model per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import HAS_TORCH

#: Quick edge training for tests: the default edge recipe with fewer epochs (measured: clean accuracy ~0.95).
QUICK_EPOCHS = 4


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CEMA_DEPLOY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def splits():  # type: ignore[no-untyped-def]
    from cema_deploy.demo.stream import digits_splits

    return digits_splits(0)


@pytest.fixture(scope="session")
def quick_edge(tmp_path_factory: pytest.TempPathFactory, splits):  # type: ignore[no-untyped-def]
    """(TrainedModel, torch model) of the edge recipe trained for QUICK_EPOCHS in a private cache."""
    if not HAS_TORCH:
        pytest.skip("needs the export extra (torch, timm)")
    from dataclasses import replace

    from cema_deploy.demo.models import EDGE_DEFAULT, load_model, train_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CEMA_DEPLOY_CACHE", str(tmp_path_factory.mktemp("cache")))
        tm = train_model(replace(EDGE_DEFAULT, epochs=QUICK_EPOCHS), splits, seed=0, role="edge")
    return tm, load_model(tm.name, tm.checkpoint)
