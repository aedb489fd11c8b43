"""``cema-deploy cloud``: run the CEMA adaptation service, manage tokens, and the operator's controls."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from cema_deploy.cli._console import console, err_console
from cema_deploy.exceptions import CemaError

cloud_app = typer.Typer(
    help=(
        "The CEMA cloud: the adaptation service (serve), bearer tokens (token) and the operator's controls "
        "(status, publish, pin, unpin, freeze, unfreeze, reset)."
    ),
    no_args_is_help=True,
)
token_app = typer.Typer(
    help="Bearer tokens of devices and operators (stored as SHA-256 hashes in the service state directory).",
    no_args_is_help=True,
)
cloud_app.add_typer(token_app, name="token")

_STATE_HELP = "Service state directory (tokens.json, deployments/NAME/...; created; resumed after a restart)."


@cloud_app.command("serve")
def serve_cmd(
    config: Annotated[
        Path | None, typer.Option(help="cloud.toml with one [deployments.NAME] table per deployment.")
    ] = None,
    edge: Annotated[
        Path | None,
        typer.Option(help="One-deployment shorthand: export directory of the edge model (`cema-deploy export`)."),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Deployment name with --edge (default: the model name).")] = None,
    teacher: Annotated[str, typer.Option(help="timm name of the foundation (teacher) model.")] = "resnet101",
    teacher_weights: Annotated[
        Path | None, typer.Option(help="Local state dict (.safetensors/.pt) for the teacher.")
    ] = None,
    state: Annotated[Path | None, typer.Option(help=_STATE_HELP + " Default: cema-state.")] = None,
    host: Annotated[str | None, typer.Option(help="Address to bind (default 127.0.0.1: local only).")] = None,
    port: Annotated[
        int | None, typer.Option(help="TCP port (default 8750; 0 = any free port, see --port-file).")
    ] = None,
    port_file: Annotated[Path | None, typer.Option(help="Write the bound port here once the service is ready.")] = None,
    engine: Annotated[
        str | None,
        typer.Option(
            help="Where deployments run: local (threads of this process, the default) or ray (one Ray actor per "
            "deployment, restarted on failure, CPUs/GPUs from its table; needs the cluster extra). See the "
            "README, Scaling out."
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="With --engine ray: the cluster to join: auto (a node started by `ray start`), ray://HOST:10001 "
            "or HOST:6379. Default: start a local Ray on 127.0.0.1 for this process."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="With --edge: cpu, cuda, cuda:N or auto.")] = "cpu",
    teacher_dtype: Annotated[
        str, typer.Option(help="With --edge: autocast of the teacher's forward: float32 (off), bfloat16, float16.")
    ] = "float32",
    batch_size: Annotated[int, typer.Option(help="B: uploaded samples per adaptation step.")] = 32,
    publish_every: Annotated[int, typer.Option(help="K: publish a refit blob after every K steps.")] = 1,
    replay_size: Annotated[int, typer.Option(help="Replay window in samples (paper: 10,000).")] = 10_000,
    replay_steps: Annotated[
        bool, typer.Option(help="The official replay-only step per batch report interval without a cloud step.")
    ] = True,
    statistics: Annotated[
        str, typer.Option(help="Running statistics from 'training' forwards (official) or statistics 'samples'.")
    ] = "training",
    student_lr: Annotated[
        float | None, typer.Option(help="SGD lr of the edge replica's distillation step (default: the paper's 2.5e-3).")
    ] = None,
    teacher_lr: Annotated[
        float | None, typer.Option(help="SGD lr of the teacher's weighted-entropy step (default: the paper's 2.5e-4).")
    ] = None,
    idle_after: Annotated[
        float, typer.Option(help="Also replay after this many seconds without uploads (0 = off; beyond the paper).")
    ] = 0.0,
    cloud_preset: Annotated[
        str,
        typer.Option(
            help="With --edge: 'default' (the measured defaults: 8 replica steps per cloud batch, replay from the "
            "episode, the calibration batch distils) or 'cema' (the paper's settings, to reproduce it)."
        ),
    ] = "default",
    student_steps: Annotated[
        int | None, typer.Option(min=1, help="Replica SGD steps per cloud batch, each with its own replay (paper: 1).")
    ] = None,
    replay_factor: Annotated[
        int | None, typer.Option(min=0, help="Replayed samples per new sample in a cloud step (paper: 3).")
    ] = None,
    replay_min: Annotated[
        int | None, typer.Option(min=0, help="Replay starts once the window holds this many samples (paper: 256).")
    ] = None,
    temperature: Annotated[float | None, typer.Option(help="T of the distillation softmax (paper: 1).")] = None,
    gate: Annotated[
        bool | None,
        typer.Option(
            help="Cloud-side gate: publish a step's replica only if it agrees with the teacher on the episode's "
            "uploads no less than the last published one (beyond the paper; off in the cema preset)."
        ),
    ] = None,
    gate_margin: Annotated[
        float | None, typer.Option(min=0, help="--gate: agreement points (%) a candidate may lose and still publish.")
    ] = None,
    cloud_set: Annotated[
        list[str] | None,
        typer.Option(help="With --edge: any CemaConfig field as KEY=VALUE (repeatable; README lists them)."),
    ] = None,
    pending_cap: Annotated[int, typer.Option(help="Pending samples per deployment before uploads get 429.")] = 4096,
    keep_blobs: Annotated[int, typer.Option(help="Blob versions (and state snapshots) kept besides version 0.")] = 16,
    rollback_devices: Annotated[
        int, typer.Option(help="Distinct devices whose rollback reports mark a version bad.")
    ] = 2,
    retention: Annotated[
        str | None,
        typer.Option(
            help="Delete uploaded frames older than this (e.g. 24h, 7d; default: when they leave the replay window)."
        ),
    ] = None,
    max_upload_bytes: Annotated[int | None, typer.Option(help="Largest accepted upload body (default 16 MiB).")] = None,
    signing_key: Annotated[
        Path | None, typer.Option(help="Ed25519 private key (`cema-deploy keys new`) to sign blobs.")
    ] = None,
    ssl_certfile: Annotated[Path | None, typer.Option(help="TLS certificate (PEM): serve https://.")] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="TLS private key (PEM) of --ssl-certfile.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of replay sampling (drawn per step, so restarts repeat it).")] = 0,
    threads: Annotated[
        int, typer.Option(help="torch CPU threads (0 = torch's default; a Ray actor uses its table's cpus).")
    ] = 0,
    log_level: Annotated[
        str,
        typer.Option(
            help="Log level of uvicorn and the service: debug, info (one line per step, publish and edge report), "
            "warning (operator actions, rollbacks, errors), error."
        ),
    ] = "info",
) -> None:
    """Serve CEMA: accept samples, adapt, publish refit blobs, for one deployment (--edge) or several (--config)."""
    import dataclasses

    import torch
    import uvicorn

    from cema_deploy.cloud.config import (
        CemaConfig,
        DeploymentSpec,
        ServiceConfig,
        config_from_toml,
        parse_duration,
        parse_method_settings,
    )
    from cema_deploy.cloud.engines import get_engine
    from cema_deploy.cloud.service.api import create_app
    from cema_deploy.cloud.service.lock import hold_service_state
    from cema_deploy.cloud.service.memory import pin_mmap_threshold
    from cema_deploy.cloud.store.state import StateStore, TokenTable
    from cema_deploy.contract.protocol import MAX_WAIT_S

    if threads > 0:
        torch.set_num_threads(threads)
    pin_mmap_threshold()  # large buffers go back to the system when freed (cema_deploy/cloud/service/memory.py)
    service_opts: dict[str, Any] = {
        "state": state,
        "host": host,
        "port": port,
        "engine": engine,
        "ray_address": ray_address,
        "max_upload_bytes": max_upload_bytes,
        "signing_key": signing_key,
        "ssl_certfile": ssl_certfile,
        "ssl_keyfile": ssl_keyfile,
    }
    if (config is None) == (edge is None):
        raise CemaError("Give either --config cloud.toml (several deployments) or --edge DIR (one), not both.")
    if config is not None:
        cfg = config_from_toml(config, **service_opts)
    else:
        from cema_deploy.contract.manifest import manifest_from_dir

        assert edge is not None
        settings: dict[str, Any] = {
            "batch_size": batch_size,
            "publish_every": publish_every,
            "idle_after_s": idle_after,
            "seed": seed,
            "replay_size": replay_size,
            "replay_steps": replay_steps,
            "statistics": statistics,
        }
        effort = {
            "student_steps": student_steps,
            "replay_factor": replay_factor,
            "replay_min": replay_min,
            "temperature": temperature,
            "gate": gate,
            "gate_margin": gate_margin,
        }
        settings |= {k: v for k, v in effort.items() if v is not None}
        method = CemaConfig.preset(cloud_preset, **(settings | parse_method_settings(cloud_set or [])))
        if student_lr is not None:
            method = dataclasses.replace(method, student_lr=student_lr)
        if teacher_lr is not None:
            method = dataclasses.replace(method, teacher_lr=teacher_lr)
        spec = DeploymentSpec(
            name=name or manifest_from_dir(edge).model_name.replace("/", "-"),
            edge=edge,
            teacher=teacher,
            teacher_weights=teacher_weights,
            method=method,
            device=device,
            teacher_dtype=teacher_dtype,
            pending_cap=pending_cap,
            keep_blobs=keep_blobs,
            rollback_devices=rollback_devices,
            retention_s=parse_duration(retention) if retention else 0.0,
        )
        cfg = ServiceConfig(deployments=(spec,), **{k: v for k, v in service_opts.items() if v is not None})
    if (cfg.ssl_certfile is None) != (cfg.ssl_keyfile is None):
        raise CemaError("TLS needs both --ssl-certfile and --ssl-keyfile (PEM files).")
    exposed = plain_http_warning(cfg.host, tls=cfg.ssl_certfile is not None)
    if exposed:
        err_console.print(f"[yellow]warning:[/] {exposed}", soft_wrap=True)
    for spec in cfg.deployments:
        if spec.teacher_weights is None:
            err_console.print(
                f"[yellow]warning:[/] {spec.name}: teacher {spec.teacher} is randomly initialised (no teacher "
                "weights); adaptation will distil noise."
            )
    if cfg.ray_address is not None and cfg.engine != "ray":
        raise CemaError(f"--ray-address {cfg.ray_address} needs --engine ray (the engine is {cfg.engine!r}).")
    level = log_level.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise CemaError(f"--log-level {log_level!r} is not one of debug, info, warning, error, critical.")
    # One writer per state, before any model is loaded or port bound (cema_deploy/cloud/service/lock.py).
    locks = hold_service_state(cfg)
    StateStore(cfg.state).record_deployments({s.name: s.state for s in cfg.deployments})  # for `token add`
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine_cls = get_engine(cfg.engine)  # a missing extra fails here, in one sentence
    if cfg.engine == "ray":
        where = cfg.ray_address or "a local Ray on 127.0.0.1 (started now; pass --ray-address to join a cluster)"
        err_console.print(f"engine ray: deployments run as Ray actors on {where}", soft_wrap=True)
    eng = engine_cls.from_config(cfg)
    app = create_app(eng, TokenTable(StateStore(cfg.state)), max_upload_bytes=cfg.max_upload_bytes)
    # The adaptation threads run many short torch ops that hold the GIL; a shorter switch interval (default 5 ms)
    # lets the event loop answer blob polls between them (benchmarks/load.py: poll p99 under load).
    sys.setswitchinterval(0.0005)

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:  # SIGTERM / SIGINT
            eng.begin_shutdown()  # long polls answer 204 at once; workers stop after their current step
            super().handle_exit(sig, frame)

    tls = {"ssl_certfile": str(cfg.ssl_certfile), "ssl_keyfile": str(cfg.ssl_keyfile)} if cfg.ssl_certfile else {}
    server = _Server(
        uvicorn.Config(
            app,
            host=cfg.host,
            port=cfg.port,
            log_level=level.lower(),
            access_log=False,
            timeout_graceful_shutdown=5,
            timeout_keep_alive=int(MAX_WAIT_S) + 5,  # an edge's connections idle between long polls and uploads
            **tls,  # type: ignore[arg-type]
        )
    )
    scheme = "https" if tls else "http"

    def announce() -> None:
        while not server.started and not server.should_exit:
            threading.Event().wait(0.05)
        if server.started:
            bound = server.servers[0].sockets[0].getsockname()[1]
            if port_file is not None:  # written whole (tmp + rename): a reader never sees half a number
                tmp = port_file.with_name(port_file.name + ".tmp")
                tmp.write_text(str(bound))
                tmp.replace(port_file)
            for d in eng.deployments():
                st = eng.status(d.fingerprint)
                console.print(
                    f"cema-deploy cloud serving {d.name}: {d.model} ({d.fingerprint[:16]}) generation "
                    f"{st.generation}, blob version {st.version}, epoch {st.epoch}",
                    soft_wrap=True,
                )
            console.print(f"at {scheme}://{cfg.host}:{bound} (state {cfg.state}, engine {cfg.engine})", soft_wrap=True)

    eng.start()
    threading.Thread(target=announce, daemon=True).start()
    # uvicorn handles SIGINT/SIGTERM while serving and re-raises them to the previous handlers once it has shut
    # down; with these no-op handlers the re-raise returns, the workers save their step and the command exits 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda _sig, _frame: None)
    try:
        server.run()
    finally:
        eng.stop()
        for lock in locks:
            lock.release()
    err_console.print(f"cema-deploy cloud stopped; state kept in {cfg.state}")


def plain_http_warning(host: str, *, tls: bool) -> str | None:
    """The warning ``cloud serve`` prints when it listens beyond this machine without TLS, else None."""
    import ipaddress

    if tls or host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host.strip("[]")).is_loopback:
            return None
    except ValueError:  # a host name: it may resolve anywhere
        pass
    return (
        f"serving plain http on {host}, beyond this machine: bearer tokens, uploaded frames and blobs cross the "
        "network unencrypted. Pass --ssl-certfile/--ssl-keyfile, or serve behind a TLS proxy on 127.0.0.1."
    )


@token_app.command("add")
def token_add_cmd(
    device: Annotated[str, typer.Argument(help="Device (or operator) id, e.g. cam-01.")],
    deployment: Annotated[
        list[str] | None, typer.Option("--deployment", help="A deployment this token may use (repeatable).")
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="May use every deployment, also ones added later.")] = False,
    admin: Annotated[
        bool,
        typer.Option(
            "--admin",
            help="An operator's token: the admin routes (status, reset, freeze, publish, pin) and model list.",
        ),
    ] = False,
    rotate: Annotated[
        bool, typer.Option(help="Replace the token DEVICE holds (its old token stops working at once).")
    ] = False,
    force: Annotated[
        bool,
        typer.Option(help="Grant a --deployment no `cloud serve` of this state has served yet (e.g. added later)."),
    ] = False,
    expires: Annotated[
        str | None,
        typer.Option(
            help="Refused by the cloud after this: a duration (12h, 30d) or a date (2027-01-31, "
            "2027-01-31T12:00; UTC). Default: never expires."
        ),
    ] = None,
    state: Annotated[Path, typer.Option(help=_STATE_HELP)] = Path("cema-state"),
) -> None:
    """Create a bearer token for DEVICE and print it once (only its hash is stored; a running service picks it
    up at once)."""
    from cema_deploy.cli._operator import parse_expiry, utc
    from cema_deploy.cloud.store.state import StateStore

    if sum([bool(deployment), all_, admin]) != 1:
        raise CemaError("Give --deployment NAME (repeatable), --all, or --admin: what may this token do?")
    store = StateStore(state)
    held = device in store.devices()
    if held and not rotate:
        raise CemaError(
            f"{device!r} already holds a token in {store.tokens_path}; pass --rotate to replace it (its old token "
            "stops working at once), or choose another device id."
        )
    if deployment and not force:
        known = store.known_deployments()
        unknown = sorted(set(deployment) - set(known))
        if unknown:
            raise CemaError(
                f"No `cloud serve` of {state} has served {', '.join(map(repr, unknown))}; served: "
                f"{', '.join(known) or 'none yet'}. Check the name (the deployment of `serve --edge DIR` is the "
                "model name unless --name), start the service first, or pass --force to grant it anyway."
            )
    when = parse_expiry(expires) if expires is not None else None
    token = store.add_token(
        device, deployments=None if all_ else list(deployment or []), admin=admin, rotate=rotate, expires=when
    )
    what = "admin token" if admin else f"token for {', '.join(deployment or []) or 'all deployments'}"
    until = f", expires {utc(when)}" if when is not None else ""
    if held:
        err_console.print(f"replaced the token of {device}: its old token stops working now", soft_wrap=True)
    err_console.print(f"{what} of {device}{until} (shown once):", soft_wrap=True)
    print(token)


@token_app.command("revoke")
def token_revoke_cmd(
    device: Annotated[str, typer.Argument(help="Device (or operator) id.")],
    state: Annotated[Path, typer.Option(help=_STATE_HELP)] = Path("cema-state"),
) -> None:
    """Revoke DEVICE's token; a running service refuses it from its next request on (no restart)."""
    from cema_deploy.cloud.store.state import StateStore

    if not StateStore(state).revoke_token(device):
        raise CemaError(f"{device!r} holds no token in {state / 'tokens.json'}.")
    err_console.print(f"revoked the token of {device}")


@token_app.command("list")
def token_list_cmd(
    state: Annotated[Path, typer.Option(help=_STATE_HELP)] = Path("cema-state"),
) -> None:
    """List the token holders and what each may use."""
    from cema_deploy.cli._operator import utc
    from cema_deploy.cloud.store.state import StateStore

    for g in StateStore(state).grants():
        expiry = "" if g.expires is None else f"\t{'expired' if g.expired() else 'expires'} {utc(g.expires)}"
        print(f"{g.device}\t{'admin' if g.admin else ','.join(g.deployments)}{expiry}")


def _admin(cloud: str, token_file: Path, ca_file: Path | None) -> Any:
    from cema_deploy.runtime.link.client import AdminClient

    try:
        token = token_file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise CemaError(f"Cannot read the admin token file {token_file}: {exc}.") from exc
    return AdminClient(cloud, token, ca_file=str(ca_file) if ca_file else None)


_CLOUD = typer.Option(help="URL of the cloud, e.g. http://127.0.0.1:8750.")
_TOKEN = typer.Option(help="File holding an admin token (`cema-deploy cloud token add NAME --admin`).")
_CA = typer.Option(help="CA bundle to verify an https:// cloud.")


def _action(action: str, name: str, cloud: str, token_file: Path, ca_file: Path | None) -> None:
    with _admin(cloud, token_file, ca_file) as client:
        st = getattr(client, action)(name)
    print(
        f"{st.name}: generation {st.generation}, version {st.version}, "
        f"{'calibrated' if st.calibrated else 'uncalibrated'}, {'frozen' if st.frozen else 'publishing'}"
    )


@cloud_app.command("freeze")
def freeze_cmd(
    name: Annotated[str, typer.Argument(help="Deployment name.")],
    cloud: Annotated[str, _CLOUD],
    token_file: Annotated[Path, _TOKEN],
    ca_file: Annotated[Path | None, _CA] = None,
) -> None:
    """Stop publishing NAME's blobs (edges keep their version; adaptation goes on and is published on unfreeze)."""
    _action("freeze", name, cloud, token_file, ca_file)


@cloud_app.command("unfreeze")
def unfreeze_cmd(
    name: Annotated[str, typer.Argument(help="Deployment name.")],
    cloud: Annotated[str, _CLOUD],
    token_file: Annotated[Path, _TOKEN],
    ca_file: Annotated[Path | None, _CA] = None,
) -> None:
    """Resume publishing NAME's blobs (what was learnt while frozen is published at once)."""
    _action("unfreeze", name, cloud, token_file, ca_file)


@cloud_app.command("reset")
def reset_cmd(
    name: Annotated[str, typer.Argument(help="Deployment name.")],
    cloud: Annotated[str, _CLOUD],
    token_file: Annotated[Path, _TOKEN],
    ca_file: Annotated[Path | None, _CA] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask (needed when stdin is not a terminal).")] = False,
) -> None:
    """Reset NAME: fresh adaptation state, generation + 1, its pending and replayed frames deleted, a blob of the
    reset state published at once (versions keep rising). Says what it deletes and asks first, unless --yes."""
    from cema_deploy.cli._operator import reset_preview

    with _admin(cloud, token_file, ca_file) as client:
        row = _fleet_row(client, name)
        preview = reset_preview(row)
        if not yes:
            if not sys.stdin.isatty():
                raise CemaError(f"{preview} stdin is not a terminal, so nothing was asked or deleted: pass --yes.")
            err_console.print(preview, soft_wrap=True, markup=False)
            if not typer.confirm("Reset?", default=False, err=True):
                raise CemaError(f"{name} was not reset; nothing was deleted.")
        st = client.reset(name)
    print(
        f"{st.name}: reset; deleted {row.get('uploads_held', 0)} uploads ({row.get('frames_held', 0)} frames); "
        f"generation {st.generation}, version {st.version}, uncalibrated"
    )


def _fleet_row(client: Any, name: str) -> dict[str, Any]:
    rows = client.fleet()
    for row in rows:
        if row.get("name") == name:
            return dict(row)
    raise CemaError(f"The cloud serves no deployment named {name!r}; served: {[r.get('name') for r in rows]}.")


@cloud_app.command("status")
def status_cmd(
    cloud: Annotated[str, _CLOUD],
    token_file: Annotated[Path, _TOKEN],
    ca_file: Annotated[Path | None, _CA] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="JSON instead of text: to PATH, or to stdout without PATH (or with -).")
    ] = False,
    path: Annotated[str | None, typer.Argument(help="With --json: the file to write (- or none: stdout).")] = None,
) -> None:
    """Per deployment: newest version, generation, calibrated, frozen or pinned, held uploads and kept versions;
    per device: the version it serves, when it was last seen, its uploads, refusals and rollbacks."""
    from cema_deploy.cli._operator import status_lines, write_json

    if path is not None and not json_out:
        raise CemaError(f"A PATH ({path!r}) is only taken with --json: `cloud status --json {path}`.")
    with _admin(cloud, token_file, ca_file) as client:
        rows = client.fleet()
    if json_out:
        write_json({"deployments": rows}, path)
        return
    for line in status_lines(rows):
        print(line)


_VERSION = typer.Option(help="A kept version (see `cloud status`; 0: the export's own parameters).", min=0)


@cloud_app.command("publish")
def publish_cmd(
    name: Annotated[str, typer.Argument(help="Deployment name.")],
    version: Annotated[int, _VERSION],
    cloud: Annotated[str, _CLOUD],
    token_file: Annotated[Path, _TOKEN],
    ca_file: Annotated[Path | None, _CA] = None,
) -> None:
    """Return NAME to the state behind kept version N and publish it as a new, higher version (edges apply it);
    adaptation goes on from there."""
    with _admin(cloud, token_file, ca_file) as client:
        st = client.publish(name, version)
    print(f"{st.name}: the state of version {version} published as version {st.version}; adaptation goes on from it")


@cloud_app.command("pin")
def pin_cmd(
    name: Annotated[str, typer.Argument(help="Deployment name.")],
    version: Annotated[int, _VERSION],
    cloud: Annotated[str, _CLOUD],
    token_file: Annotated[Path, _TOKEN],
    ca_file: Annotated[Path | None, _CA] = None,
) -> None:
    """Serve version N's parameters (published as a new, higher version) and publish nothing newer until
    `cloud unpin`; adaptation continues from N's state, unpublished. Reset, freeze, unfreeze and publish are
    refused until unpin."""
    with _admin(cloud, token_file, ca_file) as client:
        st = client.pin(name, version)
    print(
        f"{st.name}: pinned to version {version}, served as version {st.version}; nothing newer is published "
        f"until `cema-deploy cloud unpin {st.name}`"
    )


@cloud_app.command("unpin")
def unpin_cmd(
    name: Annotated[str, typer.Argument(help="Deployment name.")],
    cloud: Annotated[str, _CLOUD],
    token_file: Annotated[Path, _TOKEN],
    ca_file: Annotated[Path | None, _CA] = None,
) -> None:
    """End NAME's pin: what was learnt while pinned is published at once (unless it was frozen before the pin)."""
    _action("unpin", name, cloud, token_file, ca_file)
