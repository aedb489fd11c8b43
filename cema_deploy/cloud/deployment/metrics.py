"""The timing figures of one deployment: upload-to-blob latency (a histogram since the start and the newest
10,000), blob publish delays, and seconds per adaptation job. Read by ``/metrics``
(:mod:`cema_deploy.cloud.service.api`)."""

from __future__ import annotations

import collections
import math
from typing import Any

import numpy as np

#: Upper bounds (seconds) of the upload-to-blob histogram: 10 ms x 1.2^i, up to about 10 minutes (a bench reads
#: per-run quantiles from the differences of two scrapes, to within a factor 1.2).
LATENCY_BUCKETS = tuple(round(0.01 * 1.2**i, 4) for i in range(62))


class Timings:
    """The timing figures of one deployment; the deployment calls every method under its lock."""

    def __init__(self) -> None:
        self.latencies: collections.deque[float] = collections.deque(maxlen=10_000)
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last: +Inf
        self.latency_sum = 0.0
        self.publish_delays: collections.deque[float] = collections.deque(maxlen=1_000)
        self.seconds = [0.0, 0]  # adaptation jobs: seconds, count

    def latency(self, seconds: float) -> None:
        """One upload's (or calibration's) samples reached a published blob ``seconds`` after its ack."""
        self.latencies.append(seconds)
        self.latency_sum += seconds
        self.buckets[next((i for i, b in enumerate(LATENCY_BUCKETS) if seconds <= b), len(LATENCY_BUCKETS))] += 1

    def job(self, seconds: float) -> None:
        """One adaptation job took ``seconds``."""
        self.seconds = [self.seconds[0] + seconds, self.seconds[1] + 1]

    def mean_job_s(self) -> float:
        """Mean seconds per adaptation job (1.0 before the first)."""
        return self.seconds[0] / self.seconds[1] if self.seconds[1] else 1.0

    def figures(self) -> dict[str, Any]:
        """The timing part of :meth:`Deployment.metrics <cema_deploy.cloud.deployment.Deployment.metrics>`."""
        lat = np.asarray(self.latencies) if self.latencies else None
        return {
            "step_seconds_sum": float(self.seconds[0]),
            "step_seconds_count": int(self.seconds[1]),
            # over the newest 10,000 uploads; the histogram below counts every upload since the start
            "upload_to_blob_p50_s": float(np.percentile(lat, 50)) if lat is not None else math.nan,
            "upload_to_blob_p99_s": float(np.percentile(lat, 99)) if lat is not None else math.nan,
            "upload_to_blob_buckets": list(
                zip([*LATENCY_BUCKETS, math.inf], np.cumsum(self.buckets).tolist(), strict=True)
            ),
            "upload_to_blob_sum_s": self.latency_sum,
            "upload_to_blob_count": int(sum(self.buckets)),
            # from a blob's creation to polls seeing it (the blob written and fsynced)
            "publish_delay_p99_s": float(np.percentile(self.publish_delays, 99)) if self.publish_delays else math.nan,
        }
