"""Where the teacher's lead is lost (issue 22), measured in the frontier's in-process runs (``run_job(...,
diagnose=True)``), with the labels the demo holds and the edge never sees:

* per corruption, on the frames the edge uploaded during it: the teacher's accuracy (the cloud's adapted teacher,
  its running statistics), the replica's (the cloud's edge copy after its steps) and the edge's (the serving
  parameters after the blobs), all taken at the corruption's end, plus the rollbacks during it. The replica close
  to the teacher but the edge not: the loss is in delivery (blob cadence, rollbacks, statistics); the replica far
  from the teacher: in distillation.
* a label-aware audit of every rollback verdict: the accuracy of the previous and the new parameters on the
  frames the verdict judged (found by content among the frames served), with the version, its predecessor, the
  scores, the frames and what made each version on the cloud (``calibration``, ``step``, ``replay``, ...).

:func:`audit_summary` gives the guard's precision (rolled-back blobs that were worse) and recall (blobs that lost
>= 5 points on their judged frames and were rolled back); :func:`rollbacks_per_corruption` the most rollbacks in one
corruption (issue 22's target: <= 1) and the blobs the edge declined unjudged while it held a rejected line.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

import numpy as np

#: A blob "loses" when its accuracy on the judged frames is this many points below its predecessor's.
LOSS_POINTS = 5.0


def _key(frame: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(frame).tobytes(), digest_size=16).digest()


class Diagnosis:
    """Collects what one frontier run needs for its diagnosis; see the module doc. ``kinds``: version -> the cloud
    job that published it (filled by a publish listener)."""

    def __init__(self) -> None:
        self.labels: dict[bytes, int] = {}
        self.kinds: dict[int, str] = {}
        self.verdicts: list[dict[str, Any]] = []
        self.corruptions: list[dict[str, Any]] = []
        self._segment = ""
        self._up_frames: list[np.ndarray] = []
        self._up_labels: list[np.ndarray] = []
        self._rollbacks_at_start = self._held_at_start = 0
        self._lock = threading.Lock()

    # ---- feeding --------------------------------------------------------------------------------------------
    def on_publish(self, version: int, job: str) -> None:
        with self._lock:
            self.kinds[version] = job or "unknown"

    def begin(self, segment: str, rollbacks: int, held: int = 0) -> None:
        """A corruption begins; ``rollbacks`` and ``held`` (blobs declined unjudged) are the edge's totals so far."""
        self._segment, self._rollbacks_at_start, self._held_at_start = segment, rollbacks, held
        self._up_frames, self._up_labels = [], []

    def served(self, frames: np.ndarray, labels: np.ndarray) -> None:
        """Frames (uint8 at model size) about to be served, with their labels: the audit finds judged frames here."""
        with self._lock:
            for f, y in zip(frames, labels, strict=True):
                self.labels[_key(f)] = int(y)

    def batch(self, frames: np.ndarray, labels: np.ndarray, uploaded: np.ndarray) -> None:
        """One edge batch once served: ``frames`` uint8 at model size, ``uploaded`` the frames that went up."""
        if uploaded.any():
            self._up_frames.append(frames[uploaded])
            self._up_labels.append(labels[uploaded])

    def end(
        self,
        *,
        teacher_pred: np.ndarray,
        replica_pred: np.ndarray,
        edge_pred: np.ndarray,
        rollbacks: int,
        held: int = 0,
    ) -> None:
        """The corruption's end: predictions of the teacher, the replica and the edge on :attr:`uploaded`."""
        _, y = self.uploaded
        self.corruptions.append(
            {
                "corruption": self._segment,
                "uploaded": len(y),
                "teacher_accuracy": _acc(teacher_pred, y),
                "replica_accuracy": _acc(replica_pred, y),
                "edge_accuracy": _acc(edge_pred, y),
                "rollbacks": rollbacks - self._rollbacks_at_start,
                "held": held - self._held_at_start,
            }
        )

    @property
    def uploaded(self) -> tuple[np.ndarray, np.ndarray]:
        """The frames uploaded during the current corruption and their labels."""
        if not self._up_frames:
            return np.zeros((0, 1, 1, 3), np.uint8), np.zeros(0, np.int64)
        return np.concatenate(self._up_frames), np.concatenate(self._up_labels)

    def audit(self, j: Any, frames: np.ndarray, old_logits: np.ndarray, new_logits: np.ndarray) -> None:
        """:attr:`RollbackMonitor.audit <cema_deploy.runtime.updates.rollback.RollbackMonitor.audit>`: one verdict
        scored against the labels of its judged frames."""
        with self._lock:
            labels = [self.labels.get(_key(f), -1) for f in frames]
            kinds = dict(self.kinds)
        y = np.asarray(labels, np.int64)
        known = y >= 0
        self.verdicts.append(
            {
                "corruption": self._segment,
                "version": int(j.version),
                "previous": int(j.previous_version),
                "kind": kinds.get(int(j.version), "unknown"),
                "previous_kind": kinds.get(int(j.previous_version), "unknown"),
                "score_previous": float(j.score_previous),
                "score_new": float(j.score_new),
                "allowed_drop": float(j.allowed_drop),
                "rollback": bool(j.rollback),
                "reason": j.reason,
                "frames": int(j.n),
                "labelled": int(known.sum()),
                "accuracy_previous": _acc(old_logits.argmax(1)[known], y[known]),
                "accuracy_new": _acc(new_logits.argmax(1)[known], y[known]),
            }
        )

    def as_dict(self) -> dict[str, Any]:
        audit = audit_summary(self.verdicts) | rollbacks_per_corruption(self.corruptions)
        return {"corruptions": self.corruptions, "verdicts": self.verdicts, "audit": audit}


def _acc(pred: np.ndarray, labels: np.ndarray) -> float | None:
    return 100 * float((np.asarray(pred) == labels).mean()) if len(labels) else None


def audit_summary(verdicts: list[dict[str, Any]], loss_points: float = LOSS_POINTS) -> dict[str, Any]:
    """Over labelled verdicts: ``rollbacks``, ``precision`` (share of rolled-back blobs worse on their judged
    frames), ``losing`` (blobs at least ``loss_points`` worse), ``recall`` (share of those rolled back), and the
    mean change of accuracy of the rolled-back ones (new - previous, points). None where the denominator is 0."""
    scored = [v for v in verdicts if v["accuracy_new"] is not None and v["accuracy_previous"] is not None]
    delta = [v["accuracy_new"] - v["accuracy_previous"] for v in scored]
    back = [d for v, d in zip(scored, delta, strict=True) if v["rollback"]]
    losing = [v for v, d in zip(scored, delta, strict=True) if d <= -loss_points]
    return {
        "verdicts": len(verdicts),
        "rollbacks": sum(1 for v in verdicts if v["rollback"]),
        "precision": sum(1 for d in back if d < 0) / len(back) if back else None,
        "losing": len(losing),
        "recall": sum(1 for v in losing if v["rollback"]) / len(losing) if losing else None,
        "rolled_back_mean_change": float(np.mean(back)) if back else None,
    }


def rollbacks_per_corruption(corruptions: list[dict[str, Any]]) -> dict[str, Any]:
    """Over the corruptions of a run: the most rollbacks in one (``max_rollbacks_per_corruption``), the
    corruptions with more than one, and the blobs declined unjudged (``held``; the edge's hold after a rollback)."""
    counts = [int(c["rollbacks"]) for c in corruptions]
    return {
        "max_rollbacks_per_corruption": max(counts, default=0),
        "corruptions_over_one_rollback": sum(1 for n in counts if n > 1),
        "held": sum(int(c.get("held", 0)) for c in corruptions),
    }
