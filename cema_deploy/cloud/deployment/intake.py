"""Intake: uploads stored durably before they are acknowledged (202 only once the samples are on disk), idempotent
uploads and batch reports, the pending cap (429 + Retry-After), and the version each ack promises
(:meth:`IntakeMixin._planned` follows the worker's order in :mod:`cema_deploy.cloud.deployment.loop`)."""

from __future__ import annotations

import json
import math
import threading
import time

from cema_deploy.cloud.deployment.state import REPORT_KEYS, DeploymentState
from cema_deploy.cloud.errors import PendingCapReached, Refused, StaleGeneration
from cema_deploy.cloud.store.replay import Upload
from cema_deploy.contract.edge_statistics import statistics_from_text
from cema_deploy.contract.messages import BatchAck, BatchReport, UploadAck
from cema_deploy.contract.samples import KIND_CALIBRATION, SampleBatch, samples_from_bytes, upload_header
from cema_deploy.exceptions import CemaError

#: How long an upload waits for room in the deployment's decode budget before it is answered 429, seconds.
DECODE_WAIT_S = 10.0


def _pubs(steps: int, n: int, k: int) -> int:
    """Publishes among the next ``n`` steps after ``steps`` when every K-th step publishes."""
    return (steps + n) // k - steps // k


class IntakeMixin(DeploymentState):
    """Uploads and batch reports of a :class:`~cema_deploy.cloud.deployment.Deployment`."""

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

    def upload_bytes(self, data: bytes, *, device: str = "", idempotency_key: str = "") -> UploadAck:
        """An upload as it came over the wire (what engines pass, so a cluster engine ships the encoded bytes,
        never decoded pixels). Its header is checked first: a retry is answered from its key, an upload over the
        pending cap gets 429, all before any image is decoded; decoding and storing then run within the
        deployment's ``decode_budget_mb`` (waiting up to :data:`DECODE_WAIT_S` for room, then 429; an upload
        larger than the whole budget gets 413). Then as :meth:`upload`."""
        try:
            head = upload_header(data, image_hw=self._image_hw())
        except CemaError as exc:
            raise Refused(f"Malformed sample upload: {exc}", 400) from exc
        if head.fingerprint != self.fingerprint:
            raise Refused(
                f"Upload body is bound to fingerprint {head.fingerprint[:24]!r}, not the URL's "
                f"{self.fingerprint[:24]!r}.",
                400,
            )
        with self._cond:
            if idempotency_key and idempotency_key in self._keys:
                self.counters["duplicates"] += 1
                return UploadAck.from_json({**json.loads(self._keys[idempotency_key]), "duplicate": True})
            self._check_cap(head.count)
        need, budget = head.decoded_bytes, self.spec.decode_budget_mb << 20
        if need > budget:
            raise Refused(
                f"Upload of {head.count} images of {head.height}x{head.width} decodes to {need} bytes, more than "
                f"{self.name}'s decode budget of {budget} bytes; send fewer samples per upload.",
                413,
            )
        with self._decode:
            if not self._decode.wait_for(lambda: self._decoding + need <= budget, DECODE_WAIT_S):
                with self._cond:
                    self.counters["refused:429"] += 1
                raise PendingCapReached(
                    f"{self.name} is decoding {self._decoding} bytes of uploads, its budget is {budget}; retry "
                    "after the Retry-After seconds.",
                    429,
                    retry_after=1,
                )
            self._decoding += need
        try:
            try:
                batch = samples_from_bytes(data, image_hw=self._image_hw())
            except CemaError as exc:
                raise Refused(f"Malformed sample upload: {exc}", 400) from exc
            return self.upload(batch, device=device, idempotency_key=idempotency_key)
        finally:
            with self._decode:
                self._decoding -= need
                self._decode.notify_all()

    def _image_hw(self) -> tuple[int, int]:
        h, w = self.manifest.preprocess.size
        return int(h), int(w)

    def _check_cap(self, n: int) -> None:
        """Raise 429 when ``n`` more samples would pass the pending cap (held under the lock)."""
        pending = self._pending_samples()
        if pending and pending + n > self.spec.pending_cap:
            self.counters["refused:429"] += 1
            mean_s = self._timings.mean_job_s()
            wait = math.ceil((pending + n - self.spec.pending_cap) / self.config.batch_size) * mean_s
            raise PendingCapReached(
                f"{self.name} holds {pending} pending samples, its cap is {self.spec.pending_cap}; "
                "retry after the Retry-After seconds.",
                429,
                retry_after=int(min(max(math.ceil(wait), 1), 60)),
            )

    def _store_upload(self, batch: SampleBatch, *, device: str, key: str) -> UploadAck:
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
                self._check_cap(len(batch))
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
                # the worker publishes at least this (loop._due); promised only once the upload is visible, so the
                # worker never sees a promise before the samples that will keep it (it would publish early)
                self._promised = max(self._promised, ack.target_version)
                if key:
                    self._remember(self._keys, key, up.ack)
                self._device_versions.pop(device, None)
                self._remember(self._device_versions, device, batch.edge_version)  # what it serves now
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
            accepted=up.count,
            pending=self._pending_samples() + up.count,
            buffered=self.samples.held() + up.count,
            version=self.version,
            target_version=target,
            generation=self.generation,
            calibrated=self.calibrated,
        )

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
        v = self.version + pub + len(self._reset_waiters) + (self._restore is not None) + (self._republish is not None)
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
        compact: list[tuple[str, BatchAck]] | None = None
        if report.statistics:  # protocol 3: the edge's own statistics, checked before anything changes; kept
            try:  # durably before the ack (a retry stores the same values again)
                tensors, local_generation = statistics_from_text(report.statistics, self.manifest)
            except CemaError as exc:
                with self._cond:
                    self.counters["refused:400"] += 1
                raise Refused(f"Batch report with bad edge statistics: {exc}", 400) from exc
            self.edge_stats.put(device, tensors, local_generation=local_generation)
        elif report.seen and not report.stats_generation and self.edge_stats.get(device) is not None:
            self.edge_stats.forget(device)  # its adapter is off now: it serves the blob's statistics
        with self._cond:
            if idempotency_key and idempotency_key in self._report_keys:
                self.counters["duplicate_reports"] += 1
                return self._report_keys[idempotency_key]
            ends_batch = not (report.seen == 0 and report.statistics)  # a statistics report ends no batch
            self.counters["edge_stats_reports"] += bool(report.statistics)
            self.counters["batch_reports"] += ends_batch
            self.counters["reported_seen"] += report.seen
            self.counters["reported_uploaded"] += report.uploaded
            fired = False
            if ends_batch and report.generation in (0, self.generation):
                known = self.full_steps + (self.samples.adapt_total - self.cursor) // c.batch_size
                ran, self._attributed = max(known - self._attributed, 0), known
                window = self.samples.window_len(self.samples.adapt_total, self.replay_start)
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
            self._promised = max(self._promised, ack.target_version)
            if idempotency_key:
                self._remember(self._report_keys, idempotency_key, ack)
                self._report_lines += 1
                compact = (
                    list(self._report_keys.items())
                    if self._report_lines > 2 * max(self.spec.idempotency_keys, 1)
                    else None
                )
        if idempotency_key:  # kept across a restart: a retry after one gets this answer too
            if compact is not None:
                self.store.compact_keys([(k, json.dumps(a.to_json())) for k, a in compact], name=REPORT_KEYS)
                self._report_lines = len(compact)
            else:
                self.store.journal_report(idempotency_key, json.dumps(ack.to_json()), name=REPORT_KEYS)
        return ack
