"""The selection presets beyond CEMA's own rules (random, entropy-top, all), statistics sampling, upload budgets
and the shift detector, on constructed streams."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cema_deploy.runtime.selection.budget import BudgetController, BudgetError
from cema_deploy.runtime.selection.entropy import softmax_entropy
from cema_deploy.runtime.selection.rules import (
    KEPT,
    NOT_DRAWN,
    PRESETS,
    SampleSelector,
    SelectionConfig,
    SelectionConfigError,
)
from cema_deploy.runtime.selection.shift import ShiftConfig, ShiftDetector, effective_classes, frame_features


def _stream(n_batches: int, batch: int = 64, seed: int = 0) -> list[np.ndarray]:
    """Logits batches whose confidence varies within and between batches (entropies spread over (0, ln C))."""
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(batch, 10)) * rng.uniform(0.2, 8.0, size=(batch, 1)) for _ in range(n_batches)]


def _check(sel: SampleSelector) -> None:
    c = sel.counters
    assert c.seen == c.selected + c.unreliable + c.low_info + c.redundant + c.not_drawn


def test_presets_and_their_errors() -> None:
    assert PRESETS == ("cema", "eata", "random", "entropy-top", "all", "lead")
    cema = SelectionConfig.preset("cema", 10, warmup=128)
    assert cema.rule == "entropy" and cema.dynamic and cema.e_min == pytest.approx(0.02 * math.log(10))
    eata = SelectionConfig.preset("eata", 10)
    assert not eata.dynamic and eata.e_min is None
    assert SelectionConfig.preset("random", 10, share=0.1).rule == "random"
    with pytest.raises(SelectionConfigError, match="needs a share"):
        SelectionConfig.preset("random", 10)
    with pytest.raises(SelectionConfigError, match="share must be a share in"):
        SelectionConfig.preset("entropy-top", 10, share=1.5)
    with pytest.raises(SelectionConfigError, match="Unknown selection preset 'best'; expected one of cema, eata"):
        SelectionConfig.preset("best", 10)


def test_random_share_is_exact_in_the_long_run_and_seeded() -> None:
    stream = _stream(40, batch=50)
    a = SampleSelector(SelectionConfig.preset("random", 10, share=0.13, seed=3))
    b = SampleSelector(SelectionConfig.preset("random", 10, share=0.13, seed=3))
    picked = 0
    for z in stream:
        ra, rb = a.select(z), b.select(z)
        assert np.array_equal(ra.mask, rb.mask)
        assert set(np.unique(ra.reason)) <= {KEPT, NOT_DRAWN}
        k = int(ra.mask.sum())
        assert k in (6, 7)  # 0.13 x 50 = 6.5 per batch: the carried fraction alternates 6 and 7
        picked += k
    assert picked == int(0.13 * 50 * 40)
    _check(a)
    c = SampleSelector(SelectionConfig.preset("random", 10, share=0.13, seed=4))
    d = SampleSelector(SelectionConfig.preset("random", 10, share=0.13, seed=3))
    assert any(not np.array_equal(c.select(z).mask, d.select(z).mask) for z in stream)  # another seed, other draws


def test_entropy_top_takes_the_highest_entropies() -> None:
    sel = SampleSelector(SelectionConfig.preset("entropy-top", 10, share=0.25))
    for z in _stream(5):
        r = sel.select(z)
        ent = softmax_entropy(z)
        assert r.mask.sum() == 16
        assert ent[r.mask].min() >= ent[~r.mask].max()
    all_ = SampleSelector(SelectionConfig.preset("all", 10)).select(_stream(1)[0])
    assert all_.mask.all() and math.isinf(all_.e_max)


def test_statistics_samples_are_uniform_disjoint_and_counted() -> None:
    sel = SampleSelector(SelectionConfig.preset("cema", 10, warmup=64, stats_share=0.05, seed=1))
    total = 0
    for z in _stream(50):
        r = sel.select(z)
        assert r.stats_mask is not None and not (r.stats_mask & r.mask).any()
        total += int(r.stats_mask.sum())
    c = sel.counters
    assert total == c.statistics == int(0.05 * 64 * 50)
    assert c.uploaded == c.selected + c.statistics


def test_a_calibration_batch_counts_whole_and_keeps_the_rule_mask() -> None:
    sel = SampleSelector(SelectionConfig.preset("random", 10, share=0.1, stats_share=0.05))
    r = sel.select(_stream(1)[0], calibration=True)
    assert r.mask.sum() == 6 and r.stats_mask is None  # the whole batch goes up anyway
    c = sel.counters
    assert (c.uploaded, c.calibration, c.statistics) == (64, 64, 0)


@pytest.mark.parametrize("preset", ["random", "entropy-top", "cema", "eata"])
@pytest.mark.parametrize("target", [0.05, 0.2, 0.5])
def test_budget_holds_the_uploaded_share_of_all_kinds(preset: str, target: float) -> None:
    cfg = SelectionConfig.preset(
        preset,
        10,
        warmup=128,
        d_margin=None,
        budget=target,
        stats_share=0.01,
        share=0.5 if preset in ("random", "entropy-top") else None,
    )
    sel = SampleSelector(cfg)
    stream = _stream(160)
    after_warmup = None
    for i, z in enumerate(stream):
        sel.select(z, calibration=i in (0, 80))  # two whole calibration batches count against the budget
        if i == 19:
            after_warmup = sel.counters
    c = sel.counters
    assert after_warmup is not None
    late = (c.uploaded - after_warmup.uploaded) / (c.seen - after_warmup.seen)
    assert abs(late - target) <= 0.1 * target, (late, target)
    assert abs(c.uploaded_share - target) <= 0.1 * target


def test_budget_controller_pays_back_its_deficit() -> None:
    b = BudgetController(0.1, horizon=400)
    b.record(100, 30)  # over-spent by 20 frames: aim lower, paying them back over 400 frames
    assert b.request() == pytest.approx(0.1 - 20 / 400)
    b.record(100, 0)  # still 10 frames over-spent
    assert b.request() == pytest.approx(0.1 - 10 / 400)
    b.record(200, 0)  # now 10 frames under-spent: aim higher
    assert b.request() == pytest.approx(0.1 + 10 / 400)
    b.record(10, 1000)
    assert b.request() == 0.0  # never a negative share
    with pytest.raises(BudgetError, match=r"share in \(0, 1\]"):
        BudgetController(0.0)


def _frames(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    base = np.clip(rng.normal(128, 40, size=(n, 1, 1, 1)) + rng.normal(0, 25, size=(n, 32, 32, 1)), 0, 255)
    if kind == "noise":
        base = base + rng.normal(0, 60, size=base.shape)
    elif kind == "dark":
        base = base * 0.4
    elif kind == "blur":
        base = (base + np.roll(base, 1, 1) + np.roll(base, 1, 2) + np.roll(base, -1, 1) + np.roll(base, -1, 2)) / 5
    return np.repeat(np.clip(base, 0, 255).astype(np.uint8), 3, axis=-1)


def test_shift_detector_fires_at_segment_changes_and_never_within_them() -> None:
    rng = np.random.default_rng(0)
    det = ShiftDetector(ShiftConfig(collapse_ratio=None))
    fired: list[int] = []
    kinds = ["clean", "noise", "blur", "dark", "clean"]
    for s, kind in enumerate(kinds):
        for b in range(25):
            if det.update(_frames(kind, 64, rng), None):
                fired.append(s * 25 + b)
                det.restart()
                det.update(_frames(kind, 64, rng), None)  # the runtime's recalibration batch starts the reference
    assert fired == [25, 50, 75, 100], fired


def test_shift_detector_collapse_trigger_and_state_round_trip() -> None:
    rng = np.random.default_rng(1)
    det = ShiftDetector(ShiftConfig(reference_frames=128))
    spread = np.eye(10)[rng.integers(0, 10, 64)] * 0.9 + 0.01
    collapsed = np.eye(10)[np.zeros(64, int)] * 0.9 + 0.01
    assert effective_classes(collapsed) < 2 < 8 < effective_classes(spread)
    frames = _frames("clean", 64, rng)
    assert not det.update(frames, spread) and not det.update(frames, spread) and det.ready
    assert not det.update(frames, spread)
    state = json.loads(json.dumps(det.state_dict()))
    assert det.update(frames, collapsed)  # same inputs, predictions collapsed onto one class
    again = ShiftDetector(ShiftConfig(reference_frames=128))
    again.load_state_dict(state)
    assert again.update(frames, collapsed) and not again.update(frames, spread)
    assert frame_features(frames).shape == (64, 3)


def test_selector_fires_shift_counts_it_and_restarts_its_reference() -> None:
    rng = np.random.default_rng(2)
    sel = SampleSelector(SelectionConfig.preset("cema", 10, warmup=64, shift=ShiftConfig(collapse_ratio=None)))
    z = _stream(12)
    shifts = [sel.select(z[i], images=_frames("clean" if i < 6 else "noise", 64, rng)).shift for i in range(12)]
    assert shifts == [False] * 6 + [True] + [False] * 5
    c = sel.counters
    assert c.shifts == 1 and c.calibration == 64


def test_state_round_trip_with_budget_shift_and_draws() -> None:
    rng = np.random.default_rng(3)
    cfg = SelectionConfig.preset("random", 10, share=0.2, budget=0.3, stats_share=0.05, shift=ShiftConfig(), seed=7)
    a = SampleSelector(cfg)
    stream = _stream(8)
    for z in stream[:4]:
        a.select(z, images=_frames("clean", 64, rng))
    b = SampleSelector(cfg)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for z in stream[4:]:
        frames = _frames("clean", 64, rng)
        ra, rb = a.select(z, images=frames), b.select(z, images=frames)
        assert np.array_equal(ra.mask, rb.mask) and np.array_equal(ra.stats_mask, rb.stats_mask)
    assert a.state_dict() == b.state_dict()


def test_edge_run_defaults_to_the_frontier_winner_with_its_share() -> None:
    """`edge run` without --selection runs DEFAULT_PRESET; a share rule without --upload-share or a budget takes
    DEFAULT_SHARE, and a budget replaces the share rather than stacking on it."""
    import inspect

    from cema_deploy.cli.edge import run_cmd, selection_config
    from cema_deploy.runtime.selection.rules import DEFAULT_PRESET, DEFAULT_SHARE

    assert inspect.signature(run_cmd).parameters["selection"].default == DEFAULT_PRESET
    common = {"e0_ratio": 0.4, "e_min_ratio": 0.02, "d_margin": "auto", "warmup": 16}
    cfg = selection_config(10, selection=DEFAULT_PRESET, **common)
    assert (cfg.rule, cfg.share, cfg.budget) == ("random", DEFAULT_SHARE, None)
    cfg = selection_config(10, selection="random", upload_budget=0.3, **common)
    assert (cfg.share, cfg.budget) == (None, 0.3)
    assert selection_config(10, selection="cema", **common).rule == "entropy"
