"""``cema-deploy bench DIR``: FPS and latency per backend and batch size, ratios, and hot-refit cost."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

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
    from cema_deploy.bench import run_bench

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
    print_report(report)
    if json_file is not None:
        json_file.parent.mkdir(parents=True, exist_ok=True)
        json_file.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"wrote {json_file}")


def print_report(report: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title=f"{report['model']} — throughput (img/s) and latency (ms)")
    for col in ("backend", "engine", "batch", "img/s", "p50", "p90", "p99"):
        t.add_column(col, justify="right" if col not in ("backend", "engine") else "left")
    for r in report["rows"]:
        t.add_row(
            r["backend"],
            r["engine"],
            str(r["batch"]),
            f"{r['throughput']:.1f}",
            f"{r['p50_ms']:.2f}",
            f"{r['p90_ms']:.2f}",
            f"{r['p99_ms']:.2f}",
        )
    console.print(t)
    rt = Table(title="Ratios, same run: mean throughput (median-latency throughput)")
    for col in ("backend", "batch", "refittable / folded", "edge step / bare", "torch eager / refittable"):
        rt.add_column(col, justify="right" if col != "backend" else "left")

    def cell(r: dict[str, Any], key: str) -> str:
        mean, p50 = r.get(key), r.get(key + "_p50")
        return "n/a" if mean is None else f"{mean:.3f} ({p50:.3f})" if p50 is not None else f"{mean:.3f}"

    for r in report["ratios"]:
        rt.add_row(
            r["backend"],
            str(r["batch"]),
            *(cell(r, k) for k in ("refittable_vs_folded", "edge_step_vs_bare", "torch_eager_vs_refittable")),
        )
    console.print(rt)
    for r in report["refit"]:
        tg = r["targets"]
        console.print(
            f"[bold]refit[/] {r['backend']} ({r['refit_path']}, median of {r['repeats']}): blob {r['blob_bytes']:,} B, "
            f"version {r['version'][0]} -> {r['version'][1]}, received->serving {r['received_to_serving_ms']:.0f} ms "
            f"(parse {r['parse_ms']:.1f}, validate {r['validate_ms']:.1f}, build {r['build_ms']:.0f}, warm-up "
            f"{r['warmup_ms']:.0f}) vs idle plain build {r['idle_build_ms']:.0f} ms "
            f"(x{tg['serving_vs_idle_build']:.2f}); "
            f"first response with the new version {r['received_to_first_new_response_ms']:.0f} ms "
            f"(x{tg['first_new_vs_build_plus_p99']:.2f} of build + warm-up + steady p99; it took "
            f"{r['first_new_response_latency_ms']:.0f} ms); {r['requests_during_refit']:.0f} requests during it, "
            f"{r['failed_requests']} failed; throughput {r['throughput_during_refit']} vs steady "
            f"{r['steady_throughput']} img/s; max latency {r['max_latency_during_refit_ms']:.1f} ms vs steady p99 "
            f"{r['steady_p99_ms']:.1f} ms (x{tg['max_latency_vs_steady_p99']:.2f})"
        )
    s = report.get("sustained_refit")
    if s:
        console.print(
            f"[bold]sustained refits[/] {s['backend']} ({s['refit_path']}): {s['seconds']:.0f} s, a blob every "
            f"{s['refit_every_s']:g} s: {s['refits']} applied, {s['refits_coalesced']} coalesced, "
            f"{s['refits_failed']} failed; {s['failed_requests']} of {s['requests']} requests failed; throughput "
            f"{s['throughput']} vs steady {s['steady_throughput']} img/s (x{s['throughput_ratio']}); p99 "
            f"{s['p99_ms']:.1f} vs steady {s['steady_p99_ms']:.1f} ms; RSS {s['rss_after_10s_mb']:.0f} MB after "
            f"10 s, {s['rss_mb']:.0f} MB at the end ({s['rss_growth_pct']:+.1f} %)"
        )
        iv = s.get("interleaved") or {}
        console.print(
            f"[bold]sustained refits[/] applied {s['refits_applied_per_s']}/s of {s['refits_offered_per_s']}/s "
            f"offered; throughput by CPU time x{s['throughput_ratio_cpu']}; interleaved windows with/without "
            f"refits ({iv.get('pairs')} pairs): x{iv.get('throughput_ratio_wall')} wall, "
            f"x{iv.get('throughput_ratio_cpu')} CPU"
        )
