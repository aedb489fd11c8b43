"""Refusals a deployment answers with, each carrying its HTTP status, so that an engine in another process (Ray)
can raise them across the boundary (they pickle) and the API maps them to responses without knowing the engine."""

from __future__ import annotations

from typing import Any

from cema_deploy.exceptions import CloudError


class Refused(CloudError):
    """A request the deployment refuses; nothing was changed. ``status`` is the HTTP status to answer with,
    ``retry_after`` seconds for a 429, ``body`` a JSON object to answer with instead of ``{"detail": ...}``."""

    def __init__(
        self, message: str, status: int = 400, *, retry_after: int | None = None, body: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.body = body

    def __reduce__(self) -> Any:
        return (_rebuild, (type(self), str(self), self.status, self.retry_after, self.body))


def _rebuild(cls: type[Refused], message: str, status: int, retry_after: int | None, body: Any) -> Refused:
    return cls(message, status, retry_after=retry_after, body=body)


class UnknownDeployment(Refused):
    """No deployment with this fingerprint or name is served here (404)."""


class PendingCapReached(Refused):
    """The deployment holds its cap of pending samples (429 + Retry-After)."""


class StaleGeneration(Refused):
    """An upload for an older generation of a deployment that was reset (409; body: the DeploymentStatus)."""
