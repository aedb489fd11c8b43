"""``cema-deploy edge run``: the edge runtime on a folder of images or a ``.npy`` stream, with uploads and hot
refit when a cloud is given."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import typer

from cema_deploy.cli._console import console, err_console

edge_app = typer.Typer(
    help="The edge: run a refittable engine, select and upload samples, hot-refit from the cloud.", no_args_is_help=True
)


def selection_config(
    num_classes: int,
    *,
    selection: str,
    e0_ratio: float,
    e_min_ratio: float,
    d_margin: str,
    warmup: int,
    lam: float = 1.0,
) -> Any:
    """The selector's config from CLI-style options (``d_margin``: ``auto``, ``off`` or a number in (0, 1])."""
    from cema_deploy.exceptions import CemaError
    from cema_deploy.runtime.selection import SelectionConfig

    margin: float | Literal["auto"] | None
    if d_margin == "auto":
        margin = "auto"
    elif d_margin == "off":
        margin = None
    else:
        try:
            margin = float(d_margin)
        except ValueError as exc:
            raise CemaError(f"--d-margin must be 'auto', 'off' or a number in (0, 1], got {d_margin!r}.") from exc
    if selection == "eata":
        return SelectionConfig.eata_style(num_classes, e0_ratio=e0_ratio, d_margin=margin)
    if selection != "cema":
        raise CemaError(f"--selection must be 'cema' or 'eata', got {selection!r}.")
    return SelectionConfig.for_classes(
        num_classes,
        e0_ratio=e0_ratio,
        lam=lam,
        warmup=warmup,
        e_min_ratio=e_min_ratio if e_min_ratio > 0 else None,
        d_margin=margin,
    )


PREDICTION_SUFFIXES = (".csv", ".npy", ".npz")


@edge_app.command("run")
def run_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Export directory (from `cema-deploy export`).")],
    source: Annotated[
        Path, typer.Option(help="A folder of images (PNG/JPEG, sorted) or a .npy of uint8 [N, H, W, 3].")
    ],
    cloud: Annotated[str | None, typer.Option(help="Cloud URL, e.g. http://127.0.0.1:8750 (none: no uploads).")] = None,
    token: Annotated[str | None, typer.Option(help="Device bearer token (`cema-deploy cloud token add`).")] = None,
    token_file: Annotated[Path | None, typer.Option(help="Read the bearer token from this file.")] = None,
    device_id: Annotated[str, typer.Option(help="This device's id, sent with uploads.")] = "edge-0",
    backend: Annotated[str, typer.Option(help="ort-cpu, ort-cuda, ort-trt or trt.")] = "ort-cpu",
    threads: Annotated[int | None, typer.Option(help="Intra-op threads of ONNX Runtime.")] = None,
    batch: Annotated[int, typer.Option(min=1, help="Images per inference batch (official edge batch: 64).")] = 64,
    labels: Annotated[Path | None, typer.Option(help="Optional .npy of N int labels: report accuracy.")] = None,
    selection: Annotated[str, typer.Option(help="cema (dynamic E_max + E_min) or eata (fixed E_0 only).")] = "cema",
    e0_ratio: Annotated[float, typer.Option(help="E_0 = ratio * ln C (Eqn. 3).")] = 0.4,
    e_min_ratio: Annotated[float, typer.Option(help="E_min = ratio * ln C (Eqn. 5; 0 = rule off).")] = 0.02,
    d_margin: Annotated[str, typer.Option(help="Redundancy margin: auto (scaled to C), off, or a number.")] = "auto",
    warmup: Annotated[int, typer.Option(min=1, help="W: samples before E_max adapts (Eqn. 4).")] = 1000,
    encoding: Annotated[str, typer.Option(help="Upload encoding: png (lossless), jpeg or raw.")] = "png",
    upload_batch: Annotated[int, typer.Option(min=1, help="Most samples per upload.")] = 32,
    public_key: Annotated[
        list[Path] | None, typer.Option(help="Trusted Ed25519 public key(s); unsigned blobs are then refused.")
    ] = None,
    sync: Annotated[
        bool, typer.Option(help="After each batch, wait for the blob that includes its uploads (reproducible runs).")
    ] = False,
    sync_timeout: Annotated[float, typer.Option(help="Longest wait of one --sync step, seconds.")] = 120.0,
    rollback: Annotated[bool, typer.Option(help="Roll back a refit that makes mean entropy rise.")] = True,
    rollback_window: Annotated[int, typer.Option(min=1, help="Samples compared before/after a refit.")] = 64,
    rollback_margin: Annotated[float, typer.Option(min=0.0, help="Allowed entropy rise, fraction of ln C.")] = 0.15,
    predictions: Annotated[
        Path | None, typer.Option(help="Write predictions: .csv or .npy (classes), or .npz (all per-sample arrays).")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the final metrics as JSON here.")] = None,
    quiet: Annotated[bool, typer.Option(help="No live line.")] = False,
    max_batch: Annotated[
        int | None, typer.Option(min=1, help="TensorRT engine's largest batch (trt, ort-trt; default: --batch).")
    ] = None,
    precision: Annotated[
        str | None, typer.Option(help="trt: fp32 (TF32 off), tf32 or fp16; ort-trt: fp32 or fp16 (default fp32).")
    ] = None,
) -> None:
    """Stream SOURCE through the engine; select samples (CEMA rules), upload them, hot-refit from the cloud.

    Without --cloud it runs inference and selection only (nothing leaves the device).
    """
    from cema_deploy.contract.samples import ENCODINGS
    from cema_deploy.exceptions import CemaError
    from cema_deploy.runtime.edge import EdgeRuntime, RollbackConfig
    from cema_deploy.runtime.registry import get_backend
    from cema_deploy.runtime.selection import SampleSelector
    from cema_deploy.runtime.sources import batches_from_source, count_images, labels_from_path
    from cema_deploy.runtime.uplink import CloudClient

    if encoding not in ENCODINGS:
        raise CemaError(f"--encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}.")
    if predictions is not None and predictions.suffix not in PREDICTION_SUFFIXES:
        raise CemaError(f"--predictions must end in {', '.join(PREDICTION_SUFFIXES)}, got {predictions.name!r}.")
    total = count_images(source)
    y = labels_from_path(labels, total) if labels is not None else None
    if cloud is not None and token is None and token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise CemaError(f"Cannot read the token file {token_file}: {exc}.") from exc
    if cloud is not None and not token:
        raise CemaError("--cloud needs a device token: --token or --token-file (`cema-deploy cloud token add`).")
    verifier = None
    if public_key:
        from cema_deploy.contract.signing import BlobVerifier

        verifier = BlobVerifier.from_files(public_key)
    be = get_backend(backend, model_dir, intra_op_threads=threads, max_batch=max_batch or batch, precision=precision)
    cfg = selection_config(
        be.manifest.num_classes,
        selection=selection,
        e0_ratio=e0_ratio,
        e_min_ratio=e_min_ratio,
        d_margin=d_margin,
        warmup=warmup,
    )
    client = None
    if cloud is not None:
        assert token is not None  # checked above
        client = CloudClient(cloud, token, be.manifest.fingerprint, device_id=device_id)
    preds: list[np.ndarray] = []
    ents: list[np.ndarray] = []
    sel: list[np.ndarray] = []
    vers: list[np.ndarray] = []
    correct = seen = 0
    rt = EdgeRuntime(
        be,
        SampleSelector(cfg),
        client=client,
        verifier=verifier,
        encoding=encoding,
        upload_batch=upload_batch,
        device_id=device_id,
        rollback=RollbackConfig(enabled=rollback, window=rollback_window, margin_ratio=rollback_margin),
    )
    t0 = time.perf_counter()
    try:
        with _live(quiet, total) as update:
            for images in batches_from_source(source, batch):
                step = rt.process(images)
                if y is not None:
                    correct += int((step.predictions == y[seen : seen + len(images)]).sum())
                seen += len(images)
                preds.append(step.predictions)
                ents.append(step.selection.entropy)
                sel.append(step.selection.mask)
                vers.append(np.full(len(images), step.version))
                if sync and not rt.sync(timeout=sync_timeout):
                    err_console.print(f"warning: --sync waited {sync_timeout:g} s for the cloud; going on.")
                m = rt.metrics()
                update(len(images), m, None if y is None else correct / max(1, m["frames"]))
            if rt.uplink is not None and not rt.uplink.flush(timeout=30):
                err_console.print(f"warning: {rt.uplink.queued_now} selected samples were not uploaded in 30 s.")
        metrics = rt.metrics()
    finally:
        rt.close()
        be.close()
    metrics["wall_s"] = time.perf_counter() - t0
    metrics["selection_config"] = cfg.describe()
    p = np.concatenate(preds)
    if y is not None:
        metrics["accuracy"] = float((p == y).mean())
    if predictions is not None:
        _write_predictions(predictions, p, np.concatenate(ents), np.concatenate(sel), np.concatenate(vers))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(metrics, indent=2) + "\n")
    s = metrics["selection"]
    console.print(
        f"{metrics['frames']} frames, {metrics['fps']:.0f} frames/s, selected {metrics['selected_pct']:.1f}% "
        f"(unreliable {s['unreliable']}, low-info {s['low_info']}, redundant {s['redundant']}), "
        f"uploaded {metrics['uploaded_pct']:.1f}%, parameter version {metrics['version']}, "
        f"blobs applied {metrics['blobs_applied']}, refused {sum(metrics['refused'].values())}, "
        f"rollbacks {metrics['rollbacks']}, mean entropy {metrics['mean_entropy']:.3f}"
        + (f", accuracy {100 * metrics['accuracy']:.2f}%" if y is not None else "")
    )


def _write_predictions(path: Path, pred: np.ndarray, ent: np.ndarray, sel: np.ndarray, ver: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, pred)
    elif path.suffix == ".npz":
        np.savez(path, predictions=pred, entropy=ent, selected=sel, version=ver)
    else:
        with open(path, "w") as f:
            f.write("index,prediction,entropy,selected,version\n")
            for i, (a, b, c, d) in enumerate(zip(pred, ent, sel, ver, strict=True)):
                f.write(f"{i},{a},{b:.6f},{int(c)},{d}\n")


class _live:
    """A rich live line: frames/s, % uploaded, parameter version, mean entropy (and accuracy with labels)."""

    def __init__(self, quiet: bool, total: int) -> None:
        self.quiet, self.total = quiet, total
        self.progress: Any = None

    def __enter__(self) -> Any:
        if self.quiet:
            return lambda n, m, acc: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("edge"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=err_console,
        )
        self.progress.__enter__()
        task = self.progress.add_task("", total=self.total)

        def update(n: int, m: dict[str, Any], acc: float | None) -> None:
            desc = (
                f"{m['fps']:.0f} fps | selected {m['selected_pct']:.1f}% | uploaded {m['uploaded_pct']:.1f}% | "
                f"v{m['version']} | H {m['mean_entropy']:.3f}" + (f" | acc {100 * acc:.1f}%" if acc is not None else "")
            )
            self.progress.update(task, advance=n, description=desc)

        return update

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)
