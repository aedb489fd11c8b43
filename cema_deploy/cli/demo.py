"""``cema-deploy demo``: the whole CEMA loop on a corrupted digits stream, compared with the alternatives."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cema_deploy.cli._console import console, step_progress


def demo_cmd(
    out: Annotated[Path, typer.Option(help="Output directory: results.json/.md, plots, logs.")] = Path("out/demo"),
    quick: Annotated[
        bool, typer.Option(help="4 corruptions x 300 samples, models trained 4/8 epochs (about 2 min).")
    ] = False,
    severity: Annotated[str, typer.Option(help="Comma-separated ImageNet-C severities.")] = "3,5",
    edge: Annotated[
        str | None, typer.Option(help="Edge model: a timm name to train, or NAME=CHECKPOINT (default resnet10t).")
    ] = None,
    teacher: Annotated[
        str | None, typer.Option(help="Teacher: a timm name to train, or NAME=CHECKPOINT (default resnet18).")
    ] = None,
    methods: Annotated[
        str, typer.Option(help="Comma-separated subset of no_adapt,bn_adapt,tent,eata_style,cema.")
    ] = "no_adapt,bn_adapt,tent,eata_style,cema",
    warmup: Annotated[int | None, typer.Option(help="W: samples before CEMA's E_max adapts (default 512).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the split, training and corruptions.")] = 0,
    sync: Annotated[bool, typer.Option(help="Edge waits for each blob (reproducible on slow machines).")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print results.json to stdout.")] = False,
) -> None:
    """Run CEMA end to end on ImageNet-C corruptions of scikit-learn's digits (no download).

    Trains (once, cached) a small edge ResNet and a stronger teacher, exports the edge model, then for each
    severity streams the 13 corruptions in sequence through: no adaptation, BN statistics adaptation, Tent
    (backprop at the edge), EATA-style selection and CEMA. The last two run a real cloud service on 127.0.0.1
    and a separate torch-free edge process that uploads selected samples and hot-refits from the blobs.
    Writes results.json, results.md and stream_severity*.png under OUT.
    """
    import json

    from cema_deploy.demo.report import print_table, write_outputs
    from cema_deploy.demo.run import DemoConfig, run_demo

    base = DemoConfig.quick() if quick else DemoConfig()
    cfg = DemoConfig(
        **{
            **base.__dict__,
            "severities": tuple(int(s) for s in severity.split(",")),
            "methods": tuple(m.strip() for m in methods.split(",")),
            "seed": seed,
            "sync": sync,
            **({"warmup": warmup} if warmup is not None else {}),
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    with step_progress(quiet=json_out) as on_step:
        results, runs = run_demo(out, cfg, edge=edge, teacher=teacher, on_step=on_step)
    paths = write_outputs(results, runs, out)
    if json_out:
        print(json.dumps(results, indent=2))
        return
    print_table(results, console)
    console.print(
        f"edge {results['models']['edge']['name']} (clean {results['models']['edge']['clean_accuracy']:.1f}%)"
        f", teacher {results['models']['teacher']['name']} "
        f"(clean {results['models']['teacher']['clean_accuracy']:.1f}%), {results['seconds']:.0f} s"
    )
    for p in paths:
        console.print(f"wrote {p}")
