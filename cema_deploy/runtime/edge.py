"""The edge runtime: preprocess -> infer -> select -> upload, and in the background poll -> verify -> hot refit.

Serving never waits on the network or on a refit: uploads go through :class:`~cema_deploy.runtime.uplink.Uplink`'s
queue, and blobs are fetched, verified (signature before parsing), validated and built on a poller thread, then
swapped in atomically by the backend. A refused blob is counted by reason and the engine keeps its parameters.
After each refit the runtime compares the mean entropy of the next ``window`` samples with that of the ``window``
before; a rise above ``margin`` rolls the parameters back, refuses that version and reports it to the cloud.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cema_deploy.contract.blob import blob_from_bytes
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
from cema_deploy.runtime.preprocess import images_at_model_size, normalize
from cema_deploy.runtime.selection import SampleSelector, SelectionResult
from cema_deploy.runtime.uplink import CloudClient, Uplink

log = logging.getLogger("cema_deploy.edge")

#: Refusal reasons, in the order they are checked.
_REFUSALS: tuple[tuple[type[CemaError], str], ...] = (
    (SignatureError, "signature"), (FingerprintMismatchError, "fingerprint"), (StaleBlobError, "stale"),
    (BlobSchemaError, "schema"), (BlobValueError, "value"), (BlobFormatError, "format"), (RefitError, "build"),
)


@dataclass(frozen=True, kw_only=True)
class RollbackConfig:
    """Automatic rollback: compare mean entropy over ``window`` samples after a refit with the ``window`` before."""

    window: int = 256
    margin_ratio: float = 0.15  # allowed rise, as a fraction of ln C (nats = margin_ratio * ln C)
    enabled: bool = True


@dataclass(frozen=True)
class EdgeStep:
    """One processed batch."""

    logits: np.ndarray
    predictions: np.ndarray
    selection: SelectionResult
    version: int


class EdgeRuntime:
    """A backend, the CEMA selector and (optionally) a cloud link, as one object.

    Example:
        >>> rt = EdgeRuntime(get_backend("ort-cpu", "out/r50"), SampleSelector(SelectionConfig.for_classes(1000)),
        ...                  client=CloudClient(url, token, fp))  # doctest: +SKIP
        >>> step = rt.process(uint8_images)  # doctest: +SKIP
    """

    def __init__(
        self,
        backend: Backend,
        selector: SampleSelector,
        *,
        client: CloudClient | None = None,
        verifier: Callable[[bytes], Any] | None = None,
        rollback: RollbackConfig | None = None,
        poll_wait_s: float = 10.0,
        encoding: str = "png",
        upload_batch: int = 32,
        max_queue_samples: int = 4096,
        device_id: str = "",
    ) -> None:
        self.backend, self.selector, self.client, self.verifier = backend, selector, client, verifier
        self.manifest = backend.manifest
        self.rollback_cfg = rollback or RollbackConfig()
        self.poll_wait_s = poll_wait_s
        self.uplink = None if client is None else Uplink(
            client, fingerprint=self.manifest.fingerprint, device_id=device_id, encoding=encoding,
            upload_batch=upload_batch, max_queue_samples=max_queue_samples)
        self.frames = 0
        self.busy_s = 0.0
        self.blobs_applied = 0
        self.refused: collections.Counter[str] = collections.Counter()
        self.rollbacks = 0
        self.poll_errors = 0
        self.bytes_received = 0
        self.refused_upto = 0  # versions <= this are never applied again (rolled back)
        self._lock = threading.Lock()
        self._recent: collections.deque[float] = collections.deque(maxlen=self.rollback_cfg.window)
        self._watch: tuple[int, float, list[float]] | None = None  # (version, mean before, entropies after)
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        if client is not None:
            self._poller = threading.Thread(target=self._poll_loop, name="cema-poller", daemon=True)
            self._poller.start()

    # ---- serving --------------------------------------------------------------------------------------
    def process(self, images: np.ndarray) -> EdgeStep:
        """Run one batch of uint8 RGB images ``[N, H, W, 3]`` (any size; resized to the model's)."""
        t0 = time.perf_counter()
        at_size = images_at_model_size(images, self.manifest.preprocess)
        logits, version = self.backend.infer_versioned(normalize(at_size, self.manifest.preprocess))
        sel = self.selector.select(logits)
        if self.uplink is not None:
            self.uplink.edge_version = version
            if sel.mask.any():
                self.uplink.put(at_size[sel.mask], sel.entropy[sel.mask])
        self._watch_entropy(sel.entropy, version)
        self.frames += len(images)
        self.busy_s += time.perf_counter() - t0
        return EdgeStep(logits, logits.argmax(axis=1), sel, version)

    @property
    def version(self) -> int:
        return self.backend.version

    # ---- refit ----------------------------------------------------------------------------------------
    def apply_blob_bytes(self, data: bytes, *, source: str = "blob") -> bool:
        """Verify, parse, validate and hot-refit; True when applied. Refusals are counted, never raised."""
        try:
            if self.verifier is not None:
                self.verifier(data)
            blob = blob_from_bytes(data, source=source)
            if blob.version <= self.refused_upto:
                raise StaleBlobError(f"Blob version {blob.version} was rolled back on this edge; not applying it.")
            with self._lock:
                before = float(np.mean(self._recent)) if self._recent else math.nan
            self.backend.refit(blob)
        except CemaError as exc:
            reason = next((name for kind, name in _REFUSALS if isinstance(exc, kind)), "other")
            self.refused[reason] += 1
            log.warning("refused %s (%s): %s", source, reason, exc)
            return False
        with self._lock:
            self.blobs_applied += 1
            if self.rollback_cfg.enabled and not math.isnan(before):
                self._watch = (blob.version, before, [])
        return True

    def wait_for_version(self, version: int, timeout: float = 60.0) -> bool:
        """Block until parameters of at least ``version`` serve (or that version was refused)."""
        deadline = time.monotonic() + timeout
        while self.backend.version < version and self.refused_upto < version:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def sync(self, timeout: float = 120.0) -> bool:
        """Upload everything queued, then wait until the blob that includes it serves (deterministic demos)."""
        if self.uplink is None:
            return True
        if not self.uplink.flush(timeout):
            return False
        ack = self.uplink.last_ack
        return ack is None or self.wait_for_version(ack.target_version, timeout)

    def _poll_loop(self) -> None:
        assert self.client is not None
        delay = 0.5
        while not self._stop.is_set():
            try:
                found = self.client.fetch_blob(after=max(self.backend.version, self.refused_upto),
                                               wait=self.poll_wait_s)
                delay = 0.5
            except UplinkError as exc:
                self.poll_errors += 1
                log.debug("blob poll failed: %s", exc)
                self._stop.wait(delay * np.random.uniform(0.5, 1.0))
                delay = min(delay * 2, 30.0)
                continue
            if found is not None:
                version, data = found
                self.bytes_received += len(data)
                if not self.apply_blob_bytes(data, source=f"blob v{version}"):
                    self.refused_upto = max(self.refused_upto, version)  # do not fetch the same bad blob again

    # ---- rollback -------------------------------------------------------------------------------------
    def _watch_entropy(self, entropy: np.ndarray, version: int) -> None:
        rollback: tuple[int, float, float] | None = None
        with self._lock:
            self._recent.extend(entropy.tolist())
            w = self._watch
            if w is not None and version == w[0]:
                w[2].extend(entropy.tolist())
                if len(w[2]) >= self.rollback_cfg.window:
                    after = float(np.mean(w[2][: self.rollback_cfg.window]))
                    margin = self.rollback_cfg.margin_ratio * math.log(self.manifest.num_classes)
                    if after > w[1] + margin:
                        rollback = (w[0], w[1], after)
                    self._watch = None
        if rollback is not None:
            self._rollback(*rollback)

    def _rollback(self, version: int, before: float, after: float) -> None:
        if self.backend.version != version:
            return
        restored = self.backend.rollback()
        self.refused_upto = max(self.refused_upto, version)
        self.rollbacks += 1
        reason = f"mean entropy rose from {before:.4f} to {after:.4f} after refit to v{version}"
        log.warning("rolled back to v%d: %s", restored, reason)
        if self.client is not None:
            client = self.client

            def send() -> None:
                try:
                    client.report("rollback", version, reason)
                except UplinkError as exc:
                    log.warning("could not report the rollback: %s", exc)

            threading.Thread(target=send, daemon=True).start()

    # ---- state ----------------------------------------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        c = self.selector.counters
        up = asdict(self.uplink.counters) if self.uplink is not None else {}
        return {
            "frames": self.frames, "fps": self.frames / self.busy_s if self.busy_s else 0.0,
            "version": self.backend.version, "selection": c.as_dict(),
            "selected_pct": 100.0 * c.selected / c.seen if c.seen else 0.0,
            "uploaded_pct": 100.0 * up.get("uploaded", 0) / c.seen if c.seen else 0.0,
            "uplink": up, "blobs_applied": self.blobs_applied, "refused": dict(self.refused),
            "rollbacks": self.rollbacks, "refused_upto": self.refused_upto, "poll_errors": self.poll_errors,
            "bytes_received": self.bytes_received,
            "mean_entropy": c.mean_entropy,
        }

    def close(self) -> None:
        self._stop.set()
        if self.uplink is not None:
            self.uplink.close()
        if self._poller is not None:
            self._poller.join(timeout=self.poll_wait_s + 35)
        if self.client is not None:
            self.client.close()

    def __enter__(self) -> EdgeRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
