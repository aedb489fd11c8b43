"""Jittered exponential back-off, one rule for every retry loop of the edge (the uplink's sends, the blob poller).

Retry ``attempt`` (0-based) waits ``min(cap, base * 2**attempt)`` seconds times a uniform jitter in [0.5, 1], so
edges that lost the cloud together do not come back in step (the "equal jitter" family of AWS's Architecture Blog
post "Exponential Backoff And Jitter", 2015)."""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """Delays of a jittered exponential back-off between ``base_s`` and ``cap_s`` seconds.

    Example:
        >>> b = Backoff(0.5, 30.0, rng=random.Random(0))
        >>> 0.25 <= b.delay(0) <= 0.5 and b.delay(10**6) <= 30.0
        True
    """

    def __init__(self, base_s: float, cap_s: float, *, rng: random.Random | None = None) -> None:
        self.base_s, self.cap_s = base_s, cap_s
        self._rng = rng if rng is not None else random.Random()

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry ``attempt`` (0-based)."""
        return min(self.cap_s, self.base_s * 2.0 ** min(attempt, 32)) * self._rng.uniform(0.5, 1.0)

    def jitter(self, seconds: float) -> float:
        """``seconds`` times the same jitter (a fixed pause that many edges must not take in step)."""
        return seconds * self._rng.uniform(0.5, 1.0)
