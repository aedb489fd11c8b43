"""The adaptation service without HTTP: accepts uploads durably, runs CEMA steps on one worker thread per edge
model (adaptation is serialised per fingerprint), publishes versioned refit blobs, answers blob queries from
memory so that polls never wait on training."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cema_deploy import __version__
from cema_deploy.cloud.config import CemaConfig
from cema_deploy.cloud.replay import ReplayStore, ReplayWindow
from cema_deploy.cloud.state import StateStore
from cema_deploy.contract.blob import RefitBlob
from cema_deploy.contract.manifest import Manifest
from cema_deploy.contract.samples import SampleBatch
from cema_deploy.exceptions import CloudError

log = logging.getLogger("cema_deploy.cloud")

Signer = Callable[[RefitBlob], RefitBlob]


class AdaptationService:
    """One edge model's cloud: replay log, CEMA state, blob versions. Thread-safe.

    Example:
        >>> svc = AdaptationService(state_dir, manifest, teacher, student)  # doctest: +SKIP
        >>> svc.start(); svc.submit(batch, device="cam-1"); svc.latest(after=0)  # doctest: +SKIP
    """

    def __init__(
        self,
        state_dir: str | Path,
        manifest: Manifest,
        teacher: Any,
        student: Any,
        *,
        config: CemaConfig | None = None,
        signer: Signer | None = None,
    ) -> None:
        from cema_deploy.cloud.cema import Cema

        self.config = config or CemaConfig()
        self.manifest = manifest
        self.signer = signer
        self.store = StateStore(state_dir)
        self.replay = ReplayStore(self.store.directory / "replay", capacity=self.config.replay_size)
        self._window = ReplayWindow(self.replay)
        self.cema = Cema(teacher, student, manifest=manifest, config=self.config, replay=self._window)
        st = self.store.load_state()
        adapt = self.store.load_adapt()
        if adapt is not None:
            try:
                self.cema.load_state_dict(adapt["cema"])
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                raise CloudError(
                    f"{self.store.directory / 'adapt_state.pt'} does not fit these models ({exc!s:.200}); "
                    "serve them from a new --state directory."
                ) from exc
            # adapt_state.pt is written before state.json: when a crash fell between the two, it is the newer.
            st["cursor"], st["steps"] = adapt["cursor"], adapt["steps"]
            st["version"] = max(int(st["version"]), int(adapt["version"]))
        self.version: int = int(st["version"])
        self.cursor: int = int(st["cursor"])
        self.steps: int = int(st["steps"])
        self.cema.steps = self.steps
        if not self.replay.first <= self.cursor <= self.replay.total:
            raise CloudError(
                f"The state in {self.store.directory} consumed {self.cursor} samples but its replay log "
                f"holds [{self.replay.first}, {self.replay.total}); it was altered. Use a new --state."
            )
        self.counters: Counter[str] = Counter({k: int(v) for k, v in st.get("counters", {}).items()})
        self._latest: tuple[int, bytes] | None = (
            (self.version, self.store.blob_bytes(self.version)) if self.version > 0 else None
        )
        self._cond = threading.Condition()
        self._listeners: list[Callable[[int], None]] = []
        self._stop = False
        #: Set (without a lock: safe from a signal handler) when the server shuts down; long polls then end.
        self.closing = False
        self._thread: threading.Thread | None = None
        self._last_upload = time.monotonic()
        self._idle_steps = 0
        self._seconds = [0.0, 0]  # sum, count of adaptation step times

    # ---- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="cema-adapt", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Let the current step finish (its result is saved), then end the worker thread."""
        self.closing = True
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # ---- requests -------------------------------------------------------------------------------------
    def submit(self, batch: SampleBatch, *, device: str = "") -> dict[str, int]:
        """Store an upload durably and queue it for adaptation; the returned ack is sent only after this."""
        if batch.fingerprint != self.manifest.fingerprint:
            raise CloudError(
                f"Upload fingerprint {batch.fingerprint[:16]!r} is not this model's {self.manifest.fingerprint[:16]!r}."
            )
        if batch.images.shape[1:3] != tuple(self.manifest.preprocess.size):
            raise CloudError(f"Upload images are {batch.images.shape[1:3]}, expected {self.manifest.preprocess.size}.")
        self.replay.append(batch.images)
        with self._cond:
            self.counters["uploads"] += 1
            self.counters["samples"] += len(batch)
            self.counters[f"device_samples:{device}"] += len(batch)
            self._last_upload = time.monotonic()
            self._idle_steps = 0
            pending = self.replay.total - self.cursor
            k = self.config.publish_every  # the step that takes the last full batch of these samples publishes:
            target = self.version + (self.steps + pending // self.config.batch_size) // k - self.steps // k
            self._cond.notify_all()
            return {
                "accepted": len(batch),
                "pending": pending,
                "buffered": len(self.replay),
                "version": self.version,
                "target_version": target,
            }

    def latest(self, after: int) -> tuple[int, bytes] | None:
        """The newest blob if its version is greater than ``after`` (no waiting, no training lock)."""
        latest = self._latest
        return latest if latest is not None and latest[0] > after else None

    def wait_latest(self, after: int, timeout: float) -> tuple[int, bytes] | None:
        with self._cond:
            self._cond.wait_for(lambda: self.latest(after) is not None or self._stop, timeout)
        return self.latest(after)

    def add_listener(self, fn: Callable[[int], None]) -> None:
        """``fn(version)`` is called (on the worker thread) after each publish."""
        self._listeners.append(fn)

    def report(self, report: dict[str, Any], *, device: str) -> None:
        self.store.append_report({**report, "device": device, "received": time.time()})
        with self._cond:
            self.counters[f"report:{report.get('kind', 'other')}"] += 1

    def count(self, key: str) -> None:
        with self._cond:
            self.counters[key] += 1

    # ---- the worker -----------------------------------------------------------------------------------
    def _loop(self) -> None:
        b = self.config.batch_size
        while True:
            with self._cond:
                while not (self._stop or self.closing) and self.replay.total - self.cursor < b and not self._idle_due():
                    self._cond.wait(timeout=self._wait_s())
                if self._stop or self.closing:
                    return
                do_step = self.replay.total - self.cursor >= b
            try:
                if do_step:
                    self._step()
                else:
                    self._idle_step()
            except Exception:  # a failed step must not kill the service; the samples stay pending
                log.exception("adaptation step failed")
                with self._cond:
                    self.counters["step_errors"] += 1
                    self._cond.wait(timeout=1.0)

    def _wait_s(self) -> float:
        return 0.5 if self.config.idle_after_s <= 0 else min(0.5, self.config.idle_after_s)

    def _idle_due(self) -> bool:
        c = self.config
        return (
            c.idle_after_s > 0
            and self._idle_steps < c.idle_max_steps
            and len(ReplayWindow(self.replay, self.cursor)) > c.replay_min
            and time.monotonic() - self._last_upload >= c.idle_after_s * (self._idle_steps + 1)
        )

    def _step(self) -> None:
        b = self.config.batch_size
        new = self.replay.read(self.cursor, self.cursor + b)
        self._window.end = self.cursor + b  # replay draws from what has arrived up to and including this batch
        report = self.cema.adapt(new)
        self._commit(cursor=self.cursor + b, counter="steps", seconds=report.seconds)
        self.replay.trim(keep_from=self.cursor)

    def _idle_step(self) -> None:
        self._window.end = self.cursor
        report = self.cema.idle_step()
        with self._cond:
            self._idle_steps += 1
        if report is None:
            return
        self._commit(cursor=self.cursor, counter="idle_steps", seconds=report.seconds)

    def _commit(self, *, cursor: int, counter: str, seconds: float) -> None:
        """Publish (every K steps) and persist; counters and version change together, under the lock."""
        steps = self.cema.steps
        version = self.version
        data = None
        if steps % self.config.publish_every == 0:
            version += 1
            blob = RefitBlob(
                tensors=self.cema.blob_tensors(),
                fingerprint=self.manifest.fingerprint,
                version=version,
                producer=f"cema-deploy {__version__} cloud step {steps}",
            )
            if self.signer is not None:
                blob = self.signer(blob)
            data = self.store.save_blob(blob)  # the version is taken from here on, even if we crash next
        self.store.save_adapt({"cema": self.cema.state_dict(), "cursor": cursor, "steps": steps, "version": version})
        with self._cond:
            self.cursor, self.steps, self.version = cursor, steps, version
            self.counters[counter] += 1
            self._seconds = [self._seconds[0] + seconds, self._seconds[1] + 1]
            if data is not None:
                self._latest = (version, data)
                self.counters["blobs"] += 1
            state = {"version": version, "cursor": cursor, "steps": steps, "counters": dict(self.counters)}
            self._cond.notify_all()
        self.store.save_state(state)
        if data is not None:
            for fn in list(self._listeners):
                fn(version)

    # ---- metrics --------------------------------------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        with self._cond:
            counters = dict(self.counters)
            return {
                "fingerprint": self.manifest.fingerprint,
                "version": self.version,
                "steps": self.steps,
                "pending": self.replay.total - self.cursor,
                "buffered": len(self.replay),
                "counters": counters,
                "step_seconds_sum": float(self._seconds[0]),
                "step_seconds_count": int(self._seconds[1]),
            }
