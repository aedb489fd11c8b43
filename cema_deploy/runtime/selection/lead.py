"""The ``lead`` upload rule's arithmetic (beyond the paper; issue 22 item 4), numpy only.

The cloud sends with each blob one weight per class, ``w[c]``: how often the teacher disagrees with the replica on
uploads the replica predicts as ``c``, normalised to mean 1 (:mod:`cema_deploy.contract.lead`). The edge keeps frame
``i`` with probability ``p_i = min(1, s * w[pred_i])``, where ``pred_i`` is the class the serving parameters predict.
``s`` is chosen so that the expected share over the recently served predictions is the configured share: with ``h``
the recent prediction histogram, ``sum_c h_c min(1, s w_c) / sum_c h_c = share``. Without clipping that is the plain
``s = share / (mean of w over recent predictions)``; clipping at 1 (a class whose weight is far above the mean) would
lower the share, so ``s`` is raised until it does not (:func:`lead_scale`, by bisection: the left side is monotone
in ``s``). When no recently served class has a positive weight the rule cannot steer and the caller draws uniformly.

``h`` is an exponentially decayed count of the served predictions (:data:`LEAD_MEMORY` frames), updated with each
batch before its probabilities are computed, so the share holds as the prediction mix drifts.
"""

from __future__ import annotations

import numpy as np

__all__ = ["LEAD_MEMORY", "lead_probabilities", "lead_scale", "update_histogram"]

#: Frames the recent-prediction histogram remembers (its decay is ``1 - 1 / LEAD_MEMORY`` per frame): about 8 edge
#: batches of 64, long enough to estimate a 10-class mix, short enough to follow a corruption change.
LEAD_MEMORY = 512
_BISECT = 60  # halvings of the bracket of s: far below float precision of any share


def update_histogram(hist: np.ndarray | None, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``hist`` decayed by the frames of this batch, plus this batch's predictions ``pred`` (ints in [0, C))."""
    counts = np.bincount(pred, minlength=num_classes).astype(np.float64)[:num_classes]
    if hist is None:
        return counts
    return hist * (1.0 - 1.0 / LEAD_MEMORY) ** len(pred) + counts


def lead_scale(weights: np.ndarray, hist: np.ndarray, share: float) -> float | None:
    """The ``s`` with ``sum_c h_c min(1, s w_c) / sum_c h_c == share`` (``inf`` when even keeping every frame of a
    positive-weight class stays below the share); None when no class of ``hist`` has a positive weight."""
    total = float(hist.sum())
    mean = float((hist * weights).sum()) / total if total > 0 else 0.0
    if not mean > 0:
        return None
    reachable = float(hist[weights > 0].sum()) / total  # the share with every positive-weight frame kept
    if share >= reachable:
        return float("inf")

    def expected(s: float) -> float:
        return float((hist * np.minimum(1.0, s * weights)).sum()) / total

    lo = share / mean  # no clipping: exact; clipping only lowers expected(lo) below the share
    hi = 1.0 / float(weights[weights > 0].min())  # every positive weight clipped: expected(hi) = reachable > share
    if expected(lo) >= share:
        return lo
    for _ in range(_BISECT):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if expected(mid) < share else (lo, mid)
    return hi


def lead_probabilities(weights: np.ndarray, hist: np.ndarray, pred: np.ndarray, share: float) -> np.ndarray | None:
    """Keep-probabilities of frames predicted as ``pred`` (see the module docstring); None: draw uniformly."""
    s = lead_scale(weights, hist, share)
    if s is None:
        return None
    w = weights[pred]
    if np.isinf(s):
        return np.asarray(w > 0, dtype=np.float64)
    return np.asarray(np.minimum(1.0, s * w), dtype=np.float64)
