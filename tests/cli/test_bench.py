"""``cema-deploy bench`` on a tiny export with a BN-folded reference: report shape, ratios, hot refit, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cema_deploy.cli import app
from cema_deploy.exceptions import BackendUnavailableError
from tests.conftest import TINY_MODELS, needs_torch, tiny_model

runner = CliRunner()
BATCHES = (1, 2)


@pytest.fixture(scope="module")
def folded_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BN model exported with ``reference_folded.onnx`` (what the refittable-vs-folded ratio needs)."""
    from cema_deploy.export import export_timm

    name, _, size = TINY_MODELS["bn"]
    out = tmp_path_factory.mktemp("bench-export")
    export_timm(name, out, model=tiny_model("bn"), img_size=size, folded_reference=True)
    assert (out / "reference_folded.onnx").is_file()
    return out


@pytest.fixture(scope="module")
def report(folded_export: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("bench-json") / "sub" / "report.json"
    args = ["bench", str(folded_export), "--backend", "ort-cpu", "--batch", ",".join(map(str, BATCHES))]
    r = runner.invoke(app, [*args, "--rounds", "1", "--seconds", "0.05", "--json", str(path)])
    assert r.exit_code == 0, r.output
    assert "Ratios" in r.output and "received->serving" in r.output
    data: dict[str, Any] = json.loads(path.read_text())
    return data


@needs_torch
def test_rows_cover_every_batch_and_engine_with_ordered_percentiles(report: dict[str, Any]) -> None:
    assert report["settings"]["batches"] == list(BATCHES)
    assert report["machine"]["onnxruntime"]
    engines = {"refittable", "folded", "edge_step", "torch_eager"}
    seen = {(r["backend"], r["engine"], r["batch"]) for r in report["rows"]}
    assert seen == {("ort-cpu", e, b) for e in engines for b in BATCHES}
    for row in report["rows"]:
        assert row["providers"] == ["CPUExecutionProvider"]  # no silent fallback to some other provider
        assert row["throughput"] > 0 and row["calls"] >= 3
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"] <= row["max_ms"]


@needs_torch
def test_ratios_are_present_for_every_batch(report: dict[str, Any]) -> None:
    assert [(r["backend"], r["batch"]) for r in report["ratios"]] == [("ort-cpu", b) for b in BATCHES]
    for r in report["ratios"]:
        for key in ("refittable_vs_folded", "edge_step_vs_bare", "torch_eager_vs_refittable"):
            for variant in (key, key + "_p50"):
                assert isinstance(r[variant], float) and r[variant] > 0, (variant, r)


@needs_torch
def test_hot_refit_serves_the_new_version_without_failed_requests(report: dict[str, Any]) -> None:
    (refit,) = report["refit"]
    assert refit["backend"] == "ort-cpu" and refit["refit_path"] == "hybrid"
    assert refit["time_to_full_speed_ms"] >= refit["received_to_serving_ms"] and refit["engine_bytes"] > 0
    assert refit["repeats"] == report["settings"]["refit_repeats"] == len(refit["trials"]) == 3
    assert refit["version"] == [0, 3]
    assert refit["failed_requests"] == 0
    assert refit["requests_during_refit"] >= 1
    for t in refit["trials"]:
        assert t["build_ms"] > 0 and t["warmup_ms"] == 0  # in place: the engine refitted served before, warm
        assert t["build_ms"] + t["warmup_ms"] <= t["received_to_serving_ms"] <= t["received_to_first_new_response_ms"]
        assert t["version"][1] == t["version"][0] + 1
    assert refit["blob_bytes"] > 0 and refit["steady_throughput"] > 0
    assert len(refit["idle_build_ms_all"]) == 3 and refit["idle_build_ms"] > 0
    assert set(refit["targets"]) == {
        "serving_vs_idle_build",
        "max_latency_vs_steady_p99",
        "first_new_vs_build_plus_p99",
    }
    assert all(v > 0 for v in refit["targets"].values())


@needs_torch
def test_sustained_refits_report_throughput_latency_and_rss(folded_export: Path, tmp_path: Path) -> None:
    """The sustained path runs briefly through RefitScheduler (figures are checked for shape, not speed)."""
    path = tmp_path / "sustained.json"
    args = ["bench", str(folded_export), "--backend", "ort-cpu", "--batch", "1", "--rounds", "1", "--seconds", "0.05"]
    args += ["--no-torch", "--refit-repeats", "1", "--sustained-refit", "1.5", "--refit-every", "0.25"]
    r = runner.invoke(app, [*args, "--min-refit-interval", "0.05", "--json", str(path)])
    assert r.exit_code == 0, r.output
    assert "sustained refits" in r.output
    s = json.loads(path.read_text())["sustained_refit"]
    assert s["backend"] == "ort-cpu" and s["refit_path"] == "hybrid"
    assert s["refits_applied_in_run"] <= s["refits"] and s["refits_applied_per_s"] <= s["refits_offered_per_s"] + 1
    assert s["throughput_ratio_cpu"] > 0 and s["interleaved"]["pairs"] == 3
    assert [w["refits"] for w in s["interleaved"]["windows"]] == [False, True] * 3
    assert s["interleaved"]["throughput_ratio_wall"] > 0 and s["interleaved"]["throughput_ratio_cpu"] > 0
    assert s["failed_requests"] == 0 and s["refits_failed"] == 0 and s["refit_errors"] == []
    assert s["refits"] >= 1 and s["refits"] + s["refits_coalesced"] == s["refits_submitted"]
    assert s["throughput_ratio"] > 0 and 0 < s["p50_ms"] <= s["p99_ms"] <= s["max_ms"]
    assert s["steady_p99_ms"] > 0 and s["rss_mb"] > 0 and s["rss_after_10s_mb"] > 0
    assert isinstance(s["rss_growth_pct"], float) and s["rss_samples"]


@needs_torch
def test_unknown_backend_is_a_clean_error(folded_export: Path) -> None:
    r = runner.invoke(app, ["bench", str(folded_export), "--backend", "ort-nope", "--no-refit"])
    assert r.exit_code == 1
    assert isinstance(r.exception, BackendUnavailableError)
    assert "Unknown backend 'ort-nope'" in str(r.exception) and "ort-cpu" in str(r.exception)
    # the installed entry point prints it as one line, without a traceback
    p = subprocess.run(
        [sys.executable, "-m", "cema_deploy", "bench", str(folded_export), "--backend", "ort-nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 1 and "Unknown backend 'ort-nope'" in p.stderr and "Traceback" not in p.stderr


def test_bad_batch_list_is_a_usage_error(tmp_path: Path) -> None:
    r = runner.invoke(app, ["bench", str(tmp_path), "--batch", "1,zero"])
    assert r.exit_code == 2
    assert "comma-separated integers" in r.output
