"""The model fingerprint: a hash over the graph structure and every non-refittable weight.

Two exports share a fingerprint only when their graphs and frozen weights are identical, so a refit blob made
for one is refused by any other. Refittable initializers enter the hash by name, dtype and shape only: their
values are what a blob replaces.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any


def fingerprint_from_model(model_proto: Any, refittable: Iterable[str]) -> str:
    """SHA-256 hex digest of an ``onnx.ModelProto``'s graph and non-refittable weights.

    External-data initializers must have been loaded into the proto (``onnx.load(path)`` does that).
    """
    from onnx import numpy_helper

    refit = set(refittable)
    h = hashlib.sha256(b"cema-fingerprint/1\n")
    graph = model_proto.graph
    for opset in sorted((o.domain, o.version) for o in model_proto.opset_import):
        h.update(repr(opset).encode())
    for vi in list(graph.input) + list(graph.output):
        h.update(vi.SerializeToString(deterministic=True))
    for node in graph.node:
        h.update(node.SerializeToString(deterministic=True))
    for init in sorted(graph.initializer, key=lambda t: t.name):
        h.update(repr((init.name, init.data_type, tuple(init.dims))).encode())
        if init.name not in refit:
            h.update(numpy_helper.to_array(init).tobytes())
    return h.hexdigest()
