"""Where an export is written: a hidden work folder next to the target, renamed onto it only on success.

A failed or interrupted export therefore never leaves a folder that looks like an export: an exception removes
the work folder, and a killed process leaves only ``.NAME.partial-PID`` (or, killed between the two renames of a
replacement, the old export set aside as ``.NAME.old-PID``), which the next export to the same target removes once
that process is gone. An existing export is replaced only when it has the new export's fingerprint
(the same model and weights), or with ``force``; a non-empty folder that holds no ``manifest.json`` is never
replaced.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cema_deploy.contract.manifest import MANIFEST_FILE, Manifest, manifest_from_dir
from cema_deploy.exceptions import ExportError, ManifestError


def work_dir_for(target: Path) -> Path:
    """A fresh, empty work folder next to ``target`` (same file system, so the final rename is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    work = target.parent / f".{target.name}.partial-{os.getpid()}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    return work


def check_target(target: Path, *, model_name: str, fingerprint: str | None = None, force: bool = False) -> None:
    """Refuse (``ExportError``) to replace ``target`` unless it is absent, empty, or an export this one may replace.

    Before the export runs only the model name is known; at the end the fingerprint is checked too.
    """
    if not target.exists():
        return
    if not target.is_dir():
        raise ExportError(f"{target} is a file, not a folder; choose another --out.")
    if not any(target.iterdir()):
        return
    if not (target / MANIFEST_FILE).is_file():
        raise ExportError(
            f"{target} is not empty and holds no {MANIFEST_FILE}, so it is not an export; it is never replaced. "
            "Choose a new or empty folder for --out."
        )
    if force:
        return
    try:
        old = manifest_from_dir(target, verify=False)
    except ManifestError as exc:
        raise ExportError(
            f"{target} holds an export this version cannot read ({exc}). Pass --force to replace it, or choose "
            "another --out."
        ) from exc
    if old.model_name != model_name:
        raise ExportError(
            f"{target} holds an export of {old.model_name} (fingerprint {old.fingerprint[:16]}…), not of "
            f"{model_name}. Pass --force to replace it, or choose another --out."
        )
    if fingerprint is not None and old.fingerprint != fingerprint:
        raise ExportError(
            f"{target} holds another export of {model_name}: fingerprint {old.fingerprint[:16]}…, this export's is "
            f"{fingerprint[:16]}… (other weights or options). Edges and clouds serving the old one would refuse "
            "the new one's blobs and uploads. Pass --force to replace it, or choose another --out."
        )


def publish(work: Path, target: Path, manifest: Manifest, *, force: bool = False) -> None:
    """Move the finished ``work`` folder onto ``target`` (checked again: another process may have written it)."""
    check_target(target, model_name=manifest.model_name, fingerprint=manifest.fingerprint, force=force)
    if not target.exists():
        os.rename(work, target)
        return
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if old.exists():
        shutil.rmtree(old)
    os.rename(target, old)
    try:
        os.rename(work, target)
    except OSError:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def discard(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)


def _remove_stale(target: Path) -> None:
    """Remove work folders (and set-aside old exports) of exports to ``target`` whose process is gone."""
    leftovers = [*target.parent.glob(f".{target.name}.partial-*"), *target.parent.glob(f".{target.name}.old-*")]
    for stale in leftovers:
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
