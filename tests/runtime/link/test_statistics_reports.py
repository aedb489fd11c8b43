"""Statistics reports in the uplink (protocol 3): during an outage only the newest unsent one is kept (in memory and
in the spool), in the place of the newest, and it reaches the cloud with the batch reports in order."""

from __future__ import annotations

import numpy as np
import pytest

from cema_deploy.contract.edge_statistics import statistics_to_text
from cema_deploy.contract.messages import BatchReport
from cema_deploy.runtime.link.client import CloudClient
from cema_deploy.runtime.link.uplink import Uplink
from tests.runtime.conftest import images

FP = "ab" * 32


def _stats_report(value: float, generation: int) -> BatchReport:
    stats = {"bn.running_mean": np.full(4, value, np.float32), "bn.running_var": np.ones(4, np.float32)}
    text = statistics_to_text(stats, local_generation=generation)
    return BatchReport(seen=0, selected=0, uploaded=0, generation=1, statistics=text, stats_generation=generation)


@pytest.mark.parametrize("spooled", [False, True])
def test_only_the_newest_unsent_statistics_report_is_kept(protocol_server, tmp_path, spooled: bool) -> None:  # type: ignore[no-untyped-def]
    srv = protocol_server(FP)
    srv.stop()  # the cloud is away while the edge keeps serving
    spool = {"spool_dir": tmp_path / "spool"} if spooled else {}
    with CloudClient(srv.url, "t0k", FP, connect_timeout_s=0.5) as client:
        up = Uplink(client, fingerprint=FP, upload_batch=4, flush_interval_s=0, backoff_base_s=0.05,
                    backoff_cap_s=0.1, **spool)  # fmt: skip
        try:
            for i in range(5):
                up.put_report(_stats_report(float(i), i + 1))
                up.put(images(2, seed=i), np.zeros(2), version=0, generation=1)
                up.put_report(BatchReport(seen=2, selected=2, uploaded=2, generation=1, stats_generation=i + 1))
            superseded = up.counters.statistics_superseded  # 4, or 3 when the first was in flight already
            assert superseded in (3, 4) and up.reports_queued == 6  # five batch reports, one statistics report
            srv.start()
            assert up.flush(timeout=30)
            c = up.counters
        finally:
            up.close()
    reports = srv.state.batch_reports
    stats = [r["stats_generation"] for r in reports if r["statistics"]]
    assert stats == [5] or stats == [1, 5]  # the newest once (and the first, if it was in flight already)
    assert len(stats) == 5 - superseded
    order = [("s" if r["statistics"] else "b") + str(r["stats_generation"]) for r in reports]
    assert order[-3:] == ["b4", "s5", "b5"]  # the newest where it was queued: after the fourth batch's report
    assert [r for r in order if r[0] == "b"] == ["b1", "b2", "b3", "b4", "b5"]
    assert c.uploaded == 10 and c.reports_sent == 5 + len(stats)
    if spooled:
        assert not list((tmp_path / "spool").iterdir())
