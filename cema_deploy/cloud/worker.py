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

import numpy as np

from cema_deploy import __version__
from cema_deploy.cloud.config import CemaConfig
from cema_deploy.cloud.replay import ReplayStore
from cema_deploy.cloud.state import StateStore
from cema_deploy.contract.blob import RefitBlob
from cema_deploy.contract.manifest import Manifest
from cema_deploy.contract.samples import SampleBatch
from cema_deploy.exceptions import CloudError
from cema_deploy.runtime.preprocess import normalize

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
        import torch

        from cema_deploy.cloud.cema import Cema

        self.config = config or CemaConfig()
        self.manifest = manifest
        self.signer = signer
        self.store = StateStore(state_dir)
        self.replay = ReplayStore(self.store.directory / "replay", capacity=self.config.replay_size)
        torch.manual_seed(self.config.seed)
        self.cema = Cema(teacher, student, num_classes=manifest.num_classes, config=self.config)
        adapt = self.store.load_adapt()
        if adapt is not None:
            self.cema.load_state_dict(adapt)
        st = self.store.load_state()
        self.version: int = st["version"]
        self.cursor: int = min(int(st["cursor"]), self.replay.total)
        self.steps: int = int(st["steps"])
        self.counters: Counter[str] = Counter({k: int(v) for k, v in st.get("counters", {}).items()})
        self._rng = np.random.default_rng(self.config.seed + self.steps)
        self._latest: tuple[int, bytes] | None = (
            (self.version, self.store.blob_bytes(self.version)) if self.version > 0 else None
        )
        self._cond = threading.Condition()
        self._listeners: list[Callable[[int], None]] = []
        self._stop = False
        self._thread: threading.Thread | None = None
        self._last_upload = time.monotonic()
        self._idle_steps = 0
        self.step_seconds: list[float] = []

    # ---- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="cema-adapt", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
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
            steps_ahead = pending // self.config.batch_size
            k = self.config.publish_every
            target = self.version + (self.steps % k + steps_ahead) // k
            self._cond.notify_all()
            return {"accepted": len(batch), "pending": pending, "buffered": len(self.replay),
                    "version": self.version, "target_version": target}

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
                while not self._stop and self.replay.total - self.cursor < b and not self._idle_due():
                    self._cond.wait(timeout=self._wait_s())
                if self._stop:
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
        return (c.idle_after_s > 0 and self._idle_steps < c.idle_max_steps and len(self.replay) > c.replay_min
                and time.monotonic() - self._last_upload >= c.idle_after_s * (self._idle_steps + 1))

    def _tensor(self, images: np.ndarray) -> Any:
        import torch

        return torch.from_numpy(normalize(images, self.manifest.preprocess))

    def _step(self) -> None:
        c = self.config
        new = self.replay.read(self.cursor, self.cursor + c.batch_size)
        replay = None
        if len(self.replay) > c.replay_min and c.replay_factor > 0:
            replay = self._tensor(self.replay.sample(c.replay_factor * c.batch_size, self._rng))
        report = self.cema.adapt(self._tensor(new), replay)
        self.step_seconds.append(report.seconds)
        with self._cond:
            self.cursor += c.batch_size
            self.steps += 1
            self.counters["steps"] += 1
        self._after_step()
        self.replay.trim(keep_from=self.cursor)

    def _idle_step(self) -> None:
        c = self.config
        batch = self.replay.sample(c.idle_factor * c.batch_size, self._rng)
        t0 = time.perf_counter()
        self.cema.distill(self._tensor(batch))
        self.step_seconds.append(time.perf_counter() - t0)
        with self._cond:
            self._idle_steps += 1
            self.steps += 1
            self.counters["idle_steps"] += 1
        self._after_step()

    def _after_step(self) -> None:
        if self.steps % self.config.publish_every == 0:
            self._publish()
        else:
            self._save()

    def _publish(self) -> None:
        version = self.version + 1
        names = [p.name for p in self.manifest.refittable]
        blob = RefitBlob(tensors=self.cema.blob_tensors(names), fingerprint=self.manifest.fingerprint,
                         version=version, producer=f"cema-deploy {__version__} cloud step {self.steps}")
        if self.signer is not None:
            blob = self.signer(blob)
        data = self.store.save_blob(blob)  # the version is taken from here on, even if we crash next
        with self._cond:
            self.version = version
            self._latest = (version, data)
            self.counters["blobs"] += 1
            self._cond.notify_all()
        self._save()
        for fn in list(self._listeners):
            fn(version)

    def _save(self) -> None:
        self.store.save_adapt(self.cema.state_dict())
        with self._cond:
            state = {"version": self.version, "cursor": self.cursor, "steps": self.steps,
                     "counters": dict(self.counters)}
        self.store.save_state(state)

    # ---- metrics --------------------------------------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        with self._cond:
            counters = dict(self.counters)
            return {
                "fingerprint": self.manifest.fingerprint, "version": self.version, "steps": self.steps,
                "pending": self.replay.total - self.cursor, "buffered": len(self.replay), "counters": counters,
                "step_seconds_sum": float(sum(self.step_seconds)), "step_seconds_count": len(self.step_seconds),
            }
