"""`demo --methods edge_stats`: the edge alone (real `edge run --adapt-stats`, no cloud) in the quick demo, at edge
batch 1 on the sorted stream, where the PyTorch baselines that need batch statistics are skipped and say so."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cema_deploy.demo.edge_only import ordered
from cema_deploy.demo.stream import Segment, Stream
from cema_deploy.exceptions import CemaError
from cema_deploy.runtime.stats.adapter import DEFAULT_EVERY
from tests.conftest import needs_torch


def test_sorted_stream_groups_classes_within_each_corruption() -> None:
    rng = np.random.default_rng(0)
    segs = tuple(
        Segment(name, np.arange(40)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8), rng.integers(0, 4, 40))
        for name in ("a", "b")
    )
    stream = Stream(segs, 5)
    out = ordered(stream, "sorted", seed=3)
    for before, after in zip(stream.segments, out.segments, strict=True):
        runs = np.flatnonzero(np.diff(after.labels)) + 1
        assert len(runs) == len(set(before.labels.tolist())) - 1  # one run per class
        assert sorted(after.labels.tolist()) == sorted(before.labels.tolist())
        assert np.array_equal(after.labels, before.labels[after.images[:, 0, 0, 0]])  # images follow their labels
    assert np.array_equal(ordered(stream, "shuffled", 3).labels, stream.shuffled(3).labels)


def test_baselines_that_need_batch_statistics_are_skipped_below_two_and_the_table_says_so() -> None:
    from cema_deploy.demo.report import markdown
    from cema_deploy.demo.run import DemoConfig

    methods = ("no_adapt", "bn_adapt", "tent", "edge_stats")
    assert DemoConfig(methods=methods, edge_batch=2).skipped == {}
    skipped = DemoConfig(methods=methods, edge_batch=1).skipped
    assert sorted(skipped) == ["bn_adapt", "tent"] and "edge batch 1" in skipped["tent"]
    per = {"c": {"accuracy": 50.0, "uploaded": 0.0}}
    res = {"severities": {"5": {"methods": {"edge_stats": {"accuracy": 50.0, "uploaded": 0.0, "per_corruption": per}}}},
           "skipped": skipped}  # fmt: skip
    text = markdown(res)
    assert "BN statistics adaptation: needs batch statistics; skipped at edge batch 1." in text
    assert "| c | 50.0 |" in text  # edge-alone rows show no uploaded share: nothing goes up
    with pytest.raises(CemaError, match="--stream one of shuffled, sorted"):
        DemoConfig(stream_order="by_class")


@needs_torch
@pytest.mark.slow
def test_quick_demo_edge_stats_at_batch_one(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "demo"
    env = {**os.environ, "CEMA_DEPLOY_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "cema_deploy", "demo", "--quick", "--severity", "5", "--methods",
           "no_adapt,bn_adapt,edge_stats", "--edge-batch", "1", "--stream", "sorted", "--out", str(out),
           "--json"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["config"]["edge_batch"] == 1 and res["config"]["stream_order"] == "sorted"
    m = res["severities"]["5"]["methods"]
    assert set(m) == {"no_adapt", "edge_stats", "teacher_no_adapt", "teacher_adapted"}  # the teacher rows: always
    assert "needs batch statistics" in res["skipped"]["bn_adapt"]
    s = m["edge_stats"]["per_seed"][0]
    assert m["edge_stats"]["uploaded"] == 0 and s["uploaded_frames"] == 0 and s["samples"] == 4 * 300
    assert 0 <= m["edge_stats"]["accuracy"] <= 100
    dense = 128  # frames probed one by one after each start, then one frame in DEFAULT_EVERY
    assert s["stats_probes"] == 4 * (dense + len(range(dense - 1 + DEFAULT_EVERY, 300, DEFAULT_EVERY)))
    assert s["stats_local_generation"] >= s["stats_probes"] and s["final_version"] == 0
    assert "needs batch statistics" in (out / "results.md").read_text()
