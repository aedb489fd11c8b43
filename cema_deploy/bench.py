"""``cema-deploy bench``: throughput, latency and hot-refit cost of an export on each available backend.

Every figure that is compared is measured in the same run, engines interleaved (``runtime.timing``), and
reported as a ratio: the refittable engine against a BN-folded export of the same weights (the speed a plain
deployment gets), the full edge step (inference + entropy + selection) against bare inference, and PyTorch
eager against the refittable engine. Refit is timed from blob bytes received to new parameters serving, with
inference running on another thread throughout, against an idle plain session build of the same model timed
in the same run; sustained refits (a blob every N seconds through ``RefitScheduler``) measure throughput,
latency and RSS over a longer stretch.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from collections.abc import Callable, Mapping, Sequence
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
    refit_repeats: int = 1,
    sustained_refit_s: float = 0.0,
    refit_every_s: float = 1.0,
    min_refit_interval_s: float = 0.0,
    backend_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the benchmark and return a JSON-able report (see ``benchmarks/README.md`` for its fields).

    ``max_batch`` (TensorRT engines' batch range; default the largest of ``batches``), ``precision`` and
    ``refit_mode`` (``trt``: ``full`` or ``individual``) reach the backends that take them
    (``registry.backend_options``); ``backend_options`` go to the ONNX Runtime CPU/CUDA backends only
    (``refit_path``, ``allow_spinning``).
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
    sustained: dict[str, Any] | None = None  # measured on the first backend only
    max_batch = max_batch or max(batches)
    builds: dict[str, Any] = {}
    for name in backends:
        opts = dict(backend_options or {}) if name in ("ort-cpu", "ort-cuda") else {}
        opts.update(max_batch=max_batch, precision=precision, refit_mode=refit_mode)
        with get_backend(name, model_dir, **opts) as be:
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
                x1 = _input(manifest.input.shape, 1)
                refits.append({"backend": name, **measure_refit(be, x1, repeats=refit_repeats)})
            if sustained_refit_s > 0 and sustained is None:
                say(f"{name}: sustained refits for {sustained_refit_s:g} s, one every {refit_every_s:g} s")
                sustained = {
                    "backend": name,
                    "refit_path": getattr(be, "refit_path", "plain"),
                    **measure_sustained_refit(
                        be,
                        _input(manifest.input.shape, 1),
                        seconds=sustained_refit_s,
                        refit_every_s=refit_every_s,
                        min_interval_s=min_refit_interval_s,
                    ),
                }
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
            "refit_repeats": refit_repeats,
            "sustained_refit_s": sustained_refit_s,
            "refit_every_s": refit_every_s,
            "min_refit_interval_s": min_refit_interval_s,
            "backend_options": dict(backend_options or {}),
        },
        "builds": builds,
        "rows": rows,
        "ratios": ratios,
        "refit": refits,
        **({"sustained_refit": sustained} if sustained is not None else {}),
    }


def measure_refit(
    backend: Backend,
    x: np.ndarray,
    *,
    steady_s: float = 1.5,
    after_s: float = 0.5,
    repeats: int = 1,
    idle_builds: int = 3,
) -> dict[str, Any]:
    """Time hot refits from blob bytes received to new parameters serving, while this thread keeps inferring.

    First, with nothing else running, the plain engine build (a fresh deployment's session build with the
    refit tensors) is timed ``idle_builds`` times: the yardstick of the targets. Then ``repeats`` times:
    ``steady_s`` of inference alone, a refit on a worker thread (blob: the serving tensors with gamma x 1.01
    or / 1.01, at version + 1) while this thread keeps inferring, and ``after_s`` more. Figures are medians
    over the repeats (every trial is in ``trials``).
    """
    idle = []
    for _ in range(idle_builds):
        t0 = time.perf_counter()
        engine = backend.build_plain(dict(backend.tensors))
        idle.append(time.perf_counter() - t0)
        del engine
    trials = [_refit_trial(backend, x, steady_s=steady_s, after_s=after_s, up=i % 2 == 0) for i in range(repeats)]
    steady_all = [v for t in trials for v in t.pop("_steady")]
    st = timing_from_latencies(steady_all, batch=int(x.shape[0]))
    idle_ms = float(np.median(idle)) * 1e3

    def med(key: str) -> float:
        return round(float(np.median([t[key] for t in trials])), 2)

    out: dict[str, Any] = {
        "refit_path": getattr(backend, "refit_path", "plain"),
        "blob_bytes": trials[0]["blob_bytes"],
        "repeats": repeats,
        "idle_build_ms": round(idle_ms, 2),
        "idle_build_ms_all": [round(v * 1e3, 2) for v in idle],
    }
    for key in (
        "received_to_serving_ms",
        "received_to_first_new_response_ms",
        "first_new_response_latency_ms",
        "parse_ms",
        "validate_ms",
        "build_ms",
        "warmup_ms",
        "requests_during_refit",
        "max_latency_during_refit_ms",
        "throughput_during_refit",
    ):
        out[key] = med(key)
    out["version"] = [trials[0]["version"][0], trials[-1]["version"][1]]
    out["failed_requests"] = sum(t["failed_requests"] for t in trials)
    out["steady_throughput"] = round(st.throughput, 2)
    out["steady_p99_ms"] = round(st.p99_ms, 2)
    out["targets"] = {
        # received -> serving no slower than an idle plain build of the same model (same run)
        "serving_vs_idle_build": round(out["received_to_serving_ms"] / idle_ms, 3),
        # the slowest request while a refit runs, against the steady p99
        "max_latency_vs_steady_p99": round(out["max_latency_during_refit_ms"] / st.p99_ms, 3),
        # the first new-version response, against the refit's build (+ warm-up) time plus the steady p99
        "first_new_vs_build_plus_p99": round(
            out["received_to_first_new_response_ms"] / (out["build_ms"] + out["warmup_ms"] + st.p99_ms), 3
        ),
    }
    out["trials"] = trials
    return out


def _refit_trial(backend: Backend, x: np.ndarray, *, steady_s: float, after_s: float, up: bool) -> dict[str, Any]:
    factor = np.float32(1.01 if up else 1 / 1.01)
    tensors = {k: (v * factor if k.endswith(".weight") else v) for k, v in backend.tensors.items()}
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
            spent = report.validate_s + report.build_s + report.warmup_s
            result.update(parse_s=time.perf_counter() - t0 - spent, report=report)
        except Exception as exc:  # reported below, on the measuring thread
            result["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            result["serving_at"] = time.perf_counter()
            done.set()

    during: list[float] = []
    failed = 0
    old_version = backend.version
    first_new: tuple[float, float] | None = None  # (completed at, latency) of the first new-version response
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
            t1 = time.perf_counter()
            if served != old_version and first_new is None:
                first_new = (t1, t1 - t0)
        during.append(time.perf_counter() - t0)
    worker.join()
    window = result["serving_at"] - received
    after_end = time.perf_counter() + after_s
    while time.perf_counter() < after_end or first_new is None:
        if "error" in result:
            break
        t0 = time.perf_counter()
        _, served = backend.infer_versioned(x)
        t1 = time.perf_counter()
        if served != old_version and first_new is None:
            first_new = (t1, t1 - t0)
    if "error" in result:
        raise CemaError(f"The benchmark's refit failed: {result['error']}")
    assert first_new is not None
    rep = result["report"]
    dur = timing_from_latencies(during or [0.0], batch=int(x.shape[0]))
    return {
        "blob_bytes": len(data),
        "received_to_serving_ms": round(window * 1e3, 2),
        "received_to_first_new_response_ms": round((first_new[0] - received) * 1e3, 2),
        "first_new_response_latency_ms": round(first_new[1] * 1e3, 2),
        "parse_ms": round(result["parse_s"] * 1e3, 2),
        "validate_ms": round(rep.validate_s * 1e3, 2),
        "build_ms": round(rep.build_s * 1e3, 2),
        "warmup_ms": round(rep.warmup_s * 1e3, 2),
        "version": [old_version, backend.version],
        "requests_during_refit": len(during),
        "failed_requests": failed,
        "throughput_during_refit": round(len(during) * int(x.shape[0]) / window, 2) if window > 0 else 0.0,
        "max_latency_during_refit_ms": round(dur.max_ms, 2),
        "_steady": steady,
    }


def measure_sustained_refit(
    backend: Backend,
    x: np.ndarray,
    *,
    seconds: float,
    refit_every_s: float = 1.0,
    min_interval_s: float = 0.0,
    steady_s: float | None = None,
    rss_at_s: float = 10.0,
) -> dict[str, Any]:
    """Throughput, latency and memory while blobs arrive every ``refit_every_s`` for ``seconds``.

    This thread infers at ``x``'s batch size throughout: first ``steady_s`` alone (the baseline, default a
    quarter of ``seconds``, at most 10 s), then ``seconds`` while a feeder thread serialises a new blob
    (gamma alternately x 1.01 and / 1.01, next version) every ``refit_every_s`` and hands the parsed blob to
    a :class:`~cema_deploy.runtime.refit.RefitScheduler`. RSS is sampled every 0.25 s; ``rss_after_10s_mb``
    is the first sample ``rss_at_s`` into the refits, ``rss_mb`` the last one, after the last refit.
    """
    from cema_deploy.runtime.refit import RefitOutcome, RefitScheduler

    steady_s = min(10.0, max(1.0, seconds / 4)) if steady_s is None else steady_s
    batch = int(x.shape[0])
    steady: list[float] = []
    t_end = time.perf_counter() + steady_s
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        backend.infer(x)
        steady.append(time.perf_counter() - t0)
    base = dict(backend.tensors)
    variants = [
        {k: (v * np.float32(f) if k.endswith(".weight") else v) for k, v in base.items()} for f in (1.01, 1 / 1.01)
    ]
    outcomes: list[RefitOutcome] = []
    rss: list[tuple[float, float]] = []
    stop = threading.Event()
    start = time.perf_counter()

    def feed(refits: RefitScheduler) -> None:
        version = backend.version
        next_blob = start
        while not stop.is_set():
            now = time.perf_counter()
            rss.append((now - start, _rss_mb()))
            if now >= next_blob:
                version += 1
                blob = RefitBlob(
                    tensors=variants[version % 2], fingerprint=backend.manifest.fingerprint, version=version
                )
                refits.submit(blob_from_bytes(blob_to_bytes(blob)))  # as received over the wire
                next_blob += refit_every_s
            stop.wait(min(0.25, max(0.0, next_blob - time.perf_counter())))

    lat: list[float] = []
    failed = 0
    with RefitScheduler(backend, min_interval_s=min_interval_s, on_done=outcomes.append) as refits:
        feeder = threading.Thread(target=feed, args=(refits,), name="bench-feed")
        feeder.start()
        t_end = start + seconds
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            try:
                backend.infer_versioned(x)
            except Exception:  # counted, not raised
                failed += 1
            lat.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        stop.set()
        feeder.join()
        refits.wait_idle(timeout=120)
        counts = {
            "submitted": refits.submitted,
            "applied": refits.applied,
            "coalesced": refits.coalesced,
            "failed": refits.failed,
        }
    rss.append((time.perf_counter() - start, _rss_mb()))
    st = timing_from_latencies(steady, batch=batch)
    sus = timing_from_latencies(lat or [0.0], batch=batch)
    after = [m for t, m in rss if t >= rss_at_s] or [rss[-1][1]]
    reports = [o.report for o in outcomes if o.applied and o.report is not None]
    errors = sorted({f"{type(o.error).__name__}: {o.error}" for o in outcomes if o.error is not None})
    return {
        "seconds": round(elapsed, 2),
        "refit_every_s": refit_every_s,
        "min_interval_s": min_interval_s,
        "refits": counts["applied"],
        "refits_submitted": counts["submitted"],
        "refits_coalesced": counts["coalesced"],
        "refits_failed": counts["failed"],
        "refit_errors": errors[:5],
        "failed_requests": failed,
        "requests": len(lat),
        "throughput": round(len(lat) * batch / elapsed, 2) if elapsed > 0 else 0.0,
        "steady_throughput": round(st.throughput, 2),
        "throughput_ratio": round(len(lat) * batch / elapsed / st.throughput, 4) if st.throughput > 0 else None,
        "p50_ms": round(sus.p50_ms, 2),
        "p99_ms": round(sus.p99_ms, 2),
        "max_ms": round(sus.max_ms, 2),
        "steady_p50_ms": round(st.p50_ms, 2),
        "steady_p99_ms": round(st.p99_ms, 2),
        "build_ms_median": round(float(np.median([r.build_s for r in reports])) * 1e3, 2) if reports else None,
        "warmup_ms_median": round(float(np.median([r.warmup_s for r in reports])) * 1e3, 2) if reports else None,
        "rss_mb": round(rss[-1][1], 1),
        "rss_after_10s_mb": round(after[0], 1),
        "rss_growth_pct": round((rss[-1][1] / after[0] - 1) * 100, 2),
        "rss_max_mb": round(max(m for _, m in rss), 1),
        "rss_samples": [[round(t, 2), round(m, 1)] for t, m in rss[:: max(1, len(rss) // 60)]],
    }


def _rss_mb() -> float:
    """Resident set size of this process in MB (psutil when installed, else /proc on Linux)."""
    try:
        import psutil
    except ImportError:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
        except OSError:
            return float("nan")
    return float(psutil.Process().memory_info().rss) / 1e6


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

    # the same thread settings as the refittable engine, so the ratio compares graphs, not settings
    spinning = bool(getattr(be, "allow_spinning", False))
    sess = session_from_onnx(path, providers=PROVIDERS[be.name], allow_spinning=spinning)
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
