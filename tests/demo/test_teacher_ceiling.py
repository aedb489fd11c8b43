"""The teacher's rows in a tiny real run: ``run_stream`` with local methods only on a two-corruption stream adds
``teacher_no_adapt`` and ``teacher_adapted`` (the higher of its entropy step and test-batch BN), and the
per-severity gap block uses them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import needs_torch

pytestmark = needs_torch


@pytest.fixture(scope="module")
def shifted(splits):  # type: ignore[no-untyped-def]
    from cema_deploy.demo.stream import corrupted_stream

    return corrupted_stream(
        splits[2][:128], splits[3][:128], severity=5, corruptions=("contrast", "gaussian_noise"), cache=False
    )


def test_teacher_rows_appear_in_a_real_run_and_feed_the_gap(quick_edge, shifted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from cema_deploy.demo.gap import results_gap
    from cema_deploy.demo.report import summarize
    from cema_deploy.demo.run import DemoConfig, run_stream

    tm, model = quick_edge  # the quick edge model stands in for the teacher: any timm model with BN will do
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = DemoConfig(methods=("no_adapt", "bn_adapt"), corruptions=("contrast", "gaussian_noise"))
    runs = run_stream(shifted, model, tmp_path, tm, tmp_path, "t", cfg, 0, lambda _m: None)
    assert list(runs) == ["no_adapt", "bn_adapt", "teacher_no_adapt", "teacher_adapted"]
    # the same model as teacher: its no-adaptation row is the edge's
    assert np.array_equal(runs["teacher_no_adapt"].correct, runs["no_adapt"].correct)
    extra = runs["teacher_adapted"].extra
    assert extra["adapted_by"] in ("bn_adapt", "entropy_step")
    acc = 100 * float(runs["teacher_adapted"].correct.mean())
    assert acc == max(extra["bn_adapt_accuracy"], extra["entropy_step_accuracy"])
    assert extra["bn_adapt_accuracy"] == pytest.approx(100 * float(runs["bn_adapt"].correct.mean()))
    assert extra["entropy_step_accuracy"] != extra["bn_adapt_accuracy"]  # the entropy step is its own run
    assert all(torch_equal(v, model.state_dict()[k]) for k, v in before.items())  # the teacher is not modified
    summary = summarize(runs, shifted.segment_of, [s.name for s in shifted.segments])
    gap = results_gap([summary])
    assert gap["teacher_ceiling"] == [pytest.approx(acc)]
    assert gap["floor"] == [pytest.approx(summary["bn_adapt"]["accuracy"])]
    assert not any(r.uploaded.any() for r in runs.values())
    off = run_stream(
        shifted, model, tmp_path, tm, tmp_path, "t", DemoConfig(methods=("bn_adapt",), teacher_rows=False), 0, print
    )
    assert list(off) == ["bn_adapt"]


def torch_equal(a, b) -> bool:  # type: ignore[no-untyped-def]
    import torch

    return bool(torch.equal(a, b))
