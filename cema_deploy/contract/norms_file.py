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

from cema_deploy._atomic import PUBLIC_FILE_MODE, write_atomic
from cema_deploy.contract.manifest import Manifest

#: The norms file of an export directory: the refittable initializers as ONNX external data, because ONNX Runtime's
#: ``SessionOptions.add_external_initializers`` replaces only initializers stored that way.
NORMS_FILE = "model.norms.bin"
ALIGN = 64


def norms_layout(manifest: Manifest, *, itemsize: int | None = None) -> list[tuple[str, int, int]]:
    """(name, offset, nbytes) of every refittable tensor in the norms file; ``itemsize`` bytes per value instead of
    the manifest dtype's (2: TensorRT's fp16 copy, same order and alignment)."""
    out: list[tuple[str, int, int]] = []
    offset = 0
    for p in manifest.refittable:
        offset += -offset % ALIGN
        nbytes = p.numel * (np.dtype(p.dtype).itemsize if itemsize is None else itemsize)
        out.append((p.name, offset, nbytes))
        offset += nbytes
    return out


def write_norms_file(
    manifest: Manifest, tensors: Mapping[str, np.ndarray], path: str | os.PathLike[str], *, durable: bool = True
) -> Path:
    """Write ``tensors`` (validated against ``manifest`` by the caller) in the norms-file layout, crash-safely
    (``durable=False``: atomically, without fsync, for scratch copies)."""
    path = Path(path)
    layout = norms_layout(manifest)
    buf = bytearray(layout[-1][1] + layout[-1][2] if layout else 0)
    for name, offset, nbytes in layout:
        data = np.ascontiguousarray(tensors[name], dtype=np.dtype(manifest.refittable_by_name[name].dtype)).tobytes()
        buf[offset : offset + nbytes] = data
    write_atomic(path, bytes(buf), mode=PUBLIC_FILE_MODE, durable=durable)
    return path
