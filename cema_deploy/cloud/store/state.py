"""The cloud's state on disk. Every file is written atomically (see ``_atomic``), so a killed process restarts
where it was and never re-issues a version number.

::

    STATE/                          the service (``--state``)
      tokens.json                   device and admin bearer tokens (SHA-256 hashes only), what each may use, expiry
      deployments.json              the deployments served from this state (name -> state subdirectory)
      serve.lock                    held by the one ``cloud serve`` writing this state (see ``lock.py``)
      deployments/NAME/             one deployment (or the ``state`` subdirectory its table names)
        deployment.lock             held by the one process writing this deployment (``cloud serve`` or its actor)
        epoch                       the state's epoch: milliseconds since the Unix epoch when this folder was
                                    created, written once (every blob carries it; see :meth:`DeploymentStore.epoch`)
        state.json                  version, generation, cursors, counters, bad versions, pin, devices seen
        adapt_state.pt              both models' normalization tensors and optimizer states, with the cursors and
                                    version they belong to (written before state.json, so it wins on restart)
        blobs/v00000042.safetensors the newest ``keep_blobs`` published refit blobs (version 0 is the export's own
                                    params.safetensors)
        snapshots/v00000042.pt      adapt_state.pt as it was when that version was published (for rollbacks)
        uploads/000000000123.safetensors   acknowledged uploads still needed (see replay.py): uploaded frames
        keys.jsonl                  idempotency keys of uploads whose files were deleted (bounded)
        reports.jsonl               rollback / refusal reports from edges
        report_keys.jsonl           idempotency keys of batch reports and the acks sent (bounded)
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cema_deploy._atomic import write_atomic
from cema_deploy.contract.blob import RefitBlob, blob_to_bytes
from cema_deploy.exceptions import CloudError

ALL = "*"


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Grant:
    """What one bearer token may do: use ``deployments`` (names; ``"*"`` = all), and the admin routes."""

    device: str
    deployments: tuple[str, ...]
    admin: bool = False
    expires: float | None = None  # Unix time after which the cloud refuses the token (401); None: never

    def allows(self, deployment: str) -> bool:
        return ALL in self.deployments or deployment in self.deployments

    def expired(self, now: float | None = None) -> bool:
        return self.expires is not None and (time.time() if now is None else now) >= self.expires


class StateStore:
    """The service-level state directory: tokens, and where each deployment keeps its state.

    Example:
        >>> token = StateStore("cema-state").add_token("cam-01", deployments=["cams"])  # doctest: +SKIP
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.tokens_path = self.directory / "tokens.json"
        self._lock = threading.Lock()

    def deployment_dir(self, subdirectory: str) -> Path:
        return self.directory / subdirectory

    # ---- tokens -------------------------------------------------------------------------------------------
    def _tokens(self) -> dict[str, dict[str, Any]]:
        if not self.tokens_path.exists():
            return {}
        try:
            return dict(json.loads(self.tokens_path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as exc:
            raise CloudError(f"{self.tokens_path} is unreadable ({exc}); fix it or add the tokens again.") from exc

    def add_token(
        self,
        device_id: str,
        *,
        deployments: list[str] | None = None,
        admin: bool = False,
        rotate: bool = False,
        expires: float | None = None,
    ) -> str:
        """Create a bearer token for ``device_id`` allowed to use ``deployments`` (names; ``None``: all) or, with
        ``admin``, the operator routes, refused by the cloud after ``expires`` (Unix time; ``None``: never); only
        its SHA-256 is stored, the token is returned once. A device that holds a token is refused unless
        ``rotate``, which replaces it (the old token stops working at once)."""
        if not device_id or len(device_id) > 128 or not device_id.replace("-", "").replace("_", "").isalnum():
            raise CloudError(f"Device id {device_id!r} must be 1-128 letters, digits, '-' or '_'.")
        scope = [ALL] if deployments is None else sorted(set(deployments))
        if not scope and not admin:
            raise CloudError(f"Token for {device_id!r} would allow nothing; name a deployment, --all or --admin.")
        token = secrets.token_urlsafe(32)
        with self._lock:
            tokens = self._tokens()
            if device_id in tokens and not rotate:
                raise CloudError(
                    f"{device_id!r} already holds a token (in {self.tokens_path}); pass --rotate to replace it (its "
                    "old token stops working at once), or choose another device id."
                )
            entry = {"sha256": _hash(token), "created": time.time(), "deployments": [] if admin else scope}
            if expires is not None:
                entry["expires"] = float(expires)
            tokens[device_id] = {**entry, "admin": admin}
            write_atomic(self.tokens_path, json.dumps(tokens, indent=1).encode())
        return token

    def revoke_token(self, device_id: str) -> bool:
        """Remove ``device_id``'s token; a running service refuses it from its next request on."""
        with self._lock:
            tokens = self._tokens()
            if device_id not in tokens:
                return False
            del tokens[device_id]
            write_atomic(self.tokens_path, json.dumps(tokens, indent=1).encode())
        return True

    def grants(self) -> list[Grant]:
        return [_grant(k, v) for k, v in sorted(self._tokens().items())]

    def devices(self) -> list[str]:
        return sorted(self._tokens())

    # ---- deployments served from this state -------------------------------------------------------------------
    def record_deployments(self, deployments: dict[str, str]) -> None:
        """Remember the deployments served from this state (name -> state subdirectory), so that ``token add``
        can refuse a name no service knows."""
        with self._lock:
            known = {**self._registry(), **deployments}
            write_atomic(self.registry_path, json.dumps(known, indent=1, sort_keys=True).encode())

    def known_deployments(self) -> list[str]:
        """Deployments ever served from this state: those recorded at ``cloud serve`` and, for states written
        before the record existed, the subdirectories of ``deployments/`` that hold a ``state.json``."""
        found = set(self._registry())
        root = self.directory / "deployments"
        if root.is_dir():
            found |= {d.name for d in root.iterdir() if (d / "state.json").exists()}
        return sorted(found)

    @property
    def registry_path(self) -> Path:
        return self.directory / "deployments.json"

    def _registry(self) -> dict[str, str]:
        try:
            loaded = json.loads(self.registry_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise CloudError(
                f"{self.registry_path} is unreadable ({exc}); delete it (`cloud serve` writes it again)."
            ) from exc
        return {str(k): str(v) for k, v in loaded.items()} if isinstance(loaded, dict) else {}


def _grant(device: str, entry: dict[str, Any]) -> Grant:
    expires = entry.get("expires")
    return Grant(
        device,
        tuple(entry.get("deployments", [ALL])),
        bool(entry.get("admin", False)),
        float(expires) if expires is not None else None,
    )


class TokenTable:
    """The service's view of ``tokens.json``, re-read whenever the file changes (so an added or revoked token
    takes effect at the next request, without a restart). Thread-safe."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self._sig: tuple[int, int, int] | None = None
        self._table: dict[str, Grant] = {}
        self._lock = threading.Lock()

    def lookup(self, token: str) -> Grant | None:
        """The grant of ``token``, or None for an unknown or revoked one.

        The table is keyed by SHA-256 digests, so finding the key is the comparison: a token matches only a
        stored digest equal to its own. The dict lookup's timing can leak at most something about the digests
        (preimage-resistant), never about a token, so it is as safe as a constant-time scan of every stored hash
        and stays O(1) for a fleet of any size."""
        self._refresh()
        return self._table.get(_hash(token))

    def _refresh(self) -> None:
        try:
            st = os.stat(self.store.tokens_path)
            sig: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            sig = None
        if sig == self._sig:
            return
        with self._lock:
            tokens = self.store._tokens() if sig is not None else {}
            self._table = {v["sha256"]: _grant(k, v) for k, v in tokens.items()}
            self._sig = sig


class DeploymentStore:
    """Reads and writes one deployment's state directory (see the module docstring)."""

    def __init__(self, directory: str | Path, *, keep_blobs: int = 16) -> None:
        self.directory = Path(directory)
        self.blobs = self.directory / "blobs"
        self.snapshots = self.directory / "snapshots"
        self.keep_blobs = keep_blobs
        for d in (self.blobs, self.snapshots):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.epoch = self._epoch()

    # ---- epoch ----------------------------------------------------------------------------------------
    def _epoch(self) -> int:
        """The state's epoch: minted once, when the state has none (a new folder, or one made before epochs
        existed), as milliseconds since the Unix epoch, and kept in ``epoch`` from then on. A state created
        later has a greater epoch, so its versions (restarting at 1) order after every version of an older one:
        edges compare ``(epoch, version)``. A state restored from a backup keeps the backup's epoch (delete its
        ``epoch`` file to mint a new one)."""
        path = self.directory / "epoch"
        if path.exists():
            try:
                text = path.read_text(encoding="ascii").strip()
                epoch = int(text)
            except (OSError, ValueError) as exc:
                raise CloudError(
                    f"{path} is unreadable ({exc!s:.100}); it holds the state's epoch (decimal milliseconds). "
                    "Restore it, or delete it to mint a new epoch (edges then follow this state's versions)."
                ) from exc
            if not 0 < epoch < 10**19:
                raise CloudError(f"{path} holds epoch {epoch}, outside (0, 10**19); restore or delete it.")
            return epoch
        epoch = time.time_ns() // 1_000_000
        write_atomic(path, str(epoch).encode("ascii"))
        return epoch

    # ---- counters -------------------------------------------------------------------------------------
    def load_state(self) -> dict[str, Any]:
        path = self.directory / "state.json"
        state: dict[str, Any] = {"version": 0}
        if path.exists():
            try:
                state.update(json.loads(path.read_text()))
            except (OSError, ValueError) as exc:
                raise CloudError(f"{path} is unreadable ({exc}); restore it from a backup or use a new state.") from exc
        # A blob written before a crash, whose state.json update did not land, still holds its version.
        state["version"] = max(int(state["version"]), self.newest_blob_version())
        return state

    def save_state(self, state: dict[str, Any]) -> None:
        write_atomic(self.directory / "state.json", json.dumps(state, indent=1, sort_keys=True).encode())

    # ---- blobs ----------------------------------------------------------------------------------------
    def blob_path(self, version: int) -> Path:
        return self.blobs / f"v{version:08d}.safetensors"

    def save_blob(self, blob: RefitBlob) -> bytes:
        """Write a new version (refused if it exists: versions are never reused), then delete blobs older than the
        newest ``keep_blobs``."""
        if self.blob_path(blob.version).exists():
            raise CloudError(f"Blob version {blob.version} already exists in {self.blobs}; versions are never reused.")
        data = blob_to_bytes(blob)
        write_atomic(self.blob_path(blob.version), data)
        for old in self.blob_versions()[: -self.keep_blobs]:
            self.blob_path(old).unlink(missing_ok=True)
        return data

    def blob_versions(self) -> list[int]:
        return sorted(int(p.stem[1:]) for p in self.blobs.glob("v*.safetensors") if p.stem[1:].isdigit())

    def newest_blob_version(self) -> int:
        versions = self.blob_versions()
        return versions[-1] if versions else 0

    def blob_bytes(self, version: int) -> bytes:
        return self.blob_path(version).read_bytes()

    # ---- adaptation state (torch) ---------------------------------------------------------------------
    def save_adapt(self, state: dict[str, Any]) -> None:
        import io

        import torch

        buf = io.BytesIO()
        torch.save(state, buf)
        write_atomic(self.directory / "adapt_state.pt", buf.getvalue())

    def load_adapt(self, path: Path | None = None) -> dict[str, Any] | None:
        import torch

        path = path or self.directory / "adapt_state.pt"
        if not path.exists():
            return None
        try:
            loaded: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a damaged or foreign file
            raise CloudError(f"{path} is unreadable ({exc!s:.200}); restore it or use a new --state.") from exc
        return loaded

    def snapshot(self, version: int) -> None:
        """Keep adapt_state.pt as it is now as the state behind ``version`` (a hard link: no copy), and drop the
        snapshots older than the newest ``keep_blobs``."""
        src, dst = self.directory / "adapt_state.pt", self.snapshot_path(version)
        dst.unlink(missing_ok=True)
        try:
            os.link(src, dst)
        except OSError:  # file systems without hard links
            shutil.copyfile(src, dst)
        versions = sorted(int(p.stem[1:]) for p in self.snapshots.glob("v*.pt") if p.stem[1:].isdigit())
        for old in versions[: -self.keep_blobs]:
            self.snapshot_path(old).unlink(missing_ok=True)

    def snapshot_versions(self) -> list[int]:
        """Versions whose adaptation state is kept (ascending)."""
        return sorted(int(p.stem[1:]) for p in self.snapshots.glob("v*.pt") if p.stem[1:].isdigit())

    def snapshot_path(self, version: int) -> Path:
        return self.snapshots / f"v{version:08d}.pt"

    # ---- idempotency keys of deleted uploads, reports -------------------------------------------------------
    def journal_keys(self, items: list[tuple[str, str]]) -> None:
        if not items:
            return
        with self._lock, open(self.directory / "keys.jsonl", "a", encoding="utf-8") as f:
            f.write("".join(json.dumps({"key": k, "ack": a}) + "\n" for k, a in items))

    def compact_keys(self, keep: list[tuple[str, str]], *, name: str = "keys.jsonl") -> None:
        data = "".join(json.dumps({"key": k, "ack": a}) + "\n" for k, a in keep)
        write_atomic(self.directory / name, data.encode())

    def journal_report(self, key: str, ack: str, *, name: str) -> None:
        """Append one batch report's idempotency key and the ack sent (flushed before the ack goes out)."""
        with self._lock, open(self.directory / name, "a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "ack": ack}) + "\n")
            f.flush()

    def append_report(self, report: dict[str, Any]) -> None:
        with self._lock, open(self.directory / "reports.jsonl", "a") as f:
            f.write(json.dumps(report) + "\n")
