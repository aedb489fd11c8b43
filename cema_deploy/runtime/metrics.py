"""Edge metrics in the Prometheus text format (0.0.4), served by a stdlib HTTP thread (``edge run --metrics-port``).

No new dependency: :class:`MetricsServer` is an ``http.server`` on its own daemon thread that answers
``GET /metrics`` with :func:`prometheus_text` of the runtime's :meth:`~cema_deploy.runtime.edge.EdgeRuntime.metrics`
and its latency histogram. It binds 127.0.0.1 unless told otherwise: the metrics name versions and counts, not
frames, but an operator decides who may read them. Never imports torch.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cema_deploy._prometheus import Exposition, number
from cema_deploy.contract.protocol import METRICS_MEDIA_TYPE, METRICS_PATH
from cema_deploy.exceptions import CemaError

__all__ = ["LatencyHistogram", "MetricsServer", "prometheus_text"]

#: Upper bounds (seconds) of the batch latency histogram's buckets.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LatencyHistogram:
    """A cumulative histogram of per-batch serving latency (seconds), thread-safe."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self.buckets = buckets
        self._counts = [0] * (len(buckets) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.buckets, seconds)] += 1
            self._sum += seconds

    def snapshot(self) -> tuple[list[tuple[float, int]], float, int]:
        """(cumulative (le, count) pairs ending with +Inf, sum, count)."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        out, acc = [], 0
        for le, c in zip((*self.buckets, math.inf), counts, strict=True):
            acc += c
            out.append((le, acc))
        return out, total, acc


def prometheus_text(m: dict[str, Any], latency: LatencyHistogram | None = None) -> str:
    """The Prometheus text exposition of an edge runtime's metrics dict (see ``EdgeRuntime.metrics``)."""
    out = Exposition()

    def metric(name: str, kind: str, help_: str, samples: list[tuple[dict[str, str], float]]) -> None:
        out.metric(f"cema_edge_{name}", kind, help_, samples)

    up = m.get("uplink") or {}
    sel = m.get("selection") or {}
    metric("frames_total", "counter", "Frames run since start.", [({}, m["frames"])])
    metric(
        "frames_per_second",
        "gauge",
        "Frames per second: busy = time spent serving, wall = since start.",
        [({"basis": "busy"}, m["fps"]), ({"basis": "wall"}, m["wall_fps"])],
    )
    if latency is not None:
        buckets, total, count = latency.snapshot()
        name = "cema_edge_batch_latency_seconds"
        out.header(name, "histogram", "Serving latency of one batch (infer and select).")
        for le, c in buckets:
            out.sample(f"{name}_bucket", {"le": number(le)}, c)
        out.sample(f"{name}_sum", {}, float(total))
        out.sample(f"{name}_count", {}, count)
    metric(
        "selection_total",
        "counter",
        "Frames by the selection rule that decided them (kept = selected; not_drawn: a share rule did not draw it).",
        [
            ({"rule": r}, sel.get(k, 0))
            for r, k in (
                ("kept", "selected"),
                ("unreliable", "unreliable"),
                ("low_info", "low_info"),
                ("redundant", "redundant"),
                ("not_drawn", "not_drawn"),
            )
        ],
    )
    metric(
        "uploaded_frames_total",
        "counter",
        "Frames the cloud acknowledged, by sample kind.",
        [({"kind": k}, v) for k, v in (m.get("uploaded") or {}).items()],
    )
    metric(
        "uploaded_ratio",
        "gauge",
        "Frames uploaded (all kinds) over frames run.",
        [({}, m.get("uploaded_pct", 0.0) / 100.0)],
    )
    metric(
        "uplink_queue_samples",
        "gauge",
        "Samples waiting to be uploaded (memory queue or spool).",
        [({}, m.get("queued_now", 0))],
    )
    metric("uplink_spool_bytes", "gauge", "Bytes in the durable upload spool.", [({}, m.get("spool_bytes", 0))])
    metric(
        "uplink_dropped_total",
        "counter",
        "Samples that never reached the cloud, by cause.",
        [
            ({"cause": c}, up.get(k, 0))
            for c, k in (
                ("queue_full", "dropped_queue"),
                ("spool_full", "dropped_spool"),
                ("rejected", "rejected"),
                ("stale_generation", "stale_generation"),
            )
        ],
    )
    metric(
        "uplink_retries_total", "counter", "Requests repeated after a retryable failure.", [({}, up.get("retries", 0))]
    )
    metric(
        "batch_reports_total",
        "counter",
        "Batch reports by outcome.",
        [({"outcome": "sent"}, up.get("reports_sent", 0)), ({"outcome": "dropped"}, up.get("reports_dropped", 0))],
    )
    metric("refits_total", "counter", "Blobs applied (hot refits).", [({}, m["blobs_applied"])])
    metric(
        "refused_total",
        "counter",
        "Blobs refused, by reason.",
        [({"reason": r}, v) for r, v in sorted((m.get("refused") or {}).items())],
    )
    metric(
        "rollbacks_total",
        "counter",
        "Refits rolled back, by reason.",
        [({"reason": r}, v) for r, v in sorted((m.get("rollbacks_by_reason") or {}).items())],
    )
    metric("serving_version", "gauge", "Version of the parameters serving now.", [({}, m["version"])])
    if m.get("refit_path"):
        metric(
            "refit_path_info",
            "gauge",
            "How refits reach the engine (inplace, prepared, plain, slots), 1 for the path in use.",
            [({"path": str(m["refit_path"])}, 1)],
        )
    metric(
        "generation",
        "gauge",
        "Deployment generation this edge works in (0: not known yet).",
        [({}, m.get("generation", 0))],
    )
    metric(
        "seconds_since_last_blob",
        "gauge",
        "Seconds since a blob was last applied (since start when none was).",
        [({}, m.get("seconds_since_last_blob", 0.0))],
    )
    metric(
        "calibrations_total",
        "counter",
        "Calibration batches queued, by reason.",
        [({"reason": r}, v) for r, v in sorted((m.get("calibrations") or {}).items())],
    )
    metric("poll_errors_total", "counter", "Failed blob polls.", [({}, m.get("poll_errors", 0))])
    metric(
        "frames_unreadable_total",
        "counter",
        "Source frames that could not be read and were skipped.",
        [({}, m.get("frames_unreadable", 0))],
    )
    if m.get("cloud_up") is not None:  # only with a cloud over HTTP
        metric(
            "cloud_up",
            "gauge",
            "1 when the cloud answered the edge's last request, 0 when it was unreachable (or never answered).",
            [({}, 1 if m.get("cloud_up") else 0)],
        )
        metric(
            "cloud_outages_total", "counter", "Times the cloud became unreachable.", [({}, m.get("cloud_outages", 0))]
        )
        refusal = m.get("cloud_refusal") or {}
        metric(
            "cloud_refused",
            "gauge",
            "1 while the cloud refuses this device (token, scope, fingerprint); its uploads are held, not dropped.",
            [({"status": str(refusal.get("status", ""))}, 1)] if refusal else [({}, 0)],
        )
        metric(
            "cloud_refusals_total",
            "counter",
            "Uploads and reports the cloud refused because of this device (kept and retried).",
            [({}, up.get("refusals", 0))],
        )
    st = m.get("stats") or {"mode": "off"}  # the edge's own statistics (runtime/stats/adapter.py)
    metric("stats_mode", "gauge", "The statistics adapter's mode (1 for the one in use).", [({"mode": st["mode"]}, 1)])
    metric(
        "stats_local_generation",
        "gauge",
        "Refits of the edge's own statistics under the serving cloud version (never a cloud version).",
        [({}, st.get("local_generation", 0))],
    )
    metric("stats_probes_total", "counter", "Batches run through the statistics probe.", [({}, st.get("probes", 0))])
    metric("stats_resets_total", "counter", "Statistics reset to the source on a shift.", [({}, st.get("resets", 0))])
    return out.text()


class MetricsServer:
    """``GET /metrics`` on ``host:port`` (port 0: any free port, see :attr:`port`), on a daemon thread.

    Example:
        >>> srv = MetricsServer(lambda: prometheus_text(rt.metrics(), rt.latency), port=9464)  # doctest: +SKIP
        >>> srv.close()  # doctest: +SKIP
    """

    def __init__(self, render: Callable[[], str], *, host: str = "127.0.0.1", port: int = 0) -> None:
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.split("?")[0] != METRICS_PATH:
                    self.send_error(404, "only /metrics is served here")
                    return
                try:
                    body = render().encode()
                except Exception as exc:  # a metrics read must never take the edge down
                    self.send_error(500, f"metrics unavailable: {exc!r}"[:200])
                    return
                self.send_response(200)
                self.send_header("Content-Type", METRICS_MEDIA_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        try:
            self._httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise CemaError(f"Cannot serve metrics on {host}:{port} ({exc}); choose another --metrics-port.") from exc
        self._httpd.daemon_threads = True
        self.host, self.port = host, int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="cema-metrics", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{METRICS_PATH}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5.0)
