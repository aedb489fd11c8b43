"""A minimal reader of the ONNX protobuf wire format: nodes, attributes and initializers, no dependencies.

The edge installs numpy and onnxruntime only, so the ``onnx`` package is not there to read a model's graph.
This reads what :mod:`cema_deploy.runtime.onnxrt_prepared` needs — node op types, inputs, outputs and scalar
attributes, and where each initializer's bytes are (inline ``raw_data`` or an external-data file) — and
skips everything else by its wire type. Field numbers are those of ``onnx.proto`` (ONNX IR, stable since
IR version 3). Tensor bytes are never copied while reading: offsets point into the buffer read.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

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
    for num, wt, val in _fields(buf, 0, len(buf)):
        if num == 7 and wt == 2:  # ModelProto.graph
            graph = val
    if graph is None:
        raise WireError("no graph in the model bytes")
    nodes: list[WireNode] = []
    inits: dict[str, WireTensor] = {}
    start, end = graph
    for num, wt, val in _fields(buf, start, end):
        if wt != 2:
            continue
        if num == 1:  # GraphProto.node
            nodes.append(_node(buf, *val))
        elif num == 5:  # GraphProto.initializer
            t = _tensor(buf, *val)
            inits[t.name] = t
    return WireModel(buffer=buf, nodes=nodes, initializers=inits)


# ---- wire format ---------------------------------------------------------------------------------------
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


def _fields(buf: bytes, pos: int, end: int) -> Iterator[tuple[int, int, tuple[int, int] | int]]:
    """(field number, wire type, value): an int for varint/fixed fields, (start, end) for length-delimited."""
    while pos < end:
        key, pos = _varint(buf, pos)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, pos = _varint(buf, pos)
            yield num, wt, v
        elif wt == 1:
            yield num, wt, int.from_bytes(buf[pos : pos + 8], "little")
            pos += 8
        elif wt == 2:
            n, pos = _varint(buf, pos)
            if pos + n > end:
                raise WireError("length-delimited field runs past its message")
            yield num, wt, (pos, pos + n)
            pos += n
        elif wt == 5:
            yield num, wt, int.from_bytes(buf[pos : pos + 4], "little")
            pos += 4
        else:
            raise WireError(f"unsupported wire type {wt}")
    if pos != end:
        raise WireError("message runs past its end")


def _str(buf: bytes, span: tuple[int, int]) -> str:
    return buf[span[0] : span[1]].decode("utf-8")


def _node(buf: bytes, start: int, end: int) -> WireNode:
    node = WireNode(op_type="", domain="", inputs=[], outputs=[], attributes={})
    for num, wt, val in _fields(buf, start, end):
        if wt != 2:
            continue
        assert isinstance(val, tuple)
        if num == 1:
            node.inputs.append(_str(buf, val))
        elif num == 2:
            node.outputs.append(_str(buf, val))
        elif num == 4:
            node.op_type = _str(buf, val)
        elif num == 7:
            node.domain = _str(buf, val)
        elif num == 5:
            name, value = _attribute(buf, *val)
            if value is not None:
                node.attributes[name] = value
    return node


def _attribute(buf: bytes, start: int, end: int) -> tuple[str, float | int | bytes | None]:
    name, value = "", None
    for num, wt, val in _fields(buf, start, end):
        if num == 1 and isinstance(val, tuple):
            name = _str(buf, val)
        elif num == 2 and wt == 5:  # f
            assert isinstance(val, int)
            value = float(np.frombuffer(val.to_bytes(4, "little"), np.float32)[0])
        elif num == 3 and wt == 0:  # i
            assert isinstance(val, int)
            value = val - (1 << 64) if val >= 1 << 63 else val
        elif num == 4 and isinstance(val, tuple):  # s
            value = buf[val[0] : val[1]]
    return name, value


def _tensor(buf: bytes, start: int, end: int) -> WireTensor:
    t = WireTensor(name="", dims=(), data_type=0)
    dims: list[int] = []
    for num, wt, val in _fields(buf, start, end):
        if num == 1:  # dims: packed (wt 2) or one varint per field
            if isinstance(val, tuple):
                p = val[0]
                while p < val[1]:
                    d, p = _varint(buf, p)
                    dims.append(d)
            else:
                dims.append(val)
        elif num == 2 and isinstance(val, int):
            t.data_type = val
        elif num == 8 and isinstance(val, tuple):
            t.name = _str(buf, val)
        elif num == 9 and isinstance(val, tuple):
            t.raw = (val[0], val[1] - val[0])
        elif num == 13 and isinstance(val, tuple):
            key = value = ""
            for n2, _, v2 in _fields(buf, *val):
                if isinstance(v2, tuple):
                    if n2 == 1:
                        key = _str(buf, v2)
                    elif n2 == 2:
                        value = _str(buf, v2)
            t.external[key] = value
        elif num in (4, 5, 7, 10, 11) and t.raw is None:
            t.raw = None  # typed data fields: not read (see WireModel.array)
    t.dims = tuple(dims)
    return t
