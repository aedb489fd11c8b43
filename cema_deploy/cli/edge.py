"""``cema-deploy edge run``: the edge runtime on a folder of images or a ``.npy`` stream, with uploads and hot
refit when a cloud is given."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Literal

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
    from cema_deploy.runtime.selection.rules import PRESETS, SHARE_RULES, SelectionConfig
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
    if upload_share is not None and selection not in SHARE_RULES:
        raise CemaError(f"--upload-share applies to --selection random, entropy-top or lead, not {selection!r}.")
    if upload_share is None and upload_budget is None and selection in SHARE_RULES:
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


#: Exit codes of ``edge run`` (README, "Exit codes").
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_REFUSED = 0, 1, 2, 3

_SOURCE, _CLOUD, _SELECT, _REFIT, _OUT = (
    "Source and engine",
    "Cloud",
    "Selection",
    "Refit and rollback",
    "State, outputs",
)
_STATS = "Edge statistics (no uplink)"


def _share(value: float | None) -> float | None:
    """Parser check of a share option: (0, 1] (0 would upload nothing: run without --cloud for that)."""
    if value is not None and not 0 < value <= 1:
        raise typer.BadParameter(f"must be in (0, 1], got {value:g}; to upload nothing, run without --cloud.")
    return value


@edge_app.command("run")
def run_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Export directory (from `cema-deploy export`).")],
    source: Annotated[
        str,
        typer.Option(
            metavar="SOURCE",
            help="Image folder, .npy, video, camera index, rtsp/http URL or GStreamer pipeline (README, Sources).",
            rich_help_panel=_SOURCE,
        ),
    ],
    cloud: Annotated[
        str | None,
        typer.Option(metavar="URL", help="Cloud URL, http(s)://HOST:PORT (none: no uploads).", rich_help_panel=_CLOUD),
    ] = None,
    token: Annotated[
        str | None, typer.Option(metavar="TOKEN", help="Device token (`cloud token add`).", rich_help_panel=_CLOUD)
    ] = None,
    token_file: Annotated[
        Path | None, typer.Option(metavar="PATH", help="Read the device token from this file.", rich_help_panel=_CLOUD)
    ] = None,
    device_id: Annotated[
        str, typer.Option(metavar="ID", help="This device's id, sent with uploads.", rich_help_panel=_CLOUD)
    ] = ("edge-0"),
    backend: Annotated[
        str, typer.Option(metavar="NAME", help="ort-cpu, ort-cuda, ort-trt or trt.", rich_help_panel=_SOURCE)
    ] = ("ort-cpu"),
    threads: Annotated[
        int | None, typer.Option(metavar="N", help="ONNX Runtime intra-op threads.", rich_help_panel=_SOURCE)
    ] = None,
    batch: Annotated[
        int, typer.Option(metavar="N", min=1, help="Images per batch (official: 64).", rich_help_panel=_SOURCE)
    ] = 64,
    fps: Annotated[
        float | None,
        typer.Option(
            metavar="FPS", min=0.001, help="Take at most this many frames per second.", rich_help_panel=_SOURCE
        ),
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option(
            metavar="NPY", help=".npy of N int labels: report accuracy (known-length sources).", rich_help_panel=_SOURCE
        ),
    ] = None,
    selection: Annotated[
        str,
        typer.Option(
            metavar="RULE",
            help="random, cema (the paper), eata, entropy-top, all, lead (README).",
            rich_help_panel=_SELECT,
        ),
    ] = "random",
    upload_share: Annotated[
        float | None,
        typer.Option(
            metavar="SHARE",
            callback=_share,
            help="random/entropy-top/lead: share uploaded, (0, 1] (default 0.1).",
            rich_help_panel=_SELECT,
        ),
    ] = None,
    upload_budget: Annotated[
        float | None,
        typer.Option(
            metavar="SHARE",
            callback=_share,
            help="Hold the uploaded share (all kinds) at this, in (0, 1].",
            rich_help_panel=_SELECT,
        ),
    ] = None,
    stats_share: Annotated[
        float,
        typer.Option(
            metavar="SHARE",
            min=0.0,
            max=1.0,
            help="Statistics-sample share.",
            rich_help_panel=_SELECT,
        ),
    ] = 0.0,
    recalibrate: Annotated[
        bool, typer.Option("--recalibrate", help="Recalibrate on a shift.", rich_help_panel=_SELECT)
    ] = False,
    seed: Annotated[int, typer.Option(metavar="N", help="Seed of the random draws.", rich_help_panel=_SELECT)] = 0,
    e0_ratio: Annotated[
        float, typer.Option(metavar="X", help="E_0 = ratio * ln C (Eqn. 3).", rich_help_panel=_SELECT)
    ] = 0.4,
    e_min_ratio: Annotated[
        float, typer.Option(metavar="X", help="E_min / ln C (Eqn. 5).", rich_help_panel=_SELECT)
    ] = 0.02,
    d_margin: Annotated[
        str, typer.Option(metavar="M", help="auto, off or a margin.", rich_help_panel=_SELECT)
    ] = "auto",
    warmup: Annotated[
        int, typer.Option(metavar="W", min=1, help="W: samples before E_max adapts (Eqn. 4).", rich_help_panel=_SELECT)
    ] = 1000,
    encoding: Annotated[
        str, typer.Option(metavar="ENC", help="Upload encoding: png, jpeg or raw.", rich_help_panel=_CLOUD)
    ] = "png",
    upload_batch: Annotated[
        int, typer.Option(metavar="N", min=1, help="Most samples per upload.", rich_help_panel=_CLOUD)
    ] = 32,
    public_key: Annotated[
        list[Path] | None,
        typer.Option(
            metavar="PEM", help="Trusted Ed25519 public key(s); unsigned blobs refused.", rich_help_panel=_CLOUD
        ),
    ] = None,
    allow_unsigned: Annotated[
        bool,
        typer.Option(
            "--allow-unsigned", help="Apply unsigned blobs from a non-loopback cloud.", rich_help_panel=_CLOUD
        ),
    ] = False,
    ca_file: Annotated[
        Path | None, typer.Option(metavar="PEM", help="CA bundle (PEM) of an https:// cloud.", rich_help_panel=_CLOUD)
    ] = None,
    flush_timeout: Annotated[
        float,
        typer.Option(
            metavar="S",
            min=0.0,
            help="At the end, wait S for queued uploads (a stop: 5 s).",
            rich_help_panel=_CLOUD,
        ),
    ] = 30.0,
    sync: Annotated[
        bool, typer.Option("--sync", help="Wait for each batch's blob and its judgement.", rich_help_panel=_REFIT)
    ] = False,
    sync_timeout: Annotated[
        float, typer.Option(metavar="S", help="Longest wait of one --sync step, seconds.", rich_help_panel=_REFIT)
    ] = 120.0,
    rollback: Annotated[
        bool, typer.Option(help="Roll back a refit that loses information.", rich_help_panel=_REFIT)
    ] = True,
    rollback_window: Annotated[
        int, typer.Option(metavar="N", min=1, help="Frames a refit is judged on.", rich_help_panel=_REFIT)
    ] = 128,
    rollback_margin: Annotated[
        float,
        typer.Option(metavar="X", min=0.0, help="Allowed information drop, fraction of ln C.", rich_help_panel=_REFIT),
    ] = 0.05,
    rollback_hold: Annotated[
        int,
        typer.Option(
            metavar="N",
            min=0,
            help="Hold a rolled-back episode N frames (0: off).",
            rich_help_panel=_REFIT,
        ),
    ] = 1024,
    min_refit_interval: Annotated[
        float, typer.Option(metavar="S", min=0.0, help="Shortest time between refit builds, s.", rich_help_panel=_REFIT)
    ] = 0.0,
    pin_version: Annotated[
        int | None,
        typer.Option(
            metavar="V",
            min=0,
            help="Apply no blob above version V (README).",
            rich_help_panel=_REFIT,
        ),
    ] = None,
    state: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR", help="Durable state folder (selector, versions, upload spool).", rich_help_panel=_OUT
        ),
    ] = None,
    state_interval: Annotated[
        float, typer.Option(metavar="S", min=0.1, help="Seconds between saves of --state.", rich_help_panel=_OUT)
    ] = 30.0,
    spool_mb: Annotated[
        float, typer.Option(metavar="MIB", min=0.001, help="Bound of the upload spool, MiB.", rich_help_panel=_OUT)
    ] = 1024.0,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            metavar="PORT", min=0, max=65535, help="Serve Prometheus /metrics here (0: any).", rich_help_panel=_OUT
        ),
    ] = None,
    metrics_host: Annotated[
        str, typer.Option(metavar="HOST", help="Address of /metrics.", rich_help_panel=_OUT)
    ] = "127.0.0.1",
    predictions: Annotated[
        Path | None,
        typer.Option(
            metavar="PATH", help="Per-frame outputs: .csv, .npy (classes) or .npz (all).", rich_help_panel=_OUT
        ),
    ] = None,
    json_out: Annotated[
        str | None,
        typer.Option(
            "--json", metavar="PATH", help="Final metrics as JSON to this path ('-': stdout).", rich_help_panel=_OUT
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No live line.", rich_help_panel=_OUT)] = False,
    max_batch: Annotated[
        int | None,
        typer.Option(metavar="N", min=1, help="TensorRT's largest batch (default: --batch).", rich_help_panel=_SOURCE),
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(metavar="P", help="trt: fp32, tf32, fp16; ort-trt: fp32, fp16.", rich_help_panel=_SOURCE),
    ] = None,
    adapt_stats: Annotated[
        str,
        typer.Option(
            metavar="MODE",
            help="Own BatchNorm statistics: off, ema, alpha (README).",
            rich_help_panel=_STATS,
        ),
    ] = "off",
    stats_alpha: Annotated[float, typer.Option(metavar="A", help="alpha-BN's a.", rich_help_panel=_STATS)] = 0.1,
    stats_momentum: Annotated[
        float, typer.Option(metavar="M", help="ema: per-frame weight floor.", rich_help_panel=_STATS)
    ] = 0.002,
    stats_prior: Annotated[
        float, typer.Option(metavar="N", min=0.0, help="ema: frames the source counts as.", rich_help_panel=_STATS)
    ] = 8.0,
    stats_every: Annotated[
        int, typer.Option(metavar="K", min=1, help="Probe one batch in K.", rich_help_panel=_STATS)
    ] = 128,
    stats_dense_frames: Annotated[
        int,
        typer.Option(metavar="N", min=0, help="Dense probes after a reset.", rich_help_panel=_STATS),
    ] = 128,
    stats_balance_window: Annotated[
        int,
        typer.Option(
            metavar="N",
            min=0,
            help="ema: guard's label window (0: off).",
            rich_help_panel=_STATS,
        ),
    ] = 32,
    stats_balance_power: Annotated[
        float,
        typer.Option(metavar="P", min=0.0, help="ema: prior x concentration^P.", rich_help_panel=_STATS),
    ] = 2.0,
    stats_balance_measure: Annotated[
        str,
        typer.Option(
            metavar="M",
            help="ema: guard: histogram or runs.",
            rich_help_panel=_STATS,
        ),
    ] = "histogram",
    stats_balance_after: Annotated[
        int,
        typer.Option(metavar="N", min=0, help="ema: guard after N frames.", rich_help_panel=_STATS),
    ] = 0,
    stats_prior_mix: Annotated[
        str,
        typer.Option(metavar="M", help="ema: prior: moment or shrink.", rich_help_panel=_STATS),
    ] = "moment",
) -> None:
    """Stream SOURCE through the engine; select samples, upload them, hot-refit from the cloud.

    Without --cloud it only infers and selects. SIGINT/SIGTERM: stop after this batch, write every output.

    Exit codes: 0 done or stopped, 1 error, 2 bad arguments or model, 3 uploads refused by the cloud.
    """
    from cema_deploy.cli._stop import StopRequested, StopSignals
    from cema_deploy.contract.samples import ENCODINGS
    from cema_deploy.exceptions import CemaError
    from cema_deploy.runtime.backends.registry import get_backend
    from cema_deploy.runtime.edge import EdgeRuntime
    from cema_deploy.runtime.frames.sources import batches_from_source, count_images, labels_from_path
    from cema_deploy.runtime.link.client import CloudClient, is_loopback_url
    from cema_deploy.runtime.predictions import PREDICTION_SUFFIXES, PredictionWriter
    from cema_deploy.runtime.selection.rules import SampleSelector
    from cema_deploy.runtime.stats.adapter import StatsConfig, stats_adapter_from_dir
    from cema_deploy.runtime.stream import StreamTally, serve_stream
    from cema_deploy.runtime.updates.rollback import RollbackConfig

    be: Any = None
    try:  # bad arguments or a model that cannot load: exit 2, nothing started
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
        be = get_backend(
            backend, model_dir, intra_op_threads=threads, max_batch=max_batch or batch, precision=precision
        )
        stats, stats_why = stats_adapter_from_dir(
            be, model_dir, StatsConfig(mode=adapt_stats, alpha=stats_alpha, momentum=stats_momentum,
                                       prior_frames=stats_prior, every=stats_every,
                                       dense_frames=stats_dense_frames, balance_window=stats_balance_window,
                                       balance_power=stats_balance_power, balance_measure=stats_balance_measure,
                                       balance_after=stats_balance_after, prior_mix=stats_prior_mix)
        )  # fmt: skip
        if stats is None and adapt_stats != "off":
            _say(f"warning: --adapt-stats {adapt_stats}: the adapter stays off: {stats_why}.")
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
        rt = EdgeRuntime(
            be,
            SampleSelector(cfg),
            client=client,
            verifier=verifier,
            allow_unsigned=allow_unsigned,
            upload_batch=upload_batch,
            device_id=device_id,
            rollback=RollbackConfig(
                enabled=rollback,
                window=rollback_window,
                margin_ratio=rollback_margin,
                min_samples=min(32, rollback_window),
                hold_frames=rollback_hold,
            ),
            sync=sync,
            sync_timeout_s=sync_timeout,
            recalibrate=recalibrate,
            state_dir=state,
            state_interval_s=state_interval,
            max_spool_bytes=max(1, int(spool_mb * 2**20)),
            min_refit_interval_s=min_refit_interval,
            pin_version=pin_version,
            stats=stats,
        )
    except CemaError as exc:
        if be is not None:
            be.close()
        exc.exit_code = EXIT_USAGE  # type: ignore[attr-defined]  # main() exits with it: bad arguments or model
        raise
    if rt.restored_version:
        _say(f"restored from {state}: serving v{rt.restored_version}")
    if pin_version is not None:
        _say(f"pinned: applying no blob above v{pin_version} (restart without --pin-version to unpin)")
    tally = StreamTally()
    frames: Any = None
    server: Any = None
    error: BaseException | None = None
    writer: PredictionWriter | None = None
    stop = StopSignals()
    finish: dict[str, Any] = {}
    if sync:
        stop.on_stop = rt.cut_waits  # a --sync wait for the cloud must not hold a stop up
    with stop:
        try:
            writer = PredictionWriter(predictions) if predictions is not None else None
            server = _metrics_server(rt, metrics_host, metrics_port) if metrics_port is not None else None
            frames = batches_from_source(source, batch, fps=fps)
            with _live(quiet or not err_console.is_terminal, total) as update:

                def take(it: Any) -> Any:
                    try:
                        with stop.interruptible():
                            return next(it, None)
                    except StopRequested:
                        return None

                def on_batch(step: Any, t: StreamTally) -> None:
                    rt.frames_unreadable = frames.stats.unreadable
                    if rt.sync_timeouts > on_batch.timeouts and not stop.requested:  # type: ignore[attr-defined]
                        _say(f"warning: --sync waited {sync_timeout:g} s for the cloud; going on.")
                    on_batch.timeouts = rt.sync_timeouts  # type: ignore[attr-defined]
                    update(len(step.predictions), rt.metrics(), t.correct / t.labelled if t.labelled else None)

                on_batch.timeouts = 0  # type: ignore[attr-defined]
                serve_stream(rt, frames, writer=writer, labels=y, should_stop=lambda: stop.requested is not None,
                             next_batch=take, on_batch=on_batch, tally=tally)  # fmt: skip
            if stop.requested:
                _say(f"{stop.requested}: stopped after {tally.frames} frames; writing the outputs")
            finish = _finish_uplink(rt, stop, state, flush_timeout)
        except CemaError as exc:  # the outputs of the frames served are still written below
            error = exc
        finally:
            if frames is not None:
                rt.frames_unreadable = frames.stats.unreadable
                frames.close()
            if not finish:
                finish = _finish_uplink(rt, None, state, 0.0)
            metrics = rt.metrics()
            if server is not None:
                server.close()
            rt.close()
            be.close()
            if writer is not None:
                writer.close()
    metrics.update(finish)
    metrics["source"] = frames.stats.as_dict() if frames is not None else None
    metrics["wall_s"] = tally.wall_s
    metrics["selection_config"] = cfg.describe()
    if stats is None and adapt_stats != "off":
        metrics["stats"]["off_because"] = stats_why
    metrics["stopped_by"] = stop.requested
    metrics["run"] = {**tally.as_dict(), "busy_fps": metrics["fps"]}
    if y is not None and tally.labelled:
        metrics["accuracy"] = tally.correct / tally.labelled
    refused = finish.get("undelivered_refused", 0) > 0
    metrics["exit_code"] = EXIT_REFUSED if refused else EXIT_ERROR if error is not None else EXIT_OK
    if json_out == "-":
        typer.echo(json.dumps(metrics, indent=2))
    elif json_out is not None:
        path = Path(json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics, indent=2) + "\n")
    _summary(metrics, tally, to_stderr=json_out == "-")
    if refused:
        r = finish["refusal"]
        _say(f"error: the cloud refused this device ({r['status']}): {r['advice']}. "
             f"{finish['undelivered']} samples were not delivered: {finish['undelivered_note']}.",
             style="red")  # fmt: skip
        sys.exit(EXIT_REFUSED)
    if error is not None:
        raise error


def _say(msg: str, style: str | None = None) -> None:
    """One line on stderr that survives a pipe and any width (no wrapping, no markup, no cropping)."""
    err_console.print(msg, style=style, soft_wrap=True, markup=False, highlight=False)


def _finish_uplink(rt: Any, stop: Any, state: Path | None, timeout: float) -> dict[str, Any]:
    """Give the cloud up to ``timeout`` seconds for what is queued (5 s at most after a stop signal, none when
    the cloud is unreachable and a spool keeps it, none while the cloud refuses this device), say what is left
    and where, and return it for the JSON."""
    up = rt.uplink
    if up is None:
        return {"exit_flush_s": 0.0, "undelivered": 0, "undelivered_refused": 0, "lost": 0, "undelivered_note": ""}
    t0 = time.monotonic()
    limit = min(timeout, 5.0) if stop is not None and stop.requested else timeout
    conn = rt.connectivity
    unreachable = conn is not None and conn.up is False
    up.cut_flush(False)  # a stop cut the --sync waits; this last one is bounded by ``limit``
    if limit > 0 and up.refusal is None and not (unreachable and up.spool is not None):
        from cema_deploy.cli._stop import StopRequested

        try:
            with stop.interruptible(after_stop=True) if stop is not None else _nothing():
                if not up.flush(min(1.0, limit)) and up.refusal is None:
                    waiting = up.queued_now
                    if waiting:
                        _say(f"waiting up to {limit:.0f} s for the cloud to take {waiting} queued samples "
                             "(Ctrl-C: stop waiting)")  # fmt: skip
                    up.flush(max(0.0, limit - (time.monotonic() - t0)))
        except StopRequested:
            pass
    waited = time.monotonic() - t0
    left = up.queued_now
    where = f"in the spool {up.spool.directory}, sent by the next run" if up.spool is not None else "lost: no --state"
    refusal = rt.cloud_refusal()
    out: dict[str, Any] = {
        "exit_flush_s": waited,
        "undelivered": left,
        "undelivered_where": "spool" if up.spool is not None else "lost",
        "undelivered_note": where,
        "undelivered_refused": left + up.reports_queued if refusal is not None else 0,
        "lost": left if up.spool is None else 0,
        "refusal": refusal,
    }
    if left and refusal is None:
        why = "the cloud is unreachable" if unreachable else f"not taken within {waited:.0f} s"
        _say(f"warning: {left} samples were not uploaded ({why}): {where}.")
    return out


@contextlib.contextmanager
def _nothing() -> Any:
    yield


def _summary(m: dict[str, Any], t: Any, *, to_stderr: bool) -> None:
    """One line: this run's numbers, each with its base."""
    s = m["selection"]
    busy = f"busy {m['fps']:.0f}"
    parts = [
        f"this run: {t.frames} frames in {t.wall_s:.1f} s, served {t.as_dict()['served_fps']:.1f} frames/s ({busy})",
        f"selected {t.as_dict()['selected_pct']:.1f}% (unreliable {s['unreliable']}, low-info {s['low_info']}, "
        f"redundant {s['redundant']} since the selector started)",
        f"uploaded {m['uploaded_pct']:.1f}%",
        f"parameter version {m['version']}",
        f"blobs applied {m['blobs_applied']}",
        f"refused {sum(m['refused'].values())}",
        f"rollbacks {m['rollbacks']}",
        f"mean entropy {m['mean_entropy']:.3f}",
    ]
    if (m.get("stats") or {}).get("mode", "off") != "off":
        parts.append(f"statistics {m['stats']['mode']} (local generation {m['stats'].get('local_generation', 0)})")
    if m.get("accuracy") is not None:
        parts.append(f"accuracy {100 * m['accuracy']:.2f}%")
    if m.get("frames_unreadable"):
        parts.append(f"unreadable frames skipped {m['frames_unreadable']}")
    if m.get("restored_version") or s.get("seen", 0) > t.frames:
        parts.append(f"since --state: selected {m['selected_pct']:.1f}% of {s.get('seen', 0)}")
    line = ", ".join(parts)
    (err_console if to_stderr else console).print(line, soft_wrap=True, markup=False, highlight=False)


def _warn_unsigned(cloud: str, allow_unsigned: bool, loopback: bool) -> None:
    if loopback or allow_unsigned:
        _say(
            f"warning: no --public-key: blobs from {cloud} are applied UNSIGNED; whoever can answer for that address "
            "can change this model. Give the edge the cloud's public key (`cema-deploy keys new`, --public-key)."
        )
    else:
        _say(
            f"warning: no --public-key and {cloud} is not on a loopback address: every blob will be refused. "
            "Pass --public-key (recommended) or --allow-unsigned."
        )


def _metrics_server(rt: Any, host: str, port: int) -> Any:
    from cema_deploy.runtime.metrics import MetricsServer, prometheus_text

    server = MetricsServer(lambda: prometheus_text(rt.metrics(), rt.latency), host=host, port=port)
    _say(f"metrics on {server.url}")
    return server


class _live:
    """A rich live line on a terminal, short enough for 80 columns: served frames/s, % uploaded (this run),
    parameter version, mean entropy (and accuracy with labels). Off when stderr is not a terminal."""

    def __init__(self, quiet: bool, total: int | None) -> None:
        self.quiet, self.total = quiet, total
        self.progress: Any = None

    def __enter__(self) -> Any:
        if self.quiet:
            return lambda n, m, acc: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("edge"),
            BarColumn(bar_width=10),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=err_console,
        )
        self.progress.__enter__()
        task = self.progress.add_task("", total=self.total)

        def update(n: int, m: dict[str, Any], acc: float | None) -> None:
            desc = (
                f"{m['wall_fps']:.0f} fps | up {m['uploaded_pct']:.1f}% | v{m['version']} | H {m['mean_entropy']:.2f}"
                + (f" | acc {100 * acc:.1f}%" if acc is not None else "")
            )
            self.progress.update(task, advance=n, description=desc)

        return update

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)
