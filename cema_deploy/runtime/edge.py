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
* :mod:`~cema_deploy.runtime.stats.adapter` (``stats``, protocol 3): the edge owns its running statistics. It then
  sends no calibration batches and no statistics samples; whenever its statistics changed, a statistics report (a
  batch report of ``seen = 0`` carrying them, :mod:`cema_deploy.contract.edge_statistics`) goes ahead of the
  batch's uploads, so the cloud adapts on them under the statistics they were served with; every cloud blob is
  built with the edge's current statistics in place of the blob's (the refit scheduler's ``prepare``), so no batch
  is served, and no blob judged by the rollback guard, with the cloud's statistics. Local statistics refits are not
  judged.
* :mod:`~cema_deploy.runtime.updates.intake`: poll, verify the signature before parsing, validate, refit scheduler;
  refusals counted and reported.
* :mod:`~cema_deploy.runtime.updates.ledger`: the one owner of the versions: the cloud epoch followed, the refusal
  floor (moved only by verified metadata), refusals, rollbacks and the calibration exemption; the intake, the
  uplink's acknowledgements and the rollback guard report to it.
* :mod:`~cema_deploy.runtime.updates.rollback`: each refit judged against the previous parameters on the same recent
  frames since the last calibration (mutual information between input and prediction); a drop beyond the margin
  rolls it back, is reported once, and the ledger holds the episode's line (later blobs of the episode declined
  unjudged, ``RollbackConfig.hold_frames``). Every verdict is recorded (``metrics()["verdicts"]``).
* :mod:`~cema_deploy.runtime.updates.state`: with ``state_dir`` the selector, refused versions, generation and serving
  blob survive restarts (written on an interval, on every refit, rollback or refusal, and on close).

Never imports torch.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cema_deploy.contract.blob import RefitBlob, blob_from_bytes
from cema_deploy.contract.edge_statistics import statistics_to_text
from cema_deploy.contract.messages import BatchReport, DeploymentStatus, EdgeReport
from cema_deploy.contract.samples import KIND_STATISTICS
from cema_deploy.exceptions import CemaError, RefitError
from cema_deploy.runtime.backends.base import Backend
from cema_deploy.runtime.frames.preprocess import images_at_model_size, normalize
from cema_deploy.runtime.link.client import CloudLink, EdgeConfigError, is_loopback_url
from cema_deploy.runtime.link.uplink import Uplink, refusal_advice
from cema_deploy.runtime.metrics import LatencyHistogram
from cema_deploy.runtime.selection.rules import SampleSelector, SelectionResult
from cema_deploy.runtime.stats.adapter import StatsAdapter
from cema_deploy.runtime.updates.generation import GenerationTracker
from cema_deploy.runtime.updates.intake import REFUSAL_REASONS, BlobIntake
from cema_deploy.runtime.updates.ledger import VersionLedger, previous_stamp, serving_stamp
from cema_deploy.runtime.updates.rollback import Judgement, RollbackConfig, RollbackMonitor
from cema_deploy.runtime.updates.state import EdgeState, EdgeStateStore

__all__ = ["REFUSAL_REASONS", "EdgeRuntime", "EdgeStep", "RollbackConfig"]

log = logging.getLogger("cema_deploy.edge")


class _SignalSafeFlag(threading.Event):
    """An Event that a signal handler may set: no lock is taken (``threading.Event.set`` takes one, which the
    interrupted main thread may hold); waiters poll every 50 ms."""

    def __init__(self) -> None:
        super().__init__()
        self._flag_set = False

    def set(self) -> None:
        self._flag_set = True

    def is_set(self) -> bool:
        return self._flag_set

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._flag_set and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.05 if deadline is None else max(0.0, min(0.05, deadline - time.monotonic())))
        return self._flag_set


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
        pin_version: int | None = None,
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
        self.restored_version = 0  # serving version restored from state_dir at start (0: none)
        #: Source frames that could not be read and were skipped (set by the caller that reads the source).
        self.frames_unreadable = 0
        self.pin_version = pin_version
        #: Every rollback verdict (the newest 1,000): version, previous, scores, frames, episode, what was done.
        self.verdicts: collections.deque[dict[str, Any]] = collections.deque(maxlen=1000)
        self._hold_from: int | None = None  # frames served when the ledger began to hold (the runtime releases it)
        self._generation_of: dict[int, int] = {}  # serving version -> the generation it was applied in
        self._reset_due = False
        self._started = time.monotonic()
        self._swap_lock = threading.Lock()  # refit vs rollback
        self._sel_lock = threading.Lock()  # the selector vs state snapshots and resets
        self._save_lock = threading.Lock()
        self._stop = threading.Event()
        self._waits_cut = _SignalSafeFlag()  # set by cut_waits() and close(): --sync waits end at once
        self._state_wake = threading.Event()
        self.uplink: Uplink | None = None
        self.ledger = VersionLedger(lambda: serving_stamp(backend))
        self.deployment = GenerationTracker(client, recalibrate=recalibrate, on_new_generation=self._on_new_generation,
                                            on_calibration_done=self.ledger.calibration_done,
                                            on_cloud_version=self.ledger.cloud_says,
                                            owns_statistics=stats is not None)  # fmt: skip
        unsigned_refused = not allow_unsigned and not is_loopback_url(getattr(client, "base_url", None))
        self.intake = BlobIntake(
            backend, self.manifest, client=client, verifier=verifier, swap_lock=self._swap_lock,
            require_signature=verifier is None and client is not None and unsigned_refused, poll_wait_s=poll_wait_s,
            ledger=self.ledger, min_refit_interval_s=min_refit_interval_s, report=self._report,
            on_applied=self._on_applied, on_changed=self._state_changed, before_poll=self._before_poll,
            before_decline=self._read_generation, pin_version=pin_version,
        )  # fmt: skip
        self._store = EdgeStateStore(state_dir) if state_dir is not None else None
        self.stats = stats  # the edge's own BatchNorm statistics (runtime/stats/adapter.py); None = off
        self._stats_reported: tuple[int, int] | None = None  # (probes, resets) of the last statistics report
        #: The lead weights (contract/lead.py) of each blob prepared for a refit, by (epoch, version); the selector
        #: gets those of the blob that serves, so a rollback brings back the previous blob's weights with its tensors.
        self._lead: dict[tuple[int, int], tuple[float, ...]] = {}
        self.intake.scheduler.prepare = self._prepare
        if self._store is not None:
            if stats is not None:  # first: the saved blob is applied with the edge's statistics
                stats.load(self._store.directory)
            self._restore(self._store)
        self.monitor = RollbackMonitor(
            backend, self.rollback_cfg, num_classes=self.manifest.num_classes,
            normalize=lambda im: normalize(im, self.manifest.preprocess), on_judged=self._on_judged,
            unjudgeable=self._across_generations,
        )  # fmt: skip
        #: Whether the cloud answers (None without an HTTP client).
        self.connectivity = getattr(client, "connectivity", None)
        if client is not None:
            self.uplink = Uplink(
                client, fingerprint=self.manifest.fingerprint, device_id=device_id, upload_batch=upload_batch,
                flush_interval_s=flush_interval_s, max_queue_samples=max_queue_samples,
                max_queue_bytes=max_queue_bytes, backoff_base_s=backoff_base_s, backoff_cap_s=backoff_cap_s,
                spool_dir=self._store.spool_dir if self._store is not None else None,
                max_spool_bytes=max_spool_bytes, listener=self.deployment,
            )  # fmt: skip
            if self.uplink.calibration_queued:  # restored from the spool: its blob is exempt like any calibration's
                self.ledger.calibration_queued()
            if self.connectivity is not None:
                self.connectivity.backlog = self._backlog
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
            self.deployment.read_status(self.sync_timeout_s, self._waits_cut)  # does this batch calibrate?
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
        if self.stats is not None:  # its label-concentration guard watches the served predictions
            self.stats.served(logits.argmax(axis=1))
        start, gen = self.deployment.begin_batch() if self.uplink is not None else ("", 0)
        lead = self.lead_weights  # those of the blob serving now (after this batch's inference: at worst newer)
        with self._sel_lock:  # a start calibration sends the batch whole: the selector counts it so
            sel = self.selector.select(logits, images=at_size, calibration=bool(start), lead=lead)
        calibration = self._queue_uploads(at_size, sel, version, start, gen)
        self.monitor.ring.add(at_size, logits, version)
        self.monitor.frames_added()
        self.frames += len(at_size)
        self._release_hold_when_due()
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
        stats_report = self._statistics_report()
        if stats_report:  # ahead of this batch's uploads: the cloud adapts on them under the statistics they met
            up.put_report(BatchReport(seen=0, selected=0, uploaded=0, generation=gen, **stats_report))
        if reason:  # the whole batch, once: its selected samples are adapted on from it
            self.ledger.calibration_queued()  # a new episode: the hold (if any) ends
            self.monitor.ring.rebase()  # refits are judged only on frames from this batch on
            up.put_calibration(at_size, sel.entropy, sel.mask, version=version, generation=gen, reason=reason)
            uploaded = n
        else:
            if selected:
                up.put(at_size[sel.mask], sel.entropy[sel.mask], version=version, generation=gen)
            stats = sel.stats_mask & ~sel.mask if sel.stats_mask is not None else np.zeros(n, bool)
            if self.stats is not None:  # the edge owns its statistics: the cloud needs no statistics samples
                stats = np.zeros(n, bool)
            if stats.any():
                up.put(at_size[stats], sel.entropy[stats], version=version, kind=KIND_STATISTICS, generation=gen)
            uploaded = selected + int(stats.sum())
        owns = self.stats.local_generation if self.stats is not None else 0  # > 0: this edge owns its statistics
        up.put_report(BatchReport(seen=n, selected=selected, uploaded=uploaded, generation=gen, stats_generation=owns))
        return reason

    def _statistics_report(self) -> dict[str, Any]:
        """The ``statistics`` fields of a statistics report (protocol 3: a batch report of ``seen = 0``, queued
        ahead of the batch's uploads) when the edge's statistics changed since its last report; else nothing."""
        st = self.stats
        if st is None or self._stats_reported == (st.probes, st.resets):
            return {}
        self._stats_reported = (st.probes, st.resets)
        text = statistics_to_text(st.tensors(), local_generation=st.local_generation)
        return {"statistics": text, "stats_generation": st.local_generation}

    def _prepare(self, blob: RefitBlob) -> RefitBlob:
        """Right before a blob's build: remember its lead weights (none: the ``lead`` rule draws uniformly while it
        serves) and give it the edge's statistics."""
        if blob.lead is not None:
            self._lead[blob.stamp] = blob.lead
        else:
            self._lead.pop(blob.stamp, None)
        for stamp in sorted(self._lead)[:-8]:  # the serving and previous blobs are among the newest
            del self._lead[stamp]
        return self._with_edge_statistics(blob)

    @property
    def lead_weights(self) -> tuple[float, ...] | None:
        """The lead weights of the blob serving now (validated with it), None when it carried none."""
        return self._lead.get(serving_stamp(self.backend))

    def _with_edge_statistics(self, blob: RefitBlob) -> RefitBlob:
        """A cloud blob as this edge serves it: the cloud's affine parameters with the edge's current running
        statistics (the refit scheduler calls it right before the build); unchanged without an adapter."""
        if self.stats is None:
            return blob
        return replace(blob, tensors={**blob.tensors, **self.stats.tensors()})

    @property
    def version(self) -> int:
        """Version of the parameters serving now."""
        return self.backend.version

    @property
    def refused(self) -> Any:
        """Refused blobs by reason (a Counter, a copy)."""
        return self.intake.refused

    @property
    def refused_upto(self) -> int:
        """Versions of the followed epoch up to this one are never applied (verified refusals and rollbacks)."""
        return self.ledger.refused_upto

    @property
    def epoch(self) -> int:
        """The cloud epoch this edge follows (0: a cloud without epochs, or none seen yet)."""
        return self.ledger.epoch

    @property
    def blobs_applied(self) -> int:
        return self.intake.blobs_applied

    @property
    def poll_errors(self) -> int:
        return self.intake.poll_errors

    @property
    def rollbacks(self) -> int:
        return sum(self.ledger.snapshot().rollbacks.values())

    # ---- waiting (reproducible runs) ------------------------------------------------------------------
    def wait_for_version(self, version: int, timeout: float = 60.0) -> bool:
        """Block until parameters of at least ``version`` (of the followed epoch) serve, or that version was refused
        or rolled back, or the cloud answered with something that could not be applied nor remembered (an
        unverifiable answer, a replay: True, waiting longer cannot help), or ``timeout`` seconds passed (False)."""
        deadline = time.monotonic() + timeout
        fruitless = self.ledger.fruitless
        while not self.ledger.done(version) and self.ledger.fruitless == fruitless:
            if time.monotonic() > deadline or self._stop.is_set() or self._waits_cut.is_set():
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
            return 0.0 if self._waits_cut.is_set() else max(0.0, deadline - time.monotonic())

        ok = self.uplink.flush(left())
        target = self.uplink.max_target_version
        if ok and not self.ledger.done(target):
            ok = self.wait_for_version(target, left())
        ok = ok and self.monitor.wait_judged(left())
        if self.deployment.status_due:  # a new generation was seen: know its calibration before the next batch
            self.deployment.read_status(left(), self._waits_cut)
        if not ok:
            self.sync_timeouts += 1
        return ok

    def cut_waits(self) -> None:
        """End every ``--sync`` wait now and skip the later ones (a stop was requested: the batch being served
        finishes without waiting for the cloud). Safe to call from a signal handler: it only sets flags."""
        self._waits_cut.set()
        if self.uplink is not None:
            self.uplink.cut_flush()

    # ---- refit and rollback ---------------------------------------------------------------------------
    def apply_blob_bytes(self, data: bytes, *, source: str = "blob", timeout: float = 120.0) -> bool:
        """Verify, parse, validate and hot-refit now (blocking until the refit is done); True when applied.
        Refusals are counted by reason, logged and reported, never raised; the serving parameters are then
        unchanged."""
        return self.intake.apply_bytes(data, source=source, timeout=timeout)

    def _before_poll(self) -> None:
        if self.deployment.status_due:
            self.deployment.read_status()

    def _read_generation(self) -> DeploymentStatus | None:
        """Read the deployment's status now and let the tracker observe its generation (a new one starts a new
        episode, which ends the hold): the blob of a reset often arrives before any acknowledgement names the new
        generation. The status, or None without a cloud or when it does not answer."""
        if self.client is None:
            return None
        try:
            status = self.client.status()
        except CemaError:
            return None
        self.deployment.observe(status.generation, status.calibrated, "status")
        return status

    def _backlog(self) -> str:
        up = self.uplink
        if up is None:
            return ""
        where = f"{up.spool_bytes / 2**20:.1f} MiB in the spool" if up.spool is not None else "in memory"
        return f"{up.queued_now} samples wait to be uploaded ({where})"

    def _across_generations(self, version: int, previous: int) -> str:
        """Why ``version`` cannot be judged against ``previous`` ("" when it can): a reset of the deployment
        between them. The cloud's status is read now, since the reset's blob often arrives before any
        acknowledgement names the new generation."""
        status = self._read_generation()
        if status is None:
            return ""
        before = self._generation_of.get(previous, 0)
        if before <= 0 or status.generation <= before:
            return ""
        self._generation_of[version] = status.generation
        return (f"it is a blob of generation {status.generation} (the deployment was reset) and v{previous} one of "
                f"generation {before}: a new start, not a refit to roll back")  # fmt: skip

    def _on_applied(self, version: int) -> None:
        self._generation_of[version] = self.deployment.generation
        for v in sorted(self._generation_of)[:-8]:  # the serving and previous versions are among the newest
            del self._generation_of[v]
        if self.ledger.exempt(version):
            log.info("v%d answers a calibration batch: accepted without a rollback judgement", version)
            self.monitor.accept(version)
        else:
            self.monitor.applied(version)

    def _on_judged(self, j: Judgement) -> None:
        """RollbackMonitor callback (its thread): roll ``j.version`` back if judged bad and still serving; record
        the verdict. After a rollback the cloud is told once and the ledger holds this episode's line."""
        action = self._act_on(j)
        record = asdict(j)
        record["frames"] = record.pop("n")
        self.verdicts.append({**record, "episode": self.ledger.episode, "action": action})

    def _act_on(self, j: Judgement) -> str:
        if not j.rollback:
            log.debug("%s", j.describe())
            return "kept"
        with self._swap_lock:
            serving, previous = serving_stamp(self.backend), previous_stamp(self.backend)
            if serving[1] != j.version:  # a newer refit replaced it already: never again, nor anything older
                if previous is not None and previous[1] == j.version:
                    self.ledger.rolled_back(previous, j.reason, swapped=False)
                return "replaced already"
            try:
                restored = self.backend.rollback(only_if_serving=j.version)  # atomic with the backend's swaps
            except RefitError as exc:  # a refit landed since the check above, or nothing to return to
                log.warning("v%d judged bad but not rolled back: %s", j.version, exc)
                return "not rolled back"
            same_epoch = self.ledger.rolled_back(serving, j.reason, detail=j.describe(), swapped=True)
            if same_epoch and self.rollback_cfg.hold_frames > 0:  # one verdict per episode: hold its line
                self.ledger.hold(j.version)
                self._hold_from = self.frames
        log.warning("rolled back v%d, serving v%d again: %s", j.version, restored, j.describe())
        if same_epoch:  # a version of an epoch the cloud left behind means nothing to it
            self._report(EdgeReport(kind="rollback", version=j.version, reason=j.describe()))
        self._state_changed()
        return "rolled back"

    def _release_hold_when_due(self) -> None:
        """End the ledger's hold ``hold_frames`` frames after the rollback that began it (serving thread)."""
        since = self._hold_from
        if since is None:
            return
        if self.ledger.holding is None:  # a new episode ended it
            self._hold_from = None
        elif self.frames - since >= self.rollback_cfg.hold_frames:
            self._hold_from = None
            self.ledger.release(f"{self.frames - since} frames served since the rollback")

    def _report(self, report: EdgeReport) -> None:
        if self.uplink is not None:
            self.uplink.put_edge_report(report)

    def _on_new_generation(self, generation: int) -> None:
        self.ledger.new_episode()
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
        if st.selector is not None:
            self.selector.load_state_dict(st.selector)
        serving_epoch = 0
        pinned_out = self.pin_version is not None and st.serving_version > self.pin_version
        if pinned_out:
            log.warning("not serving the saved blob v%d: it is newer than --pin-version %d; serving the export's "
                        "parameters", st.serving_version, self.pin_version)  # fmt: skip
        if data is not None and st.serving_version > 0 and not pinned_out:
            try:
                if ik.verifier is not None:
                    ik.verifier(data)
                blob = blob_from_bytes(data, source=f"the saved serving blob v{st.serving_version}")
                self.backend.refit(self._prepare(blob))
            except CemaError as exc:
                log.warning("not serving the saved blob v%d: %s; serving the export's parameters", st.serving_version,
                            exc)  # fmt: skip
            else:
                ik.blob_bytes[blob.stamp] = data
                self.restored_version, serving_epoch = blob.version, blob.epoch
                self._generation_of[blob.version] = st.generation
        self.ledger.restore(
            epoch=max(st.epoch, serving_epoch),
            refused={int(k): v for k, v in st.refused.items()},
            rolled_back={int(k): v for k, v in st.rolled_back.items()},
            saved_upto=st.refused_upto,
        )
        if self.restored_version:
            log.info("restored from %s: serving v%d (epoch %d), generation %d, refused up to v%d", store.directory,
                     self.restored_version, self.ledger.epoch, st.generation, self.ledger.refused_upto)  # fmt: skip

    def state(self) -> EdgeState:
        """What ``state_dir`` holds (a consistent snapshot; the serving blob's bytes are written beside it)."""
        with self._sel_lock:
            selector = self.selector.state_dict()
        led = self.ledger.snapshot()
        serving_epoch, serving_version = serving_stamp(self.backend)
        return EdgeState(
            fingerprint=self.manifest.fingerprint, generation=self.deployment.generation,
            calibrated=self.deployment.calibrated, serving_version=serving_version, serving_epoch=serving_epoch,
            epoch=led.epoch, refused_upto=led.refused_upto, refused={str(k): v for k, v in led.refused.items()},
            rolled_back={str(k): v for k, v in led.rolled_back.items()}, selector=selector, saved_at=time.time(),
        )  # fmt: skip

    def save_state(self) -> bool:
        """Write the state now (atomic); False without a state folder or when the write failed (logged)."""
        if self._store is None:
            return False
        with self._save_lock:
            with self._swap_lock:
                st = self.state()
                data = self.intake.blob_bytes.get((st.serving_epoch, st.serving_version))
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
        uploaded frames by kind, uplink counters, serving version and epoch, blobs applied, refusals (and
        unverifiable answers) and rollbacks by reason, generation and calibration, mean entropy and the selection
        counters; ``refit_path``: how refits reach the engine (``hybrid``, ``inplace``, ``prepared``, ``plain``,
        ``build``). Safe to call from any thread: what other threads write is copied under their locks."""
        c = self.selector.counters
        up = asdict(self.uplink.counters) if self.uplink is not None else {}
        ik, d, last = self.intake, self.deployment, self.monitor.last
        led = self.ledger.snapshot()  # one consistent copy: the poller, the refit worker and the monitor write it
        calibrations = d.calibrations_snapshot()
        now = time.monotonic()
        return {
            "frames": self.frames,
            "frames_unreadable": self.frames_unreadable,
            "fps": self.frames / self.busy_s if self.busy_s else 0.0,
            "wall_fps": self.frames / (now - self._started),
            "version": self.backend.version,
            "epoch": led.epoch,
            "refit_path": str(getattr(self.backend, "refit_path", "build")),
            "selection": c.as_dict(),
            "selected_pct": 100.0 * c.selected / c.seen if c.seen else 0.0,
            "uploaded_pct": 100.0 * up.get("uploaded", 0) / self.frames if self.frames else 0.0,
            "uploaded": {k: up.get(f"uploaded_{k}", 0) for k in ("selected", "calibration", "statistics")},
            "uplink": up,
            "queued_now": self.uplink.queued_now if self.uplink is not None else 0,
            "spool_bytes": self.uplink.spool_bytes if self.uplink is not None else 0,
            "blobs_applied": ik.blobs_applied,
            "refused": led.refusals,
            "refused_versions": sorted(led.refused),
            "refused_upto": led.refused_upto,
            "unverified": led.unverified,
            "rebaselines": led.rebaselines,
            "rollbacks": sum(led.rollbacks.values()),
            "rollbacks_by_reason": led.rollbacks,
            "rolled_back": sorted(led.rolled_back),
            "last_judgement": asdict(last) if last is not None else None,
            "generation": d.generation,
            "calibrated": d.calibrated,
            "calibrations": calibrations,
            "selector_resets": self.selector_resets,
            "restored_version": self.restored_version,
            "seconds_since_last_blob": now - (ik.last_blob_at or self._started),
            "unsigned_applied": ik.unsigned_applied,
            "poll_errors": ik.poll_errors,
            "status_errors": d.status_errors,
            "sync_timeouts": self.sync_timeouts,
            "bytes_received": ik.bytes_received,
            "mean_entropy": c.mean_entropy,
            "cloud_up": None if self.connectivity is None else bool(self.connectivity.up),  # False: never answered
            "cloud_outages": 0 if self.connectivity is None else self.connectivity.outages,
            "cloud_unreachable_s": 0.0 if self.connectivity is None else self.connectivity.down_s(),
            "cloud_refusal": self.cloud_refusal(),
            "pin_version": self.pin_version,
            "held_by_pin": ik.held_by_pin,
            "unjudged_refits": self.monitor.unjudged,
            "episode": led.episode,
            "held_blobs": led.held,
            "holding": led.holding,
            "verdicts": list(self.verdicts),
            "stats": self.stats.metrics() if self.stats is not None else {"mode": "off"},
        }

    def cloud_refusal(self) -> dict[str, Any] | None:
        """The cloud's refusal of this device holding the uploads now (status, what to do, samples held), or None."""
        up = self.uplink
        exc = up.refusal if up is not None else None
        if up is None or exc is None:
            return None
        return {"status": exc.status, "advice": refusal_advice(exc.status), "message": str(exc),
                "samples_held": up.queued_now, "reports_held": up.reports_queued}  # fmt: skip

    def close(self) -> None:
        """Stop the poller, the refit scheduler, the rollback monitor and the uplink, and save the state. Queued
        uploads not yet sent are discarded in memory (``sync``/``uplink.flush`` first) and kept in a spool.
        Waits for a refit being built, not for a long poll; nothing is applied after it returns. Safe to call
        twice."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._waits_cut.set()
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
