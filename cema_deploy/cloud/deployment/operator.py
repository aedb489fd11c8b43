"""The operator's view and undo: per-device records (:mod:`cema_deploy.cloud.store.devices`), the status the operator
reads (``cloud status``), ``publish`` (a kept version's state published anew as a new, higher version) and ``pin``
/ ``unpin``.

``publish --version N`` returns the deployment to the adaptation state behind version N (its snapshot; version 0:
the export's own tensors) and publishes it as a new version, so edges apply it; adaptation goes on from there.
``pin --version N`` does the same and then publishes nothing newer until ``unpin``: adaptation continues on the
uploads from version N's state (uploads are still acknowledged, as when frozen), and ``unpin`` publishes what it
learnt at once (unless the deployment was frozen before the pin: then it stays frozen). While pinned, reset, freeze,
unfreeze and ``publish`` are refused (409: unpin first) and rollback reports mark nothing bad: the operator chose
the version. Beyond the paper (an operator's control of a service).
"""

from __future__ import annotations

import threading
from typing import Any

from cema_deploy.cloud.deployment.admin import AdminMixin
from cema_deploy.cloud.deployment.intake import IntakeMixin
from cema_deploy.cloud.deployment.state import log
from cema_deploy.cloud.errors import Refused
from cema_deploy.cloud.store.devices import DeviceBook
from cema_deploy.contract.messages import BatchAck, BatchReport, DeploymentStatus, EdgeReport, UploadAck
from cema_deploy.contract.samples import SampleBatch
from cema_deploy.exceptions import CloudError


class OperatorMixin(IntakeMixin, AdminMixin):
    """Device records, the operator's status, ``publish``, ``pin`` and ``unpin`` of a
    :class:`~cema_deploy.cloud.deployment.Deployment` (see the module docstring)."""

    # ---- persisted with state.json ------------------------------------------------------------------------
    def _load(self) -> None:
        super()._load()
        st = self.store.load_state()
        self.devices = DeviceBook.from_json(st.get("devices"))
        pinned = st.get("pinned")
        self.pinned = int(pinned) if pinned is not None else None
        self._pin_frozen = bool(st.get("pin_frozen", False))  # frozen before the pin: unpin returns to it
        self._republish: tuple[int, threading.Event, list[str]] | None = None

    def _state_json(self) -> dict[str, Any]:
        return {
            **super()._state_json(),
            "pinned": self.pinned,
            "pin_frozen": self._pin_frozen,
            "devices": self.devices.to_json(),
        }

    # ---- what devices do --------------------------------------------------------------------------------------
    def seen(self, device: str, *, version: int | None = None, refused: bool = False) -> None:
        """``device`` polled saying it serves ``version``, or was refused by the ingress (cheap: no step lock)."""
        self.devices.seen(device, version=version, refused=refused)

    def upload(self, batch: SampleBatch, *, device: str = "", idempotency_key: str = "") -> UploadAck:
        try:
            ack = super().upload(batch, device=device, idempotency_key=idempotency_key)
        except Refused:
            self.devices.seen(device, version=batch.edge_version, refused=True)
            raise
        if ack.duplicate:
            self.devices.seen(device, version=batch.edge_version)
        else:
            self.devices.uploaded(device, len(batch), version=batch.edge_version)
        return ack

    def batch_report(self, report: BatchReport, *, device: str = "", idempotency_key: str = "") -> BatchAck:
        self.devices.seen(device)
        return super().batch_report(report, device=device, idempotency_key=idempotency_key)

    def edge_report(self, report: EdgeReport, *, device: str = "") -> str:
        self.devices.reported(device, report.kind)
        log.warning(
            "%s: %s %s version %d%s",
            self.name,
            device or "an edge",
            "rolled back" if report.kind == "rollback" else "refused",
            report.version,
            f": {report.reason[:200]}" if report.reason else "",
        )
        return super().edge_report(report, device=device)

    # ---- the operator -------------------------------------------------------------------------------------
    def kept_versions(self) -> list[int]:
        """Versions ``publish``/``pin`` can return to: 0 (the export's tensors) and every kept blob whose
        adaptation state (snapshot) is kept too."""
        return [0, *(v for v in self.store.blob_versions() if v > 0 and self.store.snapshot_path(v).exists())]

    def operator_status(self) -> dict[str, Any]:
        """Everything ``cloud status`` shows of this deployment (plain JSON)."""
        kept = self.kept_versions()
        with self._cond:
            s = self.samples
            row: dict[str, Any] = {
                **self._status().to_json(),
                "pinned": self.pinned,
                "steps": self.cema.steps,
                "uploads_held": len(s.uploads),
                "frames_held": s.held(),
                "pending": self._pending_samples(),
                "kept_versions": kept,
                "bad_versions": list(self.bad[-32:]),
            }
        row["devices"] = self.devices.to_json()
        return row

    def admin(self, action: str, timeout: float = 300.0, *, version: int | None = None) -> DeploymentStatus:
        """Operator actions: those of :meth:`AdminMixin.admin` and ``publish``/``pin`` (with ``version``), ``unpin``
        (see the module docstring)."""
        if action in ("publish", "pin"):
            return self._republish_version(action, version, timeout)
        if action == "unpin":
            return self._unpin()
        if self.pinned is not None:
            raise Refused(
                f"{self.name} is pinned to version {self.pinned}; {action} is refused while pinned: "
                f"`cema-deploy cloud unpin {self.name}` first.",
                409,
            )
        return super().admin(action, timeout)

    def _republish_version(self, action: str, version: int | None, timeout: float) -> DeploymentStatus:
        if version is None or version < 0:
            raise Refused(f"{action} needs the version to serve: ?version=N with N >= 0 (got {version}).", 400)
        kept = self.kept_versions()
        done = threading.Event()
        errors: list[str] = []
        with self._cond:
            if action == "publish" and self.pinned is not None:
                raise Refused(
                    f"{self.name} is pinned to version {self.pinned}; pin another version (`cloud pin "
                    f"{self.name} --version N`) or unpin it first.",
                    409,
                )
            if version not in kept:
                raise Refused(
                    f"Version {version} of {self.name} is not kept (its blob or state snapshot was deleted, or it "
                    f"was never published); kept versions: {kept}. The newest keep_blobs versions are kept.",
                    404,
                )
            if self._republish is not None:
                raise Refused(f"{self.name} is already republishing version {self._republish[0]}; retry.", 409)
            self._republish = (version, done, errors)
            if action == "pin":
                if self.pinned is None:
                    self._pin_frozen = self.frozen
                self.pinned, self.frozen = version, True  # from now on nothing but the pin's blob is published
            self.counters[f"admin:{action}"] += 1
            self._cond.notify_all()
        if not done.wait(timeout):
            raise CloudError(f"{action} of {self.name} version {version} did not finish within {timeout:.0f} s.")
        if errors:
            raise CloudError(f"{action} of {self.name} version {version} failed: {errors[0]}")
        return self.status()

    def _do_republish(self) -> None:
        with self._cond:
            assert self._republish is not None
            version, done, errors = self._republish
            before = self.version
        try:
            snap = self.store.load_adapt(self.store.snapshot_path(version)) if version > 0 else None
            if version > 0 and snap is None:
                raise CloudError(f"the state snapshot of version {version} was deleted meanwhile")
            self.cema.load_state_dict(snap["cema"] if snap is not None else self.cema._initial, steps=False)
            with self._cond:
                self._republish = None
            self._commit("republishes", publish=True, seconds=0.0)
            pin = "; pinned (nothing newer is published until unpin)" if self.pinned is not None else ""
            log.warning(
                "%s: the state of version %d published anew as version %d by the operator (was %d)%s",
                self.name,
                version,
                self.version,
                before,
                pin,
            )
        except Exception as exc:
            errors.append(f"{exc!s:.300}")
            raise
        finally:
            with self._cond:
                self._republish = None
            done.set()

    def _unpin(self) -> DeploymentStatus:
        with self._cond:
            if self.pinned is None:
                raise Refused(f"{self.name} is not pinned.", 409)
            was, self.pinned = self.pinned, None
            self.frozen = self._pin_frozen
            if not self.frozen and self._dirty:
                self._publish_req = True  # what was learnt while pinned is published at once
            self.counters["admin:unpin"] += 1
            state = self._state_json()
            self._cond.notify_all()
        self.store.save_state(state)
        log.warning(
            "%s: unpinned from version %d by the operator; %s",
            self.name,
            was,
            "still frozen" if self.frozen else "publishing again",
        )
        return self.status()
