"""``cema-deploy bench DIR``: FPS and latency per backend and batch size, ratios, and hot-refit cost."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cema_deploy.cli._console import console, step_progress


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers such as 1,8,32, got {text!r}") from None
    if not values or min(values) < 1:
        raise typer.BadParameter(f"batch sizes must be >= 1, got {text!r}")
    return values


def bench_cmd(
    model_dir: Annotated[Path, typer.Argument(help="A directory written by `cema-deploy export`.")],
    batch: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8,32",
    backend: Annotated[
        str | None,
        typer.Option(help="Comma-separated backends: ort-cpu, ort-cuda, ort-trt, trt (default: all available here)."),
    ] = None,
    rounds: Annotated[int, typer.Option(help="Interleaved measurement rounds per engine.")] = 3,
    seconds: Annotated[float, typer.Option(help="Seconds per engine per round (warm-up excluded).")] = 1.0,
    refit: Annotated[bool, typer.Option(help="Also time a hot refit under load.")] = True,
    torch_eager: Annotated[
        bool, typer.Option("--torch/--no-torch", help="Compare with PyTorch eager if installed.")
    ] = True,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Write the full report as JSON to this file.")
    ] = None,
    max_batch: Annotated[
        int | None,
        typer.Option(min=1, help="TensorRT engines' largest batch (trt, ort-trt; default: the largest --batch)."),
    ] = None,
    precision: Annotated[
        str | None, typer.Option(help="trt: fp32 (TF32 off), tf32 or fp16; ort-trt: fp32 or fp16 (default fp32).")
    ] = None,
    refit_path: Annotated[
        str,
        typer.Option(
            help="ort-cpu/ort-cuda: how a refit reaches the engine: auto, hybrid, inplace or prepared (ORT CPU), "
            "or plain (see the docs)."
        ),
    ] = "auto",
    spinning: Annotated[
        bool,
        typer.Option(
            "--spinning/--no-spinning",
            help="Let ONNX Runtime's intra-op threads spin-wait between operators (ORT's own default; off here).",
        ),
    ] = False,
    refit_repeats: Annotated[
        int, typer.Option(min=1, help="Hot refits timed under load (figures are medians over them).")
    ] = 3,
    sustained_refit: Annotated[
        float,
        typer.Option(
            metavar="SECONDS", min=0, help="Also refit continuously for this long (0 = off), through RefitScheduler."
        ),
    ] = 0.0,
    refit_every: Annotated[
        float, typer.Option(metavar="S", min=0.01, help="With --sustained-refit: a new blob every S seconds.")
    ] = 1.0,
    min_refit_interval: Annotated[
        float, typer.Option(metavar="S", min=0, help="With --sustained-refit: pause between two builds.")
    ] = 0.0,
) -> None:
    """Measure throughput (images/s) and latency p50/p90/p99 of an export per backend and batch size.

    In the same run, as ratios: the refittable engine against the BN-folded reference export (export with
    --folded-reference to get it), the full edge step (inference + entropy + selection) against bare
    inference, and PyTorch eager when torch is installed. Then hot refits are timed from blob received to new
    parameters serving while inference keeps running, counting failed requests, against an idle plain session
    build timed in the same run. --sustained-refit S refits every --refit-every seconds for S seconds and
    reports throughput and p99 against steady, failed requests and RSS.
    """
    from cema_deploy.bench import print_report, run_bench

    with step_progress() as on_step:
        report = run_bench(
            model_dir,
            backends=backend.split(",") if backend else None,
            batches=_ints(batch),
            rounds=rounds,
            seconds_per_round=seconds,
            refit=refit,
            torch_eager=torch_eager,
            progress=on_step,
            max_batch=max_batch,
            precision=precision,
            refit_repeats=refit_repeats,
            sustained_refit_s=sustained_refit,
            refit_every_s=refit_every,
            min_refit_interval_s=min_refit_interval,
            backend_options={"refit_path": refit_path, "allow_spinning": spinning},
        )
    print_report(report, console)
    if json_file is not None:
        json_file.parent.mkdir(parents=True, exist_ok=True)
        json_file.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"wrote {json_file}")
