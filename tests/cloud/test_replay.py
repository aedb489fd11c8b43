"""The durable replay log: reload after a restart, trimming, seeded draws, the window CEMA sees."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.cloud.conftest import images


def test_store_survives_a_restart_and_trims_whole_uploads(tmp_path: Path) -> None:
    from cema_deploy.cloud.replay import ReplayStore

    store = ReplayStore(tmp_path, capacity=10)
    batches = [images(4, seed=i, size=8) for i in range(5)]
    assert [store.append(b) for b in batches] == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20)]
    (tmp_path / ".000000000020.npy.abc.tmp").write_bytes(b"half a write")  # a crash mid-append: never acked
    again = ReplayStore(tmp_path, capacity=10)
    assert again.total == 20 and len(again) == 20 and not list(tmp_path.glob(".*.tmp"))
    assert np.array_equal(again.read(0, 20), np.concatenate(batches))
    again.trim(keep_from=6)  # only uploads wholly before 6 and before the newest 10 go
    assert again.first == 4 and len(again) == 16 and not (tmp_path / "000000000000.npy").exists()
    again.trim(keep_from=20)
    assert again.first == 8 and len(ReplayStore(tmp_path, capacity=10)) == 12
    with pytest.raises(IndexError, match="not held"):
        again.read(0, 4)


def test_seeded_draws_repeat_and_stay_inside_the_window(tmp_path: Path) -> None:
    from cema_deploy.cloud.replay import MemoryReplay, ReplayStore, ReplayWindow

    store = ReplayStore(tmp_path, capacity=8)
    x = np.arange(20, dtype=np.uint8).reshape(20, 1, 1, 1).repeat(3, axis=3)
    store.append(x[:12])
    store.append(x[12:])
    window = ReplayWindow(store, end=12)
    assert len(window) == 8  # the newest 8 below index 12
    a = window.sample(5, np.random.default_rng([0, 3]))
    b = window.sample(5, np.random.default_rng([0, 3]))
    assert np.array_equal(a, b) and set(a[:, 0, 0, 0].tolist()) <= set(range(4, 12))
    assert len(window.sample(50, np.random.default_rng(0))) == 8
    mem = MemoryReplay(capacity=8)
    mem.add(x)
    assert len(mem) == 8 and set(mem.sample(8, np.random.default_rng(0))[:, 0, 0, 0].tolist()) == set(range(12, 20))
