"""The cluster engine: each deployment's adaptation state lives in one Ray actor, the HTTP ingress is stateless.

One named actor per fingerprint (namespace :data:`NAMESPACE`, detached, ``max_restarts=-1``) wraps the
:class:`~cema_deploy.cloud.deployment.Deployment` of the embedded engine, so both engines share every guarantee of
that class: an upload is acknowledged only once its file is fsynced, a version is taken the moment its blob is
written, and a restarted deployment resumes from its state directory. The actor reserves ``cpus``/``gpus`` of its
deployment table; its state directory is ``service state / table state`` resolved to an absolute path, which must
be the same storage on every node (a shared mount), because Ray may restart the actor on another node.

The ingress is the same FastAPI app (:func:`cema_deploy.cloud.service.api.create_app`) under the same uvicorn server as
``--engine local``, with this engine inside, rather than a Ray Serve deployment: the app already carries TLS,
tokens, the protocol middleware, graceful shutdown that answers parked polls, and its error mapping, and it parks a
long poll as one coroutine rather than in a Serve replica's ``max_ongoing_requests`` slot. The ingress holds no
deployment state, only a copy of each deployment's newest blob, so it scales by running more ``cloud serve
--engine ray --ray-address ...`` processes (on any node, behind one load balancer): they attach to the same named
actors.

Long polls park in the ingress. Per deployment, one thread keeps exactly one ``wait_for_version`` call
outstanding at the actor (an async method that returns the newest version and blob once it passes the one the
ingress holds, or after :data:`SUBSCRIBE_S`); its answer refreshes the copy and wakes every parked poll through an
:class:`asyncio.Event`, so N parked polls cost one actor call, never N. Calls that fail because the actor is
restarting are retried for :data:`RETRY_S` seconds and then answered 503 with Retry-After; an upload is retried
with its idempotency key, so it is stored once. ``reset`` is never retried (it is not idempotent).

Example:
    >>> engine = RayEngine.from_config(config)  # doctest: +SKIP
    >>> engine.start(); engine.status(fp).version  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from cema_deploy._lazy import lazy_import
from cema_deploy.cloud.config import DeploymentSpec, ServiceConfig
from cema_deploy.cloud.engines.base import DeploymentInfo, Engine, by_fingerprint, by_name
from cema_deploy.cloud.engines.polls import ParkedPolls
from cema_deploy.cloud.errors import Refused
from cema_deploy.cloud.service.lock import DEPLOYMENT_LOCK, hold_state
from cema_deploy.contract.messages import BatchAck, BatchReport, DeploymentStatus, EdgeReport, UploadAck
from cema_deploy.exceptions import CemaError, CloudError

ray = lazy_import("ray", extra="cluster", purpose="`cloud serve --engine ray`")

log = logging.getLogger("cema_deploy.cloud")

#: Ray namespace of the deployment actors (named ``deployment-<fingerprint>``).
NAMESPACE = "cema-deploy"
#: Longest wait of one subscription call, seconds (it also refreshes the ingress's copy this often).
SUBSCRIBE_S = 10.0
#: How long a call is retried while its actor restarts before the request is answered 503, seconds.
RETRY_S = 30.0
#: Longest answer time of one actor call, seconds (``reset`` waits for its step: up to 300 s).
CALL_TIMEOUT_S = 360.0
#: How long creating (or attaching to) the actors may take: models load, resources must be free.
CREATE_TIMEOUT_S = 600.0
#: Polls seen by an ingress are sent to the deployment's actor at most this often, seconds.
SEEN_FLUSH_S = 1.0
#: How long a (re)started actor waits for the lock of its deployment state held by a process still exiting.
LOCK_WAIT_S = 30.0


class DeploymentActor:
    """One deployment in a Ray actor: every method of the :class:`Engine` protocol, each async (blocking work runs
    on a thread, so ``wait_for_version`` calls are answered while a step runs or an upload is fsynced)."""

    def __init__(self, spec: DeploymentSpec, service_state: str, signing_key: str | None, threads: int) -> None:
        import sys

        import torch

        from cema_deploy.cloud.deployment import Deployment
        from cema_deploy.cloud.service.memory import pin_mmap_threshold

        torch.set_num_threads(threads)
        pin_mmap_threshold()  # as `cloud serve`: freed upload buffers leave RSS
        sys.setswitchinterval(0.0005)  # as `cloud serve`: answer calls between the step's short torch ops
        logging.basicConfig(level=logging.WARNING)
        self.spec, self.service_state = spec, service_state
        key = Path(signing_key) if signing_key else None
        # One writer per deployment state, before the models load; a restart may overlap the dying process.
        self._state_lock = hold_state(
            Path(service_state) / spec.state, DEPLOYMENT_LOCK, what=f"Ray actor of {spec.name}", wait_s=LOCK_WAIT_S
        )
        self.dep = Deployment.from_spec(spec, Path(service_state), signing_key=key)
        self._polls = ParkedPolls([""])
        self.waiting = 0  # wait_for_version calls in progress
        self.wait_calls = 0
        self.dep.add_listener(lambda _version: self._polls.wake(""))
        self.dep.start()

    async def info(self) -> dict[str, Any]:
        return {**self.dep.info(), "spec": self.spec, "service_state": self.service_state, "pid": os.getpid()}

    async def status(self) -> DeploymentStatus:
        return await asyncio.to_thread(self.dep.status)

    async def upload(self, data: bytes, device: str, idempotency_key: str) -> UploadAck:
        # the encoded upload crosses to the actor (3-10x smaller than its pixels) and is decoded here, within
        # the deployment's decode budget
        return await asyncio.to_thread(self.dep.upload_bytes, data, device=device, idempotency_key=idempotency_key)

    async def batch_report(self, report: BatchReport, device: str, idempotency_key: str) -> BatchAck:
        return await asyncio.to_thread(self.dep.batch_report, report, device=device, idempotency_key=idempotency_key)

    async def edge_report(self, report: EdgeReport, device: str) -> str:
        return await asyncio.to_thread(self.dep.edge_report, report, device=device)

    async def admin(self, action: str, version: int | None = None) -> DeploymentStatus:
        return await asyncio.to_thread(self.dep.admin, action, version=version)

    async def seen_many(self, entries: list[tuple[str, int | None, bool]]) -> None:
        """Polls and ingress refusals buffered by an ingress: (device, version, refused), oldest first."""
        for device, version, refused in entries:
            self.dep.seen(device, version=version, refused=refused)

    async def operator_status(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.dep.operator_status)

    async def metrics(self) -> dict[str, Any]:
        row = await asyncio.to_thread(self.dep.metrics)
        return {**row, "version_waiters": self.waiting, "version_wait_calls": self.wait_calls}

    async def wait_for_version(self, after: int, timeout: float) -> tuple[int, bytes | None]:
        """The newest version and its blob once the version is above ``after``, or after ``timeout`` seconds."""
        self.waiting += 1
        self.wait_calls += 1
        try:
            await self._polls.wait("", lambda: self.dep.version > after, timeout, lambda: self.dep.closing)
        finally:
            self.waiting -= 1
        found = self.dep.latest(-1)
        return (found[0], found[1]) if found is not None else (self.dep.version, None)

    async def stop(self, timeout: float) -> None:
        await asyncio.to_thread(self.dep.stop, timeout)


def _actor_name(fingerprint: str) -> str:
    return f"deployment-{fingerprint}"


def _absolute(spec: DeploymentSpec) -> DeploymentSpec:
    """Paths as every node must see them (the same absolute path on shared storage)."""
    weights = spec.teacher_weights.resolve() if spec.teacher_weights is not None else None
    return dataclasses.replace(spec, edge=spec.edge.resolve(), teacher_weights=weights)


def connect(address: str | None, *, num_cpus: float = 0.0) -> bool:
    """Join the Ray cluster at ``address`` (``auto``, ``ray://HOST:PORT`` or ``HOST:PORT``), or start a local one
    on 127.0.0.1 when ``None``; returns True when this call started Ray in this process. With Ray already
    initialised (a test's cluster, a driver script), that connection is used."""
    if ray.is_initialized():
        return False
    if address is None:
        cpus = max(os.cpu_count() or 1, math.ceil(num_cpus))
        ray.init(num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=True)
        return True
    try:
        ray.init(address=address, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise CloudError(
            f"Cannot join the Ray cluster at {address!r} ({exc!s:.200}); start it with `ray start --head` or pass "
            "--ray-address auto on a node of the cluster."
        ) from exc
    return False


class RayEngine:
    """Deployments as Ray actors, one per fingerprint (an :class:`~cema_deploy.cloud.engines.base.Engine`).

    ``keep_actors``: leave the actors running when this ingress stops (other ingresses may use them; the default
    when attached to an existing cluster); otherwise :meth:`stop` lets each finish its step, then removes it.
    """

    def __init__(
        self,
        handles: dict[str, Any],
        infos: list[DeploymentInfo],
        *,
        keep_actors: bool = False,
        started_ray: bool = False,
        retry_s: float = RETRY_S,
    ) -> None:
        self._handles = handles
        self._infos = {i.fingerprint: i for i in infos}
        self._by_name = {i.name: i.fingerprint for i in infos}
        self.keep_actors, self.started_ray, self.retry_s = keep_actors, started_ray, retry_s
        self.closing = False
        self._latest: dict[str, tuple[int, bytes | None]] = {}
        self._polls = ParkedPolls(handles)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.subscription_calls: dict[str, int] = dict.fromkeys(handles, 0)
        self._seen: dict[str, list[tuple[str, int | None, bool]]] = {}
        self._seen_sent: dict[str, float] = {}
        self.parked: dict[str, int] = dict.fromkeys(handles, 0)

    @classmethod
    def from_config(cls, config: ServiceConfig, *, keep_actors: bool | None = None) -> RayEngine:
        """Join (or start) Ray, then create each deployment's actor, or attach to the one already running for its
        fingerprint (replaced when it was created from another deployment table or state directory)."""
        from cema_deploy.contract.manifest import manifest_from_dir

        attached = ray.is_initialized() or config.ray_address is not None
        started = connect(config.ray_address, num_cpus=sum(s.cpus for s in config.deployments))
        state = str(Path(config.state).resolve())
        key = str(config.signing_key.resolve()) if config.signing_key is not None else None
        handles: dict[str, Any] = {}
        names: dict[str, str] = {}
        for raw in config.deployments:
            spec = _absolute(raw)
            fp = manifest_from_dir(spec.edge).fingerprint
            if fp in handles:
                raise CloudError(
                    f"Deployments {names[fp]!r} and {spec.name!r} serve one export (fingerprint {fp[:16]}…); a "
                    "fingerprint has one adaptation state. Export the model again for the second domain (a new "
                    "fingerprint) or serve it once."
                )
            names[fp] = spec.name
            handles[fp] = _actor(spec, fp, state, key)
        try:
            infos = ray.get([h.info.remote() for h in handles.values()], timeout=CREATE_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError as exc:
            raise CloudError(
                f"The deployment actors did not start within {CREATE_TIMEOUT_S:.0f} s; check that the cluster has "
                f"the CPUs/GPUs their tables ask for ({[(s.name, s.cpus, s.gpus) for s in config.deployments]}): "
                "`ray status`."
            ) from exc
        except ray.exceptions.RayError as exc:
            raise CloudError(f"A deployment actor failed to start: {_cause(exc)}") from exc
        return cls(
            handles,
            [DeploymentInfo(**{k: i[k] for k in ("name", "fingerprint", "model", "image_hw")}) for i in infos],
            keep_actors=attached if keep_actors is None else keep_actors,
            started_ray=started,
        )

    # ---- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Fetch each deployment's newest blob, then keep one subscription per deployment outstanding."""
        for fp in self._handles:
            self._latest[fp] = self._call(fp, "wait_for_version", -1, 0.0)
        for fp in self._handles:
            t = threading.Thread(target=self._subscribe, args=(fp,), name=f"cema-ray-{fp[:8]}", daemon=True)
            t.start()
            self._threads.append(t)

    def begin_shutdown(self) -> None:
        self.closing = True
        for fp in self._handles:
            self._polls.wake(fp)

    def stop(self, timeout: float = 30.0) -> None:
        self.begin_shutdown()
        self._stop.set()
        if not self.keep_actors:  # each actor saves its step, then goes (no restart)
            refs = [h.stop.remote(timeout) for h in self._handles.values()]
            with contextlib.suppress(ray.exceptions.RayError):
                ray.get(refs, timeout=timeout + 10)
            for h in self._handles.values():
                with contextlib.suppress(ray.exceptions.RayError, ValueError):
                    ray.kill(h, no_restart=True)
        for t in self._threads:
            t.join(timeout=0.1)
        if self.started_ray:
            ray.shutdown()

    # ---- calls to the actors ------------------------------------------------------------------------------
    def handle(self, fingerprint: str) -> Any:
        """The actor handle of a deployment (for operators and tests: ``ray.kill(engine.handle(fp))``)."""
        return by_fingerprint(self._handles, fingerprint)

    def _fp_of(self, name: str) -> str:
        return by_name(self._by_name, name)

    def _call(self, fingerprint: str, method: str, *args: Any, retry: bool = True) -> Any:
        """``ray.get`` of one actor call; retried while the actor restarts, then 503 + Retry-After."""
        h = self.handle(fingerprint)
        deadline = time.monotonic() + (self.retry_s if retry else 0.0)
        delay = 0.1
        while True:
            try:
                return ray.get(getattr(h, method).remote(*args), timeout=CALL_TIMEOUT_S)
            except ray.exceptions.RayTaskError as exc:  # raised by the deployment: Refused, CloudError
                cause = getattr(exc, "cause", None)
                if isinstance(cause, CemaError):
                    raise cause from None
                raise CloudError(f"{self._infos[fingerprint].name}: {method} failed: {_cause(exc)}") from exc
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
                if time.monotonic() + delay > deadline or self._stop.is_set():
                    name = self._infos[fingerprint].name if fingerprint in self._infos else fingerprint[:16]
                    raise Refused(
                        f"Deployment {name} is unavailable (its Ray actor is restarting or unreachable: "
                        f"{type(exc).__name__}); retry after the Retry-After seconds.",
                        503,
                        retry_after=5,
                    ) from exc
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _subscribe(self, fingerprint: str) -> None:
        """One outstanding ``wait_for_version`` per deployment: refresh the blob copy, wake parked polls."""
        h = self._handles[fingerprint]
        delay = 0.1
        while not self._stop.is_set():
            after = self._latest[fingerprint][0]
            with self._lock:
                self.subscription_calls[fingerprint] += 1
            try:
                found = ray.get(h.wait_for_version.remote(after, SUBSCRIBE_S), timeout=SUBSCRIBE_S + 60)
            except Exception as exc:  # restarting, unreachable, or Ray shutting down: try again
                if self._stop.wait(delay):
                    return
                log.debug("subscription to %s: %s; retrying", fingerprint[:16], type(exc).__name__)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.1
            if found[0] > after:
                self._latest[fingerprint] = found
                self._polls.wake(fingerprint)

    # ---- the Engine protocol ------------------------------------------------------------------------------
    def deployments(self) -> list[DeploymentInfo]:
        return list(self._infos.values())

    def status(self, fingerprint: str) -> DeploymentStatus:
        status: DeploymentStatus = self._call(fingerprint, "status")
        return status

    def upload(self, fingerprint: str, data: bytes, *, device: str, idempotency_key: str) -> UploadAck:
        # a retry after the actor restarted must not store the upload twice: give a keyless upload a key
        key = idempotency_key or f"ingress-{uuid.uuid4()}"
        ack: UploadAck = self._call(fingerprint, "upload", data, device, key)
        return ack

    def batch_report(self, fingerprint: str, report: BatchReport, *, device: str, idempotency_key: str) -> BatchAck:
        key = idempotency_key or f"ingress-{uuid.uuid4()}"
        ack: BatchAck = self._call(fingerprint, "batch_report", report, device, key)
        return ack

    def latest(self, fingerprint: str, after: int) -> tuple[int, bytes] | None:
        self.handle(fingerprint)
        version, data = self._latest.get(fingerprint, (0, None))
        return (version, data) if data is not None and version > after else None

    async def wait_version(self, fingerprint: str, after: int, timeout: float) -> int:
        with self._lock:
            self.parked[fingerprint] += 1
        try:
            await self._polls.wait(
                fingerprint, lambda: self.latest(fingerprint, after) is not None, timeout, lambda: self.closing
            )
        finally:
            with self._lock:
                self.parked[fingerprint] -= 1
        return self._latest.get(fingerprint, (0, None))[0]

    def edge_report(self, fingerprint: str, report: EdgeReport, *, device: str) -> str:
        outcome: str = self._call(fingerprint, "edge_report", report, device)
        return outcome

    def seen(self, fingerprint: str, device: str, *, version: int | None = None, refused: bool = False) -> None:
        # Buffered in the ingress and sent at most once per SEEN_FLUSH_S per deployment, without waiting: a poll
        # never costs an actor round trip.
        with self._lock:
            self._seen.setdefault(fingerprint, []).append((device, version, refused))
            due = time.monotonic() - self._seen_sent.get(fingerprint, 0.0) >= SEEN_FLUSH_S
        if due:
            self._flush_seen(fingerprint)

    def _flush_seen(self, fingerprint: str, *, wait: bool = False) -> None:
        """Send the buffered records; ``wait``: until the actor has them (a status read must see every poll)."""
        with self._lock:
            entries = self._seen.pop(fingerprint, [])
            self._seen_sent[fingerprint] = time.monotonic()
        if entries:
            with contextlib.suppress(ray.exceptions.RayError):
                ref = self.handle(fingerprint).seen_many.remote(entries[-10_000:])
                if wait:
                    ray.get(ref, timeout=30)

    def admin(self, name: str, action: str, version: int | None = None) -> DeploymentStatus:
        # reset, publish and pin are not idempotent: never retried
        retry = action in ("freeze", "unfreeze", "unpin")
        status: DeploymentStatus = self._call(self._fp_of(name), "admin", action, version, retry=retry)
        return status

    def operator_status(self, fingerprint: str) -> dict[str, Any]:
        self._flush_seen(fingerprint, wait=True)
        row: dict[str, Any] = self._call(fingerprint, "operator_status")
        return row

    def metrics(self) -> list[dict[str, Any]]:
        rows = []
        for fp in self._handles:
            row: dict[str, Any] = self._call(fp, "metrics")
            with self._lock:
                row["subscription_calls"] = self.subscription_calls[fp]
                row["parked_polls"] = self.parked[fp]
            rows.append(row)
        return rows


def _cause(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc!s:.300}"


_ActorClass: Any = None


def _actor_class() -> Any:
    global _ActorClass
    if _ActorClass is None:
        _ActorClass = ray.remote(DeploymentActor)
    return _ActorClass


def _actor(spec: DeploymentSpec, fingerprint: str, state: str, key: str | None) -> Any:
    """The actor of ``fingerprint``: the running one if it serves this table and state, else a new one. A running
    actor created from another table or state directory is never replaced from here (other ingresses use it):
    this ingress refuses to start instead, naming how to remove it."""
    name = _actor_name(fingerprint)
    with contextlib.suppress(ValueError):  # none running
        running = ray.get_actor(name, namespace=NAMESPACE)
        try:
            info = ray.get(running.info.remote(), timeout=CREATE_TIMEOUT_S)
        except ray.exceptions.RayError:  # restarting (max_restarts=-1): attach, it comes back from its state
            log.warning("%s: the running actor %s does not answer; attaching (Ray restarts it)", spec.name, name)
            return running
        if info["spec"] == spec and info["service_state"] == state:
            log.info("%s: attached to the running actor %s", spec.name, name)
            return running
        diff = "state directory" if info["service_state"] != state else "deployment table"
        raise CloudError(
            f"The Ray actor {name} ({spec.name}) already runs with another {diff} (state {info['service_state']}); "
            "other ingresses may use it, so this one does not replace it. Start this ingress with the same config, "
            f"or stop the actor first: python -c \"import ray; ray.init(address='auto'); "
            f"ray.kill(ray.get_actor('{name}', namespace='{NAMESPACE}'), no_restart=True)\"."
        )
    options: dict[str, Any] = {
        "name": name,
        "namespace": NAMESPACE,
        "lifetime": "detached",  # owned by the cluster, not by this ingress: other ingresses attach to it
        "max_restarts": -1,  # Ray restarts a crashed actor; its constructor reloads the state directory
        "max_task_retries": 0,  # the ingress retries, bounded, and only what is idempotent
        "max_concurrency": 1000,  # parked subscriptions of many ingresses and concurrent uploads
        "num_cpus": spec.cpus,
        "num_gpus": spec.gpus,
    }
    threads = max(1, math.floor(spec.cpus))
    return _actor_class().options(**options).remote(spec, state, key, threads)


def _conforms(engine: RayEngine) -> Engine:  # mypy checks here that RayEngine implements the Engine protocol
    return engine
