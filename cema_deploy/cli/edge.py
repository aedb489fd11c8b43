"""``cema-deploy edge run``: the edge runtime on a folder of images or a ``.npy`` stream, with uploads and hot
refit when a cloud is given."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from cema_deploy.cli._console import console, err_console

edge_app = typer.Typer(help="The edge: run a refittable engine, select and upload samples, hot-refit from the cloud.",
                       no_args_is_help=True)


def selection_config(num_classes: int, *, selection: str, e0_ratio: float, e_min_ratio: float, d_margin: str,
                     warmup: int, lam: float = 1.0) -> Any:
    """The selector's config from CLI-style options (``d_margin``: ``auto``, ``off`` or a number)."""
    from cema_deploy.exceptions import CemaError
    from cema_deploy.runtime.selection import SelectionConfig

    if d_margin == "auto":
        margin: float | str | None = "auto"
    elif d_margin == "off":
        margin = None
    else:
        try:
            margin = float(d_margin)
        except ValueError as exc:
            raise CemaError(f"--d-margin must be 'auto', 'off' or a number in (0, 1], got {d_margin!r}.") from exc
    if selection == "eata":
        return SelectionConfig.eata_style(num_classes, e0_ratio=e0_ratio, d_margin=margin)  # type: ignore[arg-type]
    if selection != "cema":
        raise CemaError(f"--selection must be 'cema' or 'eata', got {selection!r}.")
    return SelectionConfig.for_classes(num_classes, e0_ratio=e0_ratio, lam=lam, warmup=warmup,
                                       e_min_ratio=e_min_ratio if e_min_ratio > 0 else None,
                                       d_margin=margin)  # type: ignore[arg-type]


@edge_app.command("run")
def run_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Export directory (from `cema-deploy export`).")],
    source: Annotated[Path, typer.Option(help="A folder of images or a .npy file of uint8 [N, H, W, 3].")],
    cloud: Annotated[str | None, typer.Option(help="Cloud URL, e.g. http://127.0.0.1:8750 (none: no uploads).")]
    = None,
    token: Annotated[str | None, typer.Option(help="Device bearer token (`cema-deploy cloud token add`).")] = None,
    token_file: Annotated[Path | None, typer.Option(help="Read the bearer token from this file.")] = None,
    device_id: Annotated[str, typer.Option(help="This device's id, sent with uploads.")] = "edge-0",
    backend: Annotated[str, typer.Option(help="ort-cpu, ort-cuda, ort-trt or trt.")] = "ort-cpu",
    threads: Annotated[int | None, typer.Option(help="Intra-op threads of ONNX Runtime.")] = None,
    batch: Annotated[int, typer.Option(help="Images per inference batch (official edge batch: 64).")] = 64,
    labels: Annotated[Path | None, typer.Option(help="Optional .npy of int labels: report accuracy.")] = None,
    selection: Annotated[str, typer.Option(help="cema (dynamic E_max + E_min) or eata (fixed E_0 only).")] = "cema",
    e0_ratio: Annotated[float, typer.Option(help="E_0 = ratio * ln C.")] = 0.4,
    e_min_ratio: Annotated[float, typer.Option(help="E_min = ratio * ln C (0 = rule off).")] = 0.02,
    d_margin: Annotated[str, typer.Option(help="Redundancy margin: auto (scaled to C), off, or a number.")] = "auto",
    warmup: Annotated[int, typer.Option(help="W: samples before E_max adapts.")] = 1000,
    encoding: Annotated[str, typer.Option(help="Upload encoding: png (lossless), jpeg or raw.")] = "png",
    public_key: Annotated[
        list[Path] | None, typer.Option(help="Trusted Ed25519 public key(s); unsigned blobs are then refused.")
    ] = None,
    sync: Annotated[
        bool, typer.Option(help="After each batch, wait for the blob that includes its uploads (reproducible runs).")
    ] = False,
    rollback: Annotated[bool, typer.Option(help="Roll back a refit that makes mean entropy rise.")] = True,
    predictions: Annotated[
        Path | None, typer.Option(help="Write predictions: .npy (classes), .csv, or .npz (all per-sample arrays).")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the final metrics as JSON here.")] = None,
    quiet: Annotated[bool, typer.Option(help="No live line.")] = False,
) -> None:
    """Stream SOURCE through the engine; select samples (CEMA rules), upload them, hot-refit from the cloud."""
    from cema_deploy.exceptions import CemaError
    from cema_deploy.runtime.edge import EdgeRuntime, RollbackConfig
    from cema_deploy.runtime.registry import get_backend
    from cema_deploy.runtime.selection import SampleSelector
    from cema_deploy.runtime.sources import batches_from_source, count_images
    from cema_deploy.runtime.uplink import CloudClient

    be = get_backend(backend, model_dir, intra_op_threads=threads)
    cfg = selection_config(be.manifest.num_classes, selection=selection, e0_ratio=e0_ratio,
                           e_min_ratio=e_min_ratio, d_margin=d_margin, warmup=warmup)
    client = None
    if cloud is not None:
        if token is None and token_file is not None:
            token = token_file.read_text().strip()
        if not token:
            raise CemaError("--cloud needs a device token: --token or --token-file (`cema-deploy cloud token add`).")
        client = CloudClient(cloud, token, be.manifest.fingerprint, device_id=device_id)
    verifier = None
    if public_key:
        from cema_deploy.contract.signing import BlobVerifier

        verifier = BlobVerifier.from_files(public_key)
    y = np.load(labels) if labels is not None else None
    total = count_images(source)
    preds, ents, sel, vers = [], [], [], []
    rt = EdgeRuntime(be, SampleSelector(cfg), client=client, verifier=verifier, encoding=encoding,
                     rollback=RollbackConfig(enabled=rollback), device_id=device_id)
    t0 = time.perf_counter()
    try:
        with _live(quiet, total) as update:
            for images in batches_from_source(source, batch):
                step = rt.process(images)
                preds.append(step.predictions)
                ents.append(step.selection.entropy)
                sel.append(step.selection.mask)
                vers.append(np.full(len(images), step.version))
                if sync:
                    rt.sync()
                m = rt.metrics()
                acc = None if y is None else float((np.concatenate(preds) == y[: m["frames"]]).mean())
                update(len(images), m, acc)
            if rt.uplink is not None:
                rt.uplink.flush(timeout=30)
        metrics = rt.metrics()
    finally:
        rt.close()
    metrics["wall_s"] = time.perf_counter() - t0
    metrics["selection_config"] = cfg.describe()
    p = np.concatenate(preds) if preds else np.zeros(0, np.int64)
    if y is not None:
        metrics["accuracy"] = float((p == y[: len(p)]).mean())
    if predictions is not None:
        _write_predictions(predictions, p, np.concatenate(ents), np.concatenate(sel), np.concatenate(vers))
    if json_out is not None:
        json_out.write_text(json.dumps(metrics, indent=2))
    s = metrics["selection"]
    console.print(
        f"{metrics['frames']} frames, {metrics['fps']:.0f} frames/s, selected {metrics['selected_pct']:.1f}% "
        f"(unreliable {s['unreliable']}, low-info {s['low_info']}, redundant {s['redundant']}), "
        f"uploaded {metrics['uploaded_pct']:.1f}%, parameter version {metrics['version']}, "
        f"blobs applied {metrics['blobs_applied']}, refused {sum(metrics['refused'].values())}, "
        f"rollbacks {metrics['rollbacks']}" + (f", accuracy {100 * metrics['accuracy']:.2f}%" if y is not None else "")
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

        self.progress = Progress(TextColumn("edge"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.description}"), console=err_console)
        self.progress.__enter__()
        task = self.progress.add_task("", total=self.total)

        def update(n: int, m: dict[str, Any], acc: float | None) -> None:
            desc = (f"{m['fps']:.0f} fps | selected {m['selected_pct']:.1f}% | uploaded {m['uploaded_pct']:.1f}% | "
                    f"v{m['version']} | H {m['mean_entropy']:.3f}" + (f" | acc {100 * acc:.1f}%" if acc else ""))
            self.progress.update(task, advance=n, description=desc)

        return update

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)
