"""What the HTTP API needs of an engine (:class:`Engine`), and the static facts of a deployment it caches.

Every method takes and returns plain picklable data (sample batches, the messages of
:mod:`cema_deploy.contract.messages`, bytes, dicts), so an engine may run its deployments in other processes.
Refusals are :class:`~cema_deploy.cloud.errors.Refused` (they carry the HTTP status and pickle). Deployments are
addressed by fingerprint (edge routes) or by name (admin routes). Only :meth:`Engine.wait_version` is async: a
long poll parks on it in the ingress, and an engine wakes every parked poll of a deployment from one
subscription, never with one call per poll.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from cema_deploy.cloud.errors import UnknownDeployment
from cema_deploy.contract.messages import BatchAck, BatchReport, DeploymentStatus, EdgeReport, UploadAck

T = TypeVar("T")


def by_fingerprint(table: Mapping[str, T], fingerprint: str) -> T:
    """``table[fingerprint]``, or the 404 every engine gives for a fingerprint it does not serve."""
    if fingerprint not in table:
        raise UnknownDeployment(f"No deployment with fingerprint {fingerprint[:24]!r} is served here.", 404)
    return table[fingerprint]


def by_name(table: Mapping[str, T], name: str) -> T:
    """``table[name]``, or the 404 every engine gives for a deployment name it does not serve."""
    if name not in table:
        raise UnknownDeployment(f"No deployment named {name!r}; served: {sorted(table)}.", 404)
    return table[name]


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

    def upload(self, fingerprint: str, data: bytes, *, device: str, idempotency_key: str) -> UploadAck:
        """An upload's bytes as received (encoded: the deployment checks the header, then decodes within its
        budget; see :meth:`~cema_deploy.cloud.deployment.Deployment.upload_bytes`)."""
        ...

    def batch_report(self, fingerprint: str, report: BatchReport, *, device: str, idempotency_key: str) -> BatchAck: ...

    def latest(self, fingerprint: str, after: int) -> tuple[int, bytes] | None: ...

    async def wait_version(self, fingerprint: str, after: int, timeout: float) -> int:
        """Return the newest version once it is above ``after``, or after ``timeout`` seconds, or on shutdown."""
        ...

    def edge_report(self, fingerprint: str, report: EdgeReport, *, device: str) -> str:
        """Record an edge's report; returns what it did (``recorded``, ``counted: ...``, ``ignored: why``,
        ``restoring ...``)."""
        ...

    def seen(self, fingerprint: str, device: str, *, version: int | None = None, refused: bool = False) -> None:
        """``device`` polled saying it serves ``version`` (or was refused by the ingress); called on the event loop
        for every poll, so it must not block (an engine may buffer it)."""
        ...

    def admin(self, name: str, action: str, version: int | None = None) -> DeploymentStatus: ...

    def operator_status(self, fingerprint: str) -> dict[str, Any]:
        """What ``cloud status`` shows of a deployment: its status, pin, held uploads, kept versions, devices."""
        ...

    def metrics(self) -> list[dict[str, Any]]: ...
