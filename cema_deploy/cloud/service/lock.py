"""One writer per state directory: an exclusive ``fcntl.flock`` on a lock file, taken before any model is loaded or
any port bound.

The kernel releases a ``flock`` when its process dies (also on SIGKILL), so a lock left behind by a dead process is
never in the way: the next process takes it and overwrites the holder's record. The file itself stays (deleting it
would race with a process opening it). The record (PID, host, start time, command) is only for the message that
refuses a second process; the lock is the ``flock``. ``flock`` is per open file description, so a second lock
of the same file from the same process is refused too.

Where the lock lives: ``cloud serve`` (embedded engine) locks the service state (``STATE/serve.lock``) and each
deployment's state directory (``STATE/deployments/NAME/deployment.lock``); a Ray actor locks its deployment's
directory, so a second actor (or a local ``cloud serve``) on the same deployment state is refused too, while any
number of stateless Ray ingresses may share one service state. On NFS, Linux emulates ``flock`` with POSIX byte-range
locks (NFSv4 leases): a dead node's lock is freed when its lease expires.

Example:
    >>> lock = hold_state(Path("cema-state"), "serve.lock", what="cloud serve")  # doctest: +SKIP
    >>> lock.release()  # doctest: +SKIP
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import IO, Any

from cema_deploy.cloud.config import ServiceConfig
from cema_deploy.exceptions import CloudError

#: The service state's lock file (``cloud serve`` with the embedded engine).
SERVICE_LOCK = "serve.lock"
#: A deployment state directory's lock file (``cloud serve`` with the embedded engine, or its Ray actor).
DEPLOYMENT_LOCK = "deployment.lock"
#: How often a waiting lock retries, seconds.
_POLL_S = 0.2


class StateLocked(CloudError):
    """Another live process holds the lock of a state directory; the message names its PID and host."""


class StateLock:
    """An exclusive lock held on ``path`` until :meth:`release` (or this process ends)."""

    def __init__(self, path: Path, handle: IO[str], previous: dict[str, Any] | None) -> None:
        self.path = path
        self._handle: IO[str] | None = handle
        #: The record of a dead holder whose lock was taken over (None: the lock was free).
        self.previous = previous

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> StateLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _record(handle: IO[str]) -> dict[str, Any] | None:
    handle.seek(0)
    try:
        rec = json.loads(handle.read() or "null")
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def _holder(rec: dict[str, Any] | None) -> str:
    if rec is None:
        return "another process (its record is unreadable)"
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(rec.get("started", 0))))
    return f"process {rec.get('pid')} on host {rec.get('host')} ({rec.get('what', '?')}, since {since})"


def hold_state(directory: Path, name: str, *, what: str, wait_s: float = 0.0) -> StateLock:
    """Take the exclusive lock ``directory / name`` (created with its directory), waiting up to ``wait_s`` seconds
    for a live holder to let go, then write this process's record into it.

    Raises:
        StateLocked: another live process holds it; the message names that process's PID and host.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the life of the lock
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                rec = _record(handle)
                handle.close()
                raise StateLocked(
                    f"The state {directory} is in use by {_holder(rec)}: one process writes a state. Stop that "
                    f"process first, or give this one another --state. (lock file: {path})"
                ) from None
            time.sleep(_POLL_S)
        except OSError as exc:
            handle.close()
            raise CloudError(f"Cannot lock {path} ({exc}); the state must be on a file system with locks.") from exc
    previous = _record(handle)
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.time(),
        "what": what,
        "argv": sys.argv[:8],
    }
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(record) + "\n")
    handle.flush()
    os.fsync(handle.fileno())
    return StateLock(path, handle, previous)


def hold_service_state(config: ServiceConfig) -> list[StateLock]:
    """The locks ``cloud serve`` takes before it loads anything: with the embedded engine, the service state and
    each deployment's state directory; with the Ray engine none here (the ingress holds no state, and several may
    share one service state): each deployment actor locks its own directory. Releases what it took on failure."""
    if config.engine != "local":
        return []
    state = Path(config.state)
    taken: list[StateLock] = []
    try:
        taken.append(hold_state(state, SERVICE_LOCK, what="cloud serve"))
        for spec in config.deployments:
            taken.append(hold_state(state / spec.state, DEPLOYMENT_LOCK, what=f"cloud serve, deployment {spec.name}"))
    except BaseException:
        for lock in taken:
            lock.release()
        raise
    return taken
