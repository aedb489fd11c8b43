"""`cema-deploy edge run` as a real subprocess for the operator tests: image folders, a free metrics port, and the
edge's own /metrics read over HTTP on 127.0.0.1 (to act after some frames were served, never after a sleep)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np


def write_frames(folder: Path, n: int, *, size: int = 32, seed: int = 0) -> Path:
    """``n`` random RGB PNGs ``000.png``... in ``folder``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_edge(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``python -m cema_deploy edge run ARGS`` with stdout and stderr captured (text)."""
    return subprocess.Popen(
        [sys.executable, "-m", "cema_deploy", "edge", "run", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def metric(port: int, name: str) -> float | None:
    """The sum of the samples of ``cema_edge_<name>`` in the edge's /metrics (None: not reachable yet)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(f"cema_edge_{name}{{") or line.startswith(f"cema_edge_{name} ")]  # fmt: skip
    return sum(values) if values else None


def wait_metric(proc: subprocess.Popen[str], port: int, name: str, at_least: float, timeout: float = 120.0) -> bool:
    """Poll the edge's /metrics until ``name`` reaches ``at_least`` (True) or the edge ended or ``timeout`` (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        v = metric(port, name)
        if v is not None and v >= at_least:
            return True
        time.sleep(0.1)
    return False
