"""The edge's Prometheus endpoint over real HTTP: the exposition matches the runtime's own metrics."""

from __future__ import annotations

import urllib.error
import urllib.request

import numpy as np
import pytest

from cema_deploy.contract.blob import RefitBlob, blob_from_path, blob_to_bytes
from cema_deploy.runtime.backends.registry import get_backend
from cema_deploy.runtime.edge import EdgeRuntime
from cema_deploy.runtime.metrics import LatencyHistogram, MetricsServer, prometheus_text
from cema_deploy.runtime.selection.rules import SampleSelector, SelectionConfig
from tests.conftest import needs_torch
from tests.runtime.conftest import images


def _parse(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line[:1] != "#"}


def test_latency_histogram_is_cumulative() -> None:
    h = LatencyHistogram(buckets=(0.01, 0.1, 1.0))
    for s in (0.005, 0.01, 0.05, 0.5, 3.0):
        h.observe(s)
    buckets, total, count = h.snapshot()
    assert [c for _, c in buckets] == [2, 3, 4, 5] and count == 5 and total == pytest.approx(3.565)


@needs_torch
@pytest.mark.network
def test_metrics_over_http_match_the_runtime(exported) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    v0 = blob_from_path(out / "params.safetensors")
    cfg = SelectionConfig.for_classes(10, d_margin=None)
    with EdgeRuntime(get_backend("ort-cpu", out), SampleSelector(cfg)) as rt:
        srv = MetricsServer(lambda: prometheus_text(rt.metrics(), rt.latency), port=0)
        try:
            for i in range(3):
                rt.process(images(8, seed=i))
            assert not rt.apply_blob_bytes(
                blob_to_bytes(RefitBlob(tensors=v0.tensors, fingerprint="ff" * 32, version=4))
            )
            new = {k: v * 1.01 for k, v in v0.tensors.items()}
            assert rt.apply_blob_bytes(blob_to_bytes(RefitBlob(tensors=new, fingerprint=v0.fingerprint, version=5)))
            with urllib.request.urlopen(srv.url, timeout=5) as r:
                assert r.status == 200 and r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
                got = _parse(r.read().decode())
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(srv.url.replace("/metrics", "/other"), timeout=5)
            assert e.value.code == 404
            e.value.close()
            m = rt.metrics()
        finally:
            srv.close()
    assert srv.host == "127.0.0.1"
    s = m["selection"]
    assert got["cema_edge_frames_total"] == m["frames"] == 24
    assert got['cema_edge_batch_latency_seconds_bucket{le="+Inf"}'] == got["cema_edge_batch_latency_seconds_count"] == 3
    assert got["cema_edge_batch_latency_seconds_sum"] == pytest.approx(rt.busy_s)
    assert got['cema_edge_selection_total{rule="kept"}'] == s["selected"]
    assert got['cema_edge_selection_total{rule="unreliable"}'] == s["unreliable"]
    assert sum(v for k, v in got.items() if k.startswith("cema_edge_selection_total")) == 24
    assert got['cema_edge_refused_total{reason="fingerprint"}'] == 1 and got["cema_edge_refits_total"] == 1
    assert got["cema_edge_serving_version"] == 5 and got["cema_edge_uplink_queue_samples"] == 0
    assert m["refit_path"] == "hybrid" and got['cema_edge_refit_path_info{path="hybrid"}'] == 1
    assert 0 <= got["cema_edge_seconds_since_last_blob"] < got["cema_edge_frames_total"] * 1e6  # a number, not NaN
    assert np.isfinite(got['cema_edge_frames_per_second{basis="busy"}'])


@needs_torch
def test_frames_a_share_rule_did_not_draw_have_their_series(exported) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    with EdgeRuntime(
        get_backend("ort-cpu", out), SampleSelector(SelectionConfig.preset("random", 10, share=0.25))
    ) as rt:
        for i in range(3):
            rt.process(images(8, seed=i))
        m = rt.metrics()
    got = _parse(prometheus_text(m))
    assert m["selection"]["not_drawn"] == 18 and got['cema_edge_selection_total{rule="not_drawn"}'] == 18
    assert sum(v for k, v in got.items() if k.startswith("cema_edge_selection_total")) == m["frames"] == 24


@needs_torch
def test_metrics_are_one_consistent_snapshot_while_other_threads_write(exported) -> None:  # type: ignore[no-untyped-def]
    import sys
    import threading

    out, _ = exported("bn")
    v0 = blob_from_path(out / "params.safetensors")
    cfg = SelectionConfig.for_classes(10, d_margin=None)
    seen: list[tuple[int, int, int, int]] = []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can: any window shows
    try:
        with EdgeRuntime(get_backend("ort-cpu", out), SampleSelector(cfg)) as rt:
            done = threading.Event()

            def refuse_many() -> None:  # the poller's part: one verified refusal after another
                for v in range(1, 301):
                    rt.apply_blob_bytes(blob_to_bytes(RefitBlob(tensors=v0.tensors, fingerprint="ff" * 32, version=v)))
                done.set()

            t = threading.Thread(target=refuse_many)
            t.start()
            while not done.is_set():
                m = rt.metrics()
                seen.append((sum(m["refused"].values()), len(m["refused_versions"]), m["refused_upto"],
                             max(m["refused_versions"], default=0)))  # fmt: skip
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert len(seen) > 100 and seen[-1][0] <= 300
    assert [s for s in seen if s[0] != s[1] or s[2] != s[3]] == []  # counts, versions and floor agree every time
