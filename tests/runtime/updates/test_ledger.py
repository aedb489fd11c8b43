"""The version ledger's rules on their own (no model, no network): what moves the floor, what re-baselines, what a
hint may do. The same rules end to end on real HTTP: ``test_floor_and_epoch.py``."""

from __future__ import annotations

import numpy as np
import pytest

from cema_deploy.contract.blob import RefitBlob
from cema_deploy.exceptions import StaleBlobError, StaleEpochError
from cema_deploy.runtime.updates.ledger import Stamp, VersionLedger

A, B = 1_764_000_000_000, 1_764_000_060_000


def _blob(version: int, epoch: int = A) -> RefitBlob:
    return RefitBlob(tensors={"bn.weight": np.ones(2, np.float32)}, fingerprint="ab", version=version, epoch=epoch)


class _Serving:
    def __init__(self) -> None:
        self.stamp: Stamp = (0, 0)

    def __call__(self) -> Stamp:
        return self.stamp


def test_only_verified_metadata_moves_the_floor() -> None:
    ledger = VersionLedger(_Serving())
    ledger.admit(_blob(1))
    assert ledger.floor == 1 and ledger.epoch == A
    assert not ledger.refused(None, "signature")  # unverifiable: counted, not remembered
    assert ledger.floor == 1 and ledger.unverified == 1 and ledger.fruitless == 1
    assert ledger.refused((A, 4), "value")  # verified, this epoch: remembered
    assert ledger.floor == 4 and ledger.refused_upto == 4 and ledger.fruitless == 1
    assert not ledger.refused((A - 1, 9), "stale epoch") and ledger.floor == 4  # another epoch: not remembered
    with pytest.raises(StaleBlobError):
        ledger.admit(_blob(3))
    snap = ledger.snapshot()
    assert snap.refused == {4: "value"} and snap.refusals == {"signature": 1, "value": 1, "stale epoch": 1}


def test_a_newer_epoch_rebaselines_and_an_older_one_is_refused() -> None:
    serving = _Serving()
    ledger = VersionLedger(serving)
    ledger.admit(_blob(5))
    serving.stamp = (A, 5)
    ledger.refused((A, 6), "value")
    ledger.rolled_back((A, 5), "information_drop", swapped=True)
    assert ledger.floor == 6
    ledger.admit(_blob(1, epoch=B))  # v1 of the new state: above everything the old one left
    snap = ledger.snapshot()
    assert (snap.epoch, snap.floor, snap.refused, snap.rolled_back, snap.rebaselines) == (B, 1, {}, {}, 1)
    assert snap.rollbacks == {"information_drop": 1}  # counted since start, whatever the epoch
    with pytest.raises(StaleEpochError, match="older than epoch"):
        ledger.admit(_blob(9, epoch=A))
    assert not ledger.done(1)  # (A, 5) still serves until (B, 1) swaps in
    serving.stamp = (B, 1)
    assert ledger.done(1) and ledger.settled((B, 1)) and ledger.settled((A, 9))


def test_hints_earn_a_probe_only_when_the_cloud_fell_behind() -> None:
    serving = _Serving()
    ledger = VersionLedger(serving)
    ledger.admit(_blob(5))
    serving.stamp = (A, 5)
    ledger.cloud_says(7)
    ledger.cloud_says(4)  # lower than before: a new cloud state
    assert ledger.take_probe() and not ledger.take_probe()  # once per hinted version
    ledger.cloud_says(4)
    assert not ledger.take_probe()
    ledger.cloud_says(5)
    assert not ledger.take_probe()  # not below the floor
    lagging = VersionLedger(serving)
    lagging.admit(_blob(6))
    lagging.cloud_says(6)
    lagging.cloud_says(6)
    assert not lagging.take_probe()
    fresh = VersionLedger(serving)  # the first hint heard (at start, after a restore) below the floor
    fresh.restore(epoch=A, refused={}, rolled_back={}, saved_upto=0)
    fresh.cloud_says(1)
    assert fresh.take_probe()


def test_restore_drops_unverified_refusals_and_recomputes_the_floor() -> None:
    ledger = VersionLedger(_Serving())
    ledger.restore(epoch=A, refused={10**15: "signature", 3: "value"}, rolled_back={2: "drop"}, saved_upto=10**15)
    snap = ledger.snapshot()
    assert (snap.epoch, snap.refused_upto, snap.refused, snap.rolled_back) == (A, 3, {3: "value"}, {2: "drop"})


def test_the_calibration_exemption_is_a_version_not_a_window() -> None:
    serving = _Serving()
    ledger = VersionLedger(serving)
    ledger.admit(_blob(1))
    serving.stamp = (A, 1)
    ledger.calibration_queued()
    assert ledger.exempt(2)  # acknowledged target not known yet: whatever answers first is exempt
    ledger.calibration_queued()
    ledger.calibration_done(5)  # the calibration's blob is v5
    assert not ledger.exempt(3)  # published before the calibration: judged
    assert ledger.exempt(6)  # the first at or above the target (coalesced past it) answers the calibration
    assert not ledger.exempt(7)  # exempt once, then every refit is judged again
