"""The full check of an export folder (what ``cema-deploy inspect`` runs): every file's size and SHA-256, the
fingerprint re-hashed from ``model.onnx``, and the manifest against the graph (input, output, class count,
refittable initializers). Torch-free: numpy only, so an edge device can check what it was given.

A load (:func:`~cema_deploy.contract.manifest.manifest_from_dir`) checks the sizes and the fingerprint only;
hashing every file and comparing shapes is this module's job.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cema_deploy.contract.fingerprint import GraphSummary
from cema_deploy.contract.manifest import Manifest, check_graph, manifest_from_dir
from cema_deploy.exceptions import ExportIntegrityError

#: ONNX TensorProto.DataType codes of the dtypes a manifest names.
_ONNX_TYPES = {"float32": 1, "uint8": 2, "int64": 7, "float16": 10, "bfloat16": 16}


@dataclass(frozen=True, kw_only=True)
class ExportCheck:
    """A passed check: the manifest, what the graph holds, and how many files were hashed."""

    manifest: Manifest
    graph: GraphSummary
    files_hashed: int


def check_export(directory: str | os.PathLike[str]) -> ExportCheck:
    """Check ``directory`` as written by ``cema-deploy export``; raises :class:`ExportIntegrityError` naming
    every problem found (file sizes and hashes, fingerprint, manifest against graph).

    Example:
        >>> check_export("out/r50").files_hashed  # doctest: +SKIP
        3
    """
    directory = Path(directory)
    manifest = manifest_from_dir(directory, verify=False)
    problems = _file_problems(directory, manifest)
    if problems:  # a truncated or altered file: the graph checks below would only repeat it
        raise _error(directory, problems)
    graph = check_graph(directory, manifest)
    problems = graph_problems(manifest, graph)
    if problems:
        raise _error(directory, problems)
    return ExportCheck(manifest=manifest, graph=graph, files_hashed=len(manifest.files))


def graph_problems(manifest: Manifest, graph: GraphSummary) -> list[str]:
    """Where the manifest says something the graph does not: input, output and class count, refittable tensors."""
    out: list[str] = []
    inputs = [v for v in graph.inputs if v.name not in graph.initializers]
    if [v.name for v in inputs] != [manifest.input.name]:
        out.append(f"the graph's inputs are {[v.name for v in inputs]}, the manifest names {manifest.input.name!r}")
    else:
        dims = tuple(-1 if isinstance(d, str) else d for d in inputs[0].dims)
        if dims != manifest.input.shape:
            out.append(f"the graph's input shape is {inputs[0].dims}, the manifest says {manifest.input.shape}")
        if inputs[0].elem_type != _ONNX_TYPES.get(manifest.input.dtype):
            out.append(
                f"the graph's input has ONNX type {inputs[0].elem_type}, the manifest says {manifest.input.dtype}"
            )
    outputs = {v.name: v for v in graph.outputs}
    logits = outputs.get(manifest.output_name)
    if logits is None:
        out.append(f"the graph has no output {manifest.output_name!r} (it has {sorted(outputs)})")
    elif not logits.dims or logits.dims[-1] != manifest.num_classes:
        out.append(
            f"the graph's output {manifest.output_name!r} has shape {logits.dims}: "
            f"{logits.dims[-1] if logits.dims else 'no'} classes, the manifest says num_classes={manifest.num_classes}"
        )
    for p in manifest.refittable:
        init = graph.initializers.get(p.name)
        if init is None:
            out.append(f"refittable tensor {p.name!r} is not an initializer of the graph")
        elif init != (_ONNX_TYPES.get(p.dtype), p.shape):
            out.append(
                f"refittable tensor {p.name!r} is ONNX type {init[0]} shape {init[1]} in the graph, "
                f"{p.dtype} {p.shape} in the manifest"
            )
    return out


def _file_problems(directory: Path, manifest: Manifest) -> list[str]:
    out: list[str] = []
    recorded = {f.name for f in manifest.files}
    for needed in (manifest.model_file, manifest.params_file):
        if needed not in recorded:
            out.append(f"the manifest records no size or hash for {needed}")
    for f in manifest.files:
        path = directory / f.name
        if not path.is_file():
            out.append(f"{f.name} is missing")
            continue
        size = path.stat().st_size
        if size != f.bytes:
            out.append(f"{f.name} has {size:,} bytes, the manifest records {f.bytes:,} (truncated or replaced)")
            continue
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        if h.hexdigest() != f.sha256:
            out.append(f"{f.name} has SHA-256 {h.hexdigest()[:16]}…, the manifest records {f.sha256[:16]}… (altered)")
    return out


def _error(directory: Path, problems: list[str]) -> ExportIntegrityError:
    return ExportIntegrityError(
        f"{directory} is not the export its manifest describes: " + "; ".join(problems) + ". Export the model "
        "again with `cema-deploy export` (or restore the original files)."
    )
