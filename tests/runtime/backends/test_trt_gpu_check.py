"""``benchmarks/gpu_check.sh`` runs on a machine without a GPU and says what it skipped; its checking pipeline
(export, refit, parity against ORT CPU, hot refit, bench rows, one JSON) runs end to end with ``--backends ort-cpu``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import needs_torch

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:  # type: ignore[type-arg]
    out = tmp_path / "sub" / "gpu-check.json"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(
        ["bash", str(SCRIPT), "--json", str(out), *args], capture_output=True, text=True, timeout=300, env=env
    )
    return p, json.loads(out.read_text())


def test_without_gpu_backends_it_records_what_it_skipped_and_exits_0(tmp_path: Path) -> None:
    import onnxruntime as ort

    if {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(ort.get_available_providers()):
        pytest.skip("this machine has a GPU execution provider")
    p, report = _run(tmp_path, "--backends", "ort-cuda,ort-trt")
    assert p.returncode == 0, p.stdout + p.stderr
    assert report["verdict"] == "nothing to check" and report["checks"] == []
    skipped = {s["what"]: s["why"] for s in report["skipped"]}
    assert "CUDAExecutionProvider" in skipped["ort-cuda"] and "TensorrtExecutionProvider" in skipped["ort-trt"]
    assert "no GPU backend" in skipped["export, parity, refit, bench"]
    assert report["device"]["NVIDIA_TF32_OVERRIDE"] == "0" and "onnxruntime_providers" in report["device"]
    assert "SKIPPED  ort-cuda" in p.stdout


@needs_torch
def test_the_pipeline_runs_end_to_end_against_ort_cpu(tmp_path: Path) -> None:
    args = ["--backends", "ort-cpu", "--model", "test_resnet", "--img-size", "64", "--images", "48"]
    p, report = _run(tmp_path, *args, "--batch", "1,8", "--rounds", "1", "--seconds", "0.05")
    assert p.returncode == 0, p.stdout + p.stderr
    assert report["verdict"] == "pass" and not report["errors"]
    (check,) = report["checks"]
    assert check["parity"]["pass"] and check["parity"]["max_rel_err"] <= 1e-6
    assert check["hot_refit"]["failed_requests"] == 0 and check["hot_refit"]["version"] == [1, 2]
    probe = check["stats_probe"]  # ort-cpu has no probe engine of its own: the ORT CPU probe, against itself
    assert probe["engine"] == "onnxruntime-cpu" and probe["pass"] and probe["max_rel_err"] == 0.0
    assert report["reference"]["images"] == 48
    (bench,) = report["bench"]
    assert bench["settings"]["max_batch"] == 8 and {r["batch"] for r in bench["rows"]} == {1, 8}
