"""Cloud rules with the edge's statistics on (``random+stats``, ...) in the demo and the frontier, and the frontier's
point at 0 % uploaded (``edge_stats``, the edge alone)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cema_deploy.demo.edge_only import EDGE_ONLY_METHODS, EDGE_STATS_SETTINGS, split_stats, stats_flags
from cema_deploy.demo.frontier import SWEEP, Job, Point, _selector_config, check_rules, parse_sweep
from cema_deploy.demo.run import DemoConfig, cloud_method_args
from cema_deploy.exceptions import CemaError
from cema_deploy.runtime.stats.adapter import DEFAULT_EVERY
from tests.conftest import needs_torch

STATS_METHODS = ("random+stats", "cema+stats", "eata_style+stats", "entropy_top+stats")


def test_demo_accepts_each_cloud_rule_with_the_edge_statistics_and_refuses_unknown_ones_clearly() -> None:
    cfg = DemoConfig(methods=("edge_stats", *STATS_METHODS))
    assert cfg.methods[1:] == STATS_METHODS and split_stats("random+stats") == ("random", True)
    with pytest.raises(CemaError, match=r"\['foo\+stats'\].*\+stats turns on the edge's statistics under a cloud rule"):
        DemoConfig(methods=("no_adapt", "foo+stats"))
    with pytest.raises(CemaError, match="for the edge alone use edge_stats"):
        DemoConfig(methods=("edge_stats+stats",))  # the edge alone has no cloud rule to add them to
    with pytest.raises(CemaError, match=r"Unknown demo methods \['randomstats'\].*random\+stats"):
        DemoConfig(methods=("randomstats",))


def test_a_stats_rules_edge_runs_its_rule_plus_the_adapter_at_edge_stats_settings() -> None:
    cfg = DemoConfig(share=0.25)
    plain, stats = cloud_method_args("random", cfg), cloud_method_args("random+stats", cfg)
    assert plain == ["--selection", "random", "--upload-share", "0.25"] and "--adapt-stats" not in plain
    assert stats == [*plain, *stats_flags()]
    assert stats_flags() == EDGE_ONLY_METHODS["edge_stats"]  # the same settings as the edge alone
    assert stats[stats.index("--adapt-stats") + 1] == "ema" and str(DEFAULT_EVERY) in stats
    assert cloud_method_args("cema+stats", cfg) == ["--selection", "cema", *stats_flags()]


def test_frontier_rules_with_the_edge_statistics_share_their_rules_knobs() -> None:
    for r in ("random", "cema", "eata_style", "entropy_top"):
        assert SWEEP[f"{r}+stats"] == SWEEP[r]
        job = Job(rule=f"{r}+stats", knob=SWEEP[r][0], protocol="reset", severity=5, seed=2)
        plain = Job(rule=r, knob=SWEEP[r][0], protocol="reset", severity=5, seed=2)
        assert _selector_config(job, 128, None) == _selector_config(plain, 128, None)
    assert SWEEP["edge_stats"] == (0.0,)
    assert parse_sweep("random+stats=0.05,0.2") == {"random+stats": (0.05, 0.2)}
    with pytest.raises(CemaError, match="--sweep expects"):
        parse_sweep("edge_stats=0.1")  # the edge alone has no knob
    check_rules(["edge_stats", "random+stats", "cema"])
    with pytest.raises(CemaError, match=r"Unknown frontier rules \['foo\+stats'\]; choose from .*random\+stats"):
        check_rules(["foo+stats"])


def test_the_frontier_plot_starts_at_zero_uploaded_with_the_edge_alone() -> None:
    from cema_deploy.demo.frontier_report import frontier_figure

    def pt(share: float, acc: float) -> Point:
        return Point(knob=0.1, share=share, share_spread=None, accuracy=acc, spread=None, seeds=1)

    panels = {"reset/5": {"edge_stats": [pt(0.0, 60.0)], "random+stats": [pt(12.0, 63.0), pt(27.0, 64.0)]}}
    fig = frontier_figure(panels, "random", {"baselines": {"reset/5": {"no_adapt": 28.0}}})
    (ax,) = fig.axes
    assert ax.get_xscale() == "symlog" and ax.get_xlim()[0] == 0  # a log axis cannot show 0 %: linear below 1 %
    curves = {c.get_label(): c.lines[0] for c in ax.containers}  # one errorbar container per rule
    alone = curves["edge_stats (no uplink)"]
    assert list(alone.get_xdata()) == [0.0] and list(alone.get_ydata()) == [60.0]
    x_min, _ = ax.transData.transform((0.0, 60.0))
    x_axis, _ = ax.transAxes.transform((0.0, 0.0))
    assert x_min == pytest.approx(x_axis)  # drawn on the y axis, inside the plot
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_edge_stats_settings_are_a_valid_adapter_config() -> None:
    from cema_deploy.runtime.stats.adapter import StatsConfig

    cfg = StatsConfig(**EDGE_STATS_SETTINGS)
    assert (cfg.mode, cfg.every, cfg.dense_frames) == ("ema", DEFAULT_EVERY, 128)


def test_real_frontier_runs_with_the_edge_statistics_refit_them_locally(quick_edge, splits, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """random+stats and edge_stats on two corruptions of 128 frames under the reset protocol: the edge's own
    statistics are refitted (local generation > 0) in both; edge_stats uploads nothing; plain random has no
    adapter."""
    from cema_deploy.demo.frontier import run_job
    from cema_deploy.demo.stream import corrupted_stream
    from cema_deploy.export.to_onnx import export_timm

    tm, model = quick_edge
    edge_dir = tmp_path / "edge"
    export_timm(tm.name, edge_dir, model=model, img_size=splits[0].shape[1])
    _, _, x, y = splits
    stream = corrupted_stream(x[:128], y[:128], severity=5, corruptions=("gaussian_noise", "contrast"), seed=0)
    res = {}
    for rule, knob in (("edge_stats", 0.0), ("random+stats", 0.25), ("random", 0.25)):
        job = Job(rule=rule, knob=knob, protocol="reset", severity=5, seed=0)
        res[rule] = run_job(
            job, work=tmp_path / "work", edge_dir=edge_dir, teacher=(tm.name, tm.checkpoint), stream=stream
        )
    alone, stats, plain = res["edge_stats"], res["random+stats"], res["random"]
    assert alone["share"] == 0 and alone["edge_stats"] and alone["frames"] == 256
    # per corruption: the first 128 frames (two batches) are probed densely; a fresh adapter per corruption
    assert alone["stats_probes"] == 2 * 2 and alone["stats_local_generation"] >= 4 and alone["stats_resets"] == 0
    assert stats["edge_stats"] and stats["stats_local_generation"] >= 4 and stats["share"] > 0
    # protocol 3: an edge that owns its statistics sends no calibration batch (the plain run sends one 64-frame
    # batch per corruption on top of its random share)
    assert stats["share"] < plain["share"] and plain["share"] >= 100 * 2 * 64 / 256
    assert not plain["edge_stats"] and "stats_local_generation" not in plain
    for r in res.values():
        assert 0 <= r["accuracy"] <= 100


@needs_torch
@pytest.mark.slow
def test_quick_demo_runs_a_cloud_rule_with_the_edge_statistics(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "demo"
    env = {**os.environ, "CEMA_DEPLOY_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "cema_deploy", "demo", "--quick", "--severity", "5", "--methods",
           "edge_stats,random+stats", "--out", str(out), "--json"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout)["severities"]["5"]["methods"]
    alone, stats = m["edge_stats"], m["random+stats"]
    assert alone["uploaded"] == 0 and stats["uploaded"] > 0 and 0 <= stats["accuracy"] <= 100
    s = stats["per_seed"][0]
    assert s["stats_mode"] == "ema" and s["stats_probes"] > 0 and s["stats_local_generation"] >= s["stats_probes"]
    assert s["samples"] == 4 * 300 and s["uploaded_frames"] > 0
    assert "random+stats" in (out / "results.md").read_text()


def test_auto_runs_the_papers_methods_with_the_papers_cloud_and_the_toolkits_rules_with_its_defaults() -> None:
    from cema_deploy.demo.run import DemoConfig
    from cema_deploy.exceptions import CemaError

    auto = DemoConfig()
    assert auto.cloud_preset == "auto"
    assert [auto.cloud_preset_of(m) for m in ("cema", "eata_style", "cema_recal", "cema+stats")] == ["cema"] * 4
    assert [auto.cloud_preset_of(m) for m in ("random", "entropy_top", "lead", "random+stats")] == ["default"] * 4
    assert DemoConfig(cloud_preset="default").cloud_preset_of("cema") == "default"
    assert DemoConfig(cloud_preset="cema").cloud_preset_of("random") == "cema"
    with pytest.raises(CemaError, match="--cloud-preset must be one of auto, cema, default, got 'paper'"):
        DemoConfig(cloud_preset="paper")
