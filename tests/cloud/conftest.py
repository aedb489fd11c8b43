"""The service on 127.0.0.1 for the tests: a real ``cema-deploy cloud serve`` process (``cloud_factory``), or the
same app under ``uvicorn.Server`` in a thread of the test process (``serve_in_thread``, no start-up cost)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest


@dataclass
class InThread:
    url: str
    state: Path
    service: Any
    server: Any
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.service.stop()


@contextlib.contextmanager
def serve_in_thread(
    edge: Path, teacher: Path, state: Path, *, max_upload_bytes: int = 16 << 20, **config: Any
) -> Iterator[InThread]:
    """``create_app(AdaptationService(...))`` served by uvicorn on a free port of 127.0.0.1 in a thread."""
    import uvicorn

    from cema_deploy.cloud.config import CemaConfig
    from cema_deploy.cloud.models import replica_from_export, teacher_from_name
    from cema_deploy.cloud.service import create_app
    from cema_deploy.cloud.worker import AdaptationService
    from cema_deploy.contract.manifest import manifest_from_dir

    manifest = manifest_from_dir(edge)
    service = AdaptationService(
        state,
        manifest,
        teacher_from_name("test_resnet", num_classes=10, weights=teacher),
        replica_from_export(edge, manifest),
        config=CemaConfig(**config),
    )
    service.start()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(service, max_upload_bytes=max_upload_bytes),
            host="127.0.0.1",
            port=0,
            log_level="warning",
            access_log=False,
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    running = InThread(f"http://127.0.0.1:{port}", state, service, server, thread)
    try:
        yield running
    finally:
        running.stop()


@dataclass
class Cloud:
    url: str
    state: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_cloud(edge: Path, teacher: Path, state: Path, *extra: str, port: int = 0, timeout: float = 120.0) -> Cloud:
    port_file = state.parent / f"{state.name}.port"
    port_file.unlink(missing_ok=True)
    log = state.parent / f"{state.name}.log"
    cmd = [
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
        str(port),
        "--port-file",
        str(port_file),
        "--batch-size",
        "8",
        "--threads",
        "1",
        "--log-level",
        "warning",
        *extra,
    ]
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    t0 = time.time()
    while not port_file.exists() or not port_file.read_text():
        if proc.poll() is not None or time.time() - t0 > timeout:
            proc.kill()
            raise RuntimeError(f"cloud did not start:\n{log.read_text()}")
        time.sleep(0.1)
    return Cloud(f"http://127.0.0.1:{port_file.read_text()}", state, proc, log)


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from safetensors.torch import save_file

    from tests.conftest import tiny_model

    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    model = tiny_model("bn", seed=7)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture
def cloud_factory(tmp_path: Path, exported, teacher_ckpt: Path) -> Iterator[Callable[..., Cloud]]:  # type: ignore[no-untyped-def]
    edge, _ = exported("bn")
    started: list[Cloud] = []

    def make(*extra: str, state: Path | None = None, port: int = 0) -> Cloud:
        cloud = start_cloud(edge, teacher_ckpt, state or tmp_path / "state", *extra, port=port)
        started.append(cloud)
        return cloud

    yield make
    for c in started:
        c.stop()


def images(n: int, seed: int = 0, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
