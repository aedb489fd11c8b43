"""The refit blob: a safetensors file of refittable tensors bound to one model fingerprint.

Layout: a standard safetensors file (8-byte little-endian header length, JSON header, raw data) whose
``__metadata__`` carries:

=============  =====================================================================
``format``     ``cema-refit-blob/1``
``fingerprint``the manifest fingerprint of the one model export this blob is for
``version``    monotonically increasing integer (0 is the export's own parameters)
``epoch``      the cloud state that minted ``version`` (decimal text; absent = 0, a cloud without epochs)
``created``    creation time, seconds since the epoch (float, as text)
``producer``   who made it (``cema-deploy export``, ``cema-deploy cloud <host>``)
``signature``  detached signature over :func:`blob_digest` (empty when unsigned)
``key_id``     which key made ``signature`` (empty when unsigned)
``lead``       optional (absent: none): JSON list of ``num_classes`` finite weights >= 0, the cloud's *lead
               weights* (:mod:`cema_deploy.contract.lead`); an edge with ``--selection lead`` uploads frames it
               predicts as class ``c`` in proportion to ``lead[c]``; other edges ignore it
=============  =====================================================================

Tensors are named as in the PyTorch state dict (see :mod:`cema_deploy.contract.names`). Reading is done by
a strict parser of our own (bounded header, no overlapping or out-of-range offsets, no duplicate names), so
hostile bytes end as :class:`~cema_deploy.exceptions.BlobFormatError`, never as a crash.

Versions are ordered as ``(epoch, version)``, lexicographically (:attr:`RefitBlob.stamp`). A cloud mints its
epoch once per cloud state (milliseconds since the Unix epoch when that state was created, so a newer state's
epoch is greater) and writes it into every blob it publishes: a cloud restarted on a new or restored state
publishes ``(new epoch, 1)``, which an edge orders after everything of the old state. The epoch is metadata like
any other field, so a signature covers it (:func:`blob_digest`). So is ``lead``: it is validated against the manifest
with the tensors (:func:`validate_blob`), so a blob with a bad vector is refused whole, nothing applied. Adding it
changed neither :data:`BLOB_FORMAT` nor the protocol version: a reader that does not know the field ignores it (every
reader takes the metadata it needs by name), and a signature is verified over the header as received, unknown fields
included; a blob without lead weights is byte for byte what it was before.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cema_deploy._atomic import PUBLIC_FILE_MODE, write_atomic
from cema_deploy.contract.lead import lead_from_text, lead_to_text, validate_lead
from cema_deploy.contract.manifest import Manifest
from cema_deploy.contract.names import is_variance_name
from cema_deploy.contract.safetensors_io import header_and_chunks, header_json, tensors_from_bytes, tensors_to_bytes
from cema_deploy.exceptions import (
    BlobFormatError,
    BlobSchemaError,
    BlobValueError,
    FingerprintMismatchError,
    StaleBlobError,
)

BLOB_FORMAT = "cema-refit-blob/1"
#: Metadata fields a signature does not cover (it cannot cover itself).
SIGNATURE_FIELDS = ("signature", "key_id")
#: Prefix of the signed digest, so a signature over a blob means nothing in any other protocol.
DIGEST_DOMAIN = b"cema-refit-blob/1 signed content\n"
#: The epoch's metadata text: decimal digits only (no sign, spaces or underscores), at most 19 of them.
_EPOCH_TEXT = re.compile(r"[0-9]{1,19}")


@dataclass(frozen=True, kw_only=True)
class RefitBlob:
    """Refittable tensors plus the metadata that binds them to one model export.

    Example:
        >>> blob = RefitBlob(tensors={"bn.weight": np.ones(4, np.float32)}, fingerprint="ab12", version=1)
        >>> blob_from_bytes(blob_to_bytes(blob)).version
        1
    """

    tensors: Mapping[str, np.ndarray]
    fingerprint: str
    version: int
    created: float = field(default_factory=time.time)
    producer: str = ""
    signature: str = ""
    key_id: str = ""
    epoch: int = 0  # the cloud state that minted ``version`` (0: a cloud without epochs)
    lead: tuple[float, ...] | None = None  # the cloud's lead weights per class (contract/lead.py); None: none sent

    def __post_init__(self) -> None:
        if not isinstance(self.epoch, int) or isinstance(self.epoch, bool) or not 0 <= self.epoch < 10**19:
            raise BlobFormatError(
                f"Blob epoch must be an integer in [0, 10**19), got {self.epoch!r:.40}; the cloud mints it as "
                "milliseconds since the Unix epoch."
            )

    @property
    def stamp(self) -> tuple[int, int]:
        """``(epoch, version)``: how blobs are ordered (lexicographically)."""
        return self.epoch, self.version

    @property
    def nbytes(self) -> int:
        return sum(int(t.nbytes) for t in self.tensors.values())

    def metadata(self) -> dict[str, str]:
        meta = {
            "format": BLOB_FORMAT,
            "fingerprint": self.fingerprint,
            "version": str(self.version),
            "epoch": str(self.epoch),
            "created": repr(float(self.created)),
            "producer": self.producer,
            "signature": self.signature,
            "key_id": self.key_id,
        }
        if self.lead is not None:  # only when sent: a blob without it keeps its bytes (and signatures) as before
            meta["lead"] = lead_to_text(self.lead)
        return meta

    def with_signature(self, signature: str, key_id: str) -> RefitBlob:
        return replace(self, signature=signature, key_id=key_id)


def blob_digest(blob: RefitBlob) -> bytes:
    """SHA-256 of what a detached signature signs: the canonical safetensors header that :func:`blob_to_bytes`
    writes, with ``signature`` and ``key_id`` left empty (so every other metadata field and every tensor's name,
    dtype, shape and offsets), followed by the raw data bytes.

    Defined over the serialized form so that a verifier can recompute it from a blob file's raw bytes without
    building any array (:func:`digest_from_header`, used by :mod:`cema_deploy.contract.signing`).
    """
    header, chunks = header_and_chunks(blob.tensors, blob.metadata(), error=BlobSchemaError)
    return digest_from_header(header, chunks)


def digest_from_header(header: Mapping[str, Any], body: Iterable[bytes | memoryview]) -> bytes:
    """:func:`blob_digest` from a parsed safetensors header (key order as written) and the data region."""
    meta = header.get("__metadata__", {})
    unsigned = {k: ("" if k in SIGNATURE_FIELDS else v) for k, v in meta.items()}
    head = header_json({**header, "__metadata__": unsigned})
    h = hashlib.sha256(DIGEST_DOMAIN)
    h.update(struct.pack("<Q", len(head)))
    h.update(head)
    for chunk in body:
        h.update(chunk)
    return h.digest()


def blob_to_bytes(blob: RefitBlob) -> bytes:
    """Serialize to safetensors bytes (readable by any safetensors reader)."""
    return tensors_to_bytes(blob.tensors, blob.metadata(), error=BlobSchemaError)


def save_blob(blob: RefitBlob, path: str | os.PathLike[str]) -> Path:
    """Write crash-safely (:func:`~cema_deploy._atomic.write_atomic`): a reader never sees half a blob."""
    path = Path(path)
    write_atomic(path, blob_to_bytes(blob), mode=PUBLIC_FILE_MODE)
    return path


def blob_from_path(path: str | os.PathLike[str]) -> RefitBlob:
    """Read a refit blob file; unreadable files raise :class:`BlobFormatError`."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BlobFormatError(f"Cannot read refit blob {path}: {exc}.") from exc
    return blob_from_bytes(data, source=str(path))


def blob_from_bytes(data: bytes, *, source: str = "blob") -> RefitBlob:
    """Parse safetensors bytes strictly into a :class:`RefitBlob` (no tensor is shared with ``data``)."""
    tensors, meta = tensors_from_bytes(data, source=source, error=BlobFormatError)
    if meta.get("format") != BLOB_FORMAT:
        raise BlobFormatError(
            f"{source}: format {meta.get('format')!r} is not {BLOB_FORMAT!r}; not a refit blob of this version."
        )
    try:
        version = int(meta["version"])
        created = float(meta.get("created", "0"))
        fingerprint = meta["fingerprint"]
    except (KeyError, ValueError) as exc:
        raise BlobFormatError(f"{source}: metadata field missing or malformed ({exc!r}).") from exc
    if version < 0 or not math.isfinite(created):
        raise BlobFormatError(f"{source}: version {version} / created {created} out of range.")
    epoch_text = meta.get("epoch", "0")
    if not _EPOCH_TEXT.fullmatch(epoch_text):
        raise BlobFormatError(
            f"{source}: metadata field 'epoch' is {epoch_text[:40]!r}; expected decimal digits (at most 19), the "
            "cloud state's creation time in milliseconds. Not a blob this edge can order; refusing it."
        )
    return RefitBlob(
        tensors=tensors,
        fingerprint=fingerprint,
        version=version,
        created=created,
        producer=meta.get("producer", ""),
        signature=meta.get("signature", ""),
        key_id=meta.get("key_id", ""),
        epoch=int(epoch_text),
        lead=lead_from_text(meta["lead"], source=source) if "lead" in meta else None,
    )


def validate_blob(blob: RefitBlob, manifest: Manifest, *, newer_than: int | None = None) -> None:
    """Raise a :class:`~cema_deploy.exceptions.BlobError` unless ``blob`` can be applied to ``manifest``'s model.

    Checks, in order: fingerprint, version (``> newer_than`` when given), the exact set of names, every shape
    and dtype, finiteness, non-negative BatchNorm variances, and the lead weights when the blob carries them (one
    per class of the manifest, finite, >= 0).
    """
    if blob.fingerprint != manifest.fingerprint:
        raise FingerprintMismatchError(
            f"Blob fingerprint {blob.fingerprint[:16]!r}… does not match model fingerprint "
            f"{manifest.fingerprint[:16]!r}… of {manifest.model_name!r}; request a blob made for this export "
            "(or export again from the same weights)."
        )
    if newer_than is not None and blob.version <= newer_than:
        raise StaleBlobError(
            f"Blob version {blob.version} is not newer than the serving version {newer_than}; refusing a replay."
        )
    expected = manifest.refittable_by_name
    missing = sorted(set(expected) - set(blob.tensors))
    unexpected = sorted(set(blob.tensors) - set(expected))
    if missing or unexpected:
        raise BlobSchemaError(
            f"Blob tensor names differ from the manifest: {len(missing)} missing {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}. A blob must carry exactly the manifest's "
            f"{len(expected)} refittable tensors."
        )
    for name, spec in expected.items():
        t = blob.tensors[name]
        if tuple(t.shape) != spec.shape or t.dtype.name != spec.dtype:
            raise BlobSchemaError(
                f"Blob tensor {name!r} is {t.dtype.name}{list(t.shape)}, expected {spec.dtype}{list(spec.shape)}."
            )
        if t.dtype.kind == "f" and not np.isfinite(t).all():
            raise BlobValueError(f"Blob tensor {name!r} holds NaN or Inf; refusing to apply it.")
        if is_variance_name(name) and (t < 0).any():
            raise BlobValueError(f"Blob tensor {name!r} holds a negative variance; refusing to apply it.")
    if blob.lead is not None:
        validate_lead(blob.lead, manifest.num_classes)
