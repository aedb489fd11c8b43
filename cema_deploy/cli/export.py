"""``cema-deploy export MODEL``: a timm model to a refittable ONNX model, its manifest and refit blob v0."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cema_deploy.cli._console import console, step_progress


def export_cmd(
    model: Annotated[str, typer.Argument(help="A timm model name, e.g. resnet50, efficientnet_b0, convnext_atto.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (created).")] = Path("out/model"),
    weights: Annotated[
        Path | None, typer.Option(help="Local checkpoint: a state dict as .safetensors or .pt/.pth.")
    ] = None,
    pretrained: Annotated[
        bool, typer.Option(help="Fetch timm's pretrained weights from the hub (needs network access).")
    ] = False,
    num_classes: Annotated[int | None, typer.Option(help="Number of classes (default: the model's).")] = None,
    img_size: Annotated[int | None, typer.Option(help="Input height and width (default: the model's).")] = None,
    batch: Annotated[int | None, typer.Option(help="Fixed batch size (default: dynamic batch axis).")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
    folded_reference: Annotated[
        bool,
        typer.Option(
            help="Also write reference_folded.onnx (BN folded, as a plain deployment) for `cema-deploy bench`."
        ),
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            help="Replace an export in OUT of another model or fingerprint (by default only the same "
            "fingerprint is replaced)."
        ),
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    refit: Annotated[
        str,
        typer.Option(
            help="What a refit may carry: norms (the paper's: normalization layers) or head (beyond the paper: "
            "also the classifier's bias, and its weights for heads of <= 100 classes)."
        ),
    ] = "norms",
) -> None:
    """Export MODEL to OUT/model.onnx with refittable normalization parameters.

    Writes model.onnx (+ model.norms.bin holding the refittable tensors), manifest.json (fingerprint, input
    spec, refittable parameters) and params.safetensors (refit blob version 0), then verifies the export:
    ONNX checker, an ONNX Runtime CPU session and logits parity with PyTorch (max abs diff <= 1e-4).
    Random weights unless --weights or --pretrained is given.

    The files are written into a hidden folder next to OUT and renamed onto OUT only when every check passed:
    a failed or interrupted export leaves no OUT behind. An existing export in OUT is replaced only when it has
    the same fingerprint (same model, weights and options), or with --force.

    --refit head (beyond the paper) marks the classifier refittable too: its bias, and its weights when the head
    has at most 100 classes (a 1,000-class head stays bias only, so a ResNet-50 blob stays under 0.5 % of the
    model). The refittable list is bound by the fingerprint: a blob of one scope is refused by the other.
    """
    from cema_deploy.export.to_onnx import export_timm

    with step_progress(quiet=json_out) as on_step:
        result = export_timm(
            model,
            out,
            weights=weights,
            pretrained=pretrained,
            num_classes=num_classes,
            img_size=img_size,
            batch=batch,
            opset=opset,
            folded_reference=folded_reference,
            force=force,
            on_step=on_step,
            refit=refit,
        )
    m = result.manifest
    summary = {
        "out_dir": str(result.out_dir),
        "model": m.model_name,
        "fingerprint": m.fingerprint,
        "refittable_tensors": len(m.refittable),
        "refit": m.refit_scope,
        "head_refittable": [p.name for p in m.head_refittable],
        "norm_layers": result.norm_layers,
        "parity_max_abs_diff": result.parity_max_abs_diff,
        "blob_payload_bytes": m.refittable_bytes,
        "model_bytes": m.model_bytes,
        "seconds": {k: round(v, 3) for k, v in result.seconds.items()},
    }
    if json_out:
        typer.echo(json.dumps(summary, indent=2))
        return
    console.print(
        f"[green]Exported[/] {m.model_name} -> {result.out_dir}  fingerprint {m.fingerprint[:16]}…\n"
        f"  {len(m.refittable)} refittable tensors in {sum(result.norm_layers.values())} norm layers "
        f"{ {k: v for k, v in result.norm_layers.items() if v} }"
        + (f" + the head {[p.name for p in m.head_refittable]}" if m.head_refittable else "")
        + f", blob {m.refittable_bytes / 1024:.1f} KiB "
        f"({100 * m.refittable_bytes / max(m.model_bytes, 1):.2f} % of the model)\n"
        f"  parity vs PyTorch: max |diff| = {result.parity_max_abs_diff:.2e}"
    )
