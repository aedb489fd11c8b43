"""benchmarks/gap_closed_table.py: issue 22's table over seeds from teacher_lead.py's JSON (the arithmetic)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest


def _bench() -> Any:
    path = Path(__file__).parents[2] / "benchmarks" / "gap_closed_table.py"
    spec = importlib.util.spec_from_file_location("gap_closed_table", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _doc(seed: int, accuracy: float, floor: float, ceiling: float, audit: dict[str, Any]) -> dict[str, Any]:
    run = {
        "accuracy": accuracy,
        "share": 15.0 + seed,
        "rollbacks": audit["rollbacks"],
        "fps": 100.0,
        "cloud_s_per_uploaded_sample": 0.01 * seed,
        "gap_closed": (accuracy - floor) / (ceiling - floor),
        "diagnosis": {"audit": audit, "corruptions": [{"rollbacks": audit["rollbacks"]}, {"rollbacks": 0}]},
    }
    out = {"floor": floor, "teacher_ceiling": ceiling, "runs": {"paper": run}}
    return {"severity": 5, "seed": seed, "share": 0.1, "pace": None, "protocols": {"continual": out}}


def test_gap_closed_mean_spread_and_pooled_audit() -> None:
    bench = _bench()
    docs = [
        _doc(3, 70.0, 60.0, 80.0, {"rollbacks": 4, "precision": 0.5, "losing": 2, "recall": 1.0}),
        _doc(4, 65.0, 60.0, 70.0, {"rollbacks": 1, "precision": 1.0, "losing": 0, "recall": None}),
        # no lead to carry on this seed: left out of the gap's mean, kept in the accuracy's
        _doc(5, 60.0, 60.0, 59.0, {"rollbacks": 0, "precision": None, "losing": 2, "recall": 0.5}),
    ]
    (row,) = bench.summarize(docs)
    assert row["seeds"] == [3, 4, 5] and row["protocol"] == "continual" and row["timing"] == "sync"
    assert row["accuracy"][0] == pytest.approx(65.0) and row["accuracy"][1] == pytest.approx(5.0)
    assert row["gap_closed"][0] == pytest.approx(0.5) and row["gap_closed"][1] == pytest.approx(0.0)
    a = row["audit"]
    assert a["rollbacks_per_corruption_per_seed"] == [2.0, 0.5, 0.0]
    assert a["max_rollbacks_per_corruption_per_seed"] == [4, 1, 0]
    # pooled over the seeds' verdicts: (0.5 * 4 + 1.0 * 1) / 5 rolled back; (1.0 * 2 + 0.5 * 2) / 4 losing
    assert a["precision_pooled"] == pytest.approx(0.6) and a["recall_pooled"] == pytest.approx(0.75)
    assert "| sync | 0.1 | 5 | continual | paper | 3,4,5 |" in bench.markdown([row])


def test_paced_runs_group_apart_and_have_no_audit() -> None:
    bench = _bench()
    sync = _doc(3, 70.0, 60.0, 80.0, {"rollbacks": 1, "precision": 1.0, "losing": 1, "recall": 1.0})
    paced = _doc(3, 62.0, 60.0, 80.0, {"rollbacks": 1, "precision": 1.0, "losing": 1, "recall": 1.0})
    paced["pace"] = 100.0
    del paced["protocols"]["continual"]["runs"]["paper"]["diagnosis"]
    rows = bench.summarize([sync, paced])
    assert [r["timing"] for r in rows] == ["paced 100 fps", "sync"]
    assert "audit" not in rows[0] and rows[0]["gap_closed"][0] == pytest.approx(0.1)
