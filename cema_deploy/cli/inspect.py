"""``cema-deploy inspect DIR``: what an export holds and what a refit blob for it costs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer

from cema_deploy.cli._console import console


def inspect_summary(model_dir: Path) -> dict[str, Any]:
    """The manifest summary as a JSON-able dict (used by ``inspect --json``)."""
    from cema_deploy.contract.blob import blob_from_path, validate_blob
    from cema_deploy.contract.manifest import manifest_from_dir

    m = manifest_from_dir(model_dir)
    params_path = model_dir / m.params_file
    blob = blob_from_path(params_path)
    validate_blob(blob, m)
    blob_file = params_path.stat().st_size
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
    }


def inspect_cmd(
    model_dir: Annotated[Path, typer.Argument(help="A directory written by `cema-deploy export`.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a summary.")] = False,
) -> None:
    """Print the manifest summary of an export: refittable parameters, blob size (bytes and % of the model),
    fingerprint."""
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
        f"{s['model_bytes']:,}-byte model (params version {s['params_version']})"
    )
