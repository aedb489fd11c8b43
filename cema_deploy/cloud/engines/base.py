"""What the HTTP API needs of an engine (:class:`Engine`), and the static facts of a deployment it caches.

Every method takes and returns plain picklable data (sample batches, the messages of
:mod:`cema_deploy.contract.messages`, bytes, dicts), so an engine may run its deployments in other processes.
Refusals are :class:`~cema_deploy.cloud.errors.Refused` (they carry the HTTP status and pickle). Deployments are
addressed by fingerprint (edge routes) or by name (admin routes). Only :meth:`Engine.wait_version` is async: a
long poll parks on it in the ingress, and an engine wakes every parked poll of a deployment from one
subscription, never with one call per poll.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from cema_deploy.contract.messages import BatchAck, BatchReport, DeploymentStatus, EdgeReport, UploadAck
from cema_deploy.contract.samples import SampleBatch


@dataclass(frozen=True, kw_only=True)
class DeploymentInfo:
    """What does not change while a deployment runs."""

    name: str
    fingerprint: str
    model: str
    image_hw: tuple[int, int]


class Engine(Protocol):
    """The deployments of one service, wherever they run."""

    #: True once shutting down: parked long polls answer at once.
    closing: bool

    def start(self) -> None: ...

    def stop(self, timeout: float = 30.0) -> None: ...

    def begin_shutdown(self) -> None:
        """Set ``closing`` (called from a signal handler: must not block)."""
        ...

    def deployments(self) -> list[DeploymentInfo]: ...

    def status(self, fingerprint: str) -> DeploymentStatus: ...

    def upload(self, fingerprint: str, batch: SampleBatch, *, device: str, idempotency_key: str) -> UploadAck: ...

    def batch_report(self, fingerprint: str, report: BatchReport, *, device: str, idempotency_key: str) -> BatchAck: ...

    def latest(self, fingerprint: str, after: int) -> tuple[int, bytes] | None: ...

    async def wait_version(self, fingerprint: str, after: int, timeout: float) -> int:
        """Return the newest version once it is above ``after``, or after ``timeout`` seconds, or on shutdown."""
        ...

    def edge_report(self, fingerprint: str, report: EdgeReport, *, device: str) -> None: ...

    def admin(self, name: str, action: str) -> DeploymentStatus: ...

    def metrics(self) -> list[dict[str, Any]]: ...
