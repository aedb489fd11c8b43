"""The durable upload store: reload after a restart, the replay window (never shrunk by pending samples), what is
deleted when, seeded draws."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.cloud.conftest import images


def _append(store, kind, imgs, **kw):  # type: ignore[no-untyped-def]
    up = store.new_upload(kind, imgs, generation=1, **kw)
    store.write(up)
    store.add(up)
    return up


def test_uploads_survive_a_restart_in_order_with_their_keys(tmp_path: Path) -> None:
    from cema_deploy.cloud.store.replay import SampleStore

    store = SampleStore(tmp_path / "uploads", capacity=10)
    batches = [images(4, seed=i, size=8) for i in range(5)]
    ups = [_append(store, "selected", b, key=f"k{i}", received=float(i)) for i, b in enumerate(batches)]
    assert [(u.adapt_start, u.adapt_end) for u in ups] == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20)]
    (tmp_path / "uploads" / ".000000000006.safetensors.x.tmp").write_bytes(b"half a write")  # never acked
    again = SampleStore(tmp_path / "uploads", capacity=10)
    assert again.adapt_total == 20 and again.next_seq == 6 and not list((tmp_path / "uploads").glob(".*.tmp"))
    assert np.array_equal(again.read_adapt(0, 20), np.concatenate(batches))
    assert [u.key for u in again.uploads.values()] == [f"k{i}" for i in range(5)]
    with pytest.raises(IndexError, match="not all held"):
        again.read_adapt(18, 24)


def test_the_window_holds_the_newest_consumed_capacity_whatever_is_pending(tmp_path: Path) -> None:
    from cema_deploy.cloud.store.replay import SampleStore

    store = SampleStore(tmp_path / "u", capacity=8)
    for i in range(10):  # 40 samples, of which the deployment consumed 12: 28 pending
        _append(store, "selected", images(4, seed=i, size=4))
    cursor = 12
    done = store.collect(cursor=cursor, stats_cursor=0)
    # only uploads wholly before cursor - capacity = 4 go: a backlog never empties the replay window
    assert [u.adapt_start for u in done] == [0] and store.first_adapt == 4
    store.delete_files(done)
    assert store.window_len(cursor) == 8 and store.window(cursor) == (4, 12)
    assert len(list((tmp_path / "u").glob("*.safetensors"))) == 9
    a = store.sample(5, np.random.default_rng([0, 3]), end=cursor)
    b = store.sample(5, np.random.default_rng([0, 3]), end=cursor)
    assert np.array_equal(a, b) and len(store.sample(50, np.random.default_rng(0), end=cursor)) == 8
    assert store.upload_end(13) == 16  # the upload holding sample 13 ends at 16


def test_calibration_batches_are_held_whole_until_applied_and_statistics_until_used(tmp_path: Path) -> None:
    from cema_deploy.cloud.store.replay import SampleStore

    store = SampleStore(tmp_path / "u", capacity=100)
    x = images(6, seed=1, size=4)
    sel = np.array([True, False, True, False, False, False])
    cal = _append(store, "calibration", x, selected=sel, calibration="start")
    stats = _append(store, "statistics", images(5, seed=2, size=4))
    assert (cal.n_adapt, len(cal.images), store.adapt_total, store.stats_total) == (2, 6, 2, 5)
    assert np.array_equal(store.read_adapt(0, 2), x[sel])  # the selected ones are adapted and replayed
    assert store.collect(cursor=2, stats_cursor=0) == []  # calibration pending, statistics unused
    kept = store.applied(cal)
    assert kept is cal and len(cal.images) == 2  # the unselected frames are dropped once applied
    store.write(cal)
    again = SampleStore(tmp_path / "u", capacity=100)
    assert len(again.uploads[cal.seq].images) == 2 and again.pending_calibrations() == []
    assert [u.seq for u in again.collect(cursor=2, stats_cursor=5)] == [stats.seq]  # used: deleted
    assert np.array_equal(store.read_stats(0, 5), stats.images)
