"""fp16 for strongly typed TensorRT (11.x): a reduced-precision copy of the export's ONNX, made once at build time.

TensorRT 11 removed ``BuilderFlag.FP16``: a network computes in the types its ONNX declares. So for
``precision="fp16"`` on 11.x the engine is built from a copy of ``model.onnx`` in which

* every float32 initializer and float Constant becomes float16, and Cast-to-float nodes cast to float16;
* the graph input is cast float32 -> float16 by an inserted Cast and the output back to float32, so the
  engine's inputs and outputs stay float32 (the same buffers, the same preprocessing as fp32);
* the refittable tensors stay external data, now float16, in the copy's own ``model.norms.bin`` (layout
  :func:`fp16_norms_layout`: manifest order, 64-byte aligned, 2 bytes per value).

The export's identity is kept: the manifest, fingerprint and refit blobs stay those of the fp32 export. A refit
casts the blob's float32 tensors to float16 (:func:`write_fp16_norms`, numpy only) and refits the engine from
the copy, exactly as the fp32 engine is refitted from ``model.onnx``. Values beyond float16's range (65504) are
refused rather than served as inf.

Only :func:`fp16_copy_of_onnx` needs the ``onnx`` package (imported lazily, brought by the ``trt`` extra); it
runs once per export and precision, its result is cached beside the plans. It is the one place the edge
runtime touches ``onnx``, through ``lazy_import`` and only on this build path: the import-linter contract
("the edge runtime never imports onnx", checked statically) does not see it, and ``tests/test_dependencies.py``
(checked at import time) holds. This is a deliberate, narrow exception; the alternative is to make the copy at
export time (``cema_deploy.export``), which this module's owner could not change.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cema_deploy._atomic import PUBLIC_FILE_MODE, write_atomic
from cema_deploy._lazy import lazy_import
from cema_deploy.contract.manifest import Manifest
from cema_deploy.contract.norms_file import NORMS_FILE, norms_layout
from cema_deploy.exceptions import BackendError, RefitError

FP16_MAX = float(np.finfo(np.float16).max)
#: (op type, input index) that ONNX requires in float32 whatever the compute type; those initializers stay.
FP32_ONLY_INPUTS = frozenset({("Resize", 2), ("Upsample", 1)})
#: Bumped when the copy's recipe changes (part of its cache folder name).
COPY_FORMAT = 1


def fp16_norms_layout(manifest: Manifest) -> list[tuple[str, int, int]]:
    """(name, offset, nbytes) of each refittable tensor in the fp16 copy's norms file."""
    return norms_layout(manifest, itemsize=2)


def write_fp16_norms(
    manifest: Manifest, tensors: Mapping[str, np.ndarray], path: str | os.PathLike[str], *, durable: bool = True
) -> Path:
    """Cast ``tensors`` (validated float32 refit tensors) to float16 into the copy's norms-file layout (written as
    :func:`~cema_deploy.contract.norms_file.write_norms_file` writes)."""
    path = Path(path)
    layout = fp16_norms_layout(manifest)
    buf = bytearray(layout[-1][1] + layout[-1][2] if layout else 0)
    for name, offset, nbytes in layout:
        src = np.asarray(tensors[name], dtype=np.float32)
        peak = float(np.max(np.abs(src))) if src.size else 0.0
        if not peak <= FP16_MAX:
            raise RefitError(
                f"Refit tensor {name!r} holds {peak:.4g}, beyond float16's range ({FP16_MAX:g}); this blob cannot "
                "be served by an fp16 engine. Use --precision fp32."
            )
        buf[offset : offset + nbytes] = np.ascontiguousarray(src.astype(np.float16)).tobytes()
    write_atomic(path, bytes(buf), mode=PUBLIC_FILE_MODE, durable=durable)
    return path


def fp16_copy_of_onnx(model_dir: str | os.PathLike[str], manifest: Manifest, out_dir: str | os.PathLike[str]) -> Path:
    """Write the fp16 copy of ``model_dir``'s ONNX into ``out_dir`` (atomically); returns its ``model.onnx``.

    An existing complete copy is reused.
    """
    out_dir = Path(out_dir)
    target = out_dir / manifest.model_file
    if target.is_file() and (out_dir / NORMS_FILE).is_file():
        return target
    purpose = "fp16 on TensorRT 11 (the reduced-precision ONNX copy)"
    onnx = lazy_import("onnx", extra="trt", purpose=purpose)
    helper = lazy_import("onnx.helper", extra="trt", purpose=purpose)
    numpy_helper = lazy_import("onnx.numpy_helper", extra="trt", purpose=purpose)

    model = onnx.load(str(Path(model_dir) / manifest.model_file), load_external_data=True)
    graph = model.graph
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    keep_fp32 = {
        node.input[i]
        for node in graph.node
        for (op, i) in FP32_ONLY_INPUTS
        if node.op_type == op and len(node.input) > i
    }
    norms = set(manifest.refittable_by_name)
    for init in graph.initializer:
        if init.data_type == f32 and init.name not in keep_fp32:
            arr = numpy_helper.to_array(init).astype(np.float16)
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == f32:
                attr.i = f16
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == f32:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16)))
    _cast_io(graph, helper, manifest, f32, f16)
    del graph.value_info[:]  # intermediate types were float32; TensorRT infers them again
    inits = {i.name: i for i in graph.initializer}
    missing = sorted(norms - set(inits))
    if missing:
        raise BackendError(f"Refittable tensors {missing[:3]} are not initializers of {model_dir}; export again.")
    values = {n: numpy_helper.to_array(inits[n]).astype(np.float32) for n in norms}
    _externalize_norms(graph, manifest, lazy_import("onnx.external_data_helper", extra="trt", purpose=purpose))
    tmp_dir = Path(tempfile.mkdtemp(prefix=".fp16-", dir=_mkdir(out_dir.parent)))
    try:
        onnx.save_model(model, str(tmp_dir / manifest.model_file))
        write_fp16_norms(manifest, values, tmp_dir / NORMS_FILE)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp_dir, out_dir)
    except OSError as exc:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise BackendError(f"Could not write the fp16 ONNX copy into {out_dir}: {exc}") from exc
    return target


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cast_io(graph: Any, helper: Any, manifest: Manifest, f32: int, f16: int) -> None:
    """Keep float32 IO: Cast the input to fp16 on entry and the output back to fp32 on exit."""
    name_in, name_out = manifest.input.name, manifest.output_name
    inner_in, inner_out = name_in + "__fp16", name_out + "__fp16"
    for node in graph.node:
        node.input[:] = [inner_in if n == name_in else n for n in node.input]
        node.output[:] = [inner_out if n == name_out else n for n in node.output]
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(
        [
            helper.make_node("Cast", [name_in], [inner_in], to=f16, name="cema_fp16_input_cast"),
            *nodes,
            helper.make_node("Cast", [inner_out], [name_out], to=f32, name="cema_fp16_output_cast"),
        ]
    )


def _externalize_norms(graph: Any, manifest: Manifest, external_data_helper: Any) -> None:
    """Point the refittable initializers at the copy's fp16 norms file (written next to the model)."""
    inits = {i.name: i for i in graph.initializer}
    for name, offset, nbytes in fp16_norms_layout(manifest):
        init = inits[name]
        external_data_helper.set_external_data(init, location=NORMS_FILE, offset=offset, length=nbytes)
        init.ClearField("raw_data")
