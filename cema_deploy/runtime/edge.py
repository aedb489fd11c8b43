"""The edge runtime: preprocess -> infer -> select -> upload, and in the background poll -> verify -> refit -> judge.

Serving never waits on the network or on a refit (except in ``sync`` mode, which exists for reproducible runs).
The jobs live in their own modules, wired together here:

* :mod:`~cema_deploy.runtime.link.uplink`: one FIFO of uploads and batch reports (protocol 2: a
  :class:`~cema_deploy.contract.messages.BatchReport` after every edge batch, after its uploads), on disk with a
  state folder (:mod:`~cema_deploy.runtime.link.spool`).
* :mod:`~cema_deploy.runtime.updates.generation`: generation and calibration. While the deployment is uncalibrated the
  next edge batch goes up whole as ``calibration="start"``; ``SelectionResult.shift`` sends that batch as
  ``calibration="shift"`` (``recalibrate``); a newer generation (any acknowledgement, a 409) starts a fresh
  selector. Frames of ``SelectionResult.stats_mask`` go up as ``statistics`` samples.
* :mod:`~cema_deploy.runtime.updates.intake`: poll, verify the signature before parsing, validate, refit scheduler;
  refusals counted, reported and never fetched again.
* :mod:`~cema_deploy.runtime.updates.rollback`: each refit judged against the previous parameters on the same recent
  frames (mutual information between input and prediction); a drop beyond the margin rolls it back.
* :mod:`~cema_deploy.runtime.updates.state`: with ``state_dir`` the selector, refused versions, generation and serving
  blob survive restarts (written on an interval, on every refit, rollback or refusal, and on close).

Never imports torch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cema_deploy.contract.blob import blob_from_bytes
from cema_deploy.contract.messages import BatchReport, EdgeReport
from cema_deploy.contract.samples import KIND_STATISTICS
from cema_deploy.exceptions import CemaError
from cema_deploy.runtime.backends.base import Backend
from cema_deploy.runtime.frames.preprocess import images_at_model_size, normalize
from cema_deploy.runtime.link.client import CloudLink, EdgeConfigError, is_loopback_url
from cema_deploy.runtime.link.uplink import Uplink
from cema_deploy.runtime.metrics import LatencyHistogram
from cema_deploy.runtime.selection.rules import SampleSelector, SelectionResult
from cema_deploy.runtime.stats.adapter import StatsAdapter
from cema_deploy.runtime.updates.generation import GenerationTracker
from cema_deploy.runtime.updates.intake import REFUSAL_REASONS, BlobIntake
from cema_deploy.runtime.updates.rollback import Judgement, RollbackConfig, RollbackMonitor
from cema_deploy.runtime.updates.state import EdgeState, EdgeStateStore

__all__ = ["REFUSAL_REASONS", "EdgeRuntime", "EdgeStep", "RollbackConfig"]

log = logging.getLogger("cema_deploy.edge")


@dataclass(frozen=True)
class EdgeStep:
    """One processed batch: logits ``[N, C]``, predicted classes ``[N]``, the selection decision and the version
    of the parameters that produced the logits. ``calibration`` is ``start``/``shift`` when the batch went up as a
    calibration batch; in ``sync`` mode its logits are then those of the re-run on the calibrated parameters
    (the selection was judged on the logits before calibration)."""

    logits: np.ndarray
    predictions: np.ndarray
    selection: SelectionResult
    version: int
    calibration: str = ""


class EdgeRuntime:
    """A backend, a selector and (optionally) a cloud link, as one object.

    ``process`` runs on the caller's thread and never touches the network unless ``sync``. With a ``client``,
    the uplink thread sends samples and batch reports in order and the poller long-polls for blobs
    (``poll_wait_s`` per request). ``verifier(raw_bytes)`` runs before a blob is parsed and must raise
    :class:`~cema_deploy.exceptions.SignatureError` to refuse it; without one, blobs from a cloud that is not on a
    loopback address are refused unless ``allow_unsigned``. ``sync``: each ``process`` call waits until the blob
    that includes its uploads serves and was judged, and re-runs a calibration batch on the calibrated
    parameters, for runs whose results must not depend on timing. ``state_dir``: durable state and upload spool.

    Example:
        >>> rt = EdgeRuntime(get_backend("ort-cpu", "out/r50"), SampleSelector(SelectionConfig.for_classes(1000)),
        ...                  client=CloudClient(url, token, fp), state_dir="state")  # doctest: +SKIP
        >>> step = rt.process(uint8_images)  # doctest: +SKIP
        >>> rt.metrics()["version"]; rt.close()  # doctest: +SKIP
    """

    def __init__(
        self,
        backend: Backend,
        selector: SampleSelector,
        *,
        client: CloudLink | None = None,
        verifier: Callable[[bytes], Any] | None = None,
        allow_unsigned: bool = False,
        rollback: RollbackConfig | None = None,
        poll_wait_s: float = 10.0,
        upload_batch: int = 32,
        flush_interval_s: float = 0.5,
        max_queue_samples: int = 4096,
        max_queue_bytes: int = 64 * 2**20,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 30.0,
        device_id: str | None = None,
        sync: bool = False,
        sync_timeout_s: float = 120.0,
        recalibrate: bool = True,
        state_dir: str | Path | None = None,
        state_interval_s: float = 30.0,
        max_spool_bytes: int = 1024 * 2**20,
        min_refit_interval_s: float = 0.0,
        selector_factory: Callable[[], SampleSelector] | None = None,
        stats: StatsAdapter | None = None,
    ) -> None:
        if poll_wait_s < 0 or sync_timeout_s <= 0 or state_interval_s <= 0 or min_refit_interval_s < 0:
            raise EdgeConfigError(
                f"Need poll_wait_s >= 0, sync_timeout_s > 0, state_interval_s > 0 and min_refit_interval_s >= 0, "
                f"got {poll_wait_s}, {sync_timeout_s}, {state_interval_s}, {min_refit_interval_s}."
            )
        self.backend, self.selector, self.client = backend, selector, client
        self.manifest = backend.manifest
        self.rollback_cfg = rollback or RollbackConfig()
        self.sync_mode, self.sync_timeout_s = sync, sync_timeout_s
        self._selector_factory = selector_factory or (lambda: type(selector)(selector.config))
        self.frames, self.busy_s, self.sync_timeouts, self.selector_resets = 0, 0.0, 0, 0
        self.latency = LatencyHistogram()
        self.rolled_back: dict[int, str] = {}
        self.rollbacks_by_reason: dict[str, int] = {}
        self.restored_version = 0  # serving version restored from state_dir at start (0: none)
        self._reset_due = False
        self._started = time.monotonic()
        self._swap_lock = threading.Lock()  # refit vs rollback
        self._sel_lock = threading.Lock()  # the selector vs state snapshots and resets
        self._save_lock = threading.Lock()
        self._stop = threading.Event()
        self._state_wake = threading.Event()
        self.uplink: Uplink | None = None
        # Blobs that answer a calibration batch re-initialise the statistics by design: the previous parameters
        # are no reference for them, so they are accepted unjudged. The window opens when a calibration batch is
        # queued and closes once a blob of at least its acknowledged target version was applied.
        self._calib_lock = threading.Lock()
        self._calib_window = False
        self._calib_target: int | None = None
        self.deployment = GenerationTracker(client, recalibrate=recalibrate, on_new_generation=self._on_new_generation,
                                     on_calibration_done=self._on_calibration_done)  # fmt: skip
        unsigned_refused = not allow_unsigned and not is_loopback_url(getattr(client, "base_url", None))
        self.intake = BlobIntake(
            backend, self.manifest, client=client, verifier=verifier, swap_lock=self._swap_lock,
            require_signature=verifier is None and client is not None and unsigned_refused, poll_wait_s=poll_wait_s,
            min_refit_interval_s=min_refit_interval_s, report=self._report, on_applied=self._on_applied,
            on_changed=self._state_changed, before_poll=self._before_poll,
        )  # fmt: skip
        self._store = EdgeStateStore(state_dir) if state_dir is not None else None
        self.stats = stats  # the edge's own BatchNorm statistics (runtime/stats/adapter.py); None = off
        if self._store is not None:
            self._restore(self._store)
            if stats is not None:
                stats.load(self._store.directory)
        self.monitor = RollbackMonitor(
            backend, self.rollback_cfg, num_classes=self.manifest.num_classes,
            normalize=lambda im: normalize(im, self.manifest.preprocess), on_judged=self._on_judged,
        )  # fmt: skip
        if client is not None:
            self.uplink = Uplink(
                client, fingerprint=self.manifest.fingerprint, device_id=device_id, upload_batch=upload_batch,
                flush_interval_s=flush_interval_s, max_queue_samples=max_queue_samples,
                max_queue_bytes=max_queue_bytes, backoff_base_s=backoff_base_s, backoff_cap_s=backoff_cap_s,
                spool_dir=self._store.spool_dir if self._store is not None else None,
                max_spool_bytes=max_spool_bytes, listener=self.deployment,
            )  # fmt: skip
            self.intake.start()
        self._state_thread: threading.Thread | None = None
        if self._store is not None:
            self._state_thread = threading.Thread(
                target=self._state_loop, args=(state_interval_s,), name="cema-state", daemon=True
            )
            self._state_thread.start()

    # ---- serving --------------------------------------------------------------------------------------
    def process(self, images: np.ndarray) -> EdgeStep:
        """Run one batch of uint8 RGB images ``[N, H, W, 3]`` (any size; resized to the model's)."""
        t0 = time.perf_counter()
        if self._reset_due:
            with self._sel_lock:
                self.selector, self._reset_due = self._selector_factory(), False
                self.selector_resets += 1
        if self.sync_mode and self.deployment.status_due:
            self.deployment.read_status(self.sync_timeout_s, self._stop)  # does this batch calibrate?
        pre, c = self.manifest.preprocess, self.manifest.num_classes
        if len(images) == 0:  # nothing to run; still a well-formed step
            with self._sel_lock:
                empty = self.selector.select(np.zeros((0, c)))
            return EdgeStep(np.zeros((0, c), np.float32), np.zeros(0, np.int64), empty, self.backend.version)
        at_size = images_at_model_size(images, pre)
        x = normalize(at_size, pre)
        if self.stats is not None:  # probe when due and refit the edge's statistics before this batch is served
            self.stats.observe(x, at_size)
        logits, version = self.backend.infer_versioned(x)
        start, gen = self.deployment.begin_batch() if self.uplink is not None else ("", 0)
        with self._sel_lock:  # a start calibration sends the batch whole: the selector counts it so
            sel = self.selector.select(logits, images=at_size, calibration=bool(start))
        calibration = self._queue_uploads(at_size, sel, version, start, gen)
        self.monitor.ring.add(at_size, logits, version)
        self.monitor.frames_added()
        self.frames += len(at_size)
        busy = time.perf_counter() - t0
        step = EdgeStep(logits, logits.argmax(axis=1), sel, version, calibration)
        if self.sync_mode and self.uplink is not None:
            self.sync()
            if calibration and self.backend.version != version:  # run it again on the calibrated statistics
                t1 = time.perf_counter()
                logits2, version2 = self.backend.infer_versioned(x)
                busy += time.perf_counter() - t1
                step = EdgeStep(logits2, logits2.argmax(axis=1), sel, version2, calibration)
        self.busy_s += busy
        self.latency.observe(busy)
        return step

    def _queue_uploads(self, at_size: np.ndarray, sel: SelectionResult, version: int, start: str, gen: int) -> str:
        """Queue this batch's uploads and then its batch report; returns the calibration reason ("" if none)."""
        up = self.uplink
        if up is None:
            return ""
        reason = start or ("shift" if sel.shift and self.deployment.claim_shift() else "")
        n, selected = len(at_size), int(sel.mask.sum())
        if reason:  # the whole batch, once: its selected samples are adapted on from it
            with self._calib_lock:
                self._calib_window, self._calib_target = True, None
            up.put_calibration(at_size, sel.entropy, sel.mask, version=version, generation=gen, reason=reason)
            uploaded = n
        else:
            if selected:
                up.put(at_size[sel.mask], sel.entropy[sel.mask], version=version, generation=gen)
            stats = sel.stats_mask & ~sel.mask if sel.stats_mask is not None else np.zeros(n, bool)
            if stats.any():
                up.put(at_size[stats], sel.entropy[stats], version=version, kind=KIND_STATISTICS, generation=gen)
            uploaded = selected + int(stats.sum())
        up.put_report(BatchReport(seen=n, selected=selected, uploaded=uploaded, generation=gen))
        return reason

    @property
    def version(self) -> int:
        """Version of the parameters serving now."""
        return self.backend.version

    @property
    def refused(self) -> Any:
        """Refused blobs by reason (a Counter)."""
        return self.intake.refused

    @property
    def refused_upto(self) -> int:
        return self.intake.refused_upto

    @property
    def blobs_applied(self) -> int:
        return self.intake.blobs_applied

    @property
    def poll_errors(self) -> int:
        return self.intake.poll_errors

    @property
    def rollbacks(self) -> int:
        return sum(self.rollbacks_by_reason.values())

    # ---- waiting (reproducible runs) ------------------------------------------------------------------
    def wait_for_version(self, version: int, timeout: float = 60.0) -> bool:
        """Block until parameters of at least ``version`` serve, or that version was refused or rolled back
        (True), or ``timeout`` seconds passed (False)."""
        deadline = time.monotonic() + timeout
        while self.backend.version < version and self.intake.refused_upto < version:
            if time.monotonic() > deadline or self._stop.is_set():
                return False
            time.sleep(0.005)
        return True

    def sync(self, timeout: float | None = None) -> bool:
        """Send everything queued (uploads and batch reports), wait until the blob of the highest
        ``target_version`` acknowledged so far serves (or was refused), and until the rollback judgement of the
        serving version was taken. True when done, False on timeout (counted in ``sync_timeouts``)."""
        if self.uplink is None:
            return True
        deadline = time.monotonic() + (self.sync_timeout_s if timeout is None else timeout)

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        ok = self.uplink.flush(left())
        target = self.uplink.max_target_version
        if ok and target > self.backend.version:
            ok = self.wait_for_version(target, left())
        ok = ok and self.monitor.wait_judged(left())
        if self.deployment.status_due:  # a new generation was seen: know its calibration before the next batch
            self.deployment.read_status(left(), self._stop)
        if not ok:
            self.sync_timeouts += 1
        return ok

    # ---- refit and rollback ---------------------------------------------------------------------------
    def apply_blob_bytes(self, data: bytes, *, source: str = "blob", timeout: float = 120.0) -> bool:
        """Verify, parse, validate and hot-refit now (blocking until the refit is done); True when applied.
        Refusals are counted by reason, logged and reported, never raised; the serving parameters are then
        unchanged."""
        return self.intake.apply_bytes(data, source=source, timeout=timeout)

    def _before_poll(self) -> None:
        if self.deployment.status_due:
            self.deployment.read_status()

    def _on_applied(self, version: int) -> None:
        with self._calib_lock:
            exempt = self._calib_window
            if exempt and self._calib_target is not None and version >= self._calib_target:
                self._calib_window = False
        if exempt:
            log.info("v%d answers a calibration batch: accepted without a rollback judgement", version)
            self.monitor.accept(version)
        else:
            self.monitor.applied(version)

    def _on_calibration_done(self, target: int | None) -> None:
        with self._calib_lock:
            if target is None or self.backend.version >= target:  # lost, or its blob already serves
                self._calib_window, self._calib_target = False, None
            else:
                self._calib_target = target

    def _on_judged(self, j: Judgement) -> None:
        """RollbackMonitor callback (its thread): roll ``j.version`` back if judged bad and still serving."""
        if not j.rollback:
            log.debug("%s", j.describe())
            return
        with self._swap_lock:
            self.intake.refused_upto = max(self.intake.refused_upto, j.version)  # never again, nor anything older
            if self.backend.version != j.version:
                return  # a newer refit replaced it already
            restored = self.backend.rollback()
            self.rollbacks_by_reason[j.reason] = self.rollbacks_by_reason.get(j.reason, 0) + 1
            self.rolled_back[j.version] = j.describe()
        log.warning("rolled back v%d, serving v%d again: %s", j.version, restored, j.describe())
        self._report(EdgeReport(kind="rollback", version=j.version, reason=j.describe()))
        self._state_changed()

    def _report(self, report: EdgeReport) -> None:
        if self.uplink is not None:
            self.uplink.put_edge_report(report)

    def _on_new_generation(self, generation: int) -> None:
        self._reset_due = True  # the serving thread starts a fresh selector before its next batch
        self._state_changed()

    # ---- durable state --------------------------------------------------------------------------------
    def _restore(self, store: EdgeStateStore) -> None:
        loaded = store.load(self.manifest.fingerprint)
        if loaded is None:
            return
        st, data = loaded
        d, ik = self.deployment, self.intake
        d.generation, d.calibrated = st.generation, st.calibrated
        ik.refused_upto = st.refused_upto
        ik.refused_versions = {int(k): v for k, v in st.refused.items()}
        self.rolled_back = {int(k): v for k, v in st.rolled_back.items()}
        if st.selector is not None:
            self.selector.load_state_dict(st.selector)
        if data is None or st.serving_version <= 0:
            return
        try:
            if ik.verifier is not None:
                ik.verifier(data)
            blob = blob_from_bytes(data, source=f"the saved serving blob v{st.serving_version}")
            self.backend.refit(blob)
        except CemaError as exc:
            log.warning("not serving the saved blob v%d: %s; serving the export's parameters", st.serving_version, exc)
            return
        ik.blob_bytes[blob.version] = data
        self.restored_version = blob.version
        log.info("restored from %s: serving v%d, generation %d, refused up to v%d", store.directory, blob.version,
                 st.generation, st.refused_upto)  # fmt: skip

    def state(self) -> EdgeState:
        """What ``state_dir`` holds (a consistent snapshot; the serving blob's bytes are written beside it)."""
        with self._sel_lock:
            selector = self.selector.state_dict()
        return EdgeState(
            fingerprint=self.manifest.fingerprint, generation=self.deployment.generation,
            calibrated=self.deployment.calibrated, serving_version=self.backend.version,
            refused_upto=self.intake.refused_upto,
            refused={str(k): v for k, v in self.intake.refused_versions.items()},
            rolled_back={str(k): v for k, v in self.rolled_back.items()}, selector=selector, saved_at=time.time(),
        )  # fmt: skip

    def save_state(self) -> bool:
        """Write the state now (atomic); False without a state folder or when the write failed (logged)."""
        if self._store is None:
            return False
        with self._save_lock:
            with self._swap_lock:
                st = self.state()
                data = self.intake.blob_bytes.get(st.serving_version)
            try:
                self._store.save(st, data)
                if self.stats is not None:
                    self.stats.save(self._store.directory)
            except (OSError, CemaError) as exc:
                log.error("could not save the edge state in %s: %s", self._store.directory, exc)
                return False
        return True

    def _state_changed(self) -> None:
        self._state_wake.set()

    def _state_loop(self, interval_s: float) -> None:
        while not self._stop.is_set():
            self._state_wake.wait(interval_s)
            self._state_wake.clear()
            if not self._stop.is_set():
                self.save_state()

    # ---- metrics --------------------------------------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        """Counters as plain numbers (JSON-serialisable): frames, fps (frames per second spent in ``process``),
        wall_fps, selected % (the selector's, since its start), uploaded % (all kinds, over frames run here) and
        uploaded frames by kind, uplink counters, serving version, blobs applied, refusals and rollbacks by
        reason, generation and calibration, mean entropy and the selection counters."""
        c = self.selector.counters
        up = asdict(self.uplink.counters) if self.uplink is not None else {}
        ik, d, last = self.intake, self.deployment, self.monitor.last
        now = time.monotonic()
        return {
            "frames": self.frames,
            "fps": self.frames / self.busy_s if self.busy_s else 0.0,
            "wall_fps": self.frames / (now - self._started),
            "version": self.backend.version,
            "selection": c.as_dict(),
            "selected_pct": 100.0 * c.selected / c.seen if c.seen else 0.0,
            "uploaded_pct": 100.0 * up.get("uploaded", 0) / self.frames if self.frames else 0.0,
            "uploaded": {k: up.get(f"uploaded_{k}", 0) for k in ("selected", "calibration", "statistics")},
            "uplink": up,
            "queued_now": self.uplink.queued_now if self.uplink is not None else 0,
            "spool_bytes": self.uplink.spool_bytes if self.uplink is not None else 0,
            "blobs_applied": ik.blobs_applied,
            "refused": dict(ik.refused),
            "refused_versions": sorted(ik.refused_versions),
            "refused_upto": ik.refused_upto,
            "rollbacks": self.rollbacks,
            "rollbacks_by_reason": dict(self.rollbacks_by_reason),
            "rolled_back": sorted(self.rolled_back),
            "last_judgement": asdict(last) if last is not None else None,
            "generation": d.generation,
            "calibrated": d.calibrated,
            "calibrations": dict(d.calibrations),
            "selector_resets": self.selector_resets,
            "restored_version": self.restored_version,
            "seconds_since_last_blob": now - (ik.last_blob_at or self._started),
            "unsigned_applied": ik.unsigned_applied,
            "poll_errors": ik.poll_errors,
            "status_errors": d.status_errors,
            "sync_timeouts": self.sync_timeouts,
            "bytes_received": ik.bytes_received,
            "mean_entropy": c.mean_entropy,
            "stats": self.stats.metrics() if self.stats is not None else {"mode": "off"},
        }

    def close(self) -> None:
        """Stop the poller, the refit scheduler, the rollback monitor and the uplink, and save the state. Queued
        uploads not yet sent are discarded in memory (``sync``/``uplink.flush`` first) and kept in a spool.
        Waits for a refit being built, not for a long poll; nothing is applied after it returns. Safe to call
        twice."""
        if self._stop.is_set():
            return
        self._stop.set()
        self.monitor.close()
        self.intake.close()
        self.save_state()
        self._state_wake.set()
        if self.uplink is not None:
            self.uplink.close()
        if self._state_thread is not None:
            self._state_thread.join(timeout=5.0)
        if self.client is not None:
            self.client.close()

    def __enter__(self) -> EdgeRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
