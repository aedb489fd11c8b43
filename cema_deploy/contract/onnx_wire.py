"""A minimal reader of the ONNX protobuf wire format: nodes, attributes and initializers, no dependencies.

The edge installs numpy and onnxruntime only, so the ``onnx`` package is not there to read a model's graph.
This reads what :mod:`cema_deploy.runtime.backends.onnxrt_prepared` and the load-time fingerprint check
(:mod:`cema_deploy.contract.fingerprint`) need — node op types, inputs, outputs and scalar
attributes, and where each initializer's bytes are (inline ``raw_data`` or an external-data file) — and
skips everything else by its wire type. Field numbers are those of ``onnx.proto`` (ONNX IR, stable since
IR version 3). Tensor bytes are never copied while reading: offsets point into the buffer read.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

#: ONNX TensorProto.DataType -> numpy dtype, for the types a CNN's initializers use.
DTYPES: dict[int, np.dtype] = {
    1: np.dtype(np.float32),
    2: np.dtype(np.uint8),
    3: np.dtype(np.int8),
    5: np.dtype(np.int16),
    6: np.dtype(np.int32),
    7: np.dtype(np.int64),
    9: np.dtype(np.bool_),
    10: np.dtype(np.float16),
    11: np.dtype(np.float64),
}


class WireError(ValueError):
    """The bytes are not an ONNX model this reader understands."""


@dataclass
class WireTensor:
    """An initializer: its name, shape, element type and where its bytes are."""

    name: str
    dims: tuple[int, ...]
    data_type: int
    raw: tuple[int, int] | None = None  # (offset, length) of raw_data in the model buffer
    external: dict[str, str] = field(default_factory=dict)  # location / offset / length

    @property
    def dtype(self) -> np.dtype:
        if self.data_type not in DTYPES:
            raise WireError(f"initializer {self.name!r} has ONNX data type {self.data_type}, not supported here")
        return DTYPES[self.data_type]


@dataclass
class WireNode:
    op_type: str
    domain: str
    inputs: list[str]
    outputs: list[str]
    attributes: dict[str, float | int | bytes]


@dataclass
class WireModel:
    """The parts of a ``ModelProto`` the prepared refit path needs; ``buffer`` holds the bytes read."""

    buffer: bytes
    nodes: list[WireNode]
    initializers: dict[str, WireTensor]
    base_dir: Path | None = None

    def array(self, name: str) -> np.ndarray:
        """The value of initializer ``name`` as a read-only array (a view of the buffer or of its file)."""
        t = self.initializers[name]
        count = int(np.prod(t.dims, dtype=np.int64))
        if t.raw is not None:
            offset, length = t.raw
            if length != count * t.dtype.itemsize:
                raise WireError(f"initializer {name!r}: {length} raw bytes for shape {t.dims}")
            return np.frombuffer(self.buffer, t.dtype, count, offset).reshape(t.dims)
        if t.external:
            if self.base_dir is None:
                raise WireError(f"initializer {name!r} has external data but the model's folder is unknown")
            path = self.base_dir / t.external["location"]
            offset = int(t.external.get("offset", 0))
            data = np.memmap(path, dtype=t.dtype, mode="r", offset=offset, shape=(count,))
            return np.asarray(data).reshape(t.dims)
        if count == 0:
            return np.zeros(t.dims, t.dtype)
        raise WireError(f"initializer {name!r} stores its values in typed fields; only raw_data is read here")


def model_from_path(path: str | os.PathLike[str]) -> WireModel:
    p = Path(path)
    model = model_from_bytes(p.read_bytes())
    model.base_dir = p.parent
    return model


def model_from_bytes(buf: bytes) -> WireModel:
    graph = None
    for f in _fields(buf, 0, len(buf)):
        if f.num == 7 and f.wt == 2:  # ModelProto.graph
            graph = f.span
    if graph is None:
        raise WireError("no graph in the model bytes")
    nodes: list[WireNode] = []
    inits: dict[str, WireTensor] = {}
    for f in _fields(buf, *graph):
        if f.wt != 2:
            continue
        if f.num == 1:  # GraphProto.node
            nodes.append(_node(buf, *f.span))
        elif f.num == 5:  # GraphProto.initializer
            t = _tensor(buf, *f.span)
            inits[t.name] = t
    return WireModel(buffer=buf, nodes=nodes, initializers=inits)


# ---- wire format ---------------------------------------------------------------------------------------
class _Field(NamedTuple):
    num: int  # field number
    wt: int  # wire type
    value: int  # varint / fixed32 / fixed64 value (0 for length-delimited fields)
    span: tuple[int, int]  # (start, end) of a length-delimited field's bytes ((0, 0) otherwise)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise WireError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError("varint too long")


def _fields(buf: bytes, pos: int, end: int) -> Iterator[_Field]:
    while pos < end:
        key, pos = _varint(buf, pos)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, pos = _varint(buf, pos)
            yield _Field(num, wt, v, (0, 0))
        elif wt == 1:
            yield _Field(num, wt, int.from_bytes(buf[pos : pos + 8], "little"), (0, 0))
            pos += 8
        elif wt == 2:
            n, pos = _varint(buf, pos)
            if pos + n > end:
                raise WireError("length-delimited field runs past its message")
            yield _Field(num, wt, 0, (pos, pos + n))
            pos += n
        elif wt == 5:
            yield _Field(num, wt, int.from_bytes(buf[pos : pos + 4], "little"), (0, 0))
            pos += 4
        else:
            raise WireError(f"unsupported wire type {wt}")
    if pos != end:
        raise WireError("message runs past its end")


def _str(buf: bytes, span: tuple[int, int]) -> str:
    return buf[span[0] : span[1]].decode("utf-8")


def _node(buf: bytes, start: int, end: int) -> WireNode:
    node = WireNode(op_type="", domain="", inputs=[], outputs=[], attributes={})
    for f in _fields(buf, start, end):
        if f.wt != 2:
            continue
        if f.num == 1:
            node.inputs.append(_str(buf, f.span))
        elif f.num == 2:
            node.outputs.append(_str(buf, f.span))
        elif f.num == 4:
            node.op_type = _str(buf, f.span)
        elif f.num == 7:
            node.domain = _str(buf, f.span)
        elif f.num == 5:
            name, value = _attribute(buf, *f.span)
            if value is not None:
                node.attributes[name] = value
    return node


def _attribute(buf: bytes, start: int, end: int) -> tuple[str, float | int | bytes | None]:
    name = ""
    value: float | int | bytes | None = None
    for f in _fields(buf, start, end):
        if f.num == 1 and f.wt == 2:
            name = _str(buf, f.span)
        elif f.num == 2 and f.wt == 5:  # f
            value = float(np.frombuffer(f.value.to_bytes(4, "little"), np.float32)[0])
        elif f.num == 3 and f.wt == 0:  # i (two's complement int64)
            value = f.value - (1 << 64) if f.value >= 1 << 63 else f.value
        elif f.num == 4 and f.wt == 2:  # s
            value = buf[f.span[0] : f.span[1]]
    return name, value


def _tensor(buf: bytes, start: int, end: int) -> WireTensor:
    t = WireTensor(name="", dims=(), data_type=0)
    dims: list[int] = []
    for f in _fields(buf, start, end):
        if f.num == 1:  # dims: packed (wire type 2) or one varint per field
            if f.wt == 2:
                p = f.span[0]
                while p < f.span[1]:
                    d, p = _varint(buf, p)
                    dims.append(d)
            else:
                dims.append(f.value)
        elif f.num == 2 and f.wt == 0:
            t.data_type = f.value
        elif f.num == 8 and f.wt == 2:
            t.name = _str(buf, f.span)
        elif f.num == 9 and f.wt == 2:
            t.raw = (f.span[0], f.span[1] - f.span[0])
        elif f.num == 13 and f.wt == 2:  # external_data: StringStringEntryProto {key = 1, value = 2}
            entry = {e.num: _str(buf, e.span) for e in _fields(buf, *f.span) if e.wt == 2}
            t.external[entry.get(1, "")] = entry.get(2, "")
    t.dims = tuple(dims)
    return t
