"""The cloud's *lead weights*: which frames carry the teacher's lead (beyond the paper; issue 22 item 4).

The edge cannot see the teacher; the cloud sees both the teacher and the edge's replica on the current episode's
uploads. With each blob it can send one weight per class ``c`` of the edge model: how often, among uploads the
replica (the parameters of that very blob) predicts as ``c``, the teacher disagrees with it, smoothed and normalised
to mean 1 over the classes (``cema_deploy/cloud/deployment/lead.py`` computes them). An edge running the ``lead``
upload rule (:mod:`cema_deploy.runtime.selection.rules`) then keeps a frame it predicts as ``c`` with a probability
proportional to ``w[c]``, at its configured share: it sends more of the frames where distillation has something to
teach. Every other edge ignores the field.

On the wire it is the blob's optional metadata field ``lead`` (:mod:`cema_deploy.contract.blob`): a JSON list of
numbers, signed and fingerprint-bound with the tensors, and validated against the manifest with them
(:func:`validate_lead`: one weight per class, finite, >= 0), so a bad vector refuses the whole blob.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

from cema_deploy.exceptions import BlobFormatError, BlobSchemaError, BlobValueError

__all__ = ["lead_from_text", "lead_to_text", "validate_lead"]


def lead_to_text(weights: Sequence[float]) -> str:
    """The metadata text of ``weights``: a compact JSON list (floats written so that they read back exactly)."""
    return json.dumps([float(w) for w in weights], separators=(",", ":"))


def lead_from_text(text: str, *, source: str = "blob") -> tuple[float, ...]:
    """Parse the ``lead`` metadata field: a JSON list of numbers, else :class:`BlobFormatError`. Values are checked
    against the manifest by :func:`validate_lead`, not here (the parser does not know the class count)."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise BlobFormatError(f"{source}: metadata field 'lead' is not JSON ({exc}); refusing the blob.") from exc
    if not isinstance(value, list) or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        raise BlobFormatError(
            f"{source}: metadata field 'lead' must be a JSON list of numbers (one weight per class), got "
            f"{text[:60]!r}; refusing the blob."
        )
    return tuple(float(v) for v in value)


def validate_lead(weights: Sequence[float], num_classes: int) -> None:
    """Raise unless ``weights`` holds ``num_classes`` finite values >= 0 (:class:`BlobSchemaError` for the length,
    :class:`BlobValueError` for a value)."""
    if len(weights) != num_classes:
        raise BlobSchemaError(
            f"Blob lead weights hold {len(weights)} values; the manifest's model has {num_classes} classes and needs "
            "one weight per class. Refusing the blob: it was made for another model or by a broken cloud."
        )
    bad = [i for i, w in enumerate(weights) if not (math.isfinite(w) and w >= 0)]
    if bad:
        raise BlobValueError(
            f"Blob lead weights must be finite and >= 0; class {bad[0]} holds {weights[bad[0]]!r} ({len(bad)} bad "
            "values). Refusing the blob."
        )
