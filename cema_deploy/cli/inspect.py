"""``cema-deploy inspect DIR``: check an export (files, fingerprint, manifest against graph, the graph loads), then
say what it holds and what a refit blob for it costs."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer

from cema_deploy.cli._console import console


def inspect_summary(model_dir: Path) -> dict[str, Any]:
    """The manifest summary as a JSON-able dict (used by ``inspect --json``), after every check passed: a broken
    export raises a ``CemaError`` naming what is wrong."""
    from cema_deploy.contract.blob import blob_from_path, validate_blob
    from cema_deploy.contract.export_check import check_export

    check = check_export(model_dir)
    m = check.manifest
    params_path = model_dir / m.params_file
    blob = blob_from_path(params_path)
    validate_blob(blob, m)
    blob_file = params_path.stat().st_size
    loaded = _graph_loads(model_dir, m)
    return {
        "model": m.model_name,
        "fingerprint": m.fingerprint,
        "input": {"name": m.input.name, "shape": list(m.input.shape), "dtype": m.input.dtype},
        "output": m.output_name,
        "num_classes": m.num_classes,
        "preprocess": {"mean": list(m.preprocess.mean), "std": list(m.preprocess.std), "size": list(m.preprocess.size)},
        "opset": m.opset,
        "refittable_tensors": len(m.refittable),
        "refittable_parameters": sum(p.numel for p in m.refittable),
        "refittable_by_layer_type": dict(Counter(p.layer_type for p in m.refittable)),
        "blob_payload_bytes": m.refittable_bytes,
        "blob_file_bytes": blob_file,
        "model_bytes": m.model_bytes,
        "blob_percent_of_model": round(100.0 * blob_file / max(m.model_bytes, 1), 3),
        "params_version": blob.version,
        "model_args": dict(m.model_args),
        "checked": {
            "files_hashed": check.files_hashed,
            "fingerprint": "re-hashed from the graph, matches",
            "manifest_vs_graph": "input, output, class count and refittable tensors match",
            "refit_blob_v0": "valid for this manifest",
            "onnxruntime_load": loaded,
        },
    }


def _graph_loads(model_dir: Path, m: Any) -> str:
    """Build an ONNX Runtime CPU session and run one zero batch; 'skipped' when onnxruntime is not installed."""
    if importlib.util.find_spec("onnxruntime") is None:
        return "skipped: onnxruntime is not installed (pip install 'cema-deploy[edge]')"
    import numpy as np

    from cema_deploy.exceptions import ExportIntegrityError
    from cema_deploy.runtime.backends.onnxrt import session_from_onnx

    shape = (1 if m.input.shape[0] < 1 else m.input.shape[0], *m.input.shape[1:])
    try:
        logits = session_from_onnx(model_dir / m.model_file).run(np.zeros(shape, np.float32))
    except Exception as exc:  # ORT's own errors: the graph does not load or run
        raise ExportIntegrityError(
            f"ONNX Runtime cannot load or run {model_dir / m.model_file}: {exc!s:.300}. Export the model again."
        ) from exc
    if logits.shape != (shape[0], m.num_classes):
        raise ExportIntegrityError(
            f"ONNX Runtime ran {model_dir / m.model_file} to logits of shape {logits.shape}, expected "
            f"{(shape[0], m.num_classes)} (num_classes {m.num_classes}). Export the model again."
        )
    return f"loads, logits {list(logits.shape)}"


def inspect_cmd(
    model_dir: Annotated[Path, typer.Argument(help="A directory written by `cema-deploy export`.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a summary.")] = False,
) -> None:
    """Check an export, then print its summary: refittable parameters, blob size (bytes and % of the model),
    fingerprint.

    Checks every file's size and SHA-256, re-hashes model.onnx against the fingerprint, compares the manifest
    with the graph (input, output, class count, refittable tensors) and loads the graph in ONNX Runtime. Any
    failure exits 1 with what is wrong.
    """
    s = inspect_summary(model_dir)
    if json_out:
        typer.echo(json.dumps(s, indent=2))
        return
    console.print(
        f"[bold]{s['model']}[/]  fingerprint {s['fingerprint']}\n"
        f"  input {s['input']['name']} {s['input']['shape']} {s['input']['dtype']}, {s['num_classes']} classes, "
        f"opset {s['opset']}\n"
        f"  refittable: {s['refittable_tensors']} tensors, {s['refittable_parameters']:,} values "
        f"{s['refittable_by_layer_type']}\n"
        f"  refit blob: {s['blob_file_bytes']:,} bytes = {s['blob_percent_of_model']} % of the "
        f"{s['model_bytes']:,}-byte model (params version {s['params_version']})\n"
        f"  checked: {s['checked']['files_hashed']} files hashed, fingerprint re-hashed, manifest matches the "
        f"graph, ONNX Runtime: {s['checked']['onnxruntime_load']}"
    )
