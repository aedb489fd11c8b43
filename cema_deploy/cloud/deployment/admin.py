"""Admin actions and rollback reports: operator reset (a new generation), freeze and unfreeze; a version rolled back
by ``rollback_devices`` devices is marked bad and the state behind the last good version is published anew.

A deployment is shared by many devices, any of which may lag, restart on an old state or report wrongly, so a
rollback report counts only within bounds (:meth:`AdminMixin.edge_report`): the version was published by this state
and is not bad; the reporter serves nothing newer (its newest upload's ``edge_version``); the state to return to is
a kept snapshot (``keep_blobs``) before the version, never the export unless the generation was never calibrated and
every version since is kept; and that state is at or after the generation's *floor*, the version that published its
newest calibration or reset (no restore while a calibration applied under freeze is unpublished). So no set of
reports returns a calibrated deployment to source statistics, ``calibrated`` always describes what is served, and no
restore crosses a reset. A restore re-checks the bounds when it runs (a reset or calibration may have come first, a
snapshot may have been pruned) and is dropped, never degraded to the export, when they no longer hold.

**A sole device's report** (issue 22; beyond the paper). With one device, ``rollback_devices = 2`` meant the cloud
never acted: the device rolled back every later blob of the same trajectory (chains of ~15), and with
``rollback_devices = 1`` the deployment oscillated (44 restores in 90 batches). So a report from the *only* device
the deployment has heard from (its line is the deployment's line: it can harm no one else) restores, within the
same bounds, once per *episode* (the versions since ``floor``, the newest calibration or reset): a second report in
the same episode is counted (``report:hysteresis``) and nothing else happens, so the deployment never oscillates
between a restore and the trajectory that follows it; the edge, for its part, holds the episode's line after a
rollback (``runtime/updates/ledger.py``). Fleets keep the two-device rule: once any other device is known, a
version is marked bad only when ``rollback_devices`` distinct devices rolled it back, as before, without the
once-per-episode limit (independent devices agreeing are the stronger signal).
"""

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

    #: ``floor`` of the episode in which a sole device's report restored the deployment (at most once per episode;
    #: not saved: a restarted cloud may act once more in the episode it restarts in).
    _sole_restored_floor: int | None = None

    def edge_report(self, report: EdgeReport, *, device: str = "") -> str:
        """Record a rollback/refusal report and say what it did. A rollback report counts only within the bounds
        below; once ``rollback_devices`` distinct devices rolled a version back, it and every version built on it
        are marked bad and the deployment returns to the newest good kept state before it (published anew).

        The bounds (a deployment shared by many devices, any of which may lag, restart on old state or lie):
        the version was published by this state and is not bad already; the reporter serves nothing newer (its
        latest upload's ``edge_version``); the state to return to is a *kept* snapshot (``keep_blobs``), never
        the export by default; and it is at or after the version that published the generation's newest
        calibration or reset (``floor``), so ``calibrated`` stays true of what is served. Reports outside the
        bounds are recorded and counted (``report:ignored``), nothing else. A deployment that has heard from the
        reporter only acts on its report alone, once per episode (module doc: a sole device's report)."""
        self.store.append_report({**report.to_json(), "device": device, "received": time.time()})
        with self._cond:
            self.counters[f"report:{report.kind}"] += 1
            if report.kind != "rollback":
                return "recorded"
            v = report.version
            why, good = self._rollback_bounds(v, device)
            if why:
                self.counters["report:ignored"] += 1
                log.info("%s: rollback report of version %d from %r ignored: %s", self.name, v, device, why)
                return f"ignored: {why}"
            devices = self._rollbacks.setdefault(v, set())
            devices.add(device)
            if self.pinned is not None:  # the operator chose the version: nothing is marked bad
                return "counted: pinned, nothing is marked bad while pinned"
            sole = len(devices) < self.spec.rollback_devices and set(self._device_versions) <= {device}
            if len(devices) < self.spec.rollback_devices and not sole:
                return f"counted: {len(devices)} of {self.spec.rollback_devices} devices"
            if sole and self._sole_restored_floor == self.floor:
                self.counters["report:hysteresis"] += 1
                return (f"counted: the sole device's line was restored once in this episode (since version "
                        f"{self.floor}) already; not again until the next calibration or reset")  # fmt: skip
            if self._restore is not None:
                return "counted: a restore is under way"
            if sole:
                self._sole_restored_floor = self.floor
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
            return f"restoring the state of version {good}"

    def _rollback_bounds(self, v: int, device: str) -> tuple[str, int]:
        """``(why not, 0)``, or ``("", the version whose kept state a rollback of v returns to)`` (held under the
        lock; see :meth:`edge_report`)."""
        if not 0 < v <= self.version:
            return f"version {v} was not published by this state (newest: {self.version})", 0
        if v in self.bad:
            return f"version {v} is marked bad already", 0
        serving = self._device_versions.get(device)
        if serving is not None and serving > v:
            return f"the reporter serves version {serving} since, newer than {v}: the report is stale", 0
        if self._floor_pending:
            return "the generation's newest calibration is not published yet (frozen); nothing before it is kept", 0
        if v <= self.floor:
            return (
                f"version {v} is at or before version {self.floor}, which published the generation's newest "
                "calibration or reset; restoring before it would serve statistics of another domain (reset the "
                "deployment instead)",
                0,
            )
        snaps = self.store.snapshot_versions()
        kept = [x for x in snaps if self.floor <= x < v and x not in self.bad]
        if kept:
            return "", kept[-1]
        held = set(snaps)
        if self.floor == 0 and all(x in held for x in range(1, v)):
            # never calibrated: the generation starts at the export, whose state is always kept; allowed only
            # when every version between it and v is still kept (so none of their adaptation is skipped)
            return "", 0
        return (
            f"no kept state between version {self.floor} (the generation's calibration) and {v}: the snapshots "
            f"before {v} were pruned (keep_blobs = {self.spec.keep_blobs})",
            0,
        )

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
            if good < self.floor or self._floor_pending:  # a reset or calibration ran since the reports
                self._restore = None
                self.counters["report:ignored"] += 1
                log.warning("%s: restore of version %d dropped: a calibration or reset came first", self.name, good)
                return
        snap = self.store.load_adapt(self.store.snapshot_path(good)) if good > 0 else None
        if good > 0 and snap is None:  # pruned since the reports: never fall back to the export
            with self._cond:
                self._restore = None
                self.counters["report:ignored"] += 1
            log.warning("%s: restore of version %d dropped: its snapshot was pruned", self.name, good)
            return
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
                self.episode_start = s.adapt_total  # a reset starts an episode (its samples are gone)
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
                floor=True,
            )
        log.warning(
            "%s: reset by the operator; generation %d, %d uploads deleted", self.name, self.generation, len(dropped)
        )
        for ev in waiters:
            ev.set()
