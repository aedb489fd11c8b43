"""The demo's report: strict JSON, Markdown tables, PNG plots and the rich table from per-sample arrays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cema_deploy.demo.report import MethodRun, aggregate, markdown, print_table, summarize, write_outputs
from cema_deploy.exceptions import CemaError


def _runs(n: int, rng: np.random.Generator) -> dict[str, MethodRun]:
    none = np.zeros(n, bool)
    return {
        "no_adapt": MethodRun(rng.random(n) < 0.4, none),
        "bn_adapt": MethodRun(rng.random(n) < 0.7, none, {"edge_fps": 900.0}),
        "cema": MethodRun(
            rng.random(n) < 0.8,
            rng.random(n) < 0.2,
            {"bytes_up": 2_000_000, "bytes_down": 5_000_000, "blobs_applied": 12, "edge_fps": 450.0},
        ),
    }


def test_summary_json_markdown_and_plots(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    segment_of = np.repeat(np.arange(3), 100)
    names = ["gaussian_noise", "contrast", "jpeg_compression"]
    runs = {5: _runs(300, rng), 3: _runs(300, rng)}
    results = {
        "models": {
            "edge": {"name": "resnet10t", "clean_accuracy": 98.6},
            "teacher": {"name": "resnet18", "clean_accuracy": 98.0},
        },
        "severities": {str(s): {"methods": summarize(r, segment_of, names)} for s, r in runs.items()},
    }
    cema = results["severities"]["5"]["methods"]["cema"]
    assert cema["accuracy"] == pytest.approx(100 * runs[5]["cema"].correct.mean())
    contrast = cema["per_corruption"]["contrast"]
    assert contrast["uploaded"] == pytest.approx(100 * runs[5]["cema"].uploaded[100:200].mean())
    assert cema["uploaded_samples"] == int(runs[5]["cema"].uploaded.sum()) and cema["blobs_applied"] == 12
    results["severities"]["5"]["methods"]["no_adapt"]["edge_fps"] = float("nan")  # becomes null, not NaN
    paths = write_outputs(results, runs, tmp_path / "out")
    assert [p.name for p in paths] == ["results.json", "results.md", "stream_severity5.png", "stream_severity3.png"]
    loaded = json.loads((tmp_path / "out" / "results.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert loaded["severities"]["5"]["methods"]["no_adapt"]["edge_fps"] is None
    md = (tmp_path / "out" / "results.md").read_text()
    assert md == markdown(results) and "| **overall** |" in md and "### Severity 3" in md
    assert "| CEMA | " in md and "| 12 | 0 | 450 |" in md and "| edge | resnet10t | 98.6 |" in md
    for p in paths[2:]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


def test_rich_table(tmp_path: Path) -> None:
    from rich.console import Console

    runs = _runs(50, np.random.default_rng(1))
    results = {"severities": {"5": {"methods": summarize(runs, np.zeros(50, int), ["fog"])}}}
    console = Console(record=True, width=160)
    print_table(results, console)
    text = console.export_text()
    assert "severity 5" in text and "CEMA" in text and "overall" in text


def test_summary_refuses_a_short_run() -> None:
    runs = {"cema": MethodRun(np.ones(3, bool), np.ones(3, bool))}
    with pytest.raises(CemaError, match="whole stream"):
        summarize(runs, np.zeros(4, int), ["fog"])


def test_seeds_aggregate_to_mean_and_spread_and_rollbacks_add_up(tmp_path: Path) -> None:
    segment_of = np.repeat(np.arange(2), 50)
    per_seed = []
    for acc, rollbacks in ((0.6, 1), (0.8, 0), (0.7, 2)):
        correct = np.arange(100) < acc * 100
        run = MethodRun(correct, np.arange(100) < 20, {"rollbacks": rollbacks, "samples": 100})
        per_seed.append(summarize({"cema": run}, segment_of, ["fog", "snow"]))
    agg = aggregate(per_seed, [3, 4, 5])["cema"]
    assert agg["accuracy"] == pytest.approx(70.0) and agg["accuracy_spread"] == pytest.approx(10.0)
    assert agg["uploaded"] == pytest.approx(20.0) and agg["uploaded_spread"] == pytest.approx(0.0)
    assert agg["rollbacks"] == 3 and [r["seed"] for r in agg["per_seed"]] == [3, 4, 5]
    assert agg["per_corruption"]["snow"]["accuracy"] == pytest.approx(np.mean([20, 60, 40]))
    one = aggregate(per_seed[:1], [0])["cema"]
    assert one["accuracy_spread"] is None
    results = {"severities": {"5": {"methods": aggregate(per_seed, [3, 4, 5])}}}
    assert "70.0 ± 10.0" in markdown(results)
    boundaries = {5: [(0, "fog"), (50, "snow")]}
    runs = {5: {"cema": MethodRun(np.ones(100, bool), np.zeros(100, bool))}}
    paths = write_outputs(results, runs, tmp_path, boundaries)
    assert paths[-1].stat().st_size > 10_000
