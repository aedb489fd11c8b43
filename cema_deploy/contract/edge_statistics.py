"""The edge's BatchNorm statistics as it reports them to the cloud (protocol 3), encoded and checked once.

An edge whose statistics adapter is on (``edge run --adapt-stats ema|alpha``) owns its running statistics: the
cloud owns the affine parameters. So that the cloud distils those parameters under the statistics the edge
actually serves, the edge attaches its statistics to a :class:`~cema_deploy.contract.messages.BatchReport`
(``statistics``) whenever they changed since its last report: every BatchNorm layer's running mean and variance
as float16 safetensors bytes, base64 text in the JSON body (beyond the paper: CEMA's edge has no statistics of its
own). Sizes: 2 x 2 bytes per channel plus the safetensors header (names and shapes), e.g. the demo's resnet10t
and ResNet-50 (26,560 BatchNorm channels) in the README's "Protocol 3" (``benchmarks/edge_stats_report_size.py``).

The cloud checks a report against the manifest before it changes anything: exactly the manifest's running-mean
and running-variance names, their shapes, finite values, variances >= 0. A report that fails is refused (400).

float16: statistics are estimates (the edge's EMA moves them by ~0.2 % per frame); float16 keeps 11 significant
bits, a relative error below 5e-4, far inside the frame-to-frame noise of the estimate. Variances above float16's
largest value (65504) are clipped there on the edge, so a report is never infinite.

numpy only; imported by the edge and the cloud.

Example:
    >>> import numpy as np
    >>> stats = {"bn.running_mean": np.zeros(4, np.float32), "bn.running_var": np.ones(4, np.float32)}
    >>> text = statistics_to_text(stats)
    >>> sorted(tensors_from_text_unchecked(text))
    ['bn.running_mean', 'bn.running_var']
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping

import numpy as np

from cema_deploy.contract.manifest import Manifest
from cema_deploy.contract.safetensors_io import tensors_from_bytes, tensors_to_bytes
from cema_deploy.exceptions import ProtocolError

__all__ = [
    "STATISTICS_SUFFIXES",
    "statistics_from_text",
    "statistics_names",
    "statistics_to_bytes",
    "statistics_to_text",
    "tensors_from_text_unchecked",
]

#: The refittable tensors an edge owns when its adapter is on (the rest, the affine parameters, are the cloud's).
STATISTICS_SUFFIXES = (".running_mean", ".running_var")
_F16_MAX = float(np.finfo(np.float16).max)


def statistics_names(manifest: Manifest) -> tuple[str, ...]:
    """The manifest's BatchNorm running-mean and running-variance tensors, sorted (empty for GroupNorm/LayerNorm)."""
    return tuple(sorted(p.name for p in manifest.refittable if p.name.endswith(STATISTICS_SUFFIXES)))


def statistics_to_bytes(tensors: Mapping[str, np.ndarray], *, local_generation: int = 0) -> bytes:
    """float16 safetensors bytes of ``tensors`` (variances clipped to float16's range); ``local_generation`` (the
    edge's statistics refit counter, informational) goes into the metadata."""
    out = {}
    for name, value in tensors.items():
        v = np.asarray(value, np.float64)
        if name.endswith(".running_var"):
            v = np.clip(v, 0.0, _F16_MAX)
        out[name] = np.clip(v, -_F16_MAX, _F16_MAX).astype(np.float16)
    return tensors_to_bytes(out, {"local_generation": str(int(local_generation))}, error=ProtocolError)


def statistics_to_text(tensors: Mapping[str, np.ndarray], *, local_generation: int = 0) -> str:
    """:func:`statistics_to_bytes` as base64 text, the form a batch report carries."""
    return base64.b64encode(statistics_to_bytes(tensors, local_generation=local_generation)).decode("ascii")


def tensors_from_text_unchecked(text: str) -> dict[str, np.ndarray]:
    """Decode a report's statistics without checking them against a manifest (for tools and tests)."""
    return tensors_from_bytes(_decode(text), source="edge statistics", error=ProtocolError)[0]


def statistics_from_text(text: str, manifest: Manifest) -> tuple[dict[str, np.ndarray], int]:
    """Decode and check a report's statistics against ``manifest``; returns (float32 tensors, local generation).

    Raises :class:`~cema_deploy.exceptions.ProtocolError` naming the first problem: not base64 or not safetensors,
    a name missing or not the manifest's, a shape or dtype that differs, a value not finite, a negative variance.
    """
    tensors, meta = tensors_from_bytes(_decode(text), source="edge statistics", error=ProtocolError)
    want = statistics_names(manifest)
    if not want:
        raise ProtocolError(
            f"{manifest.model_name} has no BatchNorm running statistics; an edge of it reports none (its adapter "
            "stays off)."
        )
    got = set(tensors)
    if got != set(want):
        missing, extra = sorted(set(want) - got), sorted(got - set(want))
        raise ProtocolError(
            f"Edge statistics must name exactly the manifest's {len(want)} running mean/variance tensors; missing "
            f"{missing[:3]}, unexpected {extra[:3]}."
        )
    shapes = manifest.refittable_by_name
    out: dict[str, np.ndarray] = {}
    for name in want:
        t = tensors[name]
        if t.dtype not in (np.float16, np.float32):
            raise ProtocolError(f"Edge statistics {name!r} has dtype {t.dtype}, expected float16 (or float32).")
        if tuple(t.shape) != tuple(shapes[name].shape):
            raise ProtocolError(
                f"Edge statistics {name!r} has shape {tuple(t.shape)}, the manifest says {tuple(shapes[name].shape)}."
            )
        v = t.astype(np.float32)
        if not np.isfinite(v).all():
            raise ProtocolError(f"Edge statistics {name!r} holds NaN or Inf.")
        if name.endswith(".running_var") and (v < 0).any():
            raise ProtocolError(f"Edge statistics {name!r} holds a negative variance ({float(v.min()):.3g}).")
        out[name] = v
    try:
        generation = max(int(meta.get("local_generation", "0")), 0)
    except ValueError:
        generation = 0
    return out, generation


def _decode(text: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise ProtocolError(f"Edge statistics are not base64 text ({exc}).") from exc
