"""The service on 127.0.0.1 for the tests: a real ``cema-deploy cloud serve`` process (``cloud_factory``), or the
same app under ``uvicorn.Server`` in a thread of the test process (``serve_in_thread``, no start-up cost), and
in-process deployments (``make_deployment``) for the adaptation loop itself."""

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

#: The one-deployment shorthand names the deployment after the model.
NAME = "test_resnet"


def dep_dir(state: Path, name: str = NAME) -> Path:
    """Where a deployment of the service at ``state`` keeps its own state."""
    return state / "deployments" / name


def make_deployment(
    edge: Path, teacher: Path, state: Path, *, name: str = NAME, spec: dict[str, Any] | None = None, **method: Any
) -> Any:
    """A :class:`Deployment` of ``edge`` with the tiny teacher, its state under ``state`` (not started), running the
    paper's cloud settings (the ``cema`` preset) with ``method`` set over them: the tests pin the paper's loop and
    set each lever beyond it by name."""
    from cema_deploy.cloud.config import CemaConfig, DeploymentSpec
    from cema_deploy.cloud.deployment import Deployment

    d = DeploymentSpec(
        name=name,
        edge=edge,
        teacher="test_resnet",
        teacher_weights=teacher,
        method=CemaConfig.preset("cema", **method),
        **(spec or {}),
    )
    return Deployment.from_spec(d, state)


@dataclass
class InThread:
    url: str
    state: Path
    engine: Any
    server: Any
    thread: threading.Thread

    @property
    def service(self) -> Any:  # the first deployment
        return next(iter(self.engine._by_name.values()))

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.engine.stop()


@contextlib.contextmanager
def serve_deployments(
    deployments: list[Any], state: Path, *, max_upload_bytes: int = 16 << 20, start: bool = True
) -> Iterator[InThread]:
    """``create_app(LocalEngine(deployments))`` served by uvicorn on a free port of 127.0.0.1 in a thread
    (``start=False``: the deployments' workers are not started)."""
    from cema_deploy.cloud.engines.local import LocalEngine

    engine = LocalEngine(deployments)
    if start:
        engine.start()
    with serve_engine(engine, state, max_upload_bytes=max_upload_bytes) as running:
        yield running


@contextlib.contextmanager
def serve_engine(engine: Any, state: Path, *, max_upload_bytes: int = 16 << 20) -> Iterator[InThread]:
    """``create_app(engine)`` (started) served by uvicorn on a free port of 127.0.0.1 in a thread; the engine is
    stopped on exit."""
    import uvicorn

    from cema_deploy.cloud.service.api import create_app
    from cema_deploy.cloud.store.state import StateStore, TokenTable

    server = uvicorn.Server(
        uvicorn.Config(
            create_app(engine, TokenTable(StateStore(state)), max_upload_bytes=max_upload_bytes),
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
    running = InThread(f"http://127.0.0.1:{port}", state, engine, server, thread)
    try:
        yield running
    finally:
        running.stop()


@contextlib.contextmanager
def serve_in_thread(
    edge: Path, teacher: Path, state: Path, *, max_upload_bytes: int = 16 << 20, **config: Any
) -> Iterator[InThread]:
    """One deployment of ``edge`` served in a thread."""
    with serve_deployments(
        [make_deployment(edge, teacher, state, **config)], state, max_upload_bytes=max_upload_bytes
    ) as s:
        yield s


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


def start_cloud(
    edge: Path | None,
    teacher: Path,
    state: Path,
    *extra: str,
    port: int = 0,
    timeout: float = 120.0,
    https: bool = False,
) -> Cloud:
    """``cema-deploy cloud serve`` as a subprocess; ``edge=None`` when ``extra`` holds ``--config``."""
    port_file = state.parent / f"{state.name}.port"
    port_file.unlink(missing_ok=True)
    log = state.parent / f"{state.name}.log"
    one = []
    if edge is not None:
        one = ["--edge", str(edge), "--teacher", "test_resnet", "--teacher-weights", str(teacher), "--batch-size", "8"]
    cmd = [
        sys.executable,
        "-m",
        "cema_deploy",
        "cloud",
        "serve",
        *one,
        "--state",
        str(state),
        "--port",
        str(port),
        "--port-file",
        str(port_file),
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
    scheme = "https" if https or "--ssl-certfile" in extra else "http"
    return Cloud(f"{scheme}://127.0.0.1:{port_file.read_text()}", state, proc, log)


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """The tiny models run fastest on one thread, and a shared 2-core machine makes torch's thread pool spin
    (measured under load 8: 1-7 s per step with 2 threads, 0.1 s with 1); cloud subprocesses get --threads 1."""
    try:
        import torch
    except ImportError:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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

    def make(*extra: str, state: Path | None = None, port: int = 0, one: bool = True, https: bool = False) -> Cloud:
        cloud = start_cloud(
            edge if one else None, teacher_ckpt, state or tmp_path / "state", *extra, port=port, https=https
        )
        started.append(cloud)
        return cloud

    yield make
    for c in started:
        c.stop()


def images(n: int, seed: int = 0, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def batch(manifest: Any, n: int = 8, seed: int = 0, **kw: Any) -> Any:
    from cema_deploy.contract.samples import SampleBatch

    return SampleBatch(images=images(n, seed), fingerprint=manifest.fingerprint, edge_version=0, **kw)
