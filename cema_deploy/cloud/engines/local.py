"""The embedded default engine: each deployment is a :class:`~cema_deploy.cloud.deployment.Deployment` with its
worker thread in this process. Long polls park in :class:`~cema_deploy.cloud.engines.polls.ParkedPolls`, woken
from the worker thread when it publishes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cema_deploy.cloud.config import ServiceConfig
from cema_deploy.cloud.deployment import Deployment
from cema_deploy.cloud.engines.base import DeploymentInfo, Engine, by_fingerprint, by_name
from cema_deploy.cloud.engines.polls import ParkedPolls
from cema_deploy.contract.messages import BatchAck, BatchReport, DeploymentStatus, EdgeReport, UploadAck
from cema_deploy.exceptions import CloudError


class LocalEngine:
    """Deployments as threads of this process (an :class:`~cema_deploy.cloud.engines.base.Engine`).

    Example:
        >>> engine = LocalEngine.from_config(config)  # doctest: +SKIP
        >>> engine.start(); engine.status(fp).version  # doctest: +SKIP
    """

    def __init__(self, deployments: list[Deployment]) -> None:
        by_fp: dict[str, Deployment] = {}
        for dep in deployments:
            other = by_fp.get(dep.fingerprint)
            if other is not None:
                raise CloudError(
                    f"Deployments {other.name!r} and {dep.name!r} serve one export (fingerprint "
                    f"{dep.fingerprint[:16]}…); a fingerprint has one adaptation state. Export the model again for "
                    "the second domain (a new fingerprint) or serve it once."
                )
            by_fp[dep.fingerprint] = dep
        self._by_fp = by_fp
        self._by_name = {d.name: d for d in deployments}
        self.closing = False
        self._polls = ParkedPolls(by_fp)
        for fp, dep in by_fp.items():
            dep.add_listener(lambda _version, fp=fp: self._polls.wake(fp))  # type: ignore[misc]

    @classmethod
    def from_config(cls, config: ServiceConfig) -> LocalEngine:
        """Load every deployment of ``config`` (models, state) in this process."""
        state = Path(config.state)
        deps = [Deployment.from_spec(spec, state, signing_key=config.signing_key) for spec in config.deployments]
        return cls(deps)

    # ---- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        for dep in self._by_fp.values():
            dep.start()

    def begin_shutdown(self) -> None:
        self.closing = True
        for dep in self._by_fp.values():
            dep.closing = True

    def stop(self, timeout: float = 30.0) -> None:
        self.begin_shutdown()
        for dep in self._by_fp.values():
            dep.stop(timeout)

    # ---- lookups ------------------------------------------------------------------------------------------
    def deployment(self, fingerprint: str) -> Deployment:
        return by_fingerprint(self._by_fp, fingerprint)

    def by_name(self, name: str) -> Deployment:
        return by_name(self._by_name, name)

    def deployments(self) -> list[DeploymentInfo]:
        return [DeploymentInfo(**d.info()) for d in self._by_fp.values()]

    # ---- the Engine protocol ------------------------------------------------------------------------------
    def status(self, fingerprint: str) -> DeploymentStatus:
        return self.deployment(fingerprint).status()

    def upload(self, fingerprint: str, data: bytes, *, device: str, idempotency_key: str) -> UploadAck:
        return self.deployment(fingerprint).upload_bytes(data, device=device, idempotency_key=idempotency_key)

    def batch_report(self, fingerprint: str, report: BatchReport, *, device: str, idempotency_key: str) -> BatchAck:
        return self.deployment(fingerprint).batch_report(report, device=device, idempotency_key=idempotency_key)

    def latest(self, fingerprint: str, after: int) -> tuple[int, bytes] | None:
        return self.deployment(fingerprint).latest(after)

    async def wait_version(self, fingerprint: str, after: int, timeout: float) -> int:
        dep = self.deployment(fingerprint)
        await self._polls.wait(fingerprint, lambda: dep.latest(after) is not None, timeout, lambda: self.closing)
        found = dep.latest(after)
        return found[0] if found is not None else dep.version

    def edge_report(self, fingerprint: str, report: EdgeReport, *, device: str) -> str:
        return self.deployment(fingerprint).edge_report(report, device=device)

    def seen(self, fingerprint: str, device: str, *, version: int | None = None, refused: bool = False) -> None:
        self.deployment(fingerprint).seen(device, version=version, refused=refused)

    def admin(self, name: str, action: str, version: int | None = None) -> DeploymentStatus:
        return self.by_name(name).admin(action, version=version)

    def operator_status(self, fingerprint: str) -> dict[str, Any]:
        return self.deployment(fingerprint).operator_status()

    def metrics(self) -> list[dict[str, Any]]:
        return [d.metrics() for d in self._by_fp.values()]


def _conforms(engine: LocalEngine) -> Engine:  # mypy checks here that LocalEngine implements the Engine protocol
    return engine
