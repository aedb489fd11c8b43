"""``demo --frontier --edge-batch N --stream shuffled|sorted``: what runs below 2 frames a batch (no PyTorch baseline
that needs batch statistics, no rule that would calibrate the cloud on one frame), the order of the workers'
streams, what frontier.json and each run's line record, and a run log of another setting refused."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from cema_deploy.demo import frontier
from cema_deploy.demo.frontier import run_frontier, run_job, skipped_at
from cema_deploy.exceptions import CemaError
from tests.conftest import needs_torch


def test_below_two_frames_only_the_edges_own_statistics_run() -> None:
    rules = ["edge_stats", "random+stats", "cema+stats", "random", "cema", "cema_stats"]
    got = skipped_at(1, rules)
    assert set(got) == {"bn_adapt", "random", "cema", "cema_stats"}
    assert "batch statistics" in got["bn_adapt"] and "calibration batch" in got["random"]
    assert skipped_at(2, rules) == {} and skipped_at(64, rules) == {}


def test_the_workers_stream_follows_the_stream_order(splits, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """The in-process workers build their streams in the sweep's order: sorted groups each corruption by class."""
    got = {}
    for order in ("shuffled", "sorted"):
        worker: dict[str, Any] = {"splits": splits, "per_corruption": 96, "corruptions": ("contrast",)}
        monkeypatch.setattr(frontier, "_WORKER", {**worker, "streams": {}, "stream_order": order})
        got[order] = frontier._stream(5, 0).segments[0].labels
    changes = {k: int((np.diff(v) != 0).sum()) for k, v in got.items()}
    classes = len(set(got["sorted"].tolist()))
    assert sorted(got["sorted"].tolist()) == sorted(got["shuffled"].tolist())
    assert changes["sorted"] == classes - 1 < changes["shuffled"]


@needs_torch
def test_a_frontier_at_edge_batch_1_on_the_sorted_stream(quick_edge, splits, cache, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """One corruption of 64 frames, seed 0, edge batch 1, sorted: edge_stats and random+stats run, plain random
    and bn_adapt are skipped with their reasons; no run sends a calibration batch (a plain run at batch 64 sends
    one, so the counter counts); frontier.json and every run's line record the setting; the same --out at another
    setting is refused, and a sweep of which nothing runs at batch 1 too."""
    from cema_deploy.demo.stream import corrupted_stream
    from cema_deploy.export.to_onnx import export_timm

    tm, model = quick_edge
    given = f"{tm.name}={tm.checkpoint}"  # the quick edge model is the teacher too: nothing to train here
    kw: dict[str, Any] = dict(
        protocols=["reset"],
        severities=[5],
        seeds=[0],
        default="random+stats",
        workers=1,
        per_corruption=64,
        corruptions=("contrast",),
        sweep={"random+stats": (0.25,), "random": (0.25,)},
        edge=given,
        teacher=given,
    )
    out = tmp_path / "frontier"
    run_frontier(out, rules=["edge_stats", "random+stats", "random"], edge_batch=1, stream_order="sorted", **kw)

    doc = json.loads((out / "frontier.json").read_text())
    assert (doc["edge_batch"], doc["stream"]) == (1, "sorted")
    assert set(doc["skipped"]) == {"bn_adapt", "random"}
    assert set(doc["panels"]["reset/5"]) == {"edge_stats", "random+stats"}
    assert "bn_adapt" not in doc["baselines"]["reset/5"] and "no_adapt" in doc["baselines"]["reset/5"]
    runs = {r["rule"]: r for r in map(json.loads, (out / "frontier_runs.jsonl").read_text().splitlines())}
    assert set(runs) == {"edge_stats", "random+stats"}
    for r in runs.values():
        assert (r["edge_batch"], r["stream"], r["frames"], r["calibration_frames"]) == (1, "sorted", 64, 0)
        assert r["stats_local_generation"] > 0
    assert runs["edge_stats"]["share"] == 0 and runs["random+stats"]["share"] > 0
    assert doc["floor"]["reset/5"] == pytest.approx(runs["edge_stats"]["accuracy"])  # bn_adapt did not run

    with pytest.raises(CemaError, match="another --out"):
        run_frontier(out, rules=["edge_stats"], edge_batch=64, stream_order="sorted", **kw)
    with pytest.raises(CemaError, match="No frontier rule runs at edge batch 1"):
        run_frontier(tmp_path / "none", rules=["random", "cema"], edge_batch=1, **kw)

    edge_dir = tmp_path / "edge"
    export_timm(tm.name, edge_dir, model=model, img_size=splits[0].shape[1])
    _, _, x, y = splits
    stream = corrupted_stream(x[:64], y[:64], severity=5, corruptions=("contrast",), seed=0)
    job = frontier.Job(rule="random", knob=0.25, protocol="reset", severity=5, seed=0)
    plain = run_job(job, work=tmp_path / "work", edge_dir=edge_dir, teacher=(tm.name, tm.checkpoint), stream=stream)
    assert plain["calibration_frames"] == 64 and plain["edge_batch"] == 64
