"""``cema-deploy cloud``: run the CEMA adaptation service and manage device tokens."""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from cema_deploy.cli._console import console, err_console

cloud_app = typer.Typer(
    help="The CEMA cloud: adaptation service (serve) and device tokens (token).", no_args_is_help=True
)
token_app = typer.Typer(
    help="Per-device bearer tokens (stored as SHA-256 hashes in the state directory).", no_args_is_help=True
)
cloud_app.add_typer(token_app, name="token")


@cloud_app.command("serve")
def serve_cmd(
    edge: Annotated[
        Path, typer.Option("--edge", help="Export directory of the edge model (from `cema-deploy export`).")
    ],
    teacher: Annotated[str, typer.Option(help="timm name of the foundation (teacher) model.")] = "resnet101",
    teacher_weights: Annotated[
        Path | None, typer.Option(help="Local state dict (.safetensors/.pt) for the teacher.")
    ] = None,
    state: Annotated[Path, typer.Option(help="State directory (created; resumed after a restart).")] = Path(
        "cema-state"
    ),
    host: Annotated[str, typer.Option(help="Address to bind; 127.0.0.1 keeps the service local.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0 = any free port; see --port-file).")] = 8750,
    port_file: Annotated[Path | None, typer.Option(help="Write the bound port here once the service is ready.")] = None,
    batch_size: Annotated[int, typer.Option(help="B: uploaded samples per adaptation step.")] = 32,
    publish_every: Annotated[int, typer.Option(help="K: publish a refit blob after every K steps.")] = 1,
    replay_size: Annotated[int, typer.Option(help="Replay buffer size in samples (paper: 10,000).")] = 10_000,
    student_lr: Annotated[
        float | None, typer.Option(help="SGD lr of the edge replica's distillation step (default: the paper's 2.5e-3).")
    ] = None,
    teacher_lr: Annotated[
        float | None, typer.Option(help="SGD lr of the teacher's weighted-entropy step (default: the paper's 2.5e-4).")
    ] = None,
    idle_after: Annotated[
        float, typer.Option(help="Seconds without uploads before an idle replay step (0 = off).")
    ] = 0.0,
    max_upload_bytes: Annotated[int, typer.Option(help="Largest accepted upload body.")] = 16 * 1024 * 1024,
    signing_key: Annotated[
        Path | None, typer.Option(help="Ed25519 private key (`cema-deploy keys new`) to sign blobs.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of replay sampling (drawn per step, so restarts repeat it).")] = 0,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0 = torch's default).")] = 0,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve CEMA for one edge model: accept selected samples, adapt, publish refit blobs."""
    import torch
    import uvicorn

    from cema_deploy.cloud.config import CemaConfig
    from cema_deploy.cloud.models import replica_from_export, teacher_from_name
    from cema_deploy.cloud.service import create_app
    from cema_deploy.cloud.worker import AdaptationService
    from cema_deploy.contract.manifest import manifest_from_dir

    if threads > 0:
        torch.set_num_threads(threads)
    manifest = manifest_from_dir(edge)
    if teacher_weights is None:
        err_console.print(
            f"[yellow]warning:[/] teacher {teacher} is randomly initialised (no --teacher-weights); "
            "adaptation will distil noise."
        )
    signer = None
    if signing_key is not None:
        import functools

        from cema_deploy.contract.signing import load_private_key, sign_blob

        signer = functools.partial(sign_blob, private_key=load_private_key(signing_key))
    config = CemaConfig(
        batch_size=batch_size, publish_every=publish_every, idle_after_s=idle_after, seed=seed, replay_size=replay_size
    )
    if student_lr is not None:
        config = dataclasses.replace(config, student_lr=student_lr)
    if teacher_lr is not None:
        config = dataclasses.replace(config, teacher_lr=teacher_lr)
    service = AdaptationService(
        state,
        manifest,
        teacher_from_name(teacher, num_classes=manifest.num_classes, weights=teacher_weights),
        replica_from_export(edge, manifest),
        config=config,
        signer=signer,
    )
    app = create_app(service, max_upload_bytes=max_upload_bytes)
    # The adaptation thread runs many short torch ops that hold the GIL; a shorter switch interval (default 5 ms)
    # lets the event loop answer blob polls between them (benchmarks/load.py: poll p99 under load).
    sys.setswitchinterval(0.0005)

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:  # SIGTERM / SIGINT
            service.closing = True  # long polls answer 204 at once; the worker stops after its current step
            super().handle_exit(sig, frame)

    server = _Server(
        uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, timeout_graceful_shutdown=5)
    )

    def announce() -> None:
        while not server.started and not server.should_exit:
            threading.Event().wait(0.05)
        if server.started:
            bound = server.servers[0].sockets[0].getsockname()[1]
            if port_file is not None:  # written whole (tmp + rename): a reader never sees half a number
                tmp = port_file.with_name(port_file.name + ".tmp")
                tmp.write_text(str(bound))
                tmp.replace(port_file)
            console.print(
                f"cema-deploy cloud serving {manifest.model_name} ({manifest.fingerprint[:16]}) at "
                f"http://{host}:{bound} (state {state}, blob version {service.version})",
                soft_wrap=True,
            )

    logging.basicConfig(level=log_level.upper())
    service.start()
    threading.Thread(target=announce, daemon=True).start()
    # uvicorn handles SIGINT/SIGTERM while serving and re-raises them to the previous handlers once it has shut
    # down; with these no-op handlers the re-raise returns, the worker saves its step and the command exits 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda _sig, _frame: None)
    try:
        server.run()
    finally:
        service.stop()
    err_console.print(f"cema-deploy cloud stopped at blob version {service.version}; state kept in {state}")


@token_app.command("add")
def token_add_cmd(
    device: Annotated[str, typer.Argument(help="Device id, e.g. cam-01.")],
    state: Annotated[Path, typer.Option(help="State directory of the service.")] = Path("cema-state"),
) -> None:
    """Create a bearer token for DEVICE and print it once (only its hash is stored)."""
    from cema_deploy.cloud.state import StateStore

    token = StateStore(state).add_token(device)
    console.print(f"token for {device} (shown once; a running service picks it up on first use):")
    print(token)


@token_app.command("list")
def token_list_cmd(
    state: Annotated[Path, typer.Option(help="State directory of the service.")] = Path("cema-state"),
) -> None:
    """List the devices that hold a token."""
    from cema_deploy.cloud.state import StateStore

    for device in StateStore(state).devices():
        print(device)
