"""Upload budgets (beyond the paper): hold the share of frames an edge uploads at a target.

Everything that goes up counts: selected samples, whole calibration batches and statistics samples. Before each
batch the controller asks for ``f = target + deficit / horizon``: the target share plus a correction that pays
back what was over- or under-spent so far (``deficit = target x frames seen - frames uploaded``), spread over
``horizon`` frames. Rules then meet ``f`` their own way:

* ``random`` and ``entropy-top`` pick ``f x N`` frames of a batch (an accumulator carries the fractions, so the
  long-run share is exact);
* the entropy rules (CEMA, EATA-style) keep E_min and the redundancy rule and steer E_max's *scale*: over a ring
  of the last ``window`` entropies the controller finds the threshold below which (and above E_min) a share
  ``f`` of frames lies, and reports it as a multiple of the rule's own E_max(t). The redundancy rule and an
  E_min that excludes most frames can keep the achieved share below ``f``; the deficit then raises ``f``.

Example:
    >>> c = BudgetController(0.1, horizon=64)
    >>> c.request(), c.take(64 * 0.1)
    (0.1, 6)
"""

from __future__ import annotations

import collections
import math
from typing import Any

import numpy as np

from cema_deploy.exceptions import CemaError


class BudgetError(CemaError, ValueError):
    """An upload budget out of range."""


#: Bounds of the E_max scale the controller may choose (a guard against a degenerate entropy ring).
SCALE_BOUNDS = (1e-3, 1e3)


class BudgetController:
    """Tracks frames seen and uploaded and answers the share to aim at for the next batch."""

    def __init__(self, target: float, *, horizon: int = 512, window: int = 1024) -> None:
        if not 0 < target <= 1:
            raise BudgetError(f"The upload budget must be a share in (0, 1], got {target}.")
        if horizon < 1 or window < 1:
            raise BudgetError(f"horizon and window must be >= 1, got {horizon}, {window}.")
        self.target, self.horizon = target, horizon
        self.seen = 0
        self.uploaded = 0
        self._carry = 0.0
        self._ring: collections.deque[float] = collections.deque(maxlen=window)

    @property
    def achieved(self) -> float:
        """Share of frames uploaded so far (all kinds)."""
        return self.uploaded / self.seen if self.seen else 0.0

    def request(self) -> float:
        """The share to aim at in the next batch, in [0, 1]."""
        deficit = self.target * self.seen - self.uploaded
        return min(1.0, max(0.0, self.target + deficit / self.horizon))

    def take(self, expected: float) -> int:
        """Whole frames to pick when ``expected`` (a fractional count) are due; fractions carry to the next call."""
        self._carry += max(0.0, expected)
        k = int(self._carry)
        self._carry -= k
        return k

    def record(self, seen: int, uploaded: int) -> None:
        """Account one batch: ``seen`` frames, ``uploaded`` of them sent (any kind)."""
        self.seen += int(seen)
        self.uploaded += int(uploaded)

    def observe(self, entropy: np.ndarray) -> None:
        """Add a batch's finite entropies to the ring the E_max scale is chosen from."""
        self._ring.extend(float(e) for e in entropy if math.isfinite(e))

    def e_max_scale(self, e_max: float, e_min: float | None, share: float) -> float:
        """The multiple of ``e_max`` below which (and above ``e_min``) ``share`` of the ring's entropies lie."""
        if not self._ring or e_max <= 0:
            return 1.0
        ring = np.sort(np.fromiter(self._ring, np.float64))
        lo = int(np.searchsorted(ring, e_min, side="right")) if e_min is not None else 0
        k = lo + math.ceil(share * len(ring))
        if share <= 0:
            return SCALE_BOUNDS[0]
        # threshold just above the k-th entropy (the rule keeps E < E_max): halfway to the next value
        theta = ring[-1] * 1.0001 + 1e-9 if k >= len(ring) else 0.5 * (ring[k - 1] + ring[k]) if k > 0 else ring[0]
        return float(min(max(theta / e_max, SCALE_BOUNDS[0]), SCALE_BOUNDS[1]))

    def state_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "horizon": self.horizon,
            "seen": self.seen,
            "uploaded": self.uploaded,
            "carry": self._carry,
            "ring": list(self._ring),
            "window": self._ring.maxlen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen, self.uploaded, self._carry = int(state["seen"]), int(state["uploaded"]), float(state["carry"])
        self._ring = collections.deque((float(v) for v in state["ring"]), maxlen=int(state["window"]))
