"""The deployment itself: the class that joins the rooms (intake, calibration, publishing, admin; the fields in
:mod:`~cema_deploy.cloud.deployment.state`), its lifecycle, and the step scheduler: one worker thread picks the
next job in a fixed order (reset, restore, republish, calibration, publish, step, statistics, replay, promise, idle,
sweep) and runs it, so adaptation is serialised per fingerprint. ``promise`` keeps every ack honest: when the jobs an
ack counted on did not all publish (a reset dropped the samples, the retention expired them, a step diverged, a
replay-only step found its window gone), the worker publishes the current state once, under the highest version an
ack named, so an edge waiting for that version (``--sync``) never waits in vain."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cema_deploy.cloud.config import DeploymentSpec
from cema_deploy.cloud.deployment.admin import AdminMixin
from cema_deploy.cloud.deployment.calibration import CalibrationMixin
from cema_deploy.cloud.deployment.intake import IntakeMixin
from cema_deploy.cloud.deployment.operator import OperatorMixin
from cema_deploy.cloud.deployment.state import log


class Deployment(OperatorMixin, IntakeMixin, CalibrationMixin, AdminMixin):
    """One deployment (see :mod:`cema_deploy.cloud.deployment`). Thread-safe.

    Example:
        >>> dep = Deployment.from_spec(spec, Path("cema-state"))  # doctest: +SKIP
        >>> dep.start(); dep.upload(batch, device="cam-1", idempotency_key=key).target_version  # doctest: +SKIP
    """

    @classmethod
    def from_spec(
        cls, spec: DeploymentSpec, service_state: str | Path, *, signing_key: Path | None = None
    ) -> Deployment:
        """Load the export's manifest and replica and the teacher, place them on ``spec.device``, resolve the
        teacher's input, and open the deployment's state under ``service_state / spec.state``."""
        from cema_deploy.cloud.models import replica_from_export, resolve_device, teacher_from_name, teacher_input
        from cema_deploy.contract.manifest import manifest_from_dir

        manifest = manifest_from_dir(spec.edge)
        device = resolve_device(spec.device)
        teacher = teacher_from_name(spec.teacher, num_classes=manifest.num_classes, weights=spec.teacher_weights)
        t_in = teacher_input(
            teacher,
            manifest,
            name=spec.teacher,
            weights=spec.teacher_weights,
            mean=spec.teacher_mean,
            std=spec.teacher_std,
            size=spec.teacher_size,
        )
        signer = None
        if signing_key is not None:
            import functools

            from cema_deploy.contract.signing import load_private_key, sign_blob

            signer = functools.partial(sign_blob, private_key=load_private_key(signing_key))
        replica = replica_from_export(spec.edge, manifest)
        state_dir = Path(service_state) / spec.state
        return cls(spec, state_dir, manifest, teacher, replica, signer=signer, device=device, teacher_input=t_in)

    # ---- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"cema-{self.name}", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Let the current step finish (its result is saved), then end the worker thread."""
        self.closing = True
        with self._cond:
            self._stop = True
            for ev in self._reset_waiters:
                ev.set()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def add_listener(self, fn: Callable[[int], None]) -> None:
        """``fn(version)`` is called (on the worker thread) after each publish."""
        self._listeners.append(fn)

    @property
    def job(self) -> str:
        """The job the worker runs or ran last (``step``, ``replay``, ``calibration``, ...; "" before the first):
        read by publish listeners, which run on the worker thread, to tell what made a version."""
        return getattr(self, "_last_job", "")

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until the worker has nothing due (for tests, benchmarks and ``--sync`` simulations)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._inflight[0] == "" and self._due() is None, timeout)

    # ---- the worker ---------------------------------------------------------------------------------------
    def _due(self) -> str | None:
        """The next job, in the worker's order (held under the lock)."""
        c, s = self.config, self.samples
        if self._stop or self.closing:
            return None
        if self._reset_waiters:
            return "reset"
        if self._restore is not None:
            return "restore"
        if self._republish is not None:
            return "republish"
        if s.pending_calibrations():
            return "calibration"
        if self._publish_req:
            return "publish"
        if s.adapt_total - self.cursor >= c.batch_size:
            return "step"
        if s.stats_total - self.stats_cursor >= c.batch_size:
            return "stats"
        if self._replay_due is not None:
            return "replay"
        if self._promised > self.version and not self.frozen:
            return "promise"  # an ack named a version the jobs above did not reach: publish it now
        if (
            c.idle_after_s > 0
            and self._idle_steps < c.idle_max_steps
            and s.window_len(s.adapt_total, self.replay_start) > c.replay_min
            and time.monotonic() - self._last_upload >= c.idle_after_s * (self._idle_steps + 1)
        ):
            return "idle"
        if self.spec.retention_s > 0 and time.monotonic() >= self._next_sweep:
            return "sweep"
        return None

    def _publishes(self, job: str) -> int:
        if job in ("reset", "restore", "publish", "republish", "promise"):
            return 1
        if self.frozen or job == "sweep":
            return 0
        if job in ("calibration", "stats"):
            return 1
        return int((self.cema.steps + 1) % self.config.publish_every == 0)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while (job := self._due()) is None:
                    if self._stop or self.closing:
                        return
                    self._cond.wait(
                        timeout=0.5 if self.config.idle_after_s <= 0 else min(0.5, self.config.idle_after_s)
                    )
                self._inflight = (job, self._publishes(job))
                self._last_job: str = job
                self._job_steps = self.cema.steps
            try:
                getattr(self, f"_do_{job}")()
            except Exception:  # a failed step must not kill the service; its samples stay pending
                log.exception("%s: %s failed", self.name, job)
                with self._cond:
                    self.counters["step_errors"] += 1
                    self._inflight = ("", 0)
                    self._cond.notify_all()
                    self._cond.wait(timeout=1.0)
            finally:
                with self._cond:
                    self._inflight = ("", 0)
                    self._inflight_seq = -1
                    self._cond.notify_all()

    def _rng(self) -> np.random.Generator:
        # Seeded per step, so a restarted service draws what an uninterrupted one would have drawn.
        return np.random.default_rng([self.config.seed, self.cema.steps])

    def _do_step(self) -> None:
        c, s = self.config, self.samples
        with self._cond:
            start, end = self.cursor, self.cursor + c.batch_size
            images = s.read_adapt(start, end)
            w_end = s.upload_end(end - 1)
            replayed = None
            lo = self.replay_start
            drawn: list[int] = []
            if c.replay_size > 0 and c.replay_factor > 0 and s.window_len(w_end, lo) >= c.replay_min:
                n = c.student_steps * c.replay_factor * c.batch_size  # each student step its own 3B (official k=1)
                idx, replayed = s.sample_indexed(n, self._rng(), end=w_end, start=lo)
                drawn = [*idx]
            groups = self._student_groups([*range(start, end), *drawn])  # the edges' statistics (protocol 3)
        report = self.cema.adapt(images, replayed, groups=groups)
        if report.replayed:
            self.count("mixed_steps")  # cloud steps that replayed 3B samples
        publish = self.cema.steps % c.publish_every == 0 and not self.frozen
        self._commit("steps", publish=publish, seconds=report.seconds, cursor=end, full_steps=self.full_steps + 1)

    def _do_promise(self) -> None:
        with self._cond:
            promised = self._promised
        self._commit("promised_publishes", publish=True, seconds=0.0, at_least=promised)

    def _do_replay(self) -> None:
        self._replay_only("replay_steps", due=True)

    def _do_idle(self) -> None:
        with self._cond:
            self._idle_steps += 1
        self._replay_only("idle_steps", due=False)

    def _replay_only(self, counter: str, *, due: bool) -> None:
        c, s = self.config, self.samples
        with self._cond:
            end = s.adapt_total
            if due:
                end, self._replay_due = self._replay_due or end, None
            if s.window_len(end, self.replay_start) <= c.replay_min:
                return
            drawn, replayed = s.sample_indexed(c.idle_factor * c.batch_size, self._rng(), end=end,
                                               start=self.replay_start)  # fmt: skip
            groups = self._student_groups(drawn)  # the edges' statistics (protocol 3)
        report = self.cema.replay_step(replayed, groups=groups)
        publish = self.cema.steps % c.publish_every == 0 and not self.frozen
        self._commit(counter, publish=publish, seconds=report.seconds)
