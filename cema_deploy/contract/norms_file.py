"""The layout of ``model.norms.bin``: the refittable tensors as ONNX external data.

Tensors lie in manifest order, each starting at a 64-byte aligned offset. The exporter writes the file with
this layout and the TensorRT backend writes new versions of it for ``OnnxParserRefitter``, so the layout is
defined once, here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from cema_deploy.contract.manifest import Manifest

ALIGN = 64


def norms_layout(manifest: Manifest) -> list[tuple[str, int, int]]:
    """(name, offset, nbytes) of every refittable tensor in the norms file."""
    out: list[tuple[str, int, int]] = []
    offset = 0
    for p in manifest.refittable:
        offset += -offset % ALIGN
        nbytes = p.numel * np.dtype(p.dtype).itemsize
        out.append((p.name, offset, nbytes))
        offset += nbytes
    return out


def write_norms_file(manifest: Manifest, tensors: Mapping[str, np.ndarray], path: str | os.PathLike[str]) -> Path:
    """Write ``tensors`` (validated against ``manifest`` by the caller) in the norms-file layout."""
    path = Path(path)
    layout = norms_layout(manifest)
    buf = bytearray(layout[-1][1] + layout[-1][2] if layout else 0)
    for name, offset, nbytes in layout:
        data = np.ascontiguousarray(tensors[name], dtype=np.dtype(manifest.refittable_by_name[name].dtype)).tobytes()
        buf[offset : offset + nbytes] = data
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(bytes(buf))
    os.replace(tmp, path)
    return path
