"""The model fingerprint, computed from ``model.onnx``'s bytes with no ONNX package (numpy only), plus what the
graph says about its inputs, outputs and initializers.

The fingerprint is a SHA-256 over, in this order:

* the manifest fields that the edge and the cloud act on (:func:`binding` of a manifest: model name and
  constructor arguments, class count, preprocessing, input and output, the refittable list: the normalization
  tensors, plus the classifier's of an ``export --refit head``), as canonical JSON;
* the opset imports, the graph's inputs and outputs and every node, as their serialized protobuf messages;
* every initializer's name, element type and shape, and for the non-refittable ones their values (inline bytes,
  or the bytes of their external-data file).

The values of refittable initializers are left out: they are what a refit blob replaces. Two exports therefore
share a fingerprint only when their graphs, frozen weights and manifests agree, so a blob made for one is refused
by the other, and a hand-edited ``num_classes`` or preprocessing in ``manifest.json`` no longer matches it.
The export side (``cema_deploy.export``) computes it with this same function over the bytes it wrote, and
:func:`cema_deploy.contract.manifest.manifest_from_dir` recomputes it at every load.

Scheme 2 (this one) replaced scheme 1 (graph and weights only, computed with the ``onnx`` package): the
fingerprints of exports made before it differ, and those exports must be made again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cema_deploy.contract.onnx_wire import WireError, _fields, _str, _tensor

#: Bumped whenever what the hash covers changes; every export made under another scheme must be made again.
FINGERPRINT_SCHEME = "cema-fingerprint/2"

# onnx.proto field numbers (ONNX IR >= 3).
_MODEL_OPSET_IMPORT, _MODEL_GRAPH = 8, 7
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_OUTPUT = 1, 5, 11, 12

Dim = int | str  # a fixed size, or the name of a symbolic axis ("batch")


@dataclass(frozen=True)
class GraphValue:
    """A graph input or output: its name, ONNX element type and shape."""

    name: str
    elem_type: int
    dims: tuple[Dim, ...]


@dataclass(frozen=True)
class GraphSummary:
    """What the manifest is checked against: the graph's fingerprint, inputs, outputs and initializers."""

    fingerprint: str
    inputs: tuple[GraphValue, ...]
    outputs: tuple[GraphValue, ...]
    initializers: Mapping[str, tuple[int, tuple[int, ...]]]  # name -> (ONNX element type, dims)


def summarize_graph(
    model_bytes: bytes, *, base_dir: Path | None, refittable: Iterable[str], binding: Mapping[str, Any]
) -> GraphSummary:
    """Read ``model_bytes`` (a serialized ``ModelProto``) and hash it with ``binding`` (see the module docstring).

    ``base_dir`` is the folder of the model file, where non-refittable external data is read from.
    Raises :class:`~cema_deploy.contract.onnx_wire.WireError` when the bytes are not a whole ONNX model.

    Example:
        >>> from cema_deploy.contract.manifest import binding, manifest_from_dir  # doctest: +SKIP
        >>> m = manifest_from_dir("out/r50", verify=False)  # doctest: +SKIP
        >>> data = open("out/r50/model.onnx", "rb").read()  # doctest: +SKIP
        >>> summarize_graph(data, base_dir=Path("out/r50"), refittable=[p.name for p in m.refittable],
        ...                 binding=binding(m)).fingerprint == m.fingerprint  # doctest: +SKIP
        True
    """
    buf = model_bytes
    view = memoryview(buf)  # spans are hashed without copying them
    refit = set(refittable)
    h = hashlib.sha256(FINGERPRINT_SCHEME.encode() + b"\n")
    _update(h, json.dumps(binding, sort_keys=True, separators=(",", ":"), allow_nan=False).encode())
    graph: tuple[int, int] | None = None
    opsets: list[bytes] = []
    for f in _fields(buf, 0, len(buf)):
        if f.wt != 2:
            continue
        if f.num == _MODEL_GRAPH:
            graph = f.span
        elif f.num == _MODEL_OPSET_IMPORT:
            opsets.append(buf[f.span[0] : f.span[1]])
    if graph is None:
        raise WireError("no graph in the model bytes")
    for opset in sorted(opsets):
        _update(h, opset)
    inputs: list[GraphValue] = []
    outputs: list[GraphValue] = []
    nodes: list[memoryview] = []
    inits: dict[str, tuple[int, int]] = {}
    for f in _fields(buf, *graph):
        if f.wt != 2:
            continue
        if f.num == _GRAPH_INPUT:
            inputs.append(_value_info(buf, *f.span))
            _update(h, b"in" + buf[f.span[0] : f.span[1]])  # small: copied
        elif f.num == _GRAPH_OUTPUT:
            outputs.append(_value_info(buf, *f.span))
            _update(h, b"out" + buf[f.span[0] : f.span[1]])
        elif f.num == _GRAPH_NODE:
            nodes.append(view[f.span[0] : f.span[1]])
        elif f.num == _GRAPH_INITIALIZER:
            t = _tensor(buf, *f.span)
            if t.name in inits:
                raise WireError(f"initializer {t.name!r} appears twice")
            inits[t.name] = f.span
    for node in nodes:
        _update(h, node)
    summary: dict[str, tuple[int, tuple[int, ...]]] = {}
    for name in sorted(inits):
        t = _tensor(buf, *inits[name])
        summary[name] = (t.data_type, t.dims)
        _update(h, json.dumps([t.name, t.data_type, list(t.dims)]).encode())
        if name in refit:
            continue
        start, end = inits[name]
        _update(h, view[start:end])  # name, type, shape and inline values of a frozen tensor
        if t.external:
            for chunk in _external_bytes(t.external, base_dir, name):
                h.update(chunk)
    return GraphSummary(fingerprint=h.hexdigest(), inputs=tuple(inputs), outputs=tuple(outputs), initializers=summary)


def _update(h: Any, data: bytes | memoryview) -> None:
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


def _external_bytes(external: Mapping[str, str], base_dir: Path | None, name: str) -> Iterator[bytes]:
    if base_dir is None:
        raise WireError(f"initializer {name!r} has external data but the model's folder is unknown")
    location = external.get("location", "")
    path = base_dir / location
    if not location or Path(location).is_absolute() or ".." in Path(location).parts or not path.is_file():
        raise WireError(f"initializer {name!r}: external data file {location!r} is missing")
    offset = int(external.get("offset", 0) or 0)
    length = int(external["length"]) if external.get("length") else path.stat().st_size - offset
    if offset < 0 or length < 0 or offset + length > path.stat().st_size:
        raise WireError(f"initializer {name!r}: {location} holds fewer bytes than the {offset}+{length} it names")
    with path.open("rb") as fh:
        fh.seek(offset)
        left = length
        while left:
            chunk = fh.read(min(left, 1 << 22))
            if not chunk:
                raise WireError(f"initializer {name!r}: {location} ended early")
            left -= len(chunk)
            yield chunk


def _value_info(buf: bytes, start: int, end: int) -> GraphValue:
    """ValueInfoProto {name = 1, type = 2 TypeProto {tensor_type = 1 {elem_type = 1, shape = 2 {dim = 1}}}}."""
    name, elem_type, dims = "", 0, []
    for f in _fields(buf, start, end):
        if f.num == 1 and f.wt == 2:
            name = _str(buf, f.span)
        elif f.num == 2 and f.wt == 2:
            for t in _fields(buf, *f.span):
                if t.num != 1 or t.wt != 2:
                    continue
                for tf in _fields(buf, *t.span):
                    if tf.num == 1 and tf.wt == 0:
                        elem_type = tf.value
                    elif tf.num == 2 and tf.wt == 2:
                        dims = [_dim(buf, *d.span) for d in _fields(buf, *tf.span) if d.num == 1 and d.wt == 2]
    return GraphValue(name=name, elem_type=elem_type, dims=tuple(dims))


def _dim(buf: bytes, start: int, end: int) -> Dim:
    """TensorShapeProto.Dimension {dim_value = 1, dim_param = 2}; '?' when neither is set."""
    for f in _fields(buf, start, end):
        if f.num == 1 and f.wt == 0:
            return f.value - (1 << 64) if f.value >= 1 << 63 else f.value
        if f.num == 2 and f.wt == 2:
            return _str(buf, f.span)
    return "?"
