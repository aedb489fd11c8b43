"""The cloud-side gate before publishing (beyond the paper, issue 22 item 6; ``CemaConfig.gate``, off in the
``cema`` preset): after a step, the candidate replica is scored against the last published one on the current
episode's uploads by agreement with the teacher's argmax (the cloud holds the episode boundaries and the stronger
model; the edge has neither). The candidate is published only if it agrees no less than the published one, less
``gate_margin`` points; a refused candidate is dropped: the replica returns to the published parameters and its
optimizer's momentum is cleared, so the replica's line only ever holds published states. Every decision is counted
(``gate_passed``, ``gate_refused``), logged, and kept (:meth:`GateMixin.gate_decisions`, the last in ``metrics``).
Calibrations, resets, restores and operator publishes are not gated: they are the episode's new reference."""

from __future__ import annotations

import collections
from typing import Any

import numpy as np

from cema_deploy.cloud.deployment.state import DeploymentState, log

#: The jobs whose publish the gate judges (counters of ``_commit``): the learning steps.
GATED = ("steps", "replay_steps", "idle_steps")
#: Gate decisions kept in memory (the newest).
_KEEP = 4096


class GateMixin(DeploymentState):
    """The gate of a :class:`~cema_deploy.cloud.deployment.Deployment` (see the module docstring)."""

    #: (version, blob tensors) of the last publish this process made; None before it (the first gated step passes).
    _gate_ref: tuple[int, dict[str, np.ndarray]] | None = None
    _gate_log: collections.deque[dict[str, Any]] | None = None

    def gate_decisions(self) -> list[dict[str, Any]]:
        """Every gate decision kept, oldest first: ``job``, ``step``, ``reference`` (the published version the
        candidate was judged against), ``candidate_agreement`` and ``reference_agreement`` (% of ``frames``
        on which each replica's argmax is the teacher's), ``frames``, ``passed``, ``version`` (published, or None)."""
        with self._cond:
            return list(self._gate_log or ())

    def metrics(self) -> dict[str, Any]:
        """The deployment's metrics plus ``gate_last``, the gate's newest decision (where it has made one)."""
        out = super().metrics()
        with self._cond:
            if self._gate_log:
                out["gate_last"] = dict(self._gate_log[-1])
        return out

    def _gate_judge(self, counter: str) -> dict[str, Any] | None:
        """Judge the candidate this ``counter`` job made; None where the gate does not apply. On a refusal the
        replica is back at the published parameters when this returns."""
        c = self.config
        if not c.gate or counter not in GATED:
            return None
        with self._cond:
            s, ref = self.samples, self._gate_ref
            lo, hi = s.window(s.adapt_total, self.episode_start)
            lo = max(lo, hi - c.gate_frames)
            frames = s.read_adapt(lo, hi) if hi > lo and ref is not None else None
        rec: dict[str, Any] = {
            "job": counter,
            "step": self.cema.steps,
            "reference": None if ref is None else ref[0],
            "candidate_agreement": None,
            "reference_agreement": None,
            "frames": 0 if frames is None else len(frames),
            "passed": True,
        }
        if ref is None or frames is None or not len(frames):
            return rec  # nothing to judge against or on: the candidate passes
        candidate = self.cema.blob_tensors()
        teacher, student = self.cema.predict(frames)
        self.cema.load_replica(ref[1])
        published = self.cema.predict_replica(frames)
        target = teacher.argmax(1)
        cand = 100.0 * float((student.argmax(1) == target).mean())
        old = 100.0 * float((published.argmax(1) == target).mean())
        passed = cand >= old - c.gate_margin
        if passed:
            self.cema.load_replica(candidate)
        else:
            self.cema.opt_student.state.clear()  # the refused direction's momentum goes with it
        rec.update(candidate_agreement=round(cand, 2), reference_agreement=round(old, 2), passed=passed)
        return rec

    def _gate_record(self, rec: dict[str, Any], version: int | None) -> None:
        """Keep and count one decision (under the lock), ``version``: what the candidate was published as."""
        rec["version"] = version
        if self._gate_log is None:
            self._gate_log = collections.deque(maxlen=_KEEP)
        self._gate_log.append(rec)
        self.counters["gate_passed" if rec["passed"] else "gate_refused"] += 1
        log.info(
            "%s: gate %s the %s candidate (agreement with the teacher %s %% vs %s %% of version %s, %d frames)",
            self.name,
            "passed" if rec["passed"] else "refused",
            rec["job"],
            rec["candidate_agreement"],
            rec["reference_agreement"],
            rec["reference"],
            rec["frames"],
        )
