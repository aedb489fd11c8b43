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
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from cema_deploy.bench.engines import (
    Progress,
    available_backends,
    edge_step,
    folded_engine,
    machine_info,
    random_input,
    settle,
    torch_eager_engine,
)
from cema_deploy.bench.refit import measure_refit, measure_sustained_refit
from cema_deploy.contract.manifest import manifest_from_dir
from cema_deploy.exceptions import BackendUnavailableError
from cema_deploy.runtime.backends.registry import get_backend, list_backends
from cema_deploy.runtime.timing import Timing, measure_interleaved


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
    eager = torch_eager_engine(model_dir) if torch_eager else None
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
            folded = folded_engine(be, model_dir)
            for batch in batches:
                x = random_input(manifest.input.shape, batch)
                engines: dict[str, Callable[[], Any]] = {"refittable": partial(be.infer, x)}
                if folded is not None:
                    engines["folded"] = partial(folded, x)
                engines["edge_step"] = edge_step(be, x, manifest.num_classes)
                if eager is not None and name == "ort-cpu":
                    engines["torch_eager"] = partial(eager, x)
                say(f"{name} batch {batch}: {', '.join(engines)}")
                timings = measure_interleaved(
                    engines,
                    batch=batch,
                    rounds=rounds,
                    seconds_per_round=seconds_per_round,
                    on_round=partial(settle, engines),
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
                x1 = random_input(manifest.input.shape, 1)
                refits.append({"backend": name, **measure_refit(be, x1, repeats=refit_repeats)})
            if sustained_refit_s > 0 and sustained is None:
                say(f"{name}: sustained refits for {sustained_refit_s:g} s, one every {refit_every_s:g} s")
                sustained = {
                    "backend": name,
                    "refit_path": getattr(be, "refit_path", "plain"),
                    **measure_sustained_refit(
                        be,
                        random_input(manifest.input.shape, 1),
                        seconds=sustained_refit_s,
                        refit_every_s=refit_every_s,
                        min_interval_s=min_refit_interval_s,
                    ),
                }
    return {
        "model": manifest.model_name,
        "fingerprint": manifest.fingerprint,
        "machine": machine_info(),
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


def _ratio(num: Timing | None, den: Timing | None, *, median: bool = False) -> float | None:
    """Throughput of ``num`` over that of ``den``: mean throughput, or ``median`` (p50 latency of den / num)."""
    if num is None or den is None:
        return None
    if median:
        return round(den.p50_ms / num.p50_ms, 4) if num.p50_ms > 0 else None
    return round(num.throughput / den.throughput, 4) if den.throughput > 0 else None
