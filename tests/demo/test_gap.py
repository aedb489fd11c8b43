"""Issue 22's metric on constructed numbers: the floor (best edge-alone row), the gap closed per seed and over
seeds (a ceiling not above the floor gives None, never a division by zero), the demo's per-severity block, and
the frontier's points and top-level ceiling/floor."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cema_deploy.demo.frontier_report import Point, with_gap, write_frontier
from cema_deploy.demo.gap import floor_of, gap_closed, gap_over_seeds, results_gap
from cema_deploy.exceptions import CemaError


def test_floor_is_the_higher_of_bn_adapt_and_edge_stats() -> None:
    assert floor_of({"bn_adapt": 63.5, "no_adapt": 30.0}) == 63.5
    assert floor_of({"bn_adapt": 63.5, "edge_stats": 66.0, "teacher_adapted": 81.0}) == 66.0
    assert floor_of({"bn_adapt": 67.0, "edge_stats": 66.0}) == 67.0
    with pytest.raises(CemaError, match="bn_adapt or edge_stats"):
        floor_of({"no_adapt": 30.0})


def test_gap_closed_is_the_share_of_the_teachers_lead() -> None:
    assert gap_closed(70.0, floor=60.0, ceiling=80.0) == 0.5
    assert gap_closed(60.0, floor=60.0, ceiling=80.0) == 0.0
    assert gap_closed(80.0, floor=60.0, ceiling=80.0) == 1.0
    assert gap_closed(55.0, floor=60.0, ceiling=80.0) == -0.25  # worse than the edge alone
    assert gap_closed(85.0, floor=60.0, ceiling=80.0) == 1.25  # better than the adapted teacher
    # no lead to carry: undefined, not a division by zero
    assert gap_closed(70.0, floor=60.0, ceiling=60.0) is None
    assert gap_closed(70.0, floor=60.0, ceiling=59.0) is None


def test_gap_over_seeds_is_the_mean_and_sample_spread_of_per_seed_gaps() -> None:
    # per seed: (66-60)/(80-60) = 0.3, (75-70)/(80-70) = 0.5, (64-64)/(72-64) = 0
    mean, spread = gap_over_seeds([66.0, 75.0, 64.0], [60.0, 70.0, 64.0], [80.0, 80.0, 72.0])
    assert mean == pytest.approx(0.8 / 3)
    assert spread == pytest.approx(math.sqrt(((0.3 - 0.8 / 3) ** 2 + (0.5 - 0.8 / 3) ** 2 + (0.8 / 3) ** 2) / 2))
    # not the ratio of the means: (68.33 - 64.67) / (77.33 - 64.67) = 0.289
    assert mean != pytest.approx((68 + 1 / 3 - 64 - 2 / 3) / (77 + 1 / 3 - 64 - 2 / 3), abs=1e-3)
    # a seed without a lead is left out; one defined seed has no spread; none defined: (None, None)
    assert gap_over_seeds([70.0, 70.0], [60.0, 60.0], [80.0, 60.0]) == (0.5, None)
    assert gap_over_seeds([70.0], [60.0], [60.0]) == (None, None)
    with pytest.raises(CemaError, match="one floor and one ceiling per seed"):
        gap_over_seeds([70.0, 71.0], [60.0], [80.0])


def test_results_gap_uses_each_seeds_own_floor_and_ceiling() -> None:
    seeds = [
        {"bn_adapt": {"accuracy": 60.0}, "teacher_adapted": {"accuracy": 80.0}, "random": {"accuracy": 65.0}},
        {
            "bn_adapt": {"accuracy": 62.0},
            "edge_stats": {"accuracy": 70.0},
            "teacher_adapted": {"accuracy": 80.0},
            "random": {"accuracy": 75.0},
        },
    ]
    got = results_gap(seeds)
    assert got["floor"] == [60.0, 70.0] and got["teacher_ceiling"] == [80.0, 80.0]
    methods = got["methods"]
    assert isinstance(methods, dict)
    assert methods["random"]["gap_closed"] == pytest.approx((0.25 + 0.5) / 2)
    assert methods["teacher_adapted"]["gap_closed"] == 1.0
    assert methods["bn_adapt"]["gap_closed"] == pytest.approx((0 - 0.8) / 2)
    assert results_gap([{"bn_adapt": {"accuracy": 60.0}}]) == {}  # no teacher row: nothing to report


def test_frontier_points_carry_the_gap_and_the_json_the_ceiling_and_floor(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    pt = Point(knob=0.1, share=12.0, share_spread=None, accuracy=66.0, spread=1.0, seeds=2)
    a = with_gap(pt, [64.0, 68.0], floors=[60.0, 60.0], ceilings=[80.0, 80.0])
    assert (a.gap_closed, a.gap_closed_spread) == (pytest.approx(0.3), pytest.approx(math.sqrt(0.02)))
    b = with_gap(pt, [64.0, 68.0], floors=[60.0, 60.0], ceilings=[60.0, 60.0])
    assert (b.gap_closed, b.gap_closed_spread) == (None, None)
    meta = {
        "baselines": {"reset/5": {"no_adapt": 30.0, "bn_adapt": 60.0}},
        "teacher_ceiling": {"reset/5": 80.0},
        "floor": {"reset/5": 60.0},
    }
    write_frontier({"reset/5": {"random": [a, b]}}, "random", "reset/5", tmp_path, meta)
    doc = json.loads((tmp_path / "frontier.json").read_text())
    assert doc["teacher_ceiling"] == {"reset/5": 80.0} and doc["floor"] == {"reset/5": 60.0}
    assert [p["gap_closed"] for p in doc["methods"]["random"]] == [pytest.approx(0.3), None]
    assert all("gap_closed_spread" in p for p in doc["panels"]["reset/5"]["random"])
