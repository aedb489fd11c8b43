"""``cema-deploy demo``: the whole CEMA loop on a corrupted digits stream, compared with the alternatives."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cema_deploy.cli._console import console, step_progress


def demo_cmd(
    out: Annotated[Path, typer.Option(help="Output directory: results.json/.md, plots, logs.")] = Path("out/demo"),
    quick: Annotated[
        bool, typer.Option(help="4 corruptions x 300 samples, models trained 4/8 epochs (2.5-5 min on 2 cores).")
    ] = False,
    protocol: Annotated[
        str,
        typer.Option(
            help="reset: the paper's (fresh adaptation state and selector per corruption, via the cloud's reset); "
            "continual: the corruptions back to back (our extension)."
        ),
    ] = "reset",
    severity: Annotated[str, typer.Option(help="Comma-separated ImageNet-C severities.")] = "3,5",
    seeds: Annotated[
        int, typer.Option(min=1, help="Stream seeds (corruption draw, shuffle, selection and replay draws).")
    ] = 1,
    seed: Annotated[int, typer.Option(help="The first stream seed.")] = 0,
    train_seed: Annotated[int, typer.Option(help="Seed of the split and of the models' training.")] = 0,
    edge: Annotated[
        str | None, typer.Option(help="Edge model: a timm name to train, or NAME=CHECKPOINT (default resnet10t).")
    ] = None,
    teacher: Annotated[
        str | None, typer.Option(help="Teacher: a timm name to train, or NAME=CHECKPOINT (default resnet18).")
    ] = None,
    methods: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated subset of no_adapt, bn_adapt, tent, eata_style, cema, cema_recal, random, "
            "entropy_top, lead (uploads where the cloud's teacher disagrees), edge_stats (the edge alone with its own "
            "statistics, no cloud; edge_stats_ema, "
            "edge_stats_alpha pin the mode), RULE+stats (a cloud rule with the edge's statistics on: random+stats, "
            "cema+stats, eata_style+stats, entropy_top+stats, cema_recal+stats) (default: "
            "no_adapt,bn_adapt,tent,eata_style,cema,random; continual adds cema_recal)."
        ),
    ] = None,
    share: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Upload share of the random (default), entropy_top and lead rules.")
    ] = 0.1,
    warmup: Annotated[
        int | None, typer.Option(help="W: samples before CEMA's E_max adapts (default 128 reset, 512 continual).")
    ] = None,
    sync: Annotated[bool, typer.Option(help="Edge waits for each blob (reproducible on slow machines).")] = True,
    edge_batch: Annotated[
        int,
        typer.Option(
            min=1,
            help="Frames per edge batch (1 = a camera; bn_adapt and tent need batch statistics: skipped below 2; "
            "--frontier also skips the rules without the edge's statistics there: no calibration batch of one frame).",
        ),
    ] = 64,
    stream: Annotated[
        str,
        typer.Option(
            help="shuffled (within each corruption, the paper's) or sorted (grouped by class within each corruption: "
            "the label-correlated stream of a camera watching one class for a while). Also for --frontier."
        ),
    ] = "shuffled",
    frontier: Annotated[
        bool,
        typer.Option(
            help="Instead: sweep the uploaded share of every rule (in-process, no HTTP) and write frontier.json/png; "
            "--protocol both runs both protocols. Hours on 2 cores for 3 seeds."
        ),
    ] = False,
    rules: Annotated[
        str,
        typer.Option(
            help="--frontier: comma-separated rules (cema, eata_style, random, entropy_top, lead, cema_stats; "
            "RULE+stats "
            "with the edge's statistics on, e.g. random+stats; edge_stats: the edge alone, the plot's 0 % point)."
        ),
    ] = "edge_stats,cema,eata_style,random,entropy_top,cema_stats",
    workers: Annotated[int, typer.Option(min=1, help="--frontier: runs at once (one core each).")] = 2,
    sweep: Annotated[
        str | None,
        typer.Option(
            help="--frontier: knob values per rule instead of the built-in sweep, e.g. 'random=0.05,0.2;cema=1' "
            "(cema/cema_stats: upload budget, 1 = none; eata_style: E_0 / ln C; random/entropy_top/lead: share)."
        ),
    ] = None,
    diagnose: Annotated[
        bool,
        typer.Option(
            help="--frontier: record per corruption the teacher's, replica's and edge's accuracy on the uploaded "
            "frames and audit every rollback verdict with the labels (frontier_runs.jsonl)."
        ),
    ] = False,
    cloud_set: Annotated[
        list[str] | None,
        typer.Option(
            help="--frontier: a CemaConfig field for every cloud-backed run, KEY=VALUE (repeatable), e.g. "
            "student_steps=4, gate=true (recorded in frontier.json)."
        ),
    ] = None,
    cloud_preset: Annotated[
        str,
        typer.Option(
            help="The cloud's settings: 'auto' (the paper's methods cema, eata_style, cema_recal with the paper's "
            "settings, the toolkit's rules with its defaults), 'default' (issue 22's measured levers for every "
            "method) or 'cema' (the paper's for every method). --frontier: auto means default; --cloud-set overrides."
        ),
    ] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print results.json to stdout.")] = False,
    refit: Annotated[
        str,
        typer.Option(
            help="What the edge export's refit carries: norms (the paper's) or head (also the classifier, beyond "
            "the paper: `cema-deploy export --refit head`)."
        ),
    ] = "norms",
) -> None:
    """Run CEMA end to end on ImageNet-C corruptions of scikit-learn's digits (no download).

    By default: the reset protocol (the paper's), severities 3 and 5, one seed. It trains (once, cached) a small
    edge ResNet and a stronger teacher, exports the edge model, then for each severity streams the 13
    corruptions through no adaptation, BN statistics adaptation, Tent (backprop at the edge), and the
    cloud-backed rules: EATA-style selection, CEMA, and random uploads (the toolkit's default rule). Cloud-backed
    rules run a real cloud service on 127.0.0.1 and separate torch-free edge processes that upload and
    hot-refit; under the reset protocol the operator's reset starts every corruption afresh. Writes
    results.json, results.md and stream_severity*.png under OUT. --seeds N reports means and spreads.
    """
    import json

    from cema_deploy.demo.report import print_table, write_outputs
    from cema_deploy.demo.run import DEFAULT_METHOD, DemoConfig, run_demo

    if frontier:
        from cema_deploy.cloud.config import CEMA_PRESETS, parse_method_settings
        from cema_deploy.demo.frontier import parse_sweep, run_frontier
        from cema_deploy.demo.run import DEFAULT_METHOD, check_cloud_preset

        check_cloud_preset(cloud_preset)
        cloud_preset = "default" if cloud_preset == "auto" else cloud_preset  # one cloud for every rule compared

        protocols = ("reset", "continual") if protocol == "both" else (protocol,)
        with step_progress(quiet=json_out) as on_step:
            paths = run_frontier(
                out,
                rules=[r.strip() for r in rules.split(",")],
                protocols=protocols,
                severities=[int(x) for x in severity.split(",")],
                seeds=range(seed, seed + seeds),
                default=DEFAULT_METHOD,
                workers=workers,
                train_seed=train_seed,
                sweep=parse_sweep(sweep) if sweep else None,
                on_step=on_step,
                diagnose=diagnose,
                refit=refit,
                cloud=CEMA_PRESETS[cloud_preset] | parse_method_settings(cloud_set or []),
                edge_batch=edge_batch,
                stream_order=stream,
                edge=edge,
                teacher=teacher,
            )
        for p in paths:
            console.print(f"wrote {p}")
        return
    chosen = methods.split(",") if methods is not None else None
    if chosen is None:
        chosen = ["no_adapt", "bn_adapt", "tent", "eata_style", "cema", DEFAULT_METHOD]
        if protocol == "continual":
            chosen.insert(5, "cema_recal")
    options: dict[str, Any] = {
        "severities": tuple(int(s) for s in severity.split(",")),
        "methods": tuple(dict.fromkeys(m.strip() for m in chosen)),
        "protocol": protocol,
        "seeds": seeds,
        "seed": seed,
        "train_seed": train_seed,
        "share": share,
        "sync": sync,
        "edge_batch": edge_batch,
        "stream_order": stream,
        "refit": refit,
        "cloud_preset": cloud_preset,
        **({"warmup": warmup} if warmup is not None else {}),
    }
    cfg = DemoConfig.quick(**options) if quick else DemoConfig(**options)
    out.mkdir(parents=True, exist_ok=True)
    with step_progress(quiet=json_out) as on_step:
        results, runs, boundaries = run_demo(out, cfg, edge=edge, teacher=teacher, on_step=on_step)
    paths = write_outputs(results, runs, out, boundaries)
    if json_out:
        print(json.dumps(results, indent=2))
        return
    print_table(results, console)
    console.print(
        f"{protocol} protocol, seeds {results['seeds']}; edge {results['models']['edge']['name']} (clean "
        f"{results['models']['edge']['clean_accuracy']:.1f}%), teacher {results['models']['teacher']['name']} "
        f"(clean {results['models']['teacher']['clean_accuracy']:.1f}%), {results['seconds']:.0f} s"
    )
    for p in paths:
        console.print(f"wrote {p}")
