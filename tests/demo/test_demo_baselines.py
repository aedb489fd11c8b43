"""The in-process baselines: no adaptation equals the plain model, BN adaptation and Tent change predictions on a
shifted batch, the source model is never modified, and results cover the stream per corruption."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import needs_torch

pytestmark = needs_torch


@pytest.fixture(scope="module")
def shifted(splits):  # type: ignore[no-untyped-def]
    """128 test digits under contrast and Gaussian noise at severity 5 (not cached: no shared state)."""
    from cema_deploy.demo.stream import corrupted_stream

    return corrupted_stream(
        splits[2][:128], splits[3][:128], severity=5, corruptions=("contrast", "gaussian_noise"), cache=False
    )


def _state(model):  # type: ignore[no-untyped-def]
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_no_adapt_equals_the_plain_model(quick_edge, shifted) -> None:  # type: ignore[no-untyped-def]
    import torch

    from cema_deploy.demo.baselines import run_baseline

    _, model = quick_edge
    x = torch.from_numpy(shifted.images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model.eval()((x - mean) / std).argmax(1).numpy() == shifted.labels
    result = run_baseline("no_adapt", model, shifted)
    assert np.array_equal(result.correct, expected) and result.accuracy == pytest.approx(expected.mean())
    assert result.per_segment == {
        "contrast": pytest.approx(expected[:128].mean()),
        "gaussian_noise": pytest.approx(expected[128:].mean()),
    }
    assert result.frames_per_second > 0 and result.predictions.dtype == np.int64


def test_bn_adapt_and_tent_change_predictions(quick_edge, shifted) -> None:  # type: ignore[no-untyped-def]
    import torch

    from cema_deploy.demo.baselines import TentConfig, bn_adapt, no_adapt, tent

    _, model = quick_edge
    before = _state(model)
    source = no_adapt(model, shifted.images)
    bn = bn_adapt(model, shifted.images)
    tent_sgd = tent(model, shifted.images)
    tent_adam = tent(model, shifted.images, config=TentConfig(optimizer="adam"))
    assert (bn != source).mean() > 0.1  # batch statistics matter on a shifted batch
    assert (bn == shifted.labels).mean() > (source == shifted.labels).mean()
    # the first batch is predicted before any update, so Tent equals BN adaptation there and differs later
    assert np.array_equal(tent_adam[:64], bn[:64]) and (tent_adam[64:] != bn[64:]).any()
    assert (tent_sgd != source).mean() > 0.1
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # baselines adapt a copy


def test_tent_learning_rate_scales_with_batch() -> None:
    from cema_deploy.demo.baselines import TentConfig

    assert TentConfig().lr_for(64) == pytest.approx(0.00025) and TentConfig().lr_for(128) == pytest.approx(0.0005)
    assert TentConfig(optimizer="adam").lr_for(64) == 1e-3 and TentConfig(lr=0.01).lr_for(16) == 0.01


def test_batches_never_leave_one_sample(quick_edge, splits) -> None:  # type: ignore[no-untyped-def]
    from cema_deploy.demo.baselines import _batches, bn_adapt
    from cema_deploy.demo.stream import DataError

    assert [(s.start, s.stop) for s in _batches(129, 64)] == [(0, 64), (64, 129)]
    assert [(s.start, s.stop) for s in _batches(130, 64)] == [(0, 64), (64, 128), (128, 130)]
    assert bn_adapt(quick_edge[1], splits[2][:65], batch=64).shape == (65,)  # a last batch of 1 would raise
    with pytest.raises(DataError, match="at least 2"):
        _batches(10, 1)


def test_unknown_baseline(quick_edge, shifted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from cema_deploy.demo.baselines import run_baseline
    from cema_deploy.demo.stream import DataError

    with pytest.raises(DataError, match="choose from"):
        run_baseline("cema", quick_edge[1], shifted)


def test_reset_protocol_starts_each_corruption_from_the_source_model(quick_edge, shifted) -> None:  # type: ignore[no-untyped-def]
    from cema_deploy.demo.baselines import TentConfig, run_baseline, tent

    _, model = quick_edge
    strong = TentConfig(optimizer="adam", lr=0.01)  # large steps, so that carrying them over shows
    reset = run_baseline("tent", model, shifted, protocol="reset", tent_config=strong)
    first = tent(model, shifted.segments[0].images, config=strong)
    second = tent(model, shifted.segments[1].images, config=strong)  # fresh: not continued from the first
    assert np.array_equal(reset.predictions, np.concatenate([first, second]))
    continual = run_baseline("tent", model, shifted, protocol="continual", tent_config=strong)
    assert np.array_equal(continual.predictions[:128], first) and not np.array_equal(
        continual.predictions, reset.predictions
    )
    with pytest.raises(Exception, match="protocol must be"):
        run_baseline("tent", model, shifted, protocol="other")
