"""One deployment's adaptation loop: acknowledged uploads -> CEMA steps -> versioned, checked refit blobs.

A *deployment* is one edge model (one fingerprint) in one domain, shared by all its devices. It accepts uploads
durably (:meth:`Deployment.upload`: 202 only once the samples are on disk), runs the official loop on one worker
thread (adaptation is serialised per fingerprint) and publishes refit blobs that polls read from memory, so a poll
never waits on training. Every public method takes and returns plain picklable data (sample batches, the messages
of :mod:`cema_deploy.contract.messages`, bytes, dicts), so an engine may host the deployment in another process.

The official loop (chenyaofo/CEMA ``CEMA.infer``) mapped onto a service (PROTOCOL2):

* while B (32) samples are pending: a teacher step on those B (Eqn. 6), then a distillation step on them plus 3B
  replayed samples once the replay window holds >= 256 (the window ends at the end of the upload holding the
  batch's last sample: the official history holds the whole edge batch);
* a batch report after an edge batch in which no cloud step ran (``ran = 0``) sets ``replay_due`` when the window
  holds > 256: one replay-only step on 4B samples (a flag, never a queue; full batches run first);
* calibration batches set (first of a generation), merge (further ``start`` batches) or re-initialise (``shift``)
  the running statistics and publish at once; statistics samples move them (beyond the paper).

Beyond the paper, for a service: a pending cap (429 + Retry-After), idempotent uploads and reports, no
non-finite state ever published (the last good state is restored), blob retention, rollback reports that mark a
version bad and return to the state behind the last good one, operator reset / freeze, frame retention.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cema_deploy import __version__
from cema_deploy.cloud.config import DeploymentSpec
from cema_deploy.cloud.errors import PendingCapReached, Refused, StaleGeneration
from cema_deploy.cloud.replay import SampleStore, Upload, keys_journal_lines
from cema_deploy.cloud.state import DeploymentStore
from cema_deploy.contract.blob import RefitBlob
from cema_deploy.contract.manifest import Manifest
from cema_deploy.contract.messages import BatchAck, BatchReport, DeploymentStatus, EdgeReport, UploadAck
from cema_deploy.contract.samples import KIND_CALIBRATION, SampleBatch
from cema_deploy.exceptions import CloudError

log = logging.getLogger("cema_deploy.cloud")

Signer = Callable[[RefitBlob], RefitBlob]
#: Monotonic pointers of the loop, persisted with the adaptation state (the larger copy wins on restart).
_POINTERS = ("cursor", "stats_cursor", "calib_done", "full_steps")
#: Versions remembered as bad (rolled back), at most.
_MAX_BAD = 1024
#: Upper bounds (seconds) of the upload-to-blob histogram: 10 ms x 1.2^i, up to about 10 minutes (a bench reads
#: per-run quantiles from the differences of two scrapes, to within a factor 1.2).
LATENCY_BUCKETS = tuple(round(0.01 * 1.2**i, 4) for i in range(62))


def _pubs(steps: int, n: int, k: int) -> int:
    """Publishes among the next ``n`` steps after ``steps`` when every K-th step publishes."""
    return (steps + n) // k - steps // k


class Deployment:
    """One deployment (see the module docstring). Thread-safe.

    Example:
        >>> dep = Deployment.from_spec(spec, Path("cema-state"))  # doctest: +SKIP
        >>> dep.start(); dep.upload(batch, device="cam-1", idempotency_key=key).target_version  # doctest: +SKIP
    """

    def __init__(
        self,
        spec: DeploymentSpec,
        state_dir: str | Path,
        manifest: Manifest,
        teacher: Any,
        student: Any,
        *,
        signer: Signer | None = None,
        device: Any = "cpu",
        teacher_input: Any = None,
    ) -> None:
        from cema_deploy.cloud.method import Cema

        self.spec, self.config, self.manifest = spec, spec.method, manifest
        self.name, self.fingerprint = spec.name, manifest.fingerprint
        self.signer = signer
        self.store = DeploymentStore(state_dir, keep_blobs=spec.keep_blobs)
        self.samples = SampleStore(self.store.directory / "uploads", capacity=self.config.replay_size)
        self.cema = Cema(
            teacher,
            student,
            manifest=manifest,
            config=self.config,
            device=device,
            teacher_input=teacher_input,
            teacher_dtype=spec.teacher_dtype,
        )
        self._cond = threading.Condition()
        self._write_lock = threading.Lock()  # appends and resets, in order
        self.counters: collections.Counter[str] = collections.Counter()
        self._keys: collections.OrderedDict[str, str] = collections.OrderedDict()  # upload key -> UploadAck JSON
        self._inflight_keys: dict[str, threading.Event] = {}
        self._report_keys: collections.OrderedDict[str, BatchAck] = collections.OrderedDict()
        self._journal_lines = 0
        self._load()
        self._latest: tuple[int, bytes] | None = None
        if self.version > 0 and self.store.blob_path(self.version).exists():
            self._latest = (self.version, self.store.blob_bytes(self.version))
        self._reset_waiters: list[threading.Event] = []
        self._restore: tuple[int, int] | None = None  # (bad version, good version to return to)
        self._rollbacks: dict[int, set[str]] = {}
        self._publish_req = False
        self._replay_due: int | None = None  # the replay window's end for the due replay-only step
        self._attributed = self.full_steps + (self.samples.adapt_total - self.cursor) // self.config.batch_size
        self._inflight: tuple[str, int] = ("", 0)  # (job, publishes it will make)
        self._inflight_seq = -1  # the calibration in flight
        self._job_steps = 0  # the method's step counter when the job in flight started
        self._awaiting: collections.deque[tuple[int, float]] = collections.deque()  # (adapt end, ack time)
        self._awaiting_cal: collections.deque[tuple[int, float]] = collections.deque()  # (seq, ack time)
        self._latencies: collections.deque[float] = collections.deque(maxlen=10_000)
        self._buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last: +Inf
        self._latency_sum = 0.0
        self._publish_delays: collections.deque[float] = collections.deque(maxlen=1_000)
        self._seconds = [0.0, 0]
        self._listeners: list[Callable[[int], None]] = []
        self._stop = False
        #: Set (without a lock: safe from a signal handler) when the server shuts down; long polls then end.
        self.closing = False
        self._thread: threading.Thread | None = None
        self._last_upload = time.monotonic()
        self._idle_steps = 0
        self._next_sweep = time.monotonic()

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

    # ---- restart ------------------------------------------------------------------------------------------
    def _load(self) -> None:
        st = self.store.load_state()
        adapt = self.store.load_adapt()
        book: dict[str, Any] = {
            "generation": 1,
            "calibrated": False,
            "episode_n": 0,
            "shift_step": -1,
            "bad": [],
            **{k: 0 for k in _POINTERS},
        }
        book.update({k: st[k] for k in book if k in st})
        if adapt is not None:
            try:
                self.cema.load_state_dict(adapt["cema"])
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                raise CloudError(
                    f"{self.store.directory / 'adapt_state.pt'} does not fit these models ({exc!s:.200}); "
                    "serve them from a new state directory."
                ) from exc
            saved = adapt["book"]
            for k, v in saved.items():  # adapt_state.pt is written before state.json: it is the newer ...
                book[k] = max(book.get(k, 0), v) if k in _POINTERS else v  # ... but pointers only rise
            st["version"] = max(int(st["version"]), int(saved.get("version", 0)))
        self.version: int = int(st["version"])
        self.frozen: bool = bool(st.get("frozen", False))
        self.generation: int = int(book["generation"])
        self.calibrated: bool = bool(book["calibrated"])
        self.episode_n: int = int(book["episode_n"])
        self.shift_step: int = int(book["shift_step"])
        self.bad: list[int] = [int(v) for v in book["bad"]]
        self.cursor, self.stats_cursor = int(book["cursor"]), int(book["stats_cursor"])
        self.calib_done, self.full_steps = int(book["calib_done"]), int(book["full_steps"])
        self._dirty = bool(st.get("dirty", False))
        self.counters.update({k: int(v) for k, v in st.get("counters", {}).items()})
        s = self.samples
        s.resume(
            adapt_total=int(st.get("adapt_total", 0)),
            stats_total=int(st.get("stats_total", 0)),
            next_seq=int(st.get("next_seq", 1)),
        )
        stale = [u for u in s.uploads.values() if u.generation != self.generation]  # a reset was interrupted
        s._remove(stale)
        s.delete_files(stale)
        for u in list(s.uploads.values()):
            # applied before a crash, not yet rewritten
            if u.calibration and u.seq <= self.calib_done and s.applied(u) is not None:
                s.write(u)
        # Samples deleted by the retention while the saved cursors lagged cannot be adapted on any more.
        self.cursor = max(self.cursor, min(s.first_adapt, s.adapt_total))
        firsts = [u.stats_start for u in s.uploads.values() if u.n_stats]
        self.stats_cursor = max(self.stats_cursor, min(firsts) if firsts else s.stats_total)
        if not self.cursor <= s.adapt_total:
            raise CloudError(
                f"The state in {self.store.directory} consumed {self.cursor} samples but its uploads end at "
                f"{s.adapt_total}; it was altered. Use a new state directory."
            )
        limit = self.spec.idempotency_keys
        journal = keys_journal_lines(self.store.directory / "keys.jsonl", limit)
        if journal:
            self.store.compact_keys(journal)
        self._journal_lines = len(journal)
        live = [(u.key, u.ack) for u in sorted(s.uploads.values(), key=lambda u: u.seq) if u.key]
        for key, ack in [*journal, *live][-limit:] if limit else []:
            self._keys[key] = ack

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

    # ---- requests -----------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Static facts an ingress needs: name, fingerprint, model, the uploads' image size."""
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "model": self.manifest.model_name,
            "image_hw": tuple(self.manifest.preprocess.size),
        }

    def status(self) -> DeploymentStatus:
        with self._cond:
            return self._status()

    def _status(self) -> DeploymentStatus:
        return DeploymentStatus(
            name=self.name,
            fingerprint=self.fingerprint,
            model=self.manifest.model_name,
            version=self.version,
            generation=self.generation,
            calibrated=self.calibrated,
            frozen=self.frozen,
        )

    def upload(self, batch: SampleBatch, *, device: str = "", idempotency_key: str = "") -> UploadAck:
        """Store an upload durably and queue it; the returned ack is sent only after this. A retry with the same
        ``idempotency_key`` gets the first answer (``duplicate=True``) and stores nothing. Raises
        :class:`~cema_deploy.cloud.errors.Refused` (400, 409 older generation, 429 pending cap)."""
        if batch.fingerprint != self.fingerprint:
            raise Refused(
                f"Upload fingerprint {batch.fingerprint[:16]!r} is not this deployment's {self.fingerprint[:16]!r}."
            )
        if batch.images.shape[1:3] != tuple(self.manifest.preprocess.size):
            raise Refused(f"Upload images are {batch.images.shape[1:3]}, expected {self.manifest.preprocess.size}.")
        key = idempotency_key
        if key:
            with self._cond:
                while True:
                    if key in self._keys:
                        self.counters["duplicates"] += 1
                        return UploadAck.from_json({**json.loads(self._keys[key]), "duplicate": True})
                    ev = self._inflight_keys.get(key)
                    if ev is None:
                        self._inflight_keys[key] = threading.Event()
                        break
                    self._cond.release()
                    try:
                        ev.wait(60)
                    finally:
                        self._cond.acquire()
        try:
            return self._store_upload(batch, device=device, key=key)
        finally:
            if key:
                with self._cond:
                    self._inflight_keys.pop(key).set()

    def _store_upload(self, batch: SampleBatch, *, device: str, key: str) -> UploadAck:
        b = self.config.batch_size
        with self._write_lock:
            with self._cond:
                if batch.generation not in (0, self.generation):
                    self.counters["refused:409"] += 1
                    raise StaleGeneration(
                        f"This upload was made for generation {batch.generation} of {self.name}, which is now at "
                        f"generation {self.generation} (reset by the operator); start the new generation.",
                        409,
                        body=self._status().to_json(),
                    )
                pending = self._pending_samples()
                if pending and pending + len(batch) > self.spec.pending_cap:
                    self.counters["refused:429"] += 1
                    mean_s = self._seconds[0] / self._seconds[1] if self._seconds[1] else 1.0
                    wait = math.ceil((pending + len(batch) - self.spec.pending_cap) / b) * mean_s
                    raise PendingCapReached(
                        f"{self.name} holds {pending} pending samples, its cap is {self.spec.pending_cap}; "
                        "retry after the Retry-After seconds.",
                        429,
                        retry_after=int(min(max(math.ceil(wait), 1), 60)),
                    )
                up = self.samples.new_upload(
                    batch.kind,
                    batch.images,
                    generation=self.generation,
                    selected=batch.selected,
                    calibration=batch.calibration if batch.kind == KIND_CALIBRATION else "",
                    key=key,
                    device=device,
                    received=time.time(),
                )
                ack = self._ack_for(up)
                up.ack = json.dumps(ack.to_json())
            self.samples.write(up)  # durable before it is visible or acknowledged
            with self._cond:
                self.samples.add(up)
                if key:
                    self._remember(self._keys, key, up.ack)
                now = time.monotonic()
                if up.n_adapt:
                    self._awaiting.append((up.adapt_end, now))
                if up.calibration:
                    self._awaiting_cal.append((up.seq, now))
                self.counters["uploads"] += 1
                self.counters["samples"] += len(batch)
                self.counters[f"samples:{batch.kind}"] += len(batch)
                self._last_upload, self._idle_steps = now, 0
                self._cond.notify_all()
        return ack

    def _ack_for(self, up: Upload) -> UploadAck:
        """The acknowledgement of ``up`` as if it were visible (held under the lock)."""
        if up.calibration:
            target = self.version if self.frozen else self._planned(calibrations_upto=up.seq)
        else:
            target = self._planned(extra_adapt=up.n_adapt, extra_stats=up.n_stats, stats=up.n_stats > 0)
        return UploadAck(
            accepted=len(up.images),
            pending=self._pending_samples() + len(up.images),
            buffered=self.samples.held() + len(up.images),
            version=self.version,
            target_version=target,
            generation=self.generation,
            calibrated=self.calibrated,
        )

    def _pending_samples(self) -> int:
        s = self.samples
        cal = sum(len(u.images) - u.n_adapt for u in s.uploads.values() if u.calibration)
        return (s.adapt_total - self.cursor) + (s.stats_total - self.stats_cursor) + cal

    def _planned(
        self,
        *,
        extra_adapt: int = 0,
        extra_stats: int = 0,
        stats: bool = False,
        replay: bool = False,
        calibrations_upto: int | None = None,
    ) -> int:
        """The version after everything scheduled now (held under the lock): the job in flight, urgent jobs
        (reset, restore, calibrations, an unfreeze publish), the full batches pending, optionally the statistics
        batches and a replay-only step, in the worker's order."""
        job, pub = self._inflight
        v = self.version + pub + len(self._reset_waiters) + (self._restore is not None)
        if self.frozen:
            return v
        cals = [u for u in self.samples.pending_calibrations() if u.seq != self._inflight_seq]
        if calibrations_upto is not None:
            return v + sum(1 for u in cals if u.seq <= calibrations_upto) + 1
        v += len(cals) + self._publish_req
        b, k = self.config.batch_size, self.config.publish_every
        steps = self._job_steps + 1 if job in ("step", "replay", "idle") else self.cema.steps
        untaken = self.samples.adapt_total + extra_adapt - self.cursor - (b if job == "step" else 0)
        n = untaken // b + (replay or self._replay_due is not None)
        v += _pubs(steps, n, k)
        if stats:
            taken = b if job == "stats" else 0
            v += (self.samples.stats_total + extra_stats - self.stats_cursor - taken) // b
        return v

    def batch_report(self, report: BatchReport, *, device: str = "", idempotency_key: str = "") -> BatchAck:
        """One edge batch ended (after its uploads): schedule the official replay-only step when no cloud step ran
        in this report interval and the replay window holds more than ``replay_min`` samples."""
        c = self.config
        with self._cond:
            if idempotency_key and idempotency_key in self._report_keys:
                self.counters["duplicate_reports"] += 1
                return self._report_keys[idempotency_key]
            self.counters["batch_reports"] += 1
            self.counters["reported_seen"] += report.seen
            self.counters["reported_uploaded"] += report.uploaded
            fired = False
            if report.generation in (0, self.generation):
                known = self.full_steps + (self.samples.adapt_total - self.cursor) // c.batch_size
                ran, self._attributed = max(known - self._attributed, 0), known
                window = self.samples.window_len(self.samples.adapt_total)
                if ran == 0 and c.replay_steps and c.replay_size > 0 and window > c.replay_min:
                    fired = True
                    if self._replay_due is None:
                        self._replay_due = self.samples.adapt_total
                        self._cond.notify_all()
            ack = BatchAck(
                version=self.version,
                target_version=self._planned(),
                generation=self.generation,
                calibrated=self.calibrated,
                replay_step=fired,
            )
            if idempotency_key:
                self._remember(self._report_keys, idempotency_key, ack)
            return ack

    def _remember(self, table: collections.OrderedDict[str, Any], key: str, value: Any) -> None:
        table[key] = value
        while len(table) > self.spec.idempotency_keys:
            table.popitem(last=False)

    def latest(self, after: int) -> tuple[int, bytes] | None:
        """The newest blob if its version is greater than ``after`` (no waiting, no training lock)."""
        latest = self._latest
        return latest if latest is not None and latest[0] > after else None

    def wait_latest(self, after: int, timeout: float) -> tuple[int, bytes] | None:
        """:meth:`latest`, waiting up to ``timeout`` seconds for a newer version (blocking)."""
        with self._cond:
            self._cond.wait_for(lambda: self.latest(after) is not None or self._stop or self.closing, timeout)
        return self.latest(after)

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until the worker has nothing due (for tests, benchmarks and ``--sync`` simulations)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._inflight[0] == "" and self._due() is None, timeout)

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
            if len(devices) < self.spec.rollback_devices or self._restore is not None:
                return
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
        if (
            c.idle_after_s > 0
            and self._idle_steps < c.idle_max_steps
            and s.window_len(s.adapt_total) > c.replay_min
            and time.monotonic() - self._last_upload >= c.idle_after_s * (self._idle_steps + 1)
        ):
            return "idle"
        if self.spec.retention_s > 0 and time.monotonic() >= self._next_sweep:
            return "sweep"
        return None

    def _publishes(self, job: str) -> int:
        if job in ("reset", "restore", "publish"):
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
            if c.replay_size > 0 and c.replay_factor > 0 and s.window_len(w_end) >= c.replay_min:
                replayed = s.sample(c.replay_factor * c.batch_size, self._rng(), end=w_end)
        report = self.cema.adapt(images, replayed)
        if report.replayed:
            self.count("mixed_steps")  # cloud steps that replayed 3B samples
        publish = self.cema.steps % c.publish_every == 0 and not self.frozen
        self._commit("steps", publish=publish, seconds=report.seconds, cursor=end, full_steps=self.full_steps + 1)

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
            if s.window_len(end) <= c.replay_min:
                return
            replayed = s.sample(c.idle_factor * c.batch_size, self._rng(), end=end)
        report = self.cema.replay_step(replayed)
        publish = self.cema.steps % c.publish_every == 0 and not self.frozen
        self._commit(counter, publish=publish, seconds=report.seconds)

    def _do_stats(self) -> None:
        b = self.config.batch_size
        with self._cond:
            start = self.stats_cursor
            images = self.samples.read_stats(start, start + b)
        t0 = time.perf_counter()
        self.cema.update_statistics(images)
        self._commit(
            "statistics_updates", publish=not self.frozen, seconds=time.perf_counter() - t0, stats_cursor=start + b
        )

    def _do_calibration(self) -> None:
        c = self.config
        with self._cond:
            up = self.samples.pending_calibrations()[0]
            self._inflight_seq = up.seq
            images, n = up.images, len(up.images)
            both = up.calibration == "shift" or c.statistics == "samples"
            if up.calibration == "shift" and not (self.shift_step >= 0 and self.cema.steps - self.shift_step < 2):
                keep, self.shift_step = 0.0, self.cema.steps  # a new shift episode: replace
            elif up.calibration == "start" and not self.calibrated:
                keep = 0.0  # the generation's first calibration: set
            else:  # other devices' batches of the same start or shift episode: merge by sample count
                keep = self.episode_n / (self.episode_n + n)
            self.episode_n = n if keep == 0.0 else self.episode_n + n
            self.calibrated = True
        t0 = time.perf_counter()
        self.cema.calibrate(images, student=True, teacher=both, keep=keep)
        log.info("%s: %s calibration on %d samples (%s)", self.name, up.calibration, n, "merged" if keep else "set")
        self._commit(
            "calibrations",
            publish=not self.frozen,
            seconds=time.perf_counter() - t0,
            calib_done=up.seq,
            calibration=up,
        )

    def _do_publish(self) -> None:
        with self._cond:
            self._publish_req = False
        self._commit("publishes", publish=True, seconds=0.0)

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
            self.counters["expired_samples"] += sum(len(u.images) for u in expired)
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
        **pointers: int,
    ) -> None:
        """Check, publish (a new version), persist, then make it visible; counters and version change together.
        A state with a non-finite tensor or a negative variance is never published: the last good state (the one
        saved by the previous commit) is restored and the step counted as ``diverged``."""
        problem = self.cema.problem() if check else None
        if problem is not None:
            saved = self.store.load_adapt()
            self.cema.load_state_dict(saved["cema"] if saved is not None else self.cema._initial, steps=False)
            log.error("%s: %s after a %s step; not published, last good state restored", self.name, problem, counter)
            counter, publish = "diverged", False
        with self._cond:
            book = self._book()
            book.update(pointers)
        version = self.version + 1 if publish else self.version
        data = None
        if publish:
            blob = RefitBlob(
                tensors=self.cema.blob_tensors(),
                fingerprint=self.fingerprint,
                version=version,
                producer=f"cema-deploy {__version__} cloud {self.name} step {self.cema.steps}",
            )
            if self.signer is not None:
                blob = self.signer(blob)
            data = self.store.save_blob(blob)  # the version is taken from here on, even if we crash next
            # Polls may fetch it now: a crash before the state below is saved restarts from the state before this
            # step (its samples are adapted on again and published under a newer version; none is reused).
            with self._cond:  # version, pointers and blob become visible together: acks never lag the blob
                for k in _POINTERS:
                    setattr(self, k, int(book[k]))
                self.version, self._latest = version, (version, data)
                self._inflight = ("committing", 0)  # its publish is done, its pointers advanced
                self._publish_delays.append(time.time() - blob.created)
                now = time.monotonic()
                while self._awaiting and self._awaiting[0][0] <= book["cursor"]:
                    self._latency(now - self._awaiting.popleft()[1])
                while self._awaiting_cal and self._awaiting_cal[0][0] <= book["calib_done"]:
                    self._latency(now - self._awaiting_cal.popleft()[1])
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
            self.version = version
            self.counters[counter] += 1
            if seconds > 0:
                self._seconds = [self._seconds[0] + seconds, self._seconds[1] + 1]
            if calibration is not None:
                rewrite = self.samples.applied(calibration)
            done = list(released or [])
            done += self.samples.collect(cursor=self.cursor, stats_cursor=self.stats_cursor)
            if data is not None:
                self.counters["blobs"] += 1
                self._dirty = False
            elif counter != "diverged":
                self._dirty = True
            state = self._state_json()
            self._cond.notify_all()
        if rewrite is not None:
            self.samples.write(rewrite)
        self.store.save_state(state)
        self._release(done)

    def _latency(self, seconds: float) -> None:
        self._latencies.append(seconds)
        self._latency_sum += seconds
        self._buckets[next((i for i, b in enumerate(LATENCY_BUCKETS) if seconds <= b), len(LATENCY_BUCKETS))] += 1

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

    def _book(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "calibrated": self.calibrated,
            "episode_n": self.episode_n,
            "shift_step": self.shift_step,
            "bad": list(self.bad),
            "version": self.version,
            **{k: getattr(self, k) for k in _POINTERS},
        }

    def _state_json(self) -> dict[str, Any]:
        s = self.samples
        return {
            **self._book(),
            "frozen": self.frozen,
            "dirty": self._dirty,
            "adapt_total": s.adapt_total,
            "stats_total": s.stats_total,
            "next_seq": s.next_seq,
            "counters": dict(self.counters),
        }

    # ---- metrics ------------------------------------------------------------------------------------------
    def count(self, key: str, n: int = 1) -> None:
        with self._cond:
            self.counters[key] += n

    def metrics(self) -> dict[str, Any]:
        with self._cond:
            lat = np.asarray(self._latencies) if self._latencies else None
            s = self.samples
            return {
                "name": self.name,
                "fingerprint": self.fingerprint,
                "version": self.version,
                "generation": self.generation,
                "calibrated": self.calibrated,
                "frozen": self.frozen,
                "steps": self.cema.steps,
                "pending": self._pending_samples(),
                "pending_cap": self.spec.pending_cap,
                "replay_window": s.window_len(s.adapt_total),
                "held": s.held(),
                "counters": dict(self.counters),
                "step_seconds_sum": float(self._seconds[0]),
                "step_seconds_count": int(self._seconds[1]),
                # over the newest 10,000 uploads; the histogram below counts every upload since the start
                "upload_to_blob_p50_s": float(np.percentile(lat, 50)) if lat is not None else math.nan,
                "upload_to_blob_p99_s": float(np.percentile(lat, 99)) if lat is not None else math.nan,
                "upload_to_blob_buckets": list(
                    zip([*LATENCY_BUCKETS, math.inf], np.cumsum(self._buckets).tolist(), strict=True)
                ),
                "upload_to_blob_sum_s": self._latency_sum,
                "upload_to_blob_count": int(sum(self._buckets)),
                # from a blob's creation to polls seeing it (the blob written and fsynced)
                "publish_delay_p99_s": float(np.percentile(self._publish_delays, 99))
                if self._publish_delays
                else math.nan,
                "bad_versions": len(self.bad),
            }
