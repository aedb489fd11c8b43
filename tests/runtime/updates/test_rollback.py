"""The rollback score and rule on constructed logits (the runtime's use of them is in test_edge.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from cema_deploy.runtime.updates.rollback import (
    REASON_INFORMATION,
    REASON_NONFINITE,
    RollbackConfig,
    RollbackConfigError,
    information,
    judge,
)
from tests.conftest import needs_torch

C = 10


def _onehot(classes: list[int], scale: float = 50.0) -> np.ndarray:
    return np.eye(C)[classes] * scale


def test_information_is_high_for_confident_spread_predictions_and_low_for_broken_or_collapsed() -> None:
    spread = _onehot(list(range(C)) * 3)
    assert information(spread) == pytest.approx(math.log(C), abs=1e-6)  # the most there is
    assert information(np.zeros((30, C))) == pytest.approx(0.0, abs=1e-12)  # uniform outputs: broken
    assert information(_onehot([3] * 30)) == pytest.approx(0.0, abs=1e-6)  # every input one class: collapse
    half = np.concatenate([spread, np.zeros((30, C))])
    assert 0 < information(half) < information(spread)
    assert math.isnan(information(np.full((4, C), np.nan)))
    assert information(np.concatenate([spread, np.full((1, C), np.inf)])) == pytest.approx(math.log(C), abs=1e-6)


def test_judge_rolls_back_a_drop_beyond_the_margin_only() -> None:
    good = _onehot(list(range(C)) * 3)
    slightly_worse = good.copy()
    slightly_worse[0] = 0.0  # one frame of thirty goes uniform
    j = judge(good, slightly_worse, num_classes=C, margin_ratio=0.05, version=2, previous_version=1)
    assert not j.rollback and j.reason == "" and j.score_new < j.score_previous
    assert j.score_previous - j.score_new < j.allowed_drop == pytest.approx(0.05 * math.log(C))
    for bad in (np.zeros_like(good), _onehot([0] * 30)):
        j = judge(good, bad, num_classes=C, margin_ratio=0.05, version=2, previous_version=1)
        assert j.rollback and j.reason == REASON_INFORMATION and "v2 rolled back" in j.describe()
    nan = good.copy()
    nan[5, 2] = np.nan
    j = judge(good, nan, num_classes=C, margin_ratio=0.05)
    assert j.rollback and j.reason == REASON_NONFINITE
    # a previous engine that was itself collapsed: any spread is an improvement
    assert not judge(_onehot([1] * 30), good, num_classes=C, margin_ratio=0.05).rollback


def test_bad_rollback_options() -> None:
    with pytest.raises(RollbackConfigError, match="min_samples <= window"):
        RollbackConfig(window=16, min_samples=32)
    with pytest.raises(RollbackConfigError, match="margin_ratio"):
        RollbackConfig(margin_ratio=-0.1)


@needs_torch
def test_the_fault_benchmark_runs_on_a_tiny_model(exported, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    import importlib.util

    from cema_deploy.contract.blob import RefitBlob, blob_from_path, save_blob
    from tests.runtime.test_edge import _diverse, _last_bn

    out, _ = exported("bn")
    v0 = blob_from_path(out / "params.safetensors")
    bn = _last_bn(v0.tensors)
    rng = np.random.default_rng(0)
    for run, seed_shift in (("run", 0.0), ("other", 0.5)):
        (tmp_path / run / "blobs").mkdir(parents=True)
        for v in range(1, 5):  # a healthy-looking sequence: statistics drift a little per step
            t = {k: (x * rng.uniform(0.98, 1.02, x.shape) + seed_shift * ("running_mean" in k)).astype(x.dtype)
                 for k, x in v0.tensors.items()}  # fmt: skip
            t[f"{bn}.weight"] = t[f"{bn}.weight"] * 30
            save_blob(RefitBlob(tensors=t, fingerprint=v0.fingerprint, version=v),
                      tmp_path / run / "blobs" / f"v{v:08d}.safetensors")  # fmt: skip
    np.save(tmp_path / "stream.npy", _diverse(96, seed=1))
    np.save(tmp_path / "labels.npy", np.arange(96) % 10)
    spec = importlib.util.spec_from_file_location("rollback_faults", Path(__file__).parents[3] / "benchmarks" /
                                                  "rollback_faults.py")  # fmt: skip
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.main([str(out), "--stream", str(tmp_path / "stream.npy"), "--labels", str(tmp_path / "labels.npy"),
                      "--blobs", str(tmp_path / "run" / "blobs"), "--other-blobs", str(tmp_path / "other" / "blobs"),
                      "--trials", "3", "--window", "32", "--json", str(tmp_path / "f.json")])  # fmt: skip
    assert set(res["detection"]) == {"var_x2", "var_x10", "var_x100", "gamma_flip", "other_seed"}
    assert all(len(res["rows"][f]) == 3 for f in res["rows"]) and res["window"] == 32
    assert all(0.0 <= r <= 1.0 for r in [res["false_rollback_rate"], *res["detection"].values()])
    assert res["by_margin"]["0.05"]["none"] == res["false_rollback_rate"]
    # a larger margin never detects more
    for f in res["rows"]:
        rates = [res["by_margin"][str(m)][f] for m in bench.MARGINS]
        assert rates == sorted(rates, reverse=True)
    assert json.loads((tmp_path / "f.json").read_text())["trials"] == 3
    assert "false-rollback rate" in capsys.readouterr().out
