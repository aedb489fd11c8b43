"""The operator's day on the cloud (issue 19): one writer per state, tokens that cannot be replaced by accident and
expire, a reset that says what it deletes, the per-device status, and undo by hand (publish, pin, unpin)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cema_deploy.contract.protocol import PROTOCOL_HEADER, PROTOCOL_VERSION
from tests.cloud.conftest import batch, dep_dir, make_deployment, serve_deployments
from tests.conftest import needs_torch

pytestmark = [needs_torch, pytest.mark.network]


def _headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", PROTOCOL_HEADER: str(PROTOCOL_VERSION)}


def _body(manifest, n: int = 8, seed: int = 0, **kw) -> bytes:  # type: ignore[no-untyped-def]
    from cema_deploy.contract.samples import samples_to_bytes

    return samples_to_bytes(batch(manifest, n, seed, **kw), encoding="png")


def _cli(*args: str) -> object:
    from typer.testing import CliRunner

    from cema_deploy.cli import app

    return CliRunner().invoke(app, list(args))


def _admin_token(state: Path, path: Path) -> list[str]:
    from cema_deploy.cloud.store.state import StateStore

    path.write_text(StateStore(state).add_token("ops", admin=True))
    return ["--token-file", str(path)]


# ---- 3. one writer per state -------------------------------------------------------------------------------------


def test_state_lock_refuses_a_second_holder_and_takes_over_a_dead_ones(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cema_deploy.cloud.service.lock import StateLocked, hold_state

    state = tmp_path / "state"
    state.mkdir()
    # a lock file left by a process that died (no flock held): taken over, its record reported
    (state / "serve.lock").write_text(json.dumps({"pid": 999999, "host": "gone", "started": 0, "what": "x"}))
    lock = hold_state(state, "serve.lock", what="test")
    assert lock.previous is not None and lock.previous["pid"] == 999999
    assert json.loads((state / "serve.lock").read_text())["pid"] == os.getpid()
    with pytest.raises(StateLocked, match=f"in use by process {os.getpid()} on host "):
        hold_state(state, "serve.lock", what="second")  # flock is per open file: refused in this process too
    lock.release()
    hold_state(state, "serve.lock", what="third").release()


def _serve_cmd(edge: Path, teacher: Path, state: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cema_deploy",
        "cloud",
        "serve",
        "--edge",
        str(edge),
        "--teacher",
        "test_resnet",
        "--teacher-weights",
        str(teacher),
        "--state",
        str(state),
        "--port",
        "0",
        "--threads",
        "1",
        "--log-level",
        "warning",
    ]


def test_two_clouds_on_one_state(cloud_factory, exported, teacher_ckpt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import httpx

    edge, _ = exported("bn")
    state = tmp_path / "state"
    first = cloud_factory(state=state)
    second = subprocess.run(_serve_cmd(edge, teacher_ckpt, state), capture_output=True, text=True, timeout=300)
    said = second.stdout + second.stderr
    assert second.returncode != 0, said
    assert f"in use by process {first.proc.pid} on host" in said and "Traceback" not in said
    assert not (dep_dir(state) / "blobs" / "v00000001.safetensors").exists()
    assert httpx.get(first.url + "/v1/health", timeout=30).status_code == 200  # the first keeps serving
    assert first.proc.poll() is None
    first.kill()  # SIGKILL: its flock dies with it
    third = cloud_factory(state=state)
    assert httpx.get(third.url + "/v1/health", timeout=30).status_code == 200
    assert json.loads((state / "serve.lock").read_text())["pid"] == third.proc.pid


def test_a_ray_actor_locks_its_deployment_state(exported, teacher_ckpt, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    from cema_deploy.cloud.config import CemaConfig, DeploymentSpec
    from cema_deploy.cloud.engines import ray_engine
    from cema_deploy.cloud.service.lock import StateLocked

    edge, _ = exported("bn")
    spec = DeploymentSpec(
        name="test_resnet",
        edge=edge,
        teacher="test_resnet",
        teacher_weights=teacher_ckpt,
        method=CemaConfig.preset("cema"),
    )
    monkeypatch.setattr(ray_engine, "LOCK_WAIT_S", 0.0)
    actor = ray_engine.DeploymentActor(spec, str(tmp_path / "state"), None, 1)  # the class Ray runs, in-process
    try:
        with pytest.raises(StateLocked, match=f"in use by process {os.getpid()} .*Ray actor of test_resnet"):
            ray_engine.DeploymentActor(spec, str(tmp_path / "state"), None, 1)
    finally:
        asyncio.run(actor.stop(30))
        actor._state_lock.release()  # Ray ends the actor's process, which frees it; here the test does


# ---- 4. tokens -------------------------------------------------------------------------------------------------


def test_token_add_refuses_a_held_device_and_an_unknown_deployment(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cema_deploy.cloud.store.state import StateStore

    state = tmp_path / "state"
    r = _cli("cloud", "token", "add", "cam-01", "--deployment", "resnet50", "--state", str(state))
    assert r.exit_code == 1 and "has served 'resnet50'; served: none yet" in str(r.exception)  # type: ignore[attr-defined]
    StateStore(state).record_deployments({"resnet50": "deployments/resnet50"})  # what `cloud serve` records
    r = _cli("cloud", "token", "add", "cam-01", "--deployment", "resnet5O", "--state", str(state))
    assert r.exit_code == 1 and "served: resnet50" in str(r.exception)  # type: ignore[attr-defined]
    r = _cli("cloud", "token", "add", "cam-01", "--deployment", "resnet50", "--state", str(state))
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    first = r.output.strip().splitlines()[-1]  # type: ignore[attr-defined]
    r = _cli("cloud", "token", "add", "cam-01", "--deployment", "resnet50", "--state", str(state))
    assert r.exit_code == 1 and "already holds a token" in str(r.exception) and "--rotate" in str(r.exception)  # type: ignore[attr-defined]
    assert StateStore(state).grants()[0].deployments == ("resnet50",)
    table = StateStore(state)
    from cema_deploy.cloud.store.state import TokenTable

    assert TokenTable(table).lookup(first) is not None  # the refused replacement changed nothing
    r = _cli("cloud", "token", "add", "cam-01", "--deployment", "doors", "--force", "--rotate", "--state", str(state))
    assert r.exit_code == 0 and "its old token stops working now" in r.output  # type: ignore[attr-defined]
    assert TokenTable(table).lookup(first) is None
    r = _cli("cloud", "token", "add", "cam-02", "--all", "--expires", "30d", "--state", str(state))
    assert r.exit_code == 0 and "expires 20" in r.output  # type: ignore[attr-defined]
    (g,) = [g for g in table.grants() if g.device == "cam-02"]
    assert g.expires is not None and abs(g.expires - time.time() - 30 * 86400) < 3600
    for bad, said in (("2001-01-01", "is in the past"), ("soon", "neither a duration")):
        r = _cli("cloud", "token", "add", "cam-03", "--all", "--expires", bad, "--state", str(state))
        assert r.exit_code == 1 and said in str(r.exception)  # type: ignore[attr-defined]
    r = _cli("cloud", "token", "list", "--state", str(state))
    assert "cam-02\t*\texpires 20" in r.output  # type: ignore[attr-defined]
    assert "never expires" in _cli("cloud", "token", "add", "--help").output.replace("\n", " ").replace("│", "")  # type: ignore[attr-defined]


def test_an_expired_token_is_refused_with_401_and_counted(exported, teacher_ckpt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import httpx

    from cema_deploy.cloud.store.state import StateStore
    from cema_deploy.contract.protocol import blob_url

    edge, _ = exported("bn")
    state = tmp_path / "state"
    store = StateStore(state)
    old = store.add_token("cam-old", deployments=["test_resnet"], expires=time.time() - 1)
    fresh = store.add_token("cam-new", deployments=["test_resnet"], expires=time.time() + 3600)
    dep = make_deployment(edge, teacher_ckpt, state, batch_size=8)
    with serve_deployments([dep], state) as cloud, httpx.Client(timeout=60) as http:
        r = http.get(blob_url(cloud.url, dep.fingerprint), params={"after": 0}, headers=_headers(old))
        assert r.status_code == 401 and "The bearer token of 'cam-old' expired at" in r.json()["detail"]
        assert "token add cam-old --rotate" in r.json()["detail"]
        r = http.get(blob_url(cloud.url, dep.fingerprint), params={"after": 0}, headers=_headers(fresh))
        assert r.status_code == 204
        devices = dep.operator_status()["devices"]
        assert devices["cam-old"]["refusals"] == 1 and devices["cam-new"]["refusals"] == 0


# ---- 7. reset says what it deletes and asks ------------------------------------------------------------------------


def test_reset_says_what_it_deletes_and_needs_yes_without_a_terminal(exported, teacher_ckpt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import httpx

    from cema_deploy.cloud.store.state import StateStore
    from cema_deploy.contract.protocol import samples_url

    edge, _ = exported("bn")
    state = tmp_path / "state"
    token = StateStore(state).add_token("cam-1", deployments=["test_resnet"])
    ops = _admin_token(state, tmp_path / "ops.token")
    dep = make_deployment(edge, teacher_ckpt, state, batch_size=8, replay_size=64)
    with serve_deployments([dep], state) as cloud:
        with httpx.Client(timeout=60) as http:
            url = samples_url(cloud.url, dep.fingerprint)
            for i, n in enumerate((8, 8, 3)):
                r = http.post(url, content=_body(dep.manifest, n, seed=i), headers=_headers(token))
                assert r.status_code == 202
        assert dep.wait_idle(60) and dep.version == 2
        r = _cli("cloud", "reset", "test_resnet", "--cloud", cloud.url, *ops)
        said = str(r.exception)  # type: ignore[attr-defined]
        assert r.exit_code == 1 and "deletes 3 uploads (19 frames, 3 samples not yet adapted on)" in said  # type: ignore[attr-defined]
        assert "generation 1 -> 2" in said and "pass --yes" in said
        assert dep.generation == 1 and len(list((dep_dir(state) / "uploads").glob("*.safetensors"))) == 3
        # at a terminal it asks; "n" deletes nothing
        said, rc = _at_a_terminal(["cloud", "reset", "test_resnet", "--cloud", cloud.url, *ops], answer="n\n")
        assert rc == 1 and "deletes 3 uploads" in said and "Reset? [y/N]" in said and "was not reset" in said, said
        assert dep.generation == 1 and len(list((dep_dir(state) / "uploads").glob("*.safetensors"))) == 3
        r = _cli("cloud", "reset", "test_resnet", "--cloud", cloud.url, *ops, "--yes")
        assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
        assert "reset; deleted 3 uploads (19 frames); generation 2, version 3" in r.output  # type: ignore[attr-defined]
        assert dep.generation == 2 and not list((dep_dir(state) / "uploads").glob("*.safetensors"))


def _at_a_terminal(args: list[str], *, answer: str) -> tuple[str, int]:
    """Run ``cema-deploy ARGS`` with a pseudo-terminal as stdin and stderr, typing ``answer``."""
    import pty

    main, sub = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cema_deploy", *args], stdin=sub, stdout=subprocess.PIPE, stderr=sub, text=True
    )
    os.close(sub)
    os.write(main, answer.encode())
    out, _ = proc.communicate(timeout=120)
    said = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        said += chunk
    os.close(main)
    return said.decode(errors="replace") + out, proc.returncode


# ---- 8. see and undo ---------------------------------------------------------------------------------------------


def test_status_per_device_publish_pin_unpin_on_real_http(exported, teacher_ckpt, tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    import httpx

    from cema_deploy.cloud.store.state import StateStore
    from cema_deploy.contract.blob import blob_from_bytes, blob_from_path
    from cema_deploy.contract.protocol import admin_url, blob_url, reports_url, samples_url

    caplog.set_level(logging.INFO, logger="cema_deploy.cloud")
    edge, _ = exported("bn")
    state = tmp_path / "state"
    store = StateStore(state)
    cam1 = store.add_token("cam-1", deployments=["test_resnet"])
    cam2 = store.add_token("cam-2", deployments=["test_resnet"])
    ops = _admin_token(state, tmp_path / "ops.token")
    dep = make_deployment(edge, teacher_ckpt, state, batch_size=8, replay_size=64)
    with serve_deployments([dep], state) as cloud, httpx.Client(timeout=60) as http:
        fp, cli = dep.fingerprint, ["--cloud", cloud.url, *ops]
        url = samples_url(cloud.url, fp)
        for i in range(2):
            assert http.post(url, content=_body(dep.manifest, 8, seed=i), headers=_headers(cam1)).status_code == 202
        assert dep.wait_idle(60) and dep.version == 2
        r = http.get(blob_url(cloud.url, fp), params={"after": 1}, headers=_headers(cam2))
        assert r.status_code == 200 and r.headers["X-Cema-Version"] == "2"
        report = {"kind": "rollback", "version": 2, "reason": "score fell"}
        assert http.post(reports_url(cloud.url, fp), json=report, headers=_headers(cam2)).status_code == 202

        r = _cli("cloud", "status", *cli, "--json")
        assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
        (row,) = json.loads(r.output)["deployments"]  # type: ignore[attr-defined]
        assert row["name"] == "test_resnet" and row["version"] == 2 and row["pinned"] is None
        assert row["kept_versions"] == [0, 1, 2]
        d1, d2 = row["devices"]["cam-1"], row["devices"]["cam-2"]
        assert (d1["uploads"], d1["samples"], d1["version"], d1["rollbacks"]) == (2, 16, 0, 0)
        assert (d2["uploads"], d2["version"], d2["rollbacks"]) == (0, 1, 1)
        assert time.time() - 120 < d2["last_seen"] <= time.time()
        r = _cli("cloud", "status", *cli, "--json", str(tmp_path / "status.json"))
        assert r.exit_code == 0 and json.loads((tmp_path / "status.json").read_text())["deployments"][0]["version"] == 2  # type: ignore[attr-defined]
        text = _cli("cloud", "status", *cli).output  # type: ignore[attr-defined]
        assert "version 2, generation 1, uncalibrated, publishing" in text
        assert any(line.split()[:2] == ["cam-2", "1"] and line.split()[-1] == "1" for line in text.splitlines())

        # publish: the state of version 1 as version 3; its tensors are version 1's
        r = _cli("cloud", "publish", "test_resnet", "--version", "1", *cli)
        assert r.exit_code == 0 and "published as version 3" in r.output, r.output  # type: ignore[attr-defined]
        v1, v3 = blob_from_path(dep.store.blob_path(1)).tensors, blob_from_path(dep.store.blob_path(3)).tensors
        assert all(np.array_equal(v1[k], v3[k]) for k in v1)
        r = _cli("cloud", "publish", "test_resnet", "--version", "9", *cli)
        assert r.exit_code == 1 and "Version 9 of test_resnet is not kept" in str(r.exception)  # type: ignore[attr-defined]

        # pin to 0 (the export's tensors): served as version 4, nothing newer while adaptation goes on
        r = _cli("cloud", "pin", "test_resnet", "--version", "0", *cli)
        assert r.exit_code == 0 and "pinned to version 0, served as version 4" in r.output, r.output  # type: ignore[attr-defined]
        got = http.get(blob_url(cloud.url, fp), params={"after": 3}, headers=_headers(cam1))
        export = blob_from_path(edge / "params.safetensors").tensors
        pinned = blob_from_bytes(got.content).tensors
        assert got.headers["X-Cema-Version"] == "4" and all(np.array_equal(export[k], pinned[k]) for k in export)
        steps = dep.counters["steps"]
        assert http.post(url, content=_body(dep.manifest, 8, seed=5), headers=_headers(cam1)).status_code == 202
        assert dep.wait_idle(60) and dep.counters["steps"] == steps + 1 and dep.version == 4
        r = http.post(admin_url(cloud.url, "test_resnet", "reset"), headers=_headers(ops_token(ops)))
        assert r.status_code == 409 and "pinned to version 0" in r.json()["detail"]
        assert "pinned to 0" in _cli("cloud", "status", *cli).output  # type: ignore[attr-defined]
        r = _cli("cloud", "unpin", "test_resnet", *cli)
        assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
        assert dep.wait_idle(60) and dep.version == 5 and dep.pinned is None  # what was learnt, published at once

    logged = caplog.text
    assert "test_resnet: cloud step done" in logged and "published version 1" in logged
    assert "not published (pinned)" in logged
    assert "cam-2 rolled back version 2: score fell" in logged
    # the device records survive a restart
    dep2 = make_deployment(edge, teacher_ckpt, state, batch_size=8, replay_size=64)
    assert dep2.operator_status()["devices"]["cam-1"]["uploads"] == 3


def ops_token(args: list[str]) -> str:
    return Path(args[1]).read_text()


def test_status_survives_80_columns_and_a_pipe(exported, teacher_ckpt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import httpx

    from cema_deploy.cloud.store.state import StateStore
    from cema_deploy.contract.protocol import samples_url

    edge, _ = exported("bn")
    state = tmp_path / "state"
    token = StateStore(state).add_token("camera-entrance-north-07", deployments=["test_resnet"])
    ops = _admin_token(state, tmp_path / "ops.token")
    dep = make_deployment(edge, teacher_ckpt, state, batch_size=8)
    with serve_deployments([dep], state) as cloud:
        body = _body(dep.manifest, 8)
        assert httpx.post(samples_url(cloud.url, dep.fingerprint), content=body, headers=_headers(token)).status_code
        assert dep.wait_idle(60)
        cmd = [sys.executable, "-m", "cema_deploy", "cloud", "status", "--cloud", cloud.url, *ops]
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "80"}, check=True
        ).stdout
    lines = out.splitlines()
    assert lines[0].startswith("test_resnet: ") and any("camera-entrance-north-07" in line for line in lines)
    assert all(len(line) <= 80 for line in lines) and "…" not in out and "..." not in out
