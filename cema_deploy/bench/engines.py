"""What ``cema-deploy bench`` measures against: the backends present here, the BN-folded reference engine,
PyTorch eager, the full edge step, the input and the machine's description."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cema_deploy.contract.manifest import FOLDED_FILE
from cema_deploy.runtime.backends.base import Backend

#: Pause before each engine's turn in the interleaved measurement (seconds).
SETTLE_S = 0.05
Progress = Callable[[str], None]


def available_backends() -> list[str]:
    """The backends whose package and device are present here."""
    out = []
    try:
        import onnxruntime as ort

        providers = set(ort.get_available_providers())
        out.append("ort-cpu")
        if "CUDAExecutionProvider" in providers:
            out.append("ort-cuda")
        if "TensorrtExecutionProvider" in providers:
            out.append("ort-trt")
    except ImportError:
        pass
    try:
        import tensorrt  # noqa: F401

        out.append("trt")
    except ImportError:
        pass
    return out


def settle(engines: dict[str, Callable[[], Any]], name: str, _round: int) -> None:
    """Before an engine's turn: let the previous engine's worker threads stop spinning, then one untimed call.

    Without it the first calls of each turn share the 2 cores with the previous session's spinning thread pool
    (ORT and OpenMP spin-wait after a run), which penalises whichever engine comes second in the round order.
    """
    time.sleep(SETTLE_S)
    engines[name]()


def edge_step(be: Backend, x: np.ndarray, num_classes: int) -> Callable[[], Any]:
    from cema_deploy.runtime.selection.rules import SampleSelector, SelectionConfig

    selector = SampleSelector(SelectionConfig.for_classes(num_classes))

    def step() -> Any:
        # The edge's whole per-batch work: inference, then the CEMA gate (select() computes the entropy).
        return selector.select(be.infer(x))

    return step


def folded_engine(be: Backend, model_dir: Path) -> Callable[[np.ndarray], np.ndarray] | None:
    """The plain deployment's engine on the same device, if the export has reference_folded.onnx."""
    plain = getattr(be, "plain_engine", None)
    if plain is not None:  # e.g. TensorRT: a non-refittable engine built from the same ONNX
        fn: Callable[[np.ndarray], np.ndarray] = plain()
        return fn
    path = model_dir / FOLDED_FILE
    if not path.is_file() or not be.name.startswith("ort-"):
        return None
    from cema_deploy.runtime.backends.onnxrt import PROVIDERS, session_from_onnx

    # the same thread settings as the refittable engine, so the ratio compares graphs, not settings
    spinning = bool(getattr(be, "allow_spinning", False))
    sess = session_from_onnx(path, providers=PROVIDERS[be.name], allow_spinning=spinning)
    return sess.run


def torch_eager_engine(model_dir: Path) -> Callable[[np.ndarray], Any] | None:
    try:
        import torch

        from cema_deploy.export.reload import torch_model_from_export
    except ImportError:
        return None
    model = torch_model_from_export(model_dir)

    def run(x: np.ndarray) -> Any:
        with torch.inference_mode():
            return model(torch.from_numpy(x))

    return run


def random_input(shape: tuple[int, ...], batch: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, *shape[1:])).astype(np.float32)


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
    except ImportError:
        pass
    return info
