"""Publishing and retention: every job ends in :meth:`PublishingMixin._commit` (check, publish a new version,
persist, then make it visible); polls read the newest blob from memory; upload files nothing needs any more are
deleted (frames are personal data) and expire after ``retention_s``."""

from __future__ import annotations

import collections
import time

from cema_deploy import __version__
from cema_deploy.cloud.deployment.gate import GateMixin
from cema_deploy.cloud.deployment.lead import LeadMixin
from cema_deploy.cloud.deployment.state import _POINTERS, log
from cema_deploy.cloud.store.replay import Upload
from cema_deploy.contract.blob import RefitBlob

#: The counter of each job, as its log line names it.
_JOB_NAMES = {
    "steps": "cloud step",
    "replay_steps": "replay-only step",
    "idle_steps": "idle replay step",
    "statistics_updates": "statistics update",
    "calibrations": "calibration",
    "publishes": "publish",
    "restores": "restore",
    "resets": "reset",
    "republishes": "republish",
    "diverged": "diverged step",
}
_REFUSED = "refused by the gate"


class PublishingMixin(LeadMixin, GateMixin):
    """Polls, publishes and retention of a :class:`~cema_deploy.cloud.deployment.Deployment`."""

    def latest(self, after: int) -> tuple[int, bytes] | None:
        """The newest blob if its version is greater than ``after`` (no waiting, no training lock)."""
        latest = self._latest
        return latest if latest is not None and latest[0] > after else None

    def wait_latest(self, after: int, timeout: float) -> tuple[int, bytes] | None:
        """:meth:`latest`, waiting up to ``timeout`` seconds for a newer version (blocking)."""
        with self._cond:
            self._cond.wait_for(lambda: self.latest(after) is not None or self._stop or self.closing, timeout)
        return self.latest(after)

    def _do_publish(self) -> None:
        with self._cond:
            self._publish_req = False
        self._commit("publishes", publish=True, seconds=0.0)

    def _do_sweep(self) -> None:
        with self._cond:
            self._next_sweep = time.monotonic() + min(60.0, max(self.spec.retention_s / 10, 0.5))
            s = self.samples
            expired = s.collect(
                cursor=self.cursor, stats_cursor=self.stats_cursor, expire_before=time.time() - self.spec.retention_s
            )
            if not expired:
                return
            self.cursor = max([self.cursor, *(u.adapt_end for u in expired)])
            self.stats_cursor = max([self.stats_cursor, *(u.stats_end for u in expired)])
            self.counters["expired_samples"] += sum(u.count for u in expired)
            self._awaiting = collections.deque(a for a in self._awaiting if a[0] > self.cursor)
            live = {u.seq for u in s.pending_calibrations()}
            self._awaiting_cal = collections.deque(a for a in self._awaiting_cal if a[0] in live)
            state = self._state_json()
        self.store.save_state(state)
        self._release(expired)

    def _commit(
        self,
        counter: str,
        *,
        publish: bool,
        seconds: float,
        check: bool = True,
        calibration: Upload | None = None,
        released: list[Upload] | None = None,
        floor: bool = False,
        at_least: int = 0,
        **pointers: int,
    ) -> None:
        """Check, publish (a new version), persist, then make it visible; counters and version change together.
        A state with a non-finite tensor or a negative variance is never published: the last good state (the one
        saved by the previous commit) is restored and the step counted as ``diverged``. ``floor``: this job
        calibrated or reset the models, so the version that first publishes its state is the new restore floor.
        ``at_least``: publish under this version when it is above the next one (an ack's promise)."""
        problem = self.cema.problem() if check else None
        if problem is not None:
            saved = self.store.load_adapt()
            self.cema.load_state_dict(saved["cema"] if saved is not None else self.cema._initial, steps=False)
            log.error("%s: %s after a %s step; not published, last good state restored", self.name, problem, counter)
            counter, publish = "diverged", False
        t0 = time.perf_counter()
        gate = self._gate_judge(counter) if publish else None  # the cloud-side gate (CemaConfig.gate; gate.py)
        seconds += (time.perf_counter() - t0) if gate is not None else 0.0  # a job's time includes its gate's
        publish = publish and (gate is None or gate["passed"])
        lead, lead_s = self._lead_for_blob() if publish else (None, 0.0)  # CemaConfig.lead_frames (lead.py)
        seconds += lead_s
        with self._cond:
            book = self._book()
            book.update(pointers)
            version = max(self.version + 1, at_least) if publish else self.version  # versions may skip, never repeat
            pending = self._floor_pending or floor
            book["floor"] = version if publish and pending else self.floor
            book["floor_pending"] = pending and not publish
        data = None
        if publish:
            blob = RefitBlob(
                tensors=self.cema.blob_tensors(),
                fingerprint=self.fingerprint,
                version=version,
                epoch=self.epoch,
                producer=f"cema-deploy {__version__} cloud {self.name} step {self.cema.steps}",
                lead=lead,
            )
            if self.signer is not None:
                blob = self.signer(blob)
            data = self.store.save_blob(blob)  # the version is taken from here on, even if we crash next
            self._gate_ref = (version, dict(blob.tensors))  # what the gate judges the next candidate against
            # Polls may fetch it now: a crash before the state below is saved restarts from the state before this
            # step (its samples are adapted on again and published under a newer version; none is reused).
            with self._cond:  # version, pointers and blob become visible together: acks never lag the blob
                for k in _POINTERS:
                    setattr(self, k, int(book[k]))
                self.floor, self._floor_pending = book["floor"], book["floor_pending"]
                self.version, self._latest = version, (version, data)
                self._inflight = ("committing", 0)  # its publish is done, its pointers advanced
                self._timings.publish_delays.append(time.time() - blob.created)
                now = time.monotonic()
                while self._awaiting and self._awaiting[0][0] <= book["cursor"]:
                    self._timings.latency(now - self._awaiting.popleft()[1])
                while self._awaiting_cal and self._awaiting_cal[0][0] <= book["calib_done"]:
                    self._timings.latency(now - self._awaiting_cal.popleft()[1])
            for fn in list(self._listeners):
                fn(version)
        book["version"] = version
        self.store.save_adapt({"cema": self.cema.state_dict(), "book": book})
        if publish:
            self.store.snapshot(version)
        rewrite = None
        with self._cond:
            for k in _POINTERS:
                setattr(self, k, int(book[k]))
            self.floor, self._floor_pending = book["floor"], book["floor_pending"]
            self.version = version
            self.counters[counter] += 1
            if seconds > 0:
                self._timings.job(seconds)
            if gate is not None:
                self._gate_record(gate, version if data is not None else None)
            if calibration is not None:
                rewrite = self.samples.applied(calibration)
            done = list(released or [])
            done += self.samples.collect(cursor=self.cursor, stats_cursor=self.stats_cursor)
            if data is not None:
                self.counters["blobs"] += 1
                self._dirty = False
            elif counter != "diverged" and gate is None:  # a refused candidate left the published state
                self._dirty = True
            state = self._state_json()
            self._cond.notify_all()
        if rewrite is not None:
            self.samples.write(rewrite)
        self.store.save_state(state)
        self._release(done)
        self._log_commit(counter, seconds, version if data is not None else None, refused=gate is not None)

    def _log_commit(self, counter: str, seconds: float, published: int | None, *, refused: bool = False) -> None:
        """One line per job (INFO; ``cloud serve --log-level warning`` silences it)."""
        if published is not None:
            outcome = f"published version {published}"
        else:
            why = "pinned" if self.pinned is not None else "frozen" if self.frozen else "diverged"
            why = _REFUSED if refused else why
            if why == "diverged" and counter != "diverged":
                why = f"publishes every {self.config.publish_every} steps"
            outcome = f"not published ({why})"
        log.info(
            "%s: %s done (%.2f s, method step %d): %s",
            self.name,
            _JOB_NAMES.get(counter, counter),
            seconds,
            self.cema.steps,
            outcome,
        )

    def _release(self, done: list[Upload]) -> None:
        """Delete the files of uploads nothing needs (frames are personal data); keep their keys answerable."""
        self.samples.delete_files(done)
        keyed = [(u.key, u.ack) for u in done if u.key]
        if keyed:
            self.store.journal_keys(keyed)
            self._journal_lines += len(keyed)
            if self._journal_lines > 2 * max(self.spec.idempotency_keys, 1):
                with self._cond:
                    keep = list(self._keys.items())
                self.store.compact_keys(keep)
                self._journal_lines = len(keep)
