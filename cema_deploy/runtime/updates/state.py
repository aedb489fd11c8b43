"""The edge's durable state (``edge run --state DIR``): what a restart needs to continue where the edge was.

``DIR/edge-state.json`` holds the selector's state (warm-up mean, running counters, redundancy average), the
cloud epoch this edge follows and the versions of it that this edge refused or rolled back (with reasons) and the
bound ``refused_upto`` (only verified versions: see :mod:`cema_deploy.runtime.updates.ledger`), the deployment
generation and whether it was calibrated, and the name of the serving blob, ``DIR/serving-v{N}.safetensors``
(``serving-e{epoch}-v{N}.safetensors`` for a blob of a cloud with epochs):
the raw bytes as received (a signed blob stays signed, so a restart verifies it again). Every file is written to
a temporary name, fsynced and renamed, the blob before the JSON that names it, so a crash at any point leaves the
old state or the new one, never a mix. ``DIR/spool/`` is the upload spool (:mod:`cema_deploy.runtime.link.spool`).
Never imports torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cema_deploy._atomic import write_atomic
from cema_deploy.exceptions import CemaError

__all__ = ["EdgeState", "EdgeStateError", "EdgeStateStore"]

STATE_FILE = "edge-state.json"
STATE_FORMAT = "cema-edge-state/1"


class EdgeStateError(CemaError):
    """An edge state folder that cannot be used (unreadable, or written for another model)."""


@dataclass
class EdgeState:
    """Everything the edge restores on restart (JSON-serialisable)."""

    fingerprint: str
    generation: int = 0
    calibrated: bool | None = None
    serving_version: int = 0
    serving_epoch: int = 0  # the serving blob's epoch
    serving_blob: str = ""  # file name in the state folder ("" at version 0: the export's own parameters)
    epoch: int = 0  # the cloud epoch followed: refused_upto, refused and rolled_back are versions of it
    refused_upto: int = 0
    refused: dict[str, str] = field(default_factory=dict)  # version -> reason (refused when received)
    rolled_back: dict[str, str] = field(default_factory=dict)  # version -> reason
    selector: dict[str, Any] | None = None
    saved_at: float = 0.0


class EdgeStateStore:
    """Reads and writes :class:`EdgeState` and the serving blob in one folder.

    Example:
        >>> store = EdgeStateStore("state")  # doctest: +SKIP
        >>> loaded = store.load(manifest.fingerprint)  # (EdgeState, blob bytes or None) or None  # doctest: +SKIP
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EdgeStateError(f"Cannot create the edge state folder {self.directory}: {exc}.") from exc
        self.saves = 0

    @property
    def spool_dir(self) -> Path:
        return self.directory / "spool"

    def load(self, fingerprint: str) -> tuple[EdgeState, bytes | None] | None:
        """The saved state and serving blob bytes, or None when the folder holds no state yet.

        Raises :class:`EdgeStateError` when the state was written for another model (another fingerprint).
        """
        path = self.directory / STATE_FILE
        if not path.exists():
            return None
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            if raw.get("format") != STATE_FORMAT:
                raise ValueError(f"format {raw.get('format')!r} is not {STATE_FORMAT!r}")
            raw.pop("format")
            state = EdgeState(**raw)
        except (OSError, ValueError, TypeError) as exc:
            raise EdgeStateError(
                f"The edge state {path} is unreadable ({exc}); move it away to start this edge afresh."
            ) from exc
        if state.fingerprint != fingerprint:
            raise EdgeStateError(
                f"The edge state in {self.directory} belongs to model fingerprint {state.fingerprint[:12]}…, not "
                f"{fingerprint[:12]}… (this export); use another --state folder or delete this one."
            )
        blob = None
        if state.serving_blob:
            try:
                blob = (self.directory / state.serving_blob).read_bytes()
            except OSError as exc:
                raise EdgeStateError(f"The serving blob {state.serving_blob} of {path} is unreadable: {exc}.") from exc
        return state, blob

    def save(self, state: EdgeState, blob: bytes | None) -> None:
        """Write ``state`` (and the serving blob's bytes, when not written yet) atomically; delete older blobs."""
        if blob is not None and state.serving_version > 0:
            epoch = f"e{state.serving_epoch}-" if state.serving_epoch else ""  # (epoch, version) names a blob
            state.serving_blob = f"serving-{epoch}v{state.serving_version:08d}.safetensors"
            target = self.directory / state.serving_blob
            if not target.exists():
                write_atomic(target, blob)
        else:
            state.serving_blob = ""
        write_atomic(self.directory / STATE_FILE, json.dumps({"format": STATE_FORMAT, **asdict(state)}).encode())
        self.saves += 1
        for p in self.directory.glob("serving-*.safetensors"):
            if p.name != state.serving_blob:
                p.unlink(missing_ok=True)
