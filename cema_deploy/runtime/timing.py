"""Latency and throughput measurement: warm-up excluded, engines interleaved so they share the machine's noise."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True, kw_only=True)
class Timing:
    """Measured calls of one engine at one batch size."""

    batch: int
    calls: int
    seconds: float
    throughput: float  # images per second
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    def to_dict(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def timing_from_latencies(latencies_s: list[float], *, batch: int) -> Timing:
    lat = np.asarray(latencies_s, dtype=np.float64) * 1e3
    total = float(lat.sum() / 1e3)
    return Timing(
        batch=batch,
        calls=len(lat),
        seconds=total,
        throughput=batch * len(lat) / total if total > 0 else 0.0,
        p50_ms=float(np.percentile(lat, 50)),
        p90_ms=float(np.percentile(lat, 90)),
        p99_ms=float(np.percentile(lat, 99)),
        max_ms=float(lat.max()),
    )


def measure_interleaved(
    engines: Mapping[str, Callable[[], Any]],
    *,
    batch: int,
    warmup: int = 3,
    rounds: int = 3,
    seconds_per_round: float = 1.0,
    min_calls_per_round: int = 3,
    on_round: Callable[[str, int], None] | None = None,
) -> dict[str, Timing]:
    """Time each engine (a no-argument callable running one batch) in alternating rounds.

    Each engine is warmed up, then the engines take turns for ``rounds`` rounds of ``seconds_per_round``
    (at least ``min_calls_per_round`` calls), so slow drifts of a noisy machine hit all of them alike and
    ratios between them are meaningful.
    """
    for fn in engines.values():
        for _ in range(warmup):
            fn()
    latencies: dict[str, list[float]] = {name: [] for name in engines}
    for r in range(rounds):
        for name, fn in engines.items():
            if on_round:
                on_round(name, r)
            start = time.perf_counter()
            n = 0
            while n < min_calls_per_round or time.perf_counter() - start < seconds_per_round:
                t0 = time.perf_counter()
                fn()
                latencies[name].append(time.perf_counter() - t0)
                n += 1
    return {name: timing_from_latencies(lat, batch=batch) for name, lat in latencies.items()}
