"""Hot-refit timing for ``cema-deploy bench``: one refit under load (blob bytes received -> new parameters serving)
and sustained refits through ``RefitScheduler`` (throughput, latency and RSS over a longer stretch)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import numpy as np

from cema_deploy.contract.blob import RefitBlob, blob_from_bytes, blob_to_bytes
from cema_deploy.exceptions import CemaError
from cema_deploy.runtime.backends.base import Backend
from cema_deploy.runtime.timing import timing_from_latencies


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
        "engine_bytes": int(getattr(backend, "engine_bytes", 0)),
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
    # Until a fused engine serves the new parameters: the hybrid path's promotion; every other path serves
    # fused parameters from the swap on (then it equals received -> serving).
    out["time_to_full_speed_ms"] = med("time_to_full_speed_ms")
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


def _steady_latencies(backend: Backend, x: np.ndarray, seconds: float) -> list[float]:
    """Seconds per ``backend.infer(x)``, back to back for ``seconds``: the steady state a refit is compared with."""
    out: list[float] = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        backend.infer(x)
        out.append(time.perf_counter() - t0)
    return out


def _refit_trial(backend: Backend, x: np.ndarray, *, steady_s: float, after_s: float, up: bool) -> dict[str, Any]:
    factor = np.float32(1.01 if up else 1 / 1.01)
    tensors = {k: (v * factor if k.endswith(".weight") else v) for k, v in backend.tensors.items()}
    data = blob_to_bytes(
        RefitBlob(tensors=tensors, fingerprint=backend.manifest.fingerprint, version=backend.version + 1)
    )
    steady = _steady_latencies(backend, x, steady_s)

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
    full_speed = window
    if getattr(backend, "full_speed_at", None) is not None:  # hybrid: wait for the fused engine (still inferring)
        deadline = time.perf_counter() + 30.0
        while not backend.serving_fused and time.perf_counter() < deadline and "error" not in result:  # type: ignore[attr-defined]
            backend.infer(x)
        full_speed = max(window, backend.full_speed_at - received)  # type: ignore[attr-defined]
    if "error" in result:
        raise CemaError(f"The benchmark's refit failed: {result['error']}")
    assert first_new is not None
    rep = result["report"]
    dur = timing_from_latencies(during or [0.0], batch=int(x.shape[0]))
    return {
        "blob_bytes": len(data),
        "received_to_serving_ms": round(window * 1e3, 2),
        "time_to_full_speed_ms": round(full_speed * 1e3, 2),
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
    window_s: float | None = None,
    window_pairs: int = 3,
) -> dict[str, Any]:
    """Throughput, latency and memory while blobs arrive every ``refit_every_s`` for ``seconds``.

    This thread infers at ``x``'s batch size throughout: first ``steady_s`` alone (the baseline, default a
    quarter of ``seconds``, at most 10 s), then ``seconds`` while a feeder thread serialises a new blob
    (gamma alternately x 1.01 and / 1.01, next version) every ``refit_every_s`` and hands the parsed blob to
    a :class:`~cema_deploy.runtime.updates.scheduler.RefitScheduler`. RSS is sampled every 0.25 s; ``rss_after_10s_mb``
    is the first sample ``rss_at_s`` into the refits, ``rss_mb`` the last one, after the last refit.

    Then ``window_pairs`` pairs of ``window_s`` windows (default ``seconds`` / 8, 0.25-2 s), without blobs and
    with them (``interleaved``): the throughput ratio of the two kinds of windows by wall time and by this
    process's CPU time (images per CPU second, the refits' own work included), robust to the load other
    processes put on a shared machine.
    """
    from cema_deploy.runtime.updates.scheduler import RefitOutcome, RefitScheduler

    steady_s = min(10.0, max(1.0, seconds / 4)) if steady_s is None else steady_s
    window_s = min(2.0, max(0.25, seconds / 8)) if window_s is None else window_s
    batch = int(x.shape[0])
    cpu0 = time.process_time()
    steady = _steady_latencies(backend, x, steady_s)
    steady_cpu_s = time.process_time() - cpu0
    base = dict(backend.tensors)
    variants = [
        {k: (v * np.float32(f) if k.endswith(".weight") else v) for k, v in base.items()} for f in (1.01, 1 / 1.01)
    ]
    outcomes: list[RefitOutcome] = []
    rss: list[tuple[float, float]] = []
    stop = threading.Event()
    active = threading.Event()  # blobs are offered only while set (cleared in the interleaved off windows)
    active.set()
    start = time.perf_counter()

    def feed(refits: RefitScheduler) -> None:
        version = backend.version
        next_blob = start
        while not stop.is_set():
            now = time.perf_counter()
            rss.append((now - start, rss_mb()))
            if not active.is_set():
                next_blob = now + refit_every_s
            elif now >= next_blob:
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
        cpu0 = time.process_time()
        t_end = start + seconds
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            try:
                backend.infer_versioned(x)
            except Exception:  # counted, not raised
                failed += 1
            lat.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        sustained_cpu_s = time.process_time() - cpu0
        applied_in_run = refits.applied
        windows: list[dict[str, Any]] = []
        for i in range(2 * window_pairs):
            on = i % 2 == 1
            if on:
                active.set()
            else:
                active.clear()
                refits.wait_idle(timeout=120)  # an off window starts with no refit running
            w = _window(backend, x, window_s)
            failed += w.pop("failed")
            windows.append({"refits": on, **w})
        stop.set()
        feeder.join()
        refits.wait_idle(timeout=120)
        counts = {
            "submitted": refits.submitted,
            "applied": refits.applied,
            "coalesced": refits.coalesced,
            "failed": refits.failed,
        }
    rss.append((time.perf_counter() - start, rss_mb()))
    st = timing_from_latencies(steady, batch=batch)
    sus = timing_from_latencies(lat or [0.0], batch=batch)
    after = [m for t, m in rss if t >= rss_at_s] or [rss[-1][1]]
    reports = [o.report for o in outcomes if o.applied and o.report is not None]
    errors = sorted({f"{type(o.error).__name__}: {o.error}" for o in outcomes if o.error is not None})
    offered = int(elapsed / refit_every_s) + 1  # blobs offered during the continuous run (the first at its start)
    return {
        "seconds": round(elapsed, 2),
        "refit_every_s": refit_every_s,
        "min_interval_s": min_interval_s,
        "refits_offered_per_s": round(offered / elapsed, 2) if elapsed > 0 else 0.0,
        "refits_applied_per_s": round(applied_in_run / elapsed, 2) if elapsed > 0 else 0.0,
        "refits_applied_in_run": applied_in_run,
        "throughput_ratio_cpu": _cpu_ratio(len(lat), sustained_cpu_s, len(steady), steady_cpu_s),
        "interleaved": _interleaved(windows, batch),
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


def _window(backend: Backend, x: np.ndarray, seconds: float) -> dict[str, Any]:
    """Requests, wall and process CPU seconds of ``seconds`` of back-to-back inference on this thread."""
    n = failed = 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    t_end = t0 + seconds
    while time.perf_counter() < t_end:
        try:
            backend.infer_versioned(x)
        except Exception:  # counted, not raised
            failed += 1
        n += 1
    return {"requests": n, "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - cpu0, "failed": failed}


def _cpu_ratio(n_num: int, cpu_num: float, n_den: int, cpu_den: float) -> float | None:
    """Requests per CPU second of one stretch over those of another."""
    if cpu_num <= 0 or cpu_den <= 0 or n_den == 0:
        return None
    return round((n_num / cpu_num) / (n_den / cpu_den), 4)


def _interleaved(windows: list[dict[str, Any]], batch: int) -> dict[str, Any]:
    """Throughput with refits over without, by wall and by CPU time, per adjacent pair of windows (median)."""
    wall, cpu = [], []
    for off, on in zip(windows[::2], windows[1::2], strict=True):
        if off["requests"] and off["wall_s"] > 0 and on["wall_s"] > 0:
            wall.append((on["requests"] / on["wall_s"]) / (off["requests"] / off["wall_s"]))
        c = _cpu_ratio(on["requests"], on["cpu_s"], off["requests"], off["cpu_s"])
        if c is not None:
            cpu.append(c)
    return {
        "pairs": len(windows) // 2,
        "throughput_ratio_wall": round(float(np.median(wall)), 4) if wall else None,
        "throughput_ratio_cpu": round(float(np.median(cpu)), 4) if cpu else None,
        "windows": [
            {
                "refits": w["refits"],
                "requests": w["requests"],
                "throughput": round(w["requests"] * batch / w["wall_s"], 2) if w["wall_s"] > 0 else 0.0,
                "wall_s": round(w["wall_s"], 3),
                "cpu_s": round(w["cpu_s"], 3),
            }
            for w in windows
        ],
    }


def rss_mb() -> float:
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
