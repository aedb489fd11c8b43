"""``cema-deploy bench``: throughput, latency and hot-refit cost of an export on each available backend.

Every figure that is compared is measured in the same run, engines interleaved (``runtime.timing``), and
reported as a ratio: the refittable engine against a BN-folded export of the same weights (the speed a plain
deployment gets), the full edge step (inference + entropy + selection) against bare inference, and PyTorch
eager against the refittable engine. Refit is timed from blob bytes received to new parameters serving, with
inference running on another thread throughout.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from cema_deploy.contract.blob import RefitBlob, blob_from_bytes, blob_to_bytes
from cema_deploy.contract.manifest import manifest_from_dir
from cema_deploy.exceptions import BackendUnavailableError, CemaError
from cema_deploy.runtime.base import Backend
from cema_deploy.runtime.registry import get_backend, list_backends
from cema_deploy.runtime.timing import Timing, measure_interleaved, timing_from_latencies

FOLDED_FILE = "reference_folded.onnx"
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


def run_bench(
    model_dir: str | os.PathLike[str],
    *,
    backends: Sequence[str] | None = None,
    batches: Sequence[int] = (1, 8, 32),
    rounds: int = 3,
    seconds_per_round: float = 1.0,
    refit: bool = True,
    torch_eager: bool = True,
    progress: Progress | None = None,
    max_batch: int | None = None,
    precision: str | None = None,
    refit_mode: str | None = None,
) -> dict[str, Any]:
    """Run the benchmark and return a JSON-able report (see ``benchmarks/README.md`` for its fields).

    ``max_batch`` (TensorRT engines' batch range; default the largest of ``batches``), ``precision`` and
    ``refit_mode`` (``trt``: ``full`` or ``individual``) reach the backends that take them
    (``registry.backend_options``).
    """
    model_dir = Path(model_dir)
    manifest = manifest_from_dir(model_dir)
    say = progress or (lambda _m: None)
    backends = list(backends or available_backends())
    for name in backends:
        if name not in list_backends():
            raise BackendUnavailableError(f"Unknown backend {name!r}; expected one of: {', '.join(list_backends())}.")
    eager = _torch_eager(model_dir) if torch_eager else None
    rows: list[dict[str, Any]] = []
    ratios: list[dict[str, Any]] = []
    refits: list[dict[str, Any]] = []
    max_batch = max_batch or max(batches)
    builds: dict[str, Any] = {}
    for name in backends:
        with get_backend(name, model_dir, max_batch=max_batch, precision=precision, refit_mode=refit_mode) as be:
            describe = getattr(be, "describe", None)
            if describe is not None:  # e.g. TensorRT: versions, device, precision mechanism, plan from cache or built
                builds[name] = describe()
            folded = _folded_engine(be, model_dir)
            for batch in batches:
                x = _input(manifest.input.shape, batch)
                engines: dict[str, Callable[[], Any]] = {"refittable": partial(be.infer, x)}
                if folded is not None:
                    engines["folded"] = partial(folded, x)
                engines["edge_step"] = _edge_step(be, x, manifest.num_classes)
                if eager is not None and name == "ort-cpu":
                    engines["torch_eager"] = partial(eager, x)
                say(f"{name} batch {batch}: {', '.join(engines)}")
                timings = measure_interleaved(
                    engines,
                    batch=batch,
                    rounds=rounds,
                    seconds_per_round=seconds_per_round,
                    on_round=partial(_settle, engines),
                )
                for engine, t in timings.items():
                    rows.append({"backend": name, "providers": be.providers, "engine": engine, **t.to_dict()})
                pairs = {
                    "refittable_vs_folded": ("refittable", "folded"),
                    "edge_step_vs_bare": ("edge_step", "refittable"),
                    "torch_eager_vs_refittable": ("torch_eager", "refittable"),
                }
                ratio_row: dict[str, Any] = {"backend": name, "batch": batch}
                for key, (num, den) in pairs.items():
                    ratio_row[key] = _ratio(timings.get(num), timings.get(den))
                for key, (num, den) in pairs.items():  # the same from median latency: robust to bursts of noise
                    ratio_row[key + "_p50"] = _ratio(timings.get(num), timings.get(den), median=True)
                ratios.append(ratio_row)
            if refit:
                say(f"{name}: hot refit under load")
                refits.append({"backend": name, **measure_refit(be, _input(manifest.input.shape, 1))})
    return {
        "model": manifest.model_name,
        "fingerprint": manifest.fingerprint,
        "machine": _machine(),
        "settings": {
            "batches": list(batches),
            "rounds": rounds,
            "seconds_per_round": seconds_per_round,
            "max_batch": max_batch,
            "precision": precision or "fp32",
            "refit_mode": refit_mode,
        },
        "builds": builds,
        "rows": rows,
        "ratios": ratios,
        "refit": refits,
    }


def measure_refit(backend: Backend, x: np.ndarray, *, steady_s: float = 1.5, after_s: float = 0.5) -> dict[str, Any]:
    """Time a hot refit from blob bytes received to new parameters serving, while this thread keeps inferring.

    The blob holds the serving tensors slightly changed (gamma x 1.01), at version + 1.
    """
    tensors = {k: (v * np.float32(1.01) if k.endswith(".weight") else v) for k, v in backend.tensors.items()}
    data = blob_to_bytes(
        RefitBlob(tensors=tensors, fingerprint=backend.manifest.fingerprint, version=backend.version + 1)
    )
    steady: list[float] = []
    t_end = time.perf_counter() + steady_s
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        backend.infer(x)
        steady.append(time.perf_counter() - t0)

    done = threading.Event()
    result: dict[str, Any] = {}

    def apply() -> None:
        try:
            t0 = time.perf_counter()
            blob = blob_from_bytes(data)
            report = backend.refit(blob)
            result.update(parse_s=time.perf_counter() - t0 - report.validate_s - report.build_s, report=report)
        except Exception as exc:  # reported below, on the measuring thread
            result["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            result["serving_at"] = time.perf_counter()
            done.set()

    during: list[float] = []
    failed = 0
    old_version = backend.version
    first_new: float | None = None
    received = time.perf_counter()
    worker = threading.Thread(target=apply, name="bench-refit")
    worker.start()
    while not done.is_set():
        t0 = time.perf_counter()
        try:
            _, served = backend.infer_versioned(x)
        except Exception:  # counted, not raised: a failed request is what this measures
            failed += 1
        else:
            if served != old_version and first_new is None:
                first_new = time.perf_counter()
        during.append(time.perf_counter() - t0)
    worker.join()
    window = result["serving_at"] - received
    after_end = time.perf_counter() + after_s
    while time.perf_counter() < after_end or first_new is None:
        _, served = backend.infer_versioned(x)
        if served != old_version and first_new is None:
            first_new = time.perf_counter()
        if "error" in result:
            break
    if "error" in result:
        raise CemaError(f"The benchmark's refit failed: {result['error']}")
    assert first_new is not None
    rep = result["report"]
    st = timing_from_latencies(steady, batch=int(x.shape[0]))
    dur = timing_from_latencies(during or [0.0], batch=int(x.shape[0]))
    return {
        "blob_bytes": len(data),
        "received_to_serving_ms": round(window * 1e3, 2),
        "received_to_first_new_response_ms": round((first_new - received) * 1e3, 2),
        "parse_ms": round(result["parse_s"] * 1e3, 2),
        "validate_ms": round(rep.validate_s * 1e3, 2),
        "build_ms": round(rep.build_s * 1e3, 2),
        "version": [old_version, backend.version],
        "requests_during_refit": len(during),
        "failed_requests": failed,
        "steady_throughput": round(st.throughput, 2),
        "throughput_during_refit": round(len(during) * int(x.shape[0]) / window, 2) if window > 0 else None,
        "steady_p99_ms": round(st.p99_ms, 2),
        "max_latency_during_refit_ms": round(dur.max_ms, 2),
    }


def _settle(engines: dict[str, Callable[[], Any]], name: str, _round: int) -> None:
    """Before an engine's turn: let the previous engine's worker threads stop spinning, then one untimed call.

    Without it the first calls of each turn share the 2 cores with the previous session's spinning thread pool
    (ORT and OpenMP spin-wait after a run), which penalises whichever engine comes second in the round order.
    """
    time.sleep(SETTLE_S)
    engines[name]()


def _edge_step(be: Backend, x: np.ndarray, num_classes: int) -> Callable[[], Any]:
    from cema_deploy.runtime.selection import SampleSelector, SelectionConfig

    selector = SampleSelector(SelectionConfig.for_classes(num_classes))

    def step() -> Any:
        # The edge's whole per-batch work: inference, then the CEMA gate (select() computes the entropy).
        return selector.select(be.infer(x))

    return step


def _folded_engine(be: Backend, model_dir: Path) -> Callable[[np.ndarray], np.ndarray] | None:
    """The plain deployment's engine on the same device, if the export has reference_folded.onnx."""
    plain = getattr(be, "plain_engine", None)
    if plain is not None:  # e.g. TensorRT: a non-refittable engine built from the same ONNX
        fn: Callable[[np.ndarray], np.ndarray] = plain()
        return fn
    path = model_dir / FOLDED_FILE
    if not path.is_file() or not be.name.startswith("ort-"):
        return None
    from cema_deploy.runtime.onnxrt import PROVIDERS, session_from_onnx

    sess = session_from_onnx(path, providers=PROVIDERS[be.name])
    return sess.run


def _torch_eager(model_dir: Path) -> Callable[[np.ndarray], Any] | None:
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


def _input(shape: tuple[int, ...], batch: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, *shape[1:])).astype(np.float32)


def _ratio(num: Timing | None, den: Timing | None, *, median: bool = False) -> float | None:
    """Throughput of ``num`` over that of ``den``: mean throughput, or ``median`` (p50 latency of den / num)."""
    if num is None or den is None:
        return None
    if median:
        return round(den.p50_ms / num.p50_ms, 4) if num.p50_ms > 0 else None
    return round(num.throughput / den.throughput, 4) if den.throughput > 0 else None


def _machine() -> dict[str, Any]:
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
