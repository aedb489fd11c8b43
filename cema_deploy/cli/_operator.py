"""What the operator's commands print (``cloud status``, the ``reset`` question) and parse (``token add --expires``).

Plain lines, no rich markup or cropping: the text survives a pipe and 80 columns (a long device id widens its
column rather than being cut). Pure functions of the JSON the cloud answers (``GET /v1/admin/deployments``).
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

from cema_deploy.exceptions import CemaError


def parse_expiry(text: str, *, now: float | None = None) -> float:
    """``--expires``: a duration from now (``90s``, ``15m``, ``12h``, ``30d``) or a date/time (ISO 8601, UTC unless
    it names a zone: ``2027-01-31``, ``2027-01-31T12:00``) -> Unix time; refused when not in the future.

    Example:
        >>> parse_expiry("2h", now=0.0), parse_expiry("1970-01-02", now=0.0)
        (7200.0, 86400.0)
    """
    from cema_deploy.cloud.config import parse_duration

    now = time.time() if now is None else now
    stripped = text.strip()
    if stripped[:1].isdigit() and stripped[-1:] in "smhd0123456789" and "-" not in stripped and ":" not in stripped:
        when = now + parse_duration(stripped)
        if when <= now:
            raise CemaError(f"--expires {text!r} is not in the future; give e.g. 30d or a date such as 2027-01-31.")
        return when
    try:
        parsed = dt.datetime.fromisoformat(stripped)
    except ValueError:
        raise CemaError(
            f"--expires {text!r} is neither a duration (90s, 15m, 12h, 30d) nor a date (2027-01-31 or "
            "2027-01-31T12:00, UTC unless a zone is given)."
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.timezone.utc)
    when = parsed.timestamp()
    if when <= now:
        raise CemaError(f"--expires {text!r} is in the past ({utc(when)}); give a later date or a duration.")
    return when


def utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))


def ago(t: float, now: float) -> str:
    """``12 s ago``, ``5 min ago``, ``3 h ago``, ``2 d ago``; ``never`` for 0."""
    if t <= 0:
        return "never"
    s = max(now - t, 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{int(s // size)} {unit} ago"
    return f"{int(s)} s ago"


def _versions(kept: list[int]) -> str:
    if len(kept) <= 4:
        return ", ".join(str(v) for v in kept)
    return f"{kept[0]}, {kept[1]}..{kept[-1]} ({len(kept)})"


def status_lines(rows: list[dict[str, Any]], *, now: float | None = None) -> list[str]:
    """``cloud status`` as text: per deployment its newest version and state, then one line per device."""
    now = time.time() if now is None else now
    lines: list[str] = []
    for row in rows:
        pinned = row.get("pinned")
        mode = f"pinned to {pinned}" if pinned is not None else "frozen" if row.get("frozen") else "publishing"
        calibrated = "calibrated" if row.get("calibrated") else "uncalibrated"
        lines.append(f"{row['name']}: {row['model']} ({str(row['fingerprint'])[:16]})")
        lines.append(f"  version {row['version']}, generation {row['generation']}, {calibrated}, {mode}")
        lines.append(f"  epoch {row.get('epoch', 0)} (the cloud state's: edges follow a newer one)")
        lines.append(
            f"  held {row.get('uploads_held', 0)} uploads ({row.get('frames_held', 0)} frames), "
            f"{row.get('pending', 0)} samples pending"
        )
        lines.append(f"  kept versions {_versions(list(row.get('kept_versions', [])))} (cloud publish/pin)")
        devices: dict[str, dict[str, Any]] = row.get("devices", {})
        if not devices:
            lines.append("  no device seen yet")
            continue
        width = max(6, *(len(d) for d in devices))
        lines.append(f"  {'device':<{width}}  serves  last seen     uploads  refused  rollbacks")
        for dev, rec in devices.items():
            serves = str(rec["version"]) if rec.get("version", -1) >= 0 else "?"
            lines.append(
                f"  {dev:<{width}}  {serves:>6}  {ago(float(rec.get('last_seen', 0)), now):<12}  "
                f"{rec.get('uploads', 0):>7}  {rec.get('refusals', 0):>7}  {rec.get('rollbacks', 0):>9}"
            )
    return lines


def reset_preview(row: dict[str, Any]) -> str:
    """What ``cloud reset`` deletes, in one sentence."""
    return (
        f"Reset {row['name']}: deletes {row.get('uploads_held', 0)} uploads ({row.get('frames_held', 0)} frames, "
        f"{row.get('pending', 0)} samples not yet adapted on) and the adaptation state of generation "
        f"{row['generation']} ({row.get('steps', 0)} method steps); generation {row['generation']} -> "
        f"{row['generation'] + 1}, a blob of the fresh state is published (version {row['version']} -> "
        f"{row['version'] + 1}); kept blobs stay."
    )


def write_json(obj: Any, path: str | None) -> None:
    """The ``--json [PATH]`` convention: ``-`` (or no path) writes to stdout, anything else to that file."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    if path in (None, "-"):
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    out = Path(str(path))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
