"""The ``cema-deploy`` command line. Each command lives in its own module and imports heavy packages inside
its body, so ``--help`` works on an edge-only install."""

from __future__ import annotations

import sys

import typer

from cema_deploy import __version__
from cema_deploy.cli import export as _export
from cema_deploy.cli import inspect as _inspect
from cema_deploy.exceptions import CemaError

app = typer.Typer(
    name="cema-deploy",
    help=(
        "Cloud-edge elastic model adaptation (CEMA) for edge deployments: export a timm model to a refittable "
        "ONNX engine, run it at the edge with hot refit, and adapt it from a cloud service."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("export")(_export.export_cmd)
app.command("inspect")(_inspect.inspect_cmd)
for _name, _module, _attr in (
    ("bench", "cema_deploy.cli.bench", "bench_cmd"),
    ("demo", "cema_deploy.cli.demo", "demo_cmd"),
):
    try:
        _mod = __import__(_module, fromlist=[_attr])
    except ModuleNotFoundError as _exc:
        if _exc.name != _module:
            raise
    else:
        app.command(_name)(getattr(_mod, _attr))
for _name, _module, _attr in (
    ("cloud", "cema_deploy.cli.cloud", "cloud_app"),
    ("edge", "cema_deploy.cli.edge", "edge_app"),
    ("keys", "cema_deploy.cli.keys", "keys_app"),
):
    try:
        _mod = __import__(_module, fromlist=[_attr])
    except ModuleNotFoundError as _exc:
        if _exc.name != _module:
            raise
    else:
        app.add_typer(getattr(_mod, _attr), name=_name)


@app.callback(invoke_without_command=True)
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit()


def main() -> None:
    """Entry point of the ``cema-deploy`` console script: a CemaError is one message and exit status 1 (or the
    ``exit_code`` a command set on it)."""
    try:
        # standalone_mode=False: click returns a typer.Exit's code instead of exiting (click core.py BaseCommand.main)
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except CemaError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        sys.exit(getattr(exc, "exit_code", 1))  # a command may mark bad input (2, edge run's exit codes)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("Aborted.", err=True)
        sys.exit(130)
    except Exception as exc:  # click usage errors and the like
        import click

        # typer >= 0.26 raises its own vendored click's exceptions: recognise them by their interface
        show = getattr(exc, "show", None)
        if isinstance(exc, click.ClickException) or (callable(show) and hasattr(exc, "exit_code")):
            assert show is not None
            show()
            sys.exit(getattr(exc, "exit_code", 2))
        raise
