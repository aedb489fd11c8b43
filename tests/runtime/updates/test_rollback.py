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
    information_drop_se,
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


def _less_confident(logits: np.ndarray, temperature: float) -> np.ndarray:
    return logits / temperature


def test_a_loss_of_confidence_alone_is_kept_a_collapse_or_flat_outputs_are_rolled_back() -> None:
    # Old: 40 frames, four per class, confident but not saturated. A blob that keeps every prediction and is only
    # less confident (temperature 1.15) drops the score beyond the margin: the old rule rolled it back (the
    # misfires after a calibration, issue 22), the shaped rule keeps it.
    rng = np.random.default_rng(0)
    old = _onehot(list(range(C)) * 4, scale=6.0) + rng.normal(0, 0.3, (40, C))
    softer = _less_confident(old, 1.15)
    j_old_rule = judge(old, softer, num_classes=C, margin_ratio=0.05)
    assert j_old_rule.rollback and j_old_rule.score_previous - j_old_rule.score_new > j_old_rule.allowed_drop
    j = judge(old, softer, num_classes=C, margin_ratio=0.05, collapse_ratio=0.02, flatten_ratio=0.08)
    assert not j.rollback and j.reason == "" and j.confidence_only and "confidence only" in j.describe()
    assert abs(j.collapse) < 0.02 * math.log(C) and 0 < j.flatten < 0.08 * math.log(C)
    # the same frames, a blob whose predictions collapse onto a few classes: rolled back
    collapsed = _onehot([0, 1, 2, 3] * 10, scale=6.0)
    j = judge(old, collapsed, num_classes=C, margin_ratio=0.05, collapse_ratio=0.02, flatten_ratio=0.08)
    assert j.rollback and j.reason == REASON_INFORMATION and j.collapse > 0.02 * math.log(C)
    # a broken blob: outputs flatten towards uniform with the classes still spread: rolled back
    flat = _less_confident(old, 10.0)
    j = judge(old, flat, num_classes=C, margin_ratio=0.05, collapse_ratio=0.02, flatten_ratio=0.08)
    assert j.rollback and j.flatten > 0.08 * math.log(C) and not j.confidence_only
    # a better blob is never rolled back, whatever its shape
    assert not judge(softer, old, num_classes=C, margin_ratio=0.05, collapse_ratio=0.02, flatten_ratio=0.08).rollback
    # the parts add up to the score's change
    assert j.score_new - j.score_previous == pytest.approx(-j.collapse - j.flatten, abs=1e-9)
    assert j.drop_se == pytest.approx(information_drop_se(old, flat)) and j.drop_se > 0
    # the defaults the runtime applies are the shaped rule's
    cfg = RollbackConfig()
    assert (cfg.collapse_ratio, cfg.flatten_ratio) == (0.02, 0.08)


def test_the_standard_error_of_a_drop_shrinks_with_frames() -> None:
    # One frame in ten goes flat: the same drop on 10 and on 160 frames, a standard error 4x smaller on 16x the frames.
    errors = []
    for reps in (1, 16):
        old = _onehot(list(range(C)) * reps)
        new = old.copy()
        new[::C] = 0.0
        errors.append(information_drop_se(old, new))
    assert errors[0] > 0 and errors[1] == pytest.approx(errors[0] / 4, rel=0.1)
    good = _onehot(list(range(C)) * 8)
    assert information_drop_se(good, good) == 0.0


def test_the_information_terms_average_to_the_score() -> None:
    from cema_deploy.runtime.updates.rollback import _information_terms

    logits = np.random.default_rng(0).normal(0, 3, (50, C))
    assert float(_information_terms(logits).mean()) == pytest.approx(information(logits), abs=1e-9)


def test_bad_rollback_options() -> None:
    with pytest.raises(RollbackConfigError, match="min_samples <= window"):
        RollbackConfig(window=16, min_samples=32)
    with pytest.raises(RollbackConfigError, match="margin_ratio"):
        RollbackConfig(margin_ratio=-0.1)
    with pytest.raises(RollbackConfigError, match="collapse_ratio"):
        RollbackConfig(collapse_ratio=-0.01)
    with pytest.raises(RollbackConfigError, match="flatten_ratio"):
        RollbackConfig(flatten_ratio=-1.0)


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
