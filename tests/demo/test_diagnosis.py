"""Issue 22's diagnosis: the audit's arithmetic on constructed verdicts, and one real in-process frontier run with
``diagnose=True`` (edge runtime on ORT + local deployment) that records, per corruption, the teacher's, the
replica's and the edge's accuracy on the uploaded frames, and every rollback verdict scored with its frames'
labels and the cloud job that made each version."""

from __future__ import annotations

import pytest

from cema_deploy.demo.diagnosis import audit_summary, rollbacks_per_corruption
from tests.conftest import needs_torch


def _v(rollback: bool, prev: float | None, new: float | None) -> dict[str, object]:
    return {"rollback": rollback, "accuracy_previous": prev, "accuracy_new": new}


def test_audit_precision_and_recall_on_constructed_verdicts() -> None:
    verdicts = [
        _v(True, 60.0, 40.0),  # rolled back, worse by 20: a hit
        _v(True, 60.0, 65.0),  # rolled back, better: a misfire
        _v(False, 60.0, 50.0),  # kept, worse by 10: a miss
        _v(False, 60.0, 58.0),  # kept, worse by 2: below the 5-point loss
        _v(True, None, None),  # no labelled frame: counted as a rollback, not scored
    ]
    got = audit_summary(verdicts)
    assert got["verdicts"] == 5 and got["rollbacks"] == 3
    assert got["precision"] == 0.5  # 1 of the 2 scored rollbacks was worse
    assert got["losing"] == 2 and got["recall"] == 0.5  # -20 rolled back, -10 kept
    assert got["rolled_back_mean_change"] == pytest.approx((-20 + 5) / 2)
    none = audit_summary([_v(False, 60.0, 61.0)])
    assert none["precision"] is None and none["recall"] is None  # never a division by zero


def test_rollbacks_per_corruption_and_held_blobs() -> None:
    corruptions = [
        {"rollbacks": 0, "held": 0},
        {"rollbacks": 1, "held": 7},
        {"rollbacks": 3, "held": 2},
        {"rollbacks": 2},
    ]
    assert rollbacks_per_corruption(corruptions) == {
        "max_rollbacks_per_corruption": 3,
        "corruptions_over_one_rollback": 2,
        "held": 9,
    }
    assert rollbacks_per_corruption([])["max_rollbacks_per_corruption"] == 0


@needs_torch
def test_a_diagnosed_run_records_corruptions_and_scored_verdicts(quick_edge, splits, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cema_deploy.demo.frontier import Job, run_job
    from cema_deploy.demo.stream import corrupted_stream
    from cema_deploy.export.to_onnx import export_timm

    tm, model = quick_edge
    edge_dir = tmp_path / "edge"
    export_timm(tm.name, edge_dir, model=model, img_size=splits[0].shape[1])
    _, _, x, y = splits
    stream = corrupted_stream(x[:192], y[:192], severity=5, corruptions=("gaussian_noise", "contrast"), seed=0)
    job = Job(rule="random", knob=0.5, protocol="continual", severity=5, seed=0)
    res = run_job(
        job, work=tmp_path / "work", edge_dir=edge_dir, teacher=(tm.name, tm.checkpoint), stream=stream, diagnose=True
    )
    d = res["diagnosis"]
    assert [c["corruption"] for c in d["corruptions"]] == ["gaussian_noise", "contrast"]
    # every frame that went up is counted in its corruption (the share counts all kinds of upload)
    assert sum(c["uploaded"] for c in d["corruptions"]) == round(res["share"] * res["frames"] / 100)
    for c in d["corruptions"]:
        assert c["uploaded"] > 0
        assert all(0 <= c[k] <= 100 for k in ("teacher_accuracy", "replica_accuracy", "edge_accuracy"))
    assert sum(c["rollbacks"] for c in d["corruptions"]) == res["rollbacks"]
    assert d["audit"]["max_rollbacks_per_corruption"] == max(c["rollbacks"] for c in d["corruptions"])
    assert d["audit"]["held"] == sum(c["held"] for c in d["corruptions"])
    assert d["verdicts"], "refits after the first calibration are judged"
    for v in d["verdicts"]:
        assert v["labelled"] == v["frames"] > 0  # every judged frame found among those served, by content
        assert v["kind"] in ("step", "replay", "promise", "stats", "publish") and v["previous_kind"] != "unknown"
        assert 0 <= v["accuracy_new"] <= 100 and 0 <= v["accuracy_previous"] <= 100
        assert v["version"] > v["previous"]
    assert d["audit"]["verdicts"] == len(d["verdicts"]) and d["audit"]["rollbacks"] == res["rollbacks"]
    assert res["cloud"] == {}
