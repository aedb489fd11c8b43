"""The edge runtime: preprocess -> infer -> select -> upload, and in the background poll -> verify -> hot refit.

Serving never waits on the network or on a refit: uploads go through :class:`~cema_deploy.runtime.uplink.Uplink`'s
queue, and blobs are fetched, verified (signature before parsing), validated and built on a poller thread, then
swapped in atomically by the backend. A refused blob is counted by reason and logged; the engine keeps its
parameters and the poller stops asking for that version.

Automatic rollback (:class:`RollbackConfig`): after each refit the runtime compares the mean entropy of the next
``window`` samples served by the new version with that of the ``window`` samples served before the refit. A rise
above ``margin_ratio * ln C`` rolls the parameters back, refuses that version and every older one from then on,
and reports it to the cloud. Never imports torch.
"""

from __future__ import annotations

import collections
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cema_deploy.contract.blob import blob_from_bytes
from cema_deploy.contract.messages import EdgeReport
from cema_deploy.exceptions import (
    BlobFormatError,
    BlobSchemaError,
    BlobValueError,
    CemaError,
    FingerprintMismatchError,
    RefitError,
    SignatureError,
    StaleBlobError,
    UplinkError,
)
from cema_deploy.runtime.base import Backend
from cema_deploy.runtime.client import CloudLink, EdgeConfigError
from cema_deploy.runtime.preprocess import images_at_model_size, normalize
from cema_deploy.runtime.selection import SampleSelector, SelectionResult
from cema_deploy.runtime.uplink import Uplink

log = logging.getLogger("cema_deploy.edge")

#: Refusal reason of each error type (a blob raises exactly one of them).
REFUSAL_REASONS: tuple[tuple[type[CemaError], str], ...] = (
    (SignatureError, "signature"),
    (FingerprintMismatchError, "fingerprint"),
    (StaleBlobError, "stale"),
    (BlobSchemaError, "schema"),
    (BlobValueError, "value"),
    (BlobFormatError, "format"),
    (RefitError, "build"),
)
_POLL_BACKOFF_BASE_S, _POLL_BACKOFF_CAP_S = 0.5, 30.0
#: Shortest time between two blob polls when the cloud answers 204 at once (it ignores ``wait``, or wait=0).
_MIN_POLL_INTERVAL_S = 0.1


@dataclass(frozen=True, kw_only=True)
class RollbackConfig:
    """Automatic rollback of a refit that makes the edge less certain.

    Why on by default, and these values: CEMA's cloud step minimises entropy (the teacher's weighted entropy and
    the student's distillation toward it), so a good update does not raise the mean entropy of the stream it was
    adapted on. The mean of ``window`` = 64 samples (one official edge batch) has a standard error of about
    ``0.03 ln C`` (per-sample spread ~``0.25 ln C``), so a rise of ``0.15 ln C`` (0.35 nats at C = 10, 1.04 nats at
    C = 1000) is ~5 standard errors: a broken blob (e.g. a collapsed BatchNorm giving near-uniform logits) is caught
    within one batch, while a false rollback needs a sharp shift in the input that coincides with the refit, and
    costs only that version (the next one is accepted). When a newer refit arrives before ``window`` samples were
    served by the watched version, that watch ends without a decision.
    """

    window: int = 64  # samples after (and before) a refit whose mean entropies are compared
    margin_ratio: float = 0.15  # allowed rise of the mean entropy, as a fraction of ln C
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.window < 1 or not self.margin_ratio >= 0:
            raise EdgeConfigError(
                f"Rollback window must be >= 1 and margin_ratio >= 0, got {self.window}, {self.margin_ratio}."
            )


@dataclass(frozen=True)
class EdgeStep:
    """One processed batch: logits ``[N, C]``, predicted classes ``[N]``, the selection decision and the version
    of the parameters that produced the logits."""

    logits: np.ndarray
    predictions: np.ndarray
    selection: SelectionResult
    version: int


class EdgeRuntime:
    """A backend, the CEMA selector and (optionally) a cloud link, as one object.

    ``process`` runs on the caller's thread and never touches the network. With a ``client``, an
    :class:`~cema_deploy.runtime.uplink.Uplink` thread uploads the selected samples and a poller thread long-polls
    for blobs (``poll_wait_s`` per request) and applies them. ``verifier(raw_bytes)`` runs before a blob is parsed
    and must raise :class:`~cema_deploy.exceptions.SignatureError` to refuse it. Uploads carry ``device_id``
    (default: the client's).

    Example:
        >>> rt = EdgeRuntime(get_backend("ort-cpu", "out/r50"), SampleSelector(SelectionConfig.for_classes(1000)),
        ...                  client=CloudClient(url, token, fp))  # doctest: +SKIP
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
        rollback: RollbackConfig | None = None,
        poll_wait_s: float = 10.0,
        upload_batch: int = 32,
        flush_interval_s: float = 0.5,
        max_queue_samples: int = 4096,
        max_queue_bytes: int = 64 * 2**20,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 30.0,
        device_id: str | None = None,
    ) -> None:
        if poll_wait_s < 0:
            raise EdgeConfigError(f"poll_wait_s must be >= 0, got {poll_wait_s}.")
        self.backend, self.selector, self.client, self.verifier = backend, selector, client, verifier
        self.manifest = backend.manifest
        self.rollback_cfg = rollback or RollbackConfig()
        self.poll_wait_s = poll_wait_s
        self.uplink = None
        if client is not None:
            self.uplink = Uplink(
                client, fingerprint=self.manifest.fingerprint, device_id=device_id,
                upload_batch=upload_batch, flush_interval_s=flush_interval_s, max_queue_samples=max_queue_samples,
                max_queue_bytes=max_queue_bytes, backoff_base_s=backoff_base_s, backoff_cap_s=backoff_cap_s,
            )  # fmt: skip
        self.frames = 0
        self.busy_s = 0.0
        self.blobs_applied = 0
        self.refused: collections.Counter[str] = collections.Counter()
        self.rollbacks = 0
        self.poll_errors = 0
        self.sync_timeouts = 0
        self.bytes_received = 0
        self.refused_upto = 0  # versions <= this are never applied (rolled back, or refused when fetched)
        self._started = time.monotonic()
        self._lock = threading.Lock()  # entropy windows
        self._swap_lock = threading.Lock()  # refit vs rollback: never roll back a version that is not serving
        self._recent: collections.deque[float] = collections.deque(maxlen=self.rollback_cfg.window)
        self._watch: tuple[int, float, list[float]] | None = None  # (version, mean before, entropies after)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._poller: threading.Thread | None = None
        if client is not None:
            self._poller = threading.Thread(target=self._poll_loop, name="cema-poller", daemon=True)
            self._poller.start()

    # ---- serving --------------------------------------------------------------------------------------
    def process(self, images: np.ndarray) -> EdgeStep:
        """Run one batch of uint8 RGB images ``[N, H, W, 3]`` (any size; resized to the model's)."""
        t0 = time.perf_counter()
        pre, c = self.manifest.preprocess, self.manifest.num_classes
        if len(images) == 0:  # nothing to run; still a well-formed step
            empty = self.selector.select(np.zeros((0, c)))
            return EdgeStep(np.zeros((0, c), np.float32), np.zeros(0, np.int64), empty, self.backend.version)
        at_size = images_at_model_size(images, pre)
        logits, version = self.backend.infer_versioned(normalize(at_size, pre))
        sel = self.selector.select(logits, images=at_size)
        if self.uplink is not None and sel.mask.any():
            self.uplink.put(at_size[sel.mask], sel.entropy[sel.mask], version=version)
        self._watch_entropy(sel.entropy, version)
        self.frames += len(at_size)
        self.busy_s += time.perf_counter() - t0
        return EdgeStep(logits, logits.argmax(axis=1), sel, version)

    @property
    def version(self) -> int:
        """Version of the parameters serving now."""
        return self.backend.version

    # ---- refit ----------------------------------------------------------------------------------------
    def apply_blob_bytes(self, data: bytes, *, source: str = "blob") -> bool:
        """Verify, parse, validate and hot-refit; True when applied. Refusals are counted by reason and logged,
        never raised; the serving parameters are then unchanged."""
        try:
            if self.verifier is not None:
                self.verifier(data)
            blob = blob_from_bytes(data, source=source)
            with self._swap_lock:
                if self._stop.is_set():
                    log.info("runtime closed; not applying %s", source)
                    return False
                if blob.version <= self.refused_upto:
                    raise StaleBlobError(
                        f"Blob version {blob.version} is at or below version {self.refused_upto}, which this edge "
                        "rolled back or refused; not applying it. The cloud must publish a newer version."
                    )
                with self._lock:
                    before = float(np.mean(self._recent)) if self._recent else math.nan
                self.backend.refit(blob)
                with self._lock:
                    self.blobs_applied += 1
                    keep_watch = self.rollback_cfg.enabled and not math.isnan(before)
                    self._watch = (blob.version, before, []) if keep_watch else None
        except CemaError as exc:
            reason = next((name for kind, name in REFUSAL_REASONS if isinstance(exc, kind)), "other")
            self.refused[reason] += 1
            log.warning("refused %s (%s): %s", source, reason, exc)
            return False
        log.info("now serving parameters v%d (%s)", blob.version, source)
        return True

    def wait_for_version(self, version: int, timeout: float = 60.0) -> bool:
        """Block until parameters of at least ``version`` serve, or that version was refused or rolled back
        (True), or ``timeout`` seconds passed (False)."""
        deadline = time.monotonic() + timeout
        while self.backend.version < version and self.refused_upto < version:
            if time.monotonic() > deadline or self._stop.is_set():
                return False
            time.sleep(0.005)
        return True

    def sync(self, timeout: float = 120.0) -> bool:
        """Upload everything queued, then wait until the blob whose cloud step includes it serves.

        For deterministic runs (``edge run --sync``, the demo): after an upload acknowledged with
        ``target_version`` > the serving version, block until that version serves or is refused. True when done,
        False on timeout (counted in ``sync_timeouts``).
        """
        if self.uplink is None:
            return True
        deadline = time.monotonic() + timeout
        ok = self.uplink.flush(timeout)
        ack = self.uplink.last_ack
        if ok and ack is not None and ack.target_version > self.backend.version:
            ok = self.wait_for_version(ack.target_version, max(0.0, deadline - time.monotonic()))
        if not ok:
            self.sync_timeouts += 1
        return ok

    def _poll_loop(self) -> None:
        client = self.client
        if client is None:  # pragma: no cover - the thread starts only with a client
            return
        delay = _POLL_BACKOFF_BASE_S
        while not self._stop.is_set():
            after = max(self.backend.version, self.refused_upto)
            t0 = time.monotonic()
            try:
                found = client.fetch_blob(after=after, wait=self.poll_wait_s)
                if found is None:
                    delay = _POLL_BACKOFF_BASE_S
                    self._stop.wait(max(0.0, _MIN_POLL_INTERVAL_S - (time.monotonic() - t0)))  # never spin
                    continue
                if self._stop.is_set():
                    return  # closed while the poll was in flight: apply nothing any more
                version, data = found
                self.bytes_received += len(data)
                where = getattr(client, "base_url", "the cloud")
                if not self.apply_blob_bytes(data, source=f"blob v{version} from {where}"):
                    with self._swap_lock:
                        self.refused_upto = max(self.refused_upto, version)  # do not fetch it again
                if max(self.backend.version, self.refused_upto) > after:
                    delay = _POLL_BACKOFF_BASE_S
                    continue
                # The cloud answered with nothing newer than asked for: treat as an error, do not spin.
                log.warning("the cloud sent blob v%d when asked for a version above %d", version, after)
            except UplinkError as exc:
                self.poll_errors += 1
                log.debug("blob poll failed: %s", exc)
            except Exception as exc:  # never let the poller die; the engine keeps serving
                if self._stop.is_set():
                    return
                self.poll_errors += 1
                log.error("blob poller error: %r", exc)
            self._stop.wait(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, _POLL_BACKOFF_CAP_S)

    # ---- rollback -------------------------------------------------------------------------------------
    def _watch_entropy(self, entropy: np.ndarray, version: int) -> None:
        decision: tuple[int, float, float] | None = None
        finite = entropy[np.isfinite(entropy)].tolist()
        with self._lock:
            self._recent.extend(finite)
            w = self._watch
            if w is not None and version == w[0]:
                w[2].extend(finite)
                if len(w[2]) >= self.rollback_cfg.window:
                    after = float(np.mean(w[2][: self.rollback_cfg.window]))
                    margin = self.rollback_cfg.margin_ratio * math.log(self.manifest.num_classes)
                    if after > w[1] + margin:
                        decision = (w[0], w[1], after)
                    self._watch = None
        if decision is None:
            return
        if self._swap_lock.acquire(blocking=False):  # the usual case: no refit is being built
            try:
                self._rollback(*decision)
            finally:
                self._swap_lock.release()
        else:  # a refit is being built on the poller: decide after it, off the serving path

            def later() -> None:
                with self._swap_lock:
                    self._rollback(*decision)

            self._start_thread(later, "cema-rollback")

    def _rollback(self, version: int, before: float, after: float) -> None:
        """Roll ``version`` back if it is still serving; refuse it and everything older. Holds ``_swap_lock``."""
        self.refused_upto = max(self.refused_upto, version)
        if self.backend.version != version:
            return  # a newer refit replaced it already
        restored = self.backend.rollback()
        self.rollbacks += 1
        with self._lock:  # the refused version's entropies must not become the next refit's baseline
            self._recent.clear()
        reason = (
            f"mean entropy rose from {before:.4f} to {after:.4f} nats over {self.rollback_cfg.window} samples "
            f"after refit to v{version} (allowed rise {self.rollback_cfg.margin_ratio:g} ln C)"
        )
        log.warning("rolled back v%d, serving v%d again: %s", version, restored, reason)
        client = self.client
        if client is not None:

            def send() -> None:
                try:
                    client.report(EdgeReport(kind="rollback", version=version, reason=reason))
                except Exception as exc:
                    log.warning("could not report the rollback of v%d: %r", version, exc)

            self._start_thread(send, "cema-report")

    def _start_thread(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()

    # ---- state ----------------------------------------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        """Counters as plain numbers (JSON-serialisable): frames, fps (frames per second spent in ``process``),
        wall_fps, selected/uploaded %, uplink counters (incl. queue drops), serving version, blobs applied, refusals
        by reason, rollbacks, mean entropy and the selection counters."""
        c = self.selector.counters
        up = asdict(self.uplink.counters) if self.uplink is not None else {}
        wall = time.monotonic() - self._started
        return {
            "frames": self.frames,
            "fps": self.frames / self.busy_s if self.busy_s else 0.0,
            "wall_fps": self.frames / wall if wall > 0 else 0.0,
            "version": self.backend.version,
            "selection": c.as_dict(),
            "selected_pct": 100.0 * c.selected / c.seen if c.seen else 0.0,
            "uploaded_pct": 100.0 * up.get("uploaded", 0) / c.seen if c.seen else 0.0,
            "uplink": up,
            "queued_now": self.uplink.queued_now if self.uplink is not None else 0,
            "blobs_applied": self.blobs_applied,
            "refused": dict(self.refused),
            "rollbacks": self.rollbacks,
            "refused_upto": self.refused_upto,
            "poll_errors": self.poll_errors,
            "sync_timeouts": self.sync_timeouts,
            "bytes_received": self.bytes_received,
            "mean_entropy": c.mean_entropy,
        }

    def close(self) -> None:
        """Stop the uploader and the poller (queued samples not yet sent are discarded: ``sync``/``uplink.flush``
        first). Waits for a refit being built, not for a long poll; nothing is applied after it returns. Safe to
        call twice."""
        self._stop.set()
        if self.uplink is not None:
            self.uplink.close()
        for t in self._threads:  # rollback reports: let them reach the cloud
            t.join(timeout=10.0)
        with self._swap_lock:  # a refit being built finishes; none starts after this
            pass
        if self._poller is not None:
            # A long poll in flight cannot be interrupted (httpx has no cancel for a blocking call); rather than wait
            # up to poll_wait_s for it, leave it to end on its own: the poller is a daemon thread that applies
            # nothing once stopped and swallows the error of the closed client.
            self._poller.join(timeout=0.1)
        if self.client is not None:
            self.client.close()

    def __enter__(self) -> EdgeRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
