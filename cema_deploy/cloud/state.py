"""The cloud's state directory. Every file is written atomically (see ``_atomic``), so a killed process restarts
where it was and never re-issues a version number.

::

    STATE/
      state.json          version counter, sample cursor, step and request counters
      blobs/v00000001.safetensors ...   every published refit blob
      adapt_state.pt      teacher + replica normalization tensors, BN statistics, optimizer states, and the
                          cursor/steps/version they belong to (written before state.json, so it wins on restart)
      replay/             acknowledged uploads, pending ones included (see replay.py)
      tokens.json         per-device bearer tokens, as SHA-256 hashes only
      reports.jsonl       rollback / refusal reports from edges
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from cema_deploy.cloud._atomic import write_atomic
from cema_deploy.contract.blob import RefitBlob, blob_to_bytes
from cema_deploy.exceptions import CloudError


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class StateStore:
    """Reads and writes one state directory."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.blobs = self.directory / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    # ---- counters -------------------------------------------------------------------------------------
    def load_state(self) -> dict[str, Any]:
        path = self.directory / "state.json"
        state: dict[str, Any] = {"version": 0, "cursor": 0, "steps": 0}
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
        if self.blob_path(blob.version).exists():
            raise CloudError(f"Blob version {blob.version} already exists in {self.blobs}; versions are never reused.")
        data = blob_to_bytes(blob)
        write_atomic(self.blob_path(blob.version), data)
        return data

    def newest_blob_version(self) -> int:
        versions = [int(p.stem[1:]) for p in self.blobs.glob("v*.safetensors") if p.stem[1:].isdigit()]
        return max(versions, default=0)

    def blob_bytes(self, version: int) -> bytes:
        return self.blob_path(version).read_bytes()

    # ---- adaptation state (torch) -----------------------------------------------------------------------
    def save_adapt(self, state: dict[str, Any]) -> None:
        import io

        import torch

        buf = io.BytesIO()
        torch.save(state, buf)
        write_atomic(self.directory / "adapt_state.pt", buf.getvalue())

    def load_adapt(self) -> dict[str, Any] | None:
        import torch

        path = self.directory / "adapt_state.pt"
        if not path.exists():
            return None
        try:
            loaded: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a damaged or foreign file
            raise CloudError(f"{path} is unreadable ({exc!s:.200}); restore it or use a new --state.") from exc
        return loaded

    # ---- tokens ---------------------------------------------------------------------------------------
    def _tokens(self) -> dict[str, dict[str, Any]]:
        path = self.directory / "tokens.json"
        if not path.exists():
            return {}
        try:
            return dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as exc:
            raise CloudError(f"{path} is unreadable ({exc}); fix it or add the device tokens again.") from exc

    def add_token(self, device_id: str) -> str:
        """Create a bearer token for ``device_id``; only its SHA-256 is stored, the token is returned once."""
        if not device_id or len(device_id) > 128 or not device_id.replace("-", "").replace("_", "").isalnum():
            raise CloudError(f"Device id {device_id!r} must be 1-128 letters, digits, '-' or '_'.")
        token = secrets.token_urlsafe(32)
        with self._lock:
            tokens = self._tokens()
            tokens[device_id] = {"sha256": _hash(token), "created": time.time()}
            write_atomic(self.directory / "tokens.json", json.dumps(tokens, indent=1).encode())
        return token

    def devices(self) -> list[str]:
        return sorted(self._tokens())

    def token_table(self) -> dict[str, str]:
        """``sha256 -> device id`` for the service's authentication."""
        return {v["sha256"]: k for k, v in self._tokens().items()}

    @staticmethod
    def device_for(token: str, table: dict[str, str]) -> str | None:
        # Looking up the token's SHA-256 leaks at most timing about hashes, never about the token itself, so a
        # dict lookup (O(1) for a fleet of any size) is as safe as comparing against every stored hash.
        digest = _hash(token)
        device = table.get(digest)
        return device if device is not None and hmac.compare_digest(digest, _hash(token)) else None

    # ---- reports --------------------------------------------------------------------------------------
    def append_report(self, report: dict[str, Any]) -> None:
        with self._lock, open(self.directory / "reports.jsonl", "a") as f:
            f.write(json.dumps(report) + "\n")
