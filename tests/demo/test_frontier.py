"""The accuracy-uplink frontier: its arithmetic (interpolated share needed, headline, the tuning criterion), the
selector each rule's knob makes, and one real in-process run (edge runtime on ORT + local deployment) on a
two-corruption stream under the reset protocol."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cema_deploy.demo.frontier import (
    Job,
    Point,
    _selector_config,
    best_rule,
    headline,
    jobs_for,
    needed_share,
    point_from_runs,
)


def _pt(share: float, acc: float, knob: float = 0.0) -> Point:
    return Point(knob=knob, share=share, share_spread=None, accuracy=acc, spread=None, seeds=1)


def test_point_is_mean_and_sample_spread_over_seeds() -> None:
    p = point_from_runs(0.2, [(60.0, 20.0), (62.0, 22.0), (64.0, 21.0)])
    assert (p.accuracy, p.share, p.seeds) == (62.0, 21.0, 3)
    assert math.isclose(p.spread, 2.0) and math.isclose(p.share_spread, 1.0)  # type: ignore[arg-type]
    assert point_from_runs(0.2, [(60.0, 20.0)]).spread is None


def test_needed_share_interpolates_between_the_points_that_bracket_the_accuracy() -> None:
    curve = [_pt(40, 66), _pt(10, 60), _pt(20, 64)]  # unsorted on purpose
    assert needed_share(curve, 62) == pytest.approx(15.0)
    assert needed_share(curve, 65) == pytest.approx(30.0)
    assert needed_share(curve, 59) == 10  # the lowest point already reaches it
    assert needed_share(curve, 67) is None


def test_headline_is_the_default_rules_share_over_eatas_at_its_natural_setting() -> None:
    methods = {
        "eata_style": [_pt(30, 61, knob=0.2), _pt(60, 65, knob=0.4)],
        "random": [_pt(10, 60), _pt(20, 64), _pt(40, 66)],
    }
    h = headline(methods, "random")
    assert h["eata_style_accuracy"] == 65 and h["default_share_needed"] == pytest.approx(30.0)
    assert h["ratio"] == pytest.approx(0.5) and h["default_best_accuracy"] == 66
    assert headline({"random": methods["random"]}, "random") == {}  # no EATA natural point: no headline


def test_best_rule_never_extrapolates_a_curve() -> None:
    methods = {
        "eata_style": [_pt(60, 70)],  # one setting: best accuracy, but not measured at 10-40 %
        "cema": [_pt(11, 63), _pt(59, 66)],
        "random": [_pt(12, 64), _pt(26, 65), _pt(63, 67)],
    }
    assert best_rule(methods, (10, 20, 40)) == "random"
    assert best_rule({"eata_style": methods["eata_style"]}, (10, 20, 40)) is None


def test_each_rules_knob_reaches_its_selector() -> None:
    def cfg(rule: str, knob: float, protocol: str = "reset"):  # type: ignore[no-untyped-def]
        return _selector_config(Job(rule=rule, knob=knob, protocol=protocol, severity=5, seed=3), 128, None)

    assert cfg("cema", 0.2).budget == 0.2 and cfg("cema", 1.0).budget is None  # 1.0: the paper's rule as it is
    assert cfg("eata_style", 0.3).e0 == pytest.approx(0.3 * math.log(10)) and not cfg("eata_style", 0.3).dynamic
    r = cfg("random", 0.05)
    assert (r.rule, r.share, r.seed, r.shift) == ("random", 0.05, 3, None)
    assert cfg("cema_stats", 1.0).stats_share > 0 and cfg("cema", 1.0).stats_share == 0
    assert cfg("random", 0.1, "continual").shift is not None  # continual: every rule recalibrates on shift


def test_jobs_cover_the_product_and_keys_are_unique() -> None:
    jobs = jobs_for(["cema", "random"], ["reset"], [3, 5], [0, 1], {"cema": (1.0,), "random": (0.1, 0.2)})
    assert len(jobs) == 3 * 2 * 2 and len({j.key for j in jobs}) == len(jobs)
    assert "reset/5/random/0.1/1" in {j.key for j in jobs}


def test_one_real_run_resets_per_corruption_and_measures_the_share(quick_edge, splits, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """random at 25 % over two corruptions of 128 frames, reset protocol: every frame is predicted once, the
    measured share counts the calibration batch of each corruption (64 frames) plus the random draws."""
    from cema_deploy.demo.frontier import run_job
    from cema_deploy.demo.stream import corrupted_stream
    from cema_deploy.export.to_onnx import export_timm

    tm, model = quick_edge
    edge_dir = tmp_path / "edge"
    export_timm(tm.name, edge_dir, model=model, img_size=splits[0].shape[1])
    _, _, x, y = splits
    stream = corrupted_stream(x[:128], y[:128], severity=3, corruptions=("gaussian_noise", "contrast"), seed=0)
    job = Job(rule="random", knob=0.25, protocol="reset", severity=3, seed=0)
    res = run_job(job, work=tmp_path / "work", edge_dir=edge_dir, teacher=(tm.name, tm.checkpoint), stream=stream)
    assert res["frames"] == 256 and 0 <= res["accuracy"] <= 100
    # per corruption: one calibration batch of 64 goes up whole; the other 64 frames upload ~25 %
    assert 100 * (2 * 64 + 2 * 8) / 256 <= res["share"] <= 100 * (2 * 64 + 2 * 28) / 256
    assert not (tmp_path / "work" / job.key.replace("/", "_")).exists()  # the run's state is cleaned up
    assert np.isfinite(res["accuracy"])
    assert res["pace"] is None  # --sync: the default


def test_a_paced_run_feeds_frames_at_its_rate_and_records_the_pace(quick_edge, splits, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """pace=500 frames/s, continual, two corruptions of 128 frames: the edge does not wait for the cloud
    (sync=False), every frame is predicted once, and the run records its pace; the last batch of 64 cannot start
    before frame 192's time (192 / 500 s), which bounds the achieved rate. A pace with diagnose is refused."""
    from cema_deploy.demo.frontier import run_job
    from cema_deploy.demo.stream import corrupted_stream
    from cema_deploy.exceptions import CemaError
    from cema_deploy.export.to_onnx import export_timm

    tm, model = quick_edge
    edge_dir = tmp_path / "edge"
    export_timm(tm.name, edge_dir, model=model, img_size=splits[0].shape[1])
    _, _, x, y = splits
    stream = corrupted_stream(x[:128], y[:128], severity=3, corruptions=("gaussian_noise", "contrast"), seed=0)
    job = Job(rule="random", knob=0.25, protocol="continual", severity=3, seed=0)
    kw = dict(work=tmp_path / "work", edge_dir=edge_dir, teacher=(tm.name, tm.checkpoint), stream=stream)
    res = run_job(job, pace=500.0, **kw)  # type: ignore[arg-type]
    assert res["frames"] == 256 and 0 <= res["accuracy"] <= 100 and res["share"] > 0
    assert res["pace"] == 500.0 and 0 < res["fps"] <= 500.0 * 256 / 192
    with pytest.raises(CemaError, match="pace"):
        run_job(job, pace=500.0, diagnose=True, **kw)  # type: ignore[arg-type]


def test_sweep_option_parses_rules_and_refuses_bad_input() -> None:
    from cema_deploy.demo.frontier import parse_sweep
    from cema_deploy.exceptions import CemaError

    assert parse_sweep("random=0.05,0.2; cema=1;") == {"random": (0.05, 0.2), "cema": (1.0,)}
    for bad in ("random", "tent=0.1", "random=x", "random=", "eata_style=1.5"):
        with pytest.raises(CemaError):
            parse_sweep(bad)
