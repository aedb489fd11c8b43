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
    upload_share: float | None = None,
    upload_budget: float | None = None,
    stats_share: float = 0.0,
    recalibrate: bool = False,
    seed: int = 0,
) -> Any:
    """The selector's config from CLI-style options (``d_margin``: ``auto``, ``off`` or a number in (0, 1])."""
    from cema_deploy.exceptions import CemaError
    from cema_deploy.runtime.selection.rules import PRESETS, SelectionConfig
    from cema_deploy.runtime.selection.shift import ShiftConfig

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
        if not 0 < margin <= 1:  # refused whichever rule runs, not only where the redundancy rule reads it
            raise CemaError(f"--d-margin must be 'auto', 'off' or a number in (0, 1], got {d_margin!r}.")
    if selection not in PRESETS:
        raise CemaError(f"--selection must be one of {', '.join(PRESETS)}, got {selection!r}.")
    if upload_share is not None and selection not in ("random", "entropy-top"):
        raise CemaError(f"--upload-share applies to --selection random or entropy-top, not {selection!r}.")
    if upload_share is None and upload_budget is None and selection in ("random", "entropy-top"):
        from cema_deploy.runtime.selection.rules import DEFAULT_SHARE

        upload_share = DEFAULT_SHARE
    return SelectionConfig.preset(
        selection,
        num_classes,
        e0_ratio=e0_ratio,
        e_min_ratio=e_min_ratio if e_min_ratio > 0 else None,
        lam=lam,
        warmup=warmup,
        d_margin=margin,
        share=upload_share,
        stats_share=stats_share,
        budget=upload_budget,
        shift=ShiftConfig() if recalibrate else None,
        seed=seed,
    )


PREDICTION_SUFFIXES = (".csv", ".npy", ".npz")


@edge_app.command("run")
def run_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Export directory (from `cema-deploy export`).")],
    source: Annotated[
        str,
        typer.Option(
            help="A folder of images (PNG/JPEG, sorted), a .npy of uint8 [N, H, W, 3], a video file, a camera index "
            "(0, 1, ...), an rtsp:// or http(s):// URL, or a GStreamer pipeline ending in appsink (video extra)."
        ),
    ],
    cloud: Annotated[str | None, typer.Option(help="Cloud URL, e.g. http://127.0.0.1:8750 (none: no uploads).")] = None,
    token: Annotated[str | None, typer.Option(help="Device bearer token (`cema-deploy cloud token add`).")] = None,
    token_file: Annotated[Path | None, typer.Option(help="Read the bearer token from this file.")] = None,
    device_id: Annotated[str, typer.Option(help="This device's id, sent with uploads.")] = "edge-0",
    backend: Annotated[str, typer.Option(help="ort-cpu, ort-cuda, ort-trt or trt.")] = "ort-cpu",
    threads: Annotated[int | None, typer.Option(help="Intra-op threads of ONNX Runtime.")] = None,
    batch: Annotated[int, typer.Option(min=1, help="Images per inference batch (official edge batch: 64).")] = 64,
    fps: Annotated[
        float | None, typer.Option(min=0.001, help="Take at most this many frames per second from the source.")
    ] = None,
    labels: Annotated[
        Path | None, typer.Option(help="Optional .npy of N int labels: report accuracy (sources of known length).")
    ] = None,
    selection: Annotated[
        str,
        typer.Option(
            help="Which frames go up: random (the default: a uniform --upload-share, the rule that won the "
            "accuracy-uplink frontier, README), cema (the paper: dynamic E_max, E_min, redundancy), eata (fixed "
            "E_0 + redundancy; also what the official release config runs), entropy-top (highest entropy first, "
            "--upload-share), all."
        ),
    ] = "random",
    upload_share: Annotated[
        float | None,
        typer.Option(
            min=0.0, max=1.0, help="Share of frames random/entropy-top upload (default 0.1, or --upload-budget)."
        ),
    ] = None,
    upload_budget: Annotated[
        float | None,
        typer.Option(
            min=0.0, max=1.0, help="Hold the share of frames uploaded (all kinds, calibration included) at this."
        ),
    ] = None,
    stats_share: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Uniform share of frames sent as statistics samples (0 = off).")
    ] = 0.0,
    recalibrate: Annotated[
        bool, typer.Option(help="Send a recalibration batch when the shift detector fires (continual streams).")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of the random draws (random rule, statistics samples).")] = 0,
    e0_ratio: Annotated[float, typer.Option(help="E_0 = ratio * ln C (Eqn. 3).")] = 0.4,
    e_min_ratio: Annotated[float, typer.Option(help="E_min = ratio * ln C (Eqn. 5; 0 = rule off).")] = 0.02,
    d_margin: Annotated[str, typer.Option(help="Redundancy margin: auto (scaled to C), off, or a number.")] = "auto",
    warmup: Annotated[int, typer.Option(min=1, help="W: samples before E_max adapts (Eqn. 4).")] = 1000,
    encoding: Annotated[str, typer.Option(help="Upload encoding: png (lossless), jpeg or raw.")] = "png",
    upload_batch: Annotated[int, typer.Option(min=1, help="Most samples per upload.")] = 32,
    public_key: Annotated[
        list[Path] | None, typer.Option(help="Trusted Ed25519 public key(s); unsigned blobs are then refused.")
    ] = None,
    allow_unsigned: Annotated[
        bool,
        typer.Option(help="Apply unsigned blobs from a cloud that is not on a loopback address (no --public-key)."),
    ] = False,
    ca_file: Annotated[
        Path | None, typer.Option(help="CA bundle (PEM) that signed an https:// cloud's certificate (default: system).")
    ] = None,
    sync: Annotated[
        bool,
        typer.Option(help="After each batch, wait for the blob that includes its uploads and its rollback judgement."),
    ] = False,
    sync_timeout: Annotated[float, typer.Option(help="Longest wait of one --sync step, seconds.")] = 120.0,
    rollback: Annotated[
        bool, typer.Option(help="Roll back a refit whose parameters carry less information on the same frames.")
    ] = True,
    rollback_window: Annotated[
        int, typer.Option(min=1, help="Recent frames both parameter sets are compared on after a refit.")
    ] = 128,
    rollback_margin: Annotated[
        float, typer.Option(min=0.0, help="Allowed drop of the mutual information, fraction of ln C.")
    ] = 0.05,
    min_refit_interval: Annotated[
        float, typer.Option(min=0.0, help="Shortest time between two refit builds, seconds (newer blobs coalesce).")
    ] = 0.0,
    state: Annotated[
        Path | None,
        typer.Option(help="Durable edge state folder: selector, refused versions, serving blob, upload spool."),
    ] = None,
    state_interval: Annotated[float, typer.Option(min=0.1, help="Seconds between two saves of --state.")] = 30.0,
    spool_mb: Annotated[float, typer.Option(min=0.001, help="Bound of the upload spool in --state, MiB.")] = 1024.0,
    metrics_port: Annotated[
        int | None, typer.Option(min=0, max=65535, help="Serve Prometheus metrics on this port (0: any free port).")
    ] = None,
    metrics_host: Annotated[str, typer.Option(help="Address the metrics server binds.")] = "127.0.0.1",
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
    adapt_stats: Annotated[
        str,
        typer.Option(
            help="The edge's own BatchNorm statistics, forward-only, no uplink (README, 'The edge's own statistics'): "
            "off, ema (running estimate across batches, reset on a detected shift) or alpha (alpha-BN: "
            "(1-a)*source + a*batch). Models without BatchNorm running statistics stay off. Off by default: on a "
            "label-correlated stream at batch 1 it fell below no adaptation (README)."
        ),
    ] = "off",
    stats_alpha: Annotated[float, typer.Option(help="alpha mode: the batch's share a (You et al. 2021).")] = 0.1,
    stats_momentum: Annotated[
        float, typer.Option(help="ema mode: per-frame weight floor (the estimate remembers ~1/momentum frames).")
    ] = 0.002,
    stats_prior: Annotated[
        float, typer.Option(min=0.0, help="ema mode: frames the source statistics count as after a reset.")
    ] = 16.0,
    stats_every: Annotated[
        int, typer.Option(min=1, help="Probe one batch in this many (the adapter's cost, README).")
    ] = 128,
    stats_dense_frames: Annotated[
        int,
        typer.Option(min=0, help="Probe every batch until this many frames entered since the start or a shift."),
    ] = 128,
) -> None:
    """Stream SOURCE through the engine; select samples (CEMA rules), upload them, hot-refit from the cloud.

    Without --cloud it runs inference and selection only (nothing leaves the device).
    """
    from cema_deploy.contract.samples import ENCODINGS
    from cema_deploy.exceptions import CemaError
    from cema_deploy.runtime.backends.registry import get_backend
    from cema_deploy.runtime.edge import EdgeRuntime
    from cema_deploy.runtime.frames.sources import batches_from_source, count_images, labels_from_path
    from cema_deploy.runtime.link.client import CloudClient, is_loopback_url
    from cema_deploy.runtime.selection.rules import SampleSelector
    from cema_deploy.runtime.stats.adapter import StatsConfig, stats_adapter_from_dir
    from cema_deploy.runtime.updates.rollback import RollbackConfig

    if encoding not in ENCODINGS:
        raise CemaError(f"--encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}.")
    if predictions is not None and predictions.suffix not in PREDICTION_SUFFIXES:
        raise CemaError(f"--predictions must end in {', '.join(PREDICTION_SUFFIXES)}, got {predictions.name!r}.")
    total = count_images(source)  # None: a live source, or a video without a frame count
    if labels is not None and total is None:
        raise CemaError(f"--labels needs a source of known length; {source!r} has none (live or unknown length).")
    y = labels_from_path(labels, total) if labels is not None and total is not None else None
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
    elif cloud is not None:
        _warn_unsigned(cloud, allow_unsigned, is_loopback_url(cloud))
    be = get_backend(backend, model_dir, intra_op_threads=threads, max_batch=max_batch or batch, precision=precision)
    stats, stats_why = stats_adapter_from_dir(
        be, model_dir, StatsConfig(mode=adapt_stats, alpha=stats_alpha, momentum=stats_momentum,
                                   prior_frames=stats_prior, every=stats_every,
                                   dense_frames=stats_dense_frames)
    )  # fmt: skip
    if stats is None and adapt_stats != "off":
        err_console.print(f"warning: --adapt-stats {adapt_stats}: the adapter stays off: {stats_why}.")
    cfg = selection_config(
        be.manifest.num_classes,
        selection=selection,
        e0_ratio=e0_ratio,
        e_min_ratio=e_min_ratio,
        d_margin=d_margin,
        warmup=warmup,
        upload_share=upload_share,
        upload_budget=upload_budget,
        stats_share=stats_share,
        recalibrate=recalibrate,
        seed=seed,
    )
    client = None
    if cloud is not None:
        assert token is not None  # checked above
        client = CloudClient(cloud, token, be.manifest.fingerprint, device_id=device_id, encoding=encoding,
                             ca_file=str(ca_file) if ca_file is not None else None)  # fmt: skip
    preds: list[np.ndarray] = []
    ents: list[np.ndarray] = []
    sel: list[np.ndarray] = []
    went_up: list[np.ndarray] = []
    vers: list[np.ndarray] = []
    correct = seen = 0
    rt = EdgeRuntime(
        be,
        SampleSelector(cfg),
        client=client,
        verifier=verifier,
        allow_unsigned=allow_unsigned,
        upload_batch=upload_batch,
        device_id=device_id,
        rollback=RollbackConfig(
            enabled=rollback, window=rollback_window, margin_ratio=rollback_margin, min_samples=min(32, rollback_window)
        ),
        sync=sync,
        sync_timeout_s=sync_timeout,
        recalibrate=recalibrate,
        state_dir=state,
        state_interval_s=state_interval,
        max_spool_bytes=max(1, int(spool_mb * 2**20)),
        min_refit_interval_s=min_refit_interval,
        stats=stats,
    )
    if rt.restored_version:
        err_console.print(f"restored from {state}: serving v{rt.restored_version}")
    server = _metrics_server(rt, metrics_host, metrics_port) if metrics_port is not None else None
    t0 = time.perf_counter()
    previous_handler = _exit_cleanly_on_sigterm()
    try:
        with _live(quiet, total) as update:
            frames = batches_from_source(source, batch, fps=fps)
            for images in frames:
                timeouts = rt.sync_timeouts
                step = rt.process(images)
                if y is not None:
                    correct += int((step.predictions == y[seen : seen + len(images)]).sum())
                seen += len(images)
                preds.append(step.predictions)
                ents.append(step.selection.entropy)
                sel.append(step.selection.mask)
                went_up.append(_uploaded_mask(step, rt.uplink is not None))
                vers.append(np.full(len(images), step.version))
                if rt.sync_timeouts > timeouts:
                    err_console.print(f"warning: --sync waited {sync_timeout:g} s for the cloud; going on.")
                m = rt.metrics()
                update(len(images), m, None if y is None else correct / max(1, m["frames"]))
            if rt.uplink is not None and not rt.uplink.flush(timeout=30):
                where = "wait in the spool for the next run" if state is not None else "were not uploaded"
                err_console.print(f"warning: {rt.uplink.queued_now} samples {where} (30 s flush).")
        metrics = rt.metrics()
        metrics["source"] = frames.stats.as_dict()  # kind, frames, and for live sources dropped/skipped
    finally:
        if server is not None:
            server.close()
        rt.close()
        be.close()
        if previous_handler is not None:
            import signal

            signal.signal(signal.SIGTERM, previous_handler)
    metrics["wall_s"] = time.perf_counter() - t0
    metrics["selection_config"] = cfg.describe()
    if stats is None and adapt_stats != "off":
        metrics["stats"]["off_because"] = stats_why
    p = np.concatenate(preds)
    if y is not None:
        metrics["accuracy"] = float((p == y).mean())
    if predictions is not None:
        _write_predictions(
            predictions, p, np.concatenate(ents), np.concatenate(sel), np.concatenate(vers), np.concatenate(went_up)
        )
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
        + (f", statistics {adapt_stats} (local generation {metrics['stats']['local_generation']})" if stats else "")
        + (f", accuracy {100 * metrics['accuracy']:.2f}%" if y is not None else "")
    )


def _warn_unsigned(cloud: str, allow_unsigned: bool, loopback: bool) -> None:
    if loopback or allow_unsigned:
        err_console.print(
            f"warning: no --public-key: blobs from {cloud} are applied UNSIGNED; whoever can answer for that address "
            "can change this model. Give the edge the cloud's public key (`cema-deploy keys new`, --public-key)."
        )
    else:
        err_console.print(
            f"warning: no --public-key and {cloud} is not on a loopback address: every blob will be refused. "
            "Pass --public-key (recommended) or --allow-unsigned."
        )


def _metrics_server(rt: Any, host: str, port: int) -> Any:
    from cema_deploy.runtime.metrics import MetricsServer, prometheus_text

    server = MetricsServer(lambda: prometheus_text(rt.metrics(), rt.latency), host=host, port=port)
    err_console.print(f"metrics on {server.url}")
    return server


def _exit_cleanly_on_sigterm() -> Any:
    """SIGTERM ends the run like Ctrl-C: the runtime closes and saves its state (SIGKILL cannot be caught; the
    state then holds the last interval's or event's save). Returns the handler it replaced (None off the main
    thread, where signals cannot be handled)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, stop)


def _uploaded_mask(step: Any, with_cloud: bool) -> np.ndarray:
    """Frames of this step that went up, of any kind (selected, statistics, the whole of a calibration batch)."""
    n = len(step.predictions)
    if not with_cloud:
        return np.zeros(n, bool)
    if step.calibration:
        return np.ones(n, bool)
    stats = step.selection.stats_mask
    return np.asarray(step.selection.mask | (stats if stats is not None else False), bool)


def _write_predictions(
    path: Path, pred: np.ndarray, ent: np.ndarray, sel: np.ndarray, ver: np.ndarray, uploaded: np.ndarray
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, pred)
    elif path.suffix == ".npz":
        np.savez(path, predictions=pred, entropy=ent, selected=sel, version=ver, uploaded=uploaded)
    else:
        with open(path, "w") as f:
            f.write("index,prediction,entropy,selected,version\n")
            for i, (a, b, c, d) in enumerate(zip(pred, ent, sel, ver, strict=True)):
                f.write(f"{i},{a},{b:.6f},{int(c)},{d}\n")


class _live:
    """A rich live line: frames/s, % uploaded, parameter version, mean entropy (and accuracy with labels)."""

    def __init__(self, quiet: bool, total: int | None) -> None:
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
