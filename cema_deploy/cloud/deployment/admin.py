"""Admin actions and rollback reports: operator reset (a new generation), freeze and unfreeze; a version rolled back
by ``rollback_devices`` devices is marked bad and the state behind the last good version is published anew."""

from __future__ import annotations

import threading
import time

from cema_deploy.cloud.deployment.publishing import PublishingMixin
from cema_deploy.cloud.deployment.state import _MAX_BAD, log
from cema_deploy.cloud.errors import Refused
from cema_deploy.contract.messages import DeploymentStatus, EdgeReport
from cema_deploy.exceptions import CloudError


class AdminMixin(PublishingMixin):
    """Operator actions, rollback reports and the reset / restore jobs of a
    :class:`~cema_deploy.cloud.deployment.Deployment`."""

    def edge_report(self, report: EdgeReport, *, device: str = "") -> None:
        """Record a rollback/refusal report; once ``rollback_devices`` distinct devices rolled a version back, it
        is marked bad and the deployment returns to the state behind the last good version (published anew)."""
        self.store.append_report({**report.to_json(), "device": device, "received": time.time()})
        with self._cond:
            self.counters[f"report:{report.kind}"] += 1
            v = report.version
            if report.kind != "rollback" or not 0 < v <= self.version or v in self.bad:
                return
            devices = self._rollbacks.setdefault(v, set())
            devices.add(device)
            if len(devices) < self.spec.rollback_devices or self._restore is not None or self.pinned is not None:
                return  # while pinned the operator chose the version: nothing is marked bad
            older = [x for x in self.store.blob_versions() if x < v and x not in self.bad]
            good = next((x for x in reversed(older) if self.store.snapshot_path(x).exists()), 0)
            self._restore = (v, good)
            log.warning(
                "%s: version %d rolled back by %d devices %s; returning to the state behind version %d",
                self.name,
                v,
                len(devices),
                sorted(devices),
                good,
            )
            for old in [x for x in self._rollbacks if x < v - 4 * self.spec.keep_blobs]:
                del self._rollbacks[old]
            self._cond.notify_all()

    def admin(self, action: str, timeout: float = 300.0) -> DeploymentStatus:
        """Operator actions: ``reset`` (waits until the reset blob is published), ``freeze``, ``unfreeze``."""
        if action == "reset":
            ev = threading.Event()
            with self._cond:
                self._reset_waiters.append(ev)
                self._cond.notify_all()
            if not ev.wait(timeout):
                raise CloudError(f"Reset of {self.name} did not finish within {timeout:.0f} s.")
            return self.status()
        if action not in ("freeze", "unfreeze"):
            raise Refused(f"Unknown admin action {action!r}; expected reset, freeze or unfreeze.", 404)
        with self._cond:
            self.frozen = action == "freeze"
            if not self.frozen and self._dirty:
                self._publish_req = True  # what was learnt while frozen is published at once
            self.counters[f"admin:{action}"] += 1
            state = self._state_json()
            self._cond.notify_all()
        self.store.save_state(state)
        log.warning("%s: %s by the operator", self.name, "frozen" if self.frozen else "unfrozen")
        return self.status()

    def _do_restore(self) -> None:
        with self._cond:
            assert self._restore is not None
            bad, good = self._restore
        snap = self.store.load_adapt(self.store.snapshot_path(good)) if good > 0 else None
        self.cema.load_state_dict(snap["cema"] if snap is not None else self.cema._initial, steps=False)
        with self._cond:
            self._restore = None
            self.bad = sorted(set(self.bad) | set(range(bad, self.version + 1)))[-_MAX_BAD:]
        self._commit("restores", publish=True, seconds=0.0)
        log.warning(
            "%s: versions %d..%d marked bad; published the state of version %d anew",
            self.name,
            bad,
            self.version - 1,
            good,
        )

    def _do_reset(self) -> None:
        with self._write_lock:  # no upload is stored while the deployment is reset
            self.cema.reset()
            with self._cond:
                waiters, self._reset_waiters = self._reset_waiters, []
                s = self.samples
                dropped = s.take_all()
                self.generation += 1
                self.calibrated, self.episode_n, self.shift_step = False, 0, -1
                self._replay_due, self._publish_req = None, False
                self._awaiting.clear()
                self._awaiting_cal.clear()
                self._attributed = self.full_steps
                cursor, stats_cursor, calib_done = s.adapt_total, s.stats_total, s.next_seq - 1
            self._commit(
                "resets",
                publish=True,
                seconds=0.0,
                check=False,
                cursor=cursor,
                stats_cursor=stats_cursor,
                calib_done=calib_done,
                released=dropped,
            )
        log.warning(
            "%s: reset by the operator; generation %d, %d uploads deleted", self.name, self.generation, len(dropped)
        )
        for ev in waiters:
            ev.set()
