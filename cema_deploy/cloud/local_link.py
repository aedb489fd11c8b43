"""An in-process :class:`~cema_deploy.runtime.link.client.CloudLink`: the edge runtime calls a local engine's
deployment directly (no HTTP, no encoding), so benchmarks run the same ``EdgeRuntime`` against the same
deployment code in one process. Refusals map to the same :class:`~cema_deploy.exceptions.UplinkError` the HTTP
client raises (429 retryable with ``retry_after``, 409 :class:`~cema_deploy.exceptions.StaleGenerationError`,
other 4xx not retryable), so the uplink behaves as it does over the network."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from cema_deploy.cloud.engines.local import LocalEngine
from cema_deploy.cloud.errors import Refused, StaleGeneration
from cema_deploy.contract.messages import BatchAck, BatchReport, DeploymentStatus, EdgeReport, UploadAck
from cema_deploy.contract.samples import SampleBatch
from cema_deploy.exceptions import StaleGenerationError, UplinkError

_T = TypeVar("_T")


class LocalLink:
    """One device's link to one deployment of a :class:`LocalEngine`.

    Example:
        >>> link = LocalLink(engine, manifest.fingerprint, "cam-01")  # doctest: +SKIP
        >>> EdgeRuntime(backend, selector, client=link).process(images)  # doctest: +SKIP
    """

    def __init__(self, engine: LocalEngine, fingerprint: str, device_id: str) -> None:
        self.engine, self.fingerprint, self.device_id = engine, fingerprint, device_id
        self._deployment = engine.deployment(fingerprint)
        self.base_url = f"local:{self._deployment.name}"
        self.bytes_sent = 0  # nothing is encoded in-process
        self._closed = False

    def status(self) -> DeploymentStatus:
        return self._call(self._deployment.status)

    def upload(self, batch: SampleBatch, *, idempotency_key: str) -> UploadAck:
        return self._call(
            lambda: self._deployment.upload(batch, device=self.device_id, idempotency_key=idempotency_key)
        )

    def batch_report(self, report: BatchReport, *, idempotency_key: str) -> BatchAck:
        return self._call(
            lambda: self._deployment.batch_report(report, device=self.device_id, idempotency_key=idempotency_key)
        )

    def fetch_blob(self, after: int, wait: float = 0.0) -> tuple[int, bytes] | None:
        if self._closed:
            raise UplinkError("The local link is closed.", retryable=False)
        if wait <= 0:
            return self._deployment.latest(after)
        return self._deployment.wait_latest(after, wait)

    def report(self, report: EdgeReport) -> None:
        self._call(lambda: self._deployment.edge_report(report, device=self.device_id))

    def close(self) -> None:
        self._closed = True

    def _call(self, fn: Callable[[], _T]) -> _T:
        if self._closed:
            raise UplinkError("The local link is closed.", retryable=False)
        try:
            return fn()
        except StaleGeneration as exc:
            current = DeploymentStatus.from_json(exc.body or {})
            raise StaleGenerationError(str(exc), current=current) from exc
        except Refused as exc:
            retryable = exc.status == 429
            raise UplinkError(str(exc), retryable=retryable, status=exc.status, retry_after=exc.retry_after) from exc
