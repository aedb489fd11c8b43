"""The lead weights each published blob carries (beyond the paper; issue 22 item 4; ``CemaConfig.lead_frames``, off
when 0, as in the ``cema`` preset).

Distillation learns where the teacher and the edge's replica disagree, and only the cloud can see that. With each
publish it measures, on the current episode's newest ``lead_frames`` uploads, how often the teacher's argmax differs
from the argmax of the replica being published, per class the *replica* predicts, and sends that as one weight per
class (:func:`lead_weights`; the blob's ``lead`` field, :mod:`cema_deploy.contract.lead`). The edge's ``lead`` rule
(:mod:`cema_deploy.runtime.selection.lead`) then uploads frames it predicts as ``c`` in proportion to ``w[c]``.

Why per predicted class, not per entropy band: the index must be something the edge knows for every frame and that
means the same on both sides. The predicted class does (the blob's parameters predict it on the edge and on the
cloud's replica alike, up to the statistics), and under a corruption the errors concentrate on the few classes the
model collapses onto; an entropy band's meaning moves with every refit and every statistics update.

The teacher's label of an upload is taken once, when the upload is first scored (cached by sample index for the
episode): the replica is scored again at each publish, the teacher is not (it changes slowly, and one teacher
forward per upload keeps the cost at about one extra replica forward over ``lead_frames`` per publish).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from cema_deploy.cloud.deployment.state import DeploymentState

__all__ = ["LeadMixin", "lead_weights"]


def lead_weights(
    teacher_pred: np.ndarray, replica_pred: np.ndarray, num_classes: int, *, prior: float, mix: float
) -> np.ndarray:
    """Per class ``c`` of the replica's predictions, the smoothed rate at which the teacher disagrees, normalised to
    mean 1 over the classes and mixed with the uniform weight (every class keeps at least ``mix`` of the mean).

    ``d_c = (k_c + prior * r) / (n_c + prior)``: ``n_c`` uploads predicted as ``c`` by the replica, ``k_c`` of them
    labelled otherwise by the teacher, ``r`` the disagreement rate over all of them (a class seen rarely gets ``r``,
    not 0 or 1 from one frame). ``w = (1 - mix) * d / mean(d) + mix``. All ones when the two never disagree.

    Example:
        >>> lead_weights(np.array([0, 1, 1, 1]), np.array([0, 0, 1, 1]), 2, prior=0.0, mix=0.0).tolist()
        [2.0, 0.0]
    """
    teacher_pred, replica_pred = np.asarray(teacher_pred), np.asarray(replica_pred)
    n = np.bincount(replica_pred, minlength=num_classes)[:num_classes].astype(np.float64)
    k = np.bincount(replica_pred[teacher_pred != replica_pred], minlength=num_classes)[:num_classes]
    total = n.sum()
    rate = float(k.sum()) / total if total > 0 else 0.0
    if rate <= 0:
        return np.ones(num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(n + prior > 0, (k + prior * rate) / (n + prior), rate)
    return np.asarray((1.0 - mix) * d / d.mean() + mix)


class LeadMixin(DeploymentState):
    """Computes the lead weights of a :class:`~cema_deploy.cloud.deployment.Deployment`'s next blob."""

    _lead_teacher: dict[int, int] | None = None  # adapt index -> the teacher's argmax (this episode's uploads)
    _lead_last: dict[str, Any] | None = None  # the newest computation: frames, disagreement, weights, seconds

    def lead_last(self) -> dict[str, Any] | None:
        """The newest lead weights sent and what they were measured on (None before any)."""
        with self._cond:
            return None if self._lead_last is None else dict(self._lead_last)

    def _lead_for_blob(self) -> tuple[tuple[float, ...] | None, float]:
        """(The lead weights for the blob about to be published, seconds spent); None when off or nothing to
        measure on (the edge then draws uniformly while that blob serves)."""
        c = self.config
        if c.lead_frames <= 0:
            return None, 0.0
        t0 = time.perf_counter()
        with self._cond:
            s = self.samples
            lo, hi = s.window(s.adapt_total, self.episode_start)
            lo = max(lo, hi - c.lead_frames)
            frames = s.read_adapt(lo, hi) if hi > lo else None
        if frames is None or not len(frames):
            return None, 0.0
        cache = self._lead_teacher if self._lead_teacher is not None else {}
        self._lead_teacher = cache = {i: t for i, t in cache.items() if i >= lo}
        missing = [i for i in range(lo, hi) if i not in cache]
        if missing:
            teacher_logits, _ = self.cema.predict(frames[np.asarray(missing) - lo])
            cache.update(zip(missing, teacher_logits.argmax(axis=1).tolist(), strict=True))
        teacher = np.asarray([cache[i] for i in range(lo, hi)])
        replica = self.cema.predict_replica(frames).argmax(axis=1)
        w = lead_weights(teacher, replica, self.manifest.num_classes, prior=c.lead_prior, mix=c.lead_mix)
        seconds = time.perf_counter() - t0
        with self._cond:
            self._lead_last = {
                "frames": int(hi - lo),
                "disagreement": round(100.0 * float((teacher != replica).mean()), 2),
                "weights": [round(float(x), 4) for x in w],
                "seconds": round(seconds, 4),
            }
        return tuple(float(x) for x in w), seconds
