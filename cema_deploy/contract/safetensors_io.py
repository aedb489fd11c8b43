"""A strict, dependency-free reader and a writer for the safetensors format.

Used by the refit blob and the sample-upload wire format. The reader bounds the header, refuses duplicate
names, out-of-range or overlapping offsets and unsupported dtypes, and copies every tensor out of the input
bytes, so hostile input ends as :class:`~cema_deploy.exceptions.BlobFormatError` (or the error class the
caller passes), never as a crash. Output is readable by the ``safetensors`` package.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from cema_deploy.exceptions import BlobFormatError, ContractError

#: Largest JSON header accepted; a ResNet-50 refit blob's header is ~20 KB.
MAX_HEADER_BYTES = 8 * 1024 * 1024
#: Most dimensions a tensor may have (numpy allows 64).
MAX_DIMS = 16
ST_DTYPES: dict[str, np.dtype[Any]] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "U8": np.dtype("u1"),
}
NP_TO_ST = {"float32": "F32", "float16": "F16", "float64": "F64", "int64": "I64", "int32": "I32", "uint8": "U8"}


def tensors_to_bytes(
    tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str], *, error: type[ContractError] = BlobFormatError
) -> bytes:
    """Serialize tensors (in name order) and string metadata to safetensors bytes."""
    header, chunks = header_and_chunks(tensors, metadata, error=error)
    head = header_json(header)
    head += b" " * (-len(head) % 8)  # safetensors aligns the data start to 8 bytes
    return struct.pack("<Q", len(head)) + head + b"".join(chunks)


def header_and_chunks(
    tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str], *, error: type[ContractError] = BlobFormatError
) -> tuple[dict[str, Any], list[bytes]]:
    """The header (``__metadata__`` first, then tensors in name order) and the little-endian data chunks that
    :func:`tensors_to_bytes` writes. The signature digest is computed from exactly these."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        t = np.ascontiguousarray(tensors[name])
        st = NP_TO_ST.get(t.dtype.name)
        if st is None:
            raise error(f"Tensor {name!r} has dtype {t.dtype}, which cannot be written to safetensors here.")
        data = t.astype(t.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": st, "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    return header, chunks


def header_json(header: Mapping[str, Any]) -> bytes:
    """The canonical JSON text of a header as :func:`tensors_to_bytes` writes it (before padding)."""
    return json.dumps(header, separators=(",", ":")).encode()


def tensors_from_bytes(
    data: bytes, *, source: str = "data", error: type[ContractError] = BlobFormatError
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse safetensors bytes strictly; returns (tensors, string metadata)."""
    header, body_start = header_from_bytes(data, source=source, error=error)
    meta = header.pop("__metadata__")
    body = memoryview(data)[body_start:]
    return _read_tensors(header, body, source, error), meta


def header_from_bytes(
    data: bytes, *, source: str = "data", error: type[ContractError] = BlobFormatError
) -> tuple[dict[str, Any], int]:
    """Parse only the bounded JSON header; returns (header, offset of the data region). No tensor is built.

    The header keeps its key order and always has a ``__metadata__`` mapping of strings to strings.
    """
    if len(data) < 8:
        raise error(f"{source}: {len(data)} bytes is too short for a safetensors file.")
    (hlen,) = struct.unpack("<Q", data[:8])
    if hlen > MAX_HEADER_BYTES or 8 + hlen > len(data):
        raise error(
            f"{source}: header length {hlen} exceeds the {min(MAX_HEADER_BYTES, len(data) - 8)} bytes available; "
            "the data is truncated or not safetensors."
        )
    try:
        header = json.loads(bytes(data[8 : 8 + hlen]).decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise error(f"{source}: header is not valid JSON ({exc}).") from exc
    if not isinstance(header, dict):
        raise error(f"{source}: header must be a JSON object.")
    meta = header.setdefault("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise error(f"{source}: __metadata__ must map strings to strings.")
    return header, 8 + hlen


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _read_tensors(
    header: dict[str, Any], body: memoryview, source: str, error: type[ContractError]
) -> dict[str, np.ndarray]:
    # Check every entry and every overlap before copying anything: many entries pointing at the same bytes
    # must not multiply the allocation.
    entries: list[tuple[int, int, str, np.dtype[Any], tuple[int, ...]]] = []
    for name, info in header.items():
        dtype, shape, begin, end = _entry(name, info, len(body), source, error)
        entries.append((begin, end, name, dtype, shape))
    spans = sorted(entries, key=lambda e: (e[0], e[1]))
    for (_, e0, n0, *_r0), (b1, _, n1, *_r1) in itertools.pairwise(spans):
        if b1 < e0:
            raise error(f"{source}: tensors {n0!r} and {n1!r} overlap.")
    return {
        name: np.frombuffer(body[begin:end], dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
        for begin, end, name, dtype, shape in entries
    }


def _entry(
    name: str, info: Any, body_len: int, source: str, error: type[ContractError]
) -> tuple[np.dtype[Any], tuple[int, ...], int, int]:
    """One header entry checked: known dtype, integer shape and offsets in range, size that matches."""
    try:
        dtype = ST_DTYPES[info["dtype"]]
        shape = tuple(info["shape"])
        begin, end = info["data_offsets"]
    except (KeyError, TypeError, ValueError) as exc:
        raise error(f"{source}: tensor {name!r} has a malformed or unsupported entry {info!r:.200}.") from exc
    if not all(_is_int(v) for v in (*shape, begin, end)) or len(shape) > MAX_DIMS:
        raise error(
            f"{source}: tensor {name!r} needs a shape of at most {MAX_DIMS} integers and two integer "
            f"data_offsets, got {info!r:.200}."
        )
    if any(d < 0 for d in shape) or not 0 <= begin <= end <= body_len:
        raise error(f"{source}: tensor {name!r} shape {shape!r:.100} / offsets {begin}..{end} out of range.")
    if math.prod(d for d in shape if d) > max(body_len, 1 << 32):  # bounds every dimension: numpy never overflows
        raise error(f"{source}: tensor {name!r} shape {shape!r:.100} is larger than the data ({body_len} bytes).")
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise error(f"{source}: tensor {name!r} has {end - begin} bytes, expected {expected}.")
    return dtype, shape, begin, end


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
