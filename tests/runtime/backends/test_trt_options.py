"""Backend options from the CLI: ``--threads`` never reaches TensorRT (it was a TypeError), ``--max-batch`` and
``--precision`` reach the backends that take them (bench defaults to the largest batch, edge run to --batch)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cema_deploy.cli import app
from cema_deploy.exceptions import BackendUnavailableError, CemaError, MissingExtraError
from cema_deploy.runtime import get_backend
from cema_deploy.runtime.backends.registry import backend_options
from tests.conftest import needs_torch
from tests.runtime.conftest import images

runner = CliRunner()
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def test_options_a_backend_does_not_take_are_dropped_or_refused() -> None:
    opts = {"intra_op_threads": 2, "max_batch": 64, "precision": "fp32", "other": 1, "unset": None}
    assert backend_options("trt", opts) == {"max_batch": 64, "precision": "fp32", "other": 1}
    assert backend_options("ort-cpu", opts) == {"intra_op_threads": 2, "other": 1}
    assert backend_options("ort-trt", opts) == {"intra_op_threads": 2, "max_batch": 64, "precision": "fp32", "other": 1}
    with pytest.raises(BackendUnavailableError, match="does not take --precision 'fp16'"):
        backend_options("ort-cpu", {"precision": "fp16"})
    with pytest.raises(BackendUnavailableError, match="--refit-mode"):
        backend_options("ort-cuda", {"refit_mode": "individual"})


@needs_torch
@pytest.mark.skipif(HAS_TRT, reason="checks the message on a machine without TensorRT")
def test_threads_with_trt_is_no_type_error(exported) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    with pytest.raises(MissingExtraError, match=r"cema-deploy\[trt\]"):
        get_backend("trt", out, intra_op_threads=2, max_batch=64)


@needs_torch
@pytest.mark.skipif(HAS_TRT, reason="checks the message on a machine without TensorRT")
def test_edge_run_threads_backend_trt_fails_with_one_message(exported, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    src = tmp_path / "frames.npy"
    np.save(src, images(4))
    args = ["edge", "run", str(out), "--source", str(src), "--backend", "trt", "--threads", "2", "--quiet"]
    r = runner.invoke(app, args)
    assert r.exit_code == 1 and isinstance(r.exception, MissingExtraError), r.output
    assert not isinstance(r.exception, TypeError)


@needs_torch
def test_edge_run_precision_on_ort_cpu_is_refused_and_max_batch_is_harmless(exported, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    src = tmp_path / "frames.npy"
    np.save(src, images(6))
    base = ["edge", "run", str(out), "--source", str(src), "--backend", "ort-cpu", "--quiet", "--batch", "4"]
    r = runner.invoke(app, [*base, "--precision", "fp16"])
    assert r.exit_code == 1 and isinstance(r.exception, CemaError) and "--precision 'fp16'" in str(r.exception)
    metrics = tmp_path / "m.json"
    r = runner.invoke(app, [*base, "--max-batch", "4", "--precision", "fp32", "--threads", "1", "--json", str(metrics)])
    assert r.exit_code == 0, r.output
    assert json.loads(metrics.read_text())["frames"] == 6


@needs_torch
def test_bench_records_max_batch_defaulting_to_the_largest_batch(exported, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from cema_deploy.bench import run_bench

    out, _ = exported("bn")
    report = run_bench(out, backends=["ort-cpu"], batches=(1, 3), rounds=1, seconds_per_round=0.02, refit=False,
                       torch_eager=False)  # fmt: skip
    assert report["settings"]["max_batch"] == 3 and report["settings"]["precision"] == "fp32"
    path = tmp_path / "r.json"
    args = ["bench", str(out), "--backend", "ort-cpu", "--batch", "1", "--rounds", "1", "--seconds", "0.02"]
    r = runner.invoke(app, [*args, "--no-refit", "--no-torch", "--max-batch", "8", "--json", str(path)])
    assert r.exit_code == 0, r.output
    assert json.loads(path.read_text())["settings"]["max_batch"] == 8
    r = runner.invoke(app, [*args, "--no-refit", "--no-torch", "--precision", "fp16"])
    assert r.exit_code == 1 and "--precision 'fp16'" in str(r.exception)
