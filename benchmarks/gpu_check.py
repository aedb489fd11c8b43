"""One-command GPU check: does every GPU backend here give ORT CPU's answers after a refit, how fast, on what.

    bash benchmarks/gpu_check.sh                      # resnet50, random init (nothing downloaded)
    bash benchmarks/gpu_check.sh --export out/r50     # an export made elsewhere (a Jetson without torch)

For each GPU backend available here (``ort-cuda``, ``ort-trt``, ``trt``) and precision (fp32; fp16 where the
backend has it): open it on the export, apply a non-trivial refit (every BatchNorm tensor perturbed), and compare
its logits on a fixed input set with ONNX Runtime CPU holding the same refit:

* fp32 (TF32 off: ``NVIDIA_TF32_OVERRIDE=0`` for the ORT EPs, ``BuilderFlag.TF32`` cleared for ``trt``):
  max |gpu - cpu| / max |cpu| <= 1e-3 and top-1 agreement >= 99.9 %;
* fp16: top-1 agreement >= 99 %.

The statistics probe (``edge run --adapt-stats``) on the backend's own engine where it has one (``trt``: a second
TensorRT engine; the others run it on ONNX Runtime CPU) against the ONNX Runtime CPU probe: per-layer batch means and
variances, max relative error <= 1e-3 (probe built at fp32) or 1e-2 (TF32; it is never built at fp16), and its
median time per batch. On ``trt`` also a local statistics refit after the refit, then a rollback: it must succeed
and serve the export's parameters with the local statistics, checked against ONNX Runtime CPU as above.

Then a hot refit timed under load (``cema_deploy.bench.measure_refit``) and the bench rows
(``cema_deploy.bench.run_bench``), the device, versions and, on a Jetson, the power mode (``nvpmodel -q``).
Everything goes into one JSON (default ``gpu-check.json``); what could not run is listed under ``skipped`` with
the reason. On a machine without a GPU it records that and exits 0. Exit status 1 means a check failed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

# Before any CUDA library initialises: fp32 parity is judged with TF32 off (cuBLAS/cuDNN/TensorRT honour it).
os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")

import numpy as np

GPU_BACKENDS = ("ort-cuda", "ort-trt", "trt")
PRECISIONS = {"ort-cuda": ("fp32",), "ort-trt": ("fp32", "fp16"), "trt": ("fp32", "fp16"), "ort-cpu": ("fp32",)}
FP32_MAX_REL_ERR = 1e-3
FP32_MIN_TOP1 = 0.999
FP16_MIN_TOP1 = 0.99
PROBE_MAX_REL_ERR = {"fp32": 1e-3, "tf32": 1e-2}


def _run(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"failed: {exc}"
    return (p.stdout or p.stderr).strip()


def device_report() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "nvidia_smi": _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]),
        "NVIDIA_TF32_OVERRIDE": os.environ.get("NVIDIA_TF32_OVERRIDE"),
    }
    tegra = Path("/etc/nv_tegra_release")
    if tegra.is_file():  # a Jetson: L4T release and power mode
        info["jetson"] = {"l4t": tegra.read_text().strip().splitlines()[0], "nvpmodel": _run(["nvpmodel", "-q"])}
    for mod in ("onnxruntime", "tensorrt", "torch"):
        if importlib.util.find_spec(mod) is None:
            info[mod] = None
            continue
        try:
            info[mod] = getattr(__import__(mod), "__version__", "installed")
        except Exception as exc:  # a broken install is a finding, not a crash
            info[mod] = f"import failed: {type(exc).__name__}: {exc}"
    for dist in ("cuda-python", "cuda-bindings", "onnxruntime-gpu"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = None
    try:
        import onnxruntime as ort

        info["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        pass
    return info


def perturbed_tensors(tensors: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    """Every refittable tensor changed (gamma, beta, mean shifted; variance scaled by 0.5..1.5): a real refit."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, v in tensors.items():
        noise = rng.standard_normal(v.shape).astype(v.dtype)
        if name.endswith("running_var"):
            out[name] = v * rng.uniform(0.5, 1.5, v.shape).astype(v.dtype)
        elif name.endswith("weight"):
            out[name] = v * (1 + 0.2 * noise)
        else:
            out[name] = v + 0.1 * noise
    return out


def fixed_inputs(manifest: Any, n: int, seed: int = 0) -> np.ndarray:
    """``n`` images drawn uniformly in [0, 1], normalised like the model's preprocessing (deterministic)."""
    _, c, h, w = manifest.input.shape
    rng = np.random.default_rng(seed)
    mean = np.asarray(manifest.preprocess.mean, dtype=np.float32).reshape(1, c, 1, 1)
    std = np.asarray(manifest.preprocess.std, dtype=np.float32).reshape(1, c, 1, 1)
    return ((rng.random((n, c, h, w), dtype=np.float32) - mean) / std).astype(np.float32)


def logits_of(backend: Any, x: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([backend.infer(x[i : i + batch]) for i in range(0, len(x), batch)])


def compare(ref: np.ndarray, got: np.ndarray, precision: str) -> dict[str, Any]:
    rel = float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-30))
    top1 = float((ref.argmax(1) == got.argmax(1)).mean())
    srt = np.sort(ref, axis=1)
    margin = (srt[:, -1] - srt[:, -2]) / np.maximum(np.abs(srt[:, -1]), 1e-30)
    if precision == "fp16":
        ok = top1 >= FP16_MIN_TOP1
        criteria = f"top-1 agreement >= {FP16_MIN_TOP1:.0%}"
    else:
        ok = rel <= FP32_MAX_REL_ERR and top1 >= FP32_MIN_TOP1
        criteria = f"max rel err <= {FP32_MAX_REL_ERR:g} and top-1 agreement >= {FP32_MIN_TOP1:.1%}"
    return {
        "max_rel_err": rel,
        "top1_agreement": top1,
        "reference_top1_margin_p10": float(np.percentile(margin, 10)),  # near-ties flip under any rounding
        "criteria": criteria,
        "pass": bool(ok),
    }


def check_backend(
    name: str,
    precision: str,
    model_dir: Path,
    blob: Any,
    x: np.ndarray,
    ref: np.ndarray,
    batch: int,
    refit_mode: str | None = None,
) -> dict[str, Any]:
    from cema_deploy.bench import measure_refit
    from cema_deploy.runtime import get_backend

    result: dict[str, Any] = {"backend": name, "precision": precision, "refit_mode": refit_mode}
    opts = {"max_batch": batch, "precision": precision if name != "ort-cpu" else None, "refit_mode": refit_mode}
    t0 = time.perf_counter()
    with get_backend(name, model_dir, **opts) as be:
        result["open_s"] = round(time.perf_counter() - t0, 3)
        result["providers"] = be.providers
        describe = getattr(be, "describe", None)
        if describe is not None:
            result["build"] = describe()
        t0 = time.perf_counter()
        report = be.refit(blob)
        result["first_refit_s"] = round(time.perf_counter() - t0, 3)
        result["first_refit_build_s"] = round(report.build_s, 3)
        result["parity"] = compare(ref, logits_of(be, x, batch), precision)
        result["stats_probe"] = check_stats_probe(be, model_dir, x[:batch], precision)
        result["hot_refit"] = measure_refit(be, x[:1])
    return result


def check_stats_probe(be: Any, model_dir: Path, x: np.ndarray, precision: str) -> dict[str, Any]:
    """The statistics probe on ``be``'s engine against the ORT CPU probe; on ``trt`` a local refit, then rollback."""
    from cema_deploy.contract import RefitBlob
    from cema_deploy.runtime import get_backend
    from cema_deploy.runtime.stats.probe import OrtProbeEngine, StatsProbe, probe_from_dir

    probe = probe_from_dir(model_dir, be.manifest, backend=be)
    if probe is None:
        return {"skipped": "the export has no statistics probe (no BatchNorm running statistics)"}
    cpu = StatsProbe(probe.spec, OrtProbeEngine(model_dir, probe.spec))
    probe_precision = "fp32" if precision == "fp32" else "tf32"
    worst = 0.0
    for mix in (0.0, 0.1, 1.0):
        got, want = probe.run(x, be.tensors, mix=mix), cpu.run(x, be.tensors, mix=mix)
        for layer in probe.layers:
            for a, b in ((got.mean[layer], want.mean[layer]), (got.var[layer], want.var[layer])):
                worst = max(worst, float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-30)))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        probe.run(x, be.tensors, mix=1.0)
        times.append(time.perf_counter() - t0)
    out: dict[str, Any] = {
        "engine": probe.kind,
        "batch": len(x),
        "max_rel_err": worst,
        "median_ms": round(1000 * float(np.median(times)), 2),
        "criteria": f"max rel err <= {PROBE_MAX_REL_ERR[probe_precision]:g} (probe at {probe_precision})",
    }
    ok = worst <= PROBE_MAX_REL_ERR[probe_precision]
    if be.name == "trt":  # a cloud blob, local statistics, then the blob's rollback
        before, (epoch, version) = dict(be.tensors), be.stamp
        be.refit(RefitBlob(tensors=perturbed_tensors(before, seed=1), fingerprint=be.manifest.fingerprint,
                           version=version + 1, epoch=epoch))  # fmt: skip
        stats = probe.run(x, be.tensors, mix=1.0)
        local = {}
        for ly in probe.spec.layers:
            local[ly.mean], local[ly.var] = stats.mean[ly.name], stats.var[ly.name]
        be.refit_local(local)
        out["rollback_to"] = be.rollback()
        with get_backend("ort-cpu", model_dir) as ref_be:
            ref_be.refit(RefitBlob(tensors={**before, **local}, fingerprint=be.manifest.fingerprint, version=1))
            out["after_rollback"] = compare(ref_be.infer(x), be.infer(x), precision)
        ok = ok and out["rollback_to"] == version and out["after_rollback"]["pass"]
    out["pass"] = bool(ok)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50", help="timm model to export (random init unless --weights)")
    ap.add_argument("--weights", type=Path, default=None, help="state dict for the export (.safetensors/.pt)")
    ap.add_argument("--img-size", type=int, default=None)
    ap.add_argument("--export", type=Path, default=None, help="use this export instead of exporting (no torch needed)")
    ap.add_argument("--images", type=int, default=1000, help="size of the fixed input set")
    ap.add_argument("--batch", default="1,8,32", help="bench batch sizes; the largest is also the engine max batch")
    ap.add_argument("--backends", default=None, help="comma-separated; default: every GPU backend available here")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--no-bench", action="store_true", help="parity and refit only")
    ap.add_argument("--json", type=Path, default=Path("gpu-check.json"))
    args = ap.parse_args()

    from cema_deploy.bench import available_backends

    batches = [int(b) for b in args.batch.split(",")]
    out: dict[str, Any] = {
        "command": shlex.join(["bash", "benchmarks/gpu_check.sh", *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": device_report(),
        "checks": [],
        "bench": [],
        "skipped": [],
        "errors": [],
    }
    here = available_backends()
    wanted = args.backends.split(",") if args.backends else list(GPU_BACKENDS)
    for name in wanted:
        if name not in here:
            why = {
                "ort-cuda": "onnxruntime has no CUDAExecutionProvider (pip install 'cema-deploy[gpu]')",
                "ort-trt": "onnxruntime has no TensorrtExecutionProvider (onnxruntime-gpu built with TensorRT)",
                "trt": "the tensorrt package is not installed (pip install 'cema-deploy[trt]'; Jetson: JetPack)",
            }
            out["skipped"].append({"what": name, "why": why.get(name, "not available here")})  # fmt: skip
    run = [n for n in wanted if n in here]
    tmp: tempfile.TemporaryDirectory[str] | None = None
    try:
        if not run:
            out["skipped"].append({"what": "export, parity, refit, bench", "why": "no GPU backend available here"})
        else:
            if args.export is not None:
                model_dir = args.export
            else:
                from cema_deploy.export import export_timm

                tmp = tempfile.TemporaryDirectory(prefix="cema-gpu-check-")
                model_dir = Path(tmp.name) / args.model
                t0 = time.perf_counter()
                export_timm(args.model, model_dir, weights=args.weights, img_size=args.img_size, folded_reference=True)
                out["export_s"] = round(time.perf_counter() - t0, 1)
            _checks(out, model_dir, run, batches, args)
    except Exception as exc:  # recorded in the JSON: the report is what the user sends us
        out["errors"].append(
            {"where": "setup", "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
        )
    finally:
        if tmp is not None:
            tmp.cleanup()
    out["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    failed = [
        c
        for c in out["checks"]
        if not c.get("parity", {}).get("pass", False) or not c.get("stats_probe", {}).get("pass", True)
    ]
    out["verdict"] = "fail" if failed or out["errors"] else ("pass" if out["checks"] else "nothing to check")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
    _summary(out, args.json)
    return 1 if out["verdict"] == "fail" else 0


def _checks(out: dict[str, Any], model_dir: Path, run: list[str], batches: list[int], args: Any) -> None:
    from cema_deploy.bench import run_bench
    from cema_deploy.contract import RefitBlob, blob_from_path, manifest_from_dir
    from cema_deploy.runtime import get_backend

    manifest = manifest_from_dir(model_dir)
    base = blob_from_path(model_dir / manifest.params_file)
    blob = RefitBlob(
        tensors=perturbed_tensors(dict(base.tensors)), fingerprint=manifest.fingerprint, version=base.version + 1
    )
    x = fixed_inputs(manifest, args.images)
    batch = max(batches)
    with get_backend("ort-cpu", model_dir) as cpu:
        cpu.refit(blob)
        t0 = time.perf_counter()
        ref = logits_of(cpu, x, batch)
        out["reference"] = {"backend": "ort-cpu", "images": len(x), "seconds": round(time.perf_counter() - t0, 1)}
    variants = [(n, p, None) for n in run for p in PRECISIONS.get(n, ("fp32",))]
    if "trt" in run:  # REFIT_INDIVIDUAL (only the norms refittable) against the default full REFIT
        variants.append(("trt", "fp32", "individual"))
    for name, precision, refit_mode in variants:
        try:
            out["checks"].append(check_backend(name, precision, model_dir, blob, x, ref, batch, refit_mode))
        except Exception as exc:
            err = f"{type(exc).__name__}: {exc}"
            out["checks"].append({"backend": name, "precision": precision, "refit_mode": refit_mode, "error": err})
            out["errors"].append({"where": f"{name} {precision} {refit_mode or ''}", "trace": traceback.format_exc()})
    if args.no_bench:
        out["skipped"].append({"what": "bench", "why": "--no-bench"})
        return
    benches = [(p, [n for n in run if p in PRECISIONS.get(n, ())], None) for p in ("fp32", "fp16")]
    if "trt" in run:
        benches.append(("fp32", ["trt"], "individual"))
    for precision, names, refit_mode in benches:
        if not names:
            continue
        try:
            report = run_bench(
                model_dir,
                backends=names,
                batches=batches,
                rounds=args.rounds,
                seconds_per_round=args.seconds,
                refit=False,  # timed above, per backend
                torch_eager=False,
                max_batch=batch,
                precision=precision,
                refit_mode=refit_mode,
            )
            out["bench"].append({"precision": precision, "refit_mode": refit_mode, **report})
        except Exception as exc:
            out["errors"].append({"where": f"bench {precision}", "error": f"{type(exc).__name__}: {exc}"})


def _summary(out: dict[str, Any], path: Path) -> None:
    print(f"device: {out['device'].get('nvidia_smi') or 'no nvidia-smi'}")
    if "jetson" in out["device"]:
        print(f"jetson: {out['device']['jetson']}")
    for c in out["checks"]:
        if "error" in c:
            print(f"FAIL  {c['backend']:8s} {c['precision']} {c.get('refit_mode') or ''}: {c['error']}")
            continue
        p, r = c["parity"], c["hot_refit"]
        print(
            f"{'PASS' if p['pass'] else 'FAIL'}  {c['backend']:8s} {c['precision']} {c.get('refit_mode') or ''}: "
            f"max rel err {p['max_rel_err']:.2e}, "
            f"top-1 agreement {100 * p['top1_agreement']:.2f} % ({p['criteria']}); hot refit received->serving "
            f"{r['received_to_serving_ms']:.0f} ms, {r['failed_requests']} failed requests"
        )
        sp = c.get("stats_probe", {})
        if "engine" in sp:
            print(
                f"{'PASS' if sp['pass'] else 'FAIL'}  {c['backend']:8s} {c['precision']} statistics probe on "
                f"{sp['engine']}: max rel err {sp['max_rel_err']:.2e} ({sp['criteria']}), {sp['median_ms']} ms at "
                f"batch {sp['batch']}"
                + (f"; rollback after a local refit -> v{sp['rollback_to']}" if "rollback_to" in sp else "")
            )
    for s in out["skipped"]:
        print(f"SKIPPED  {s['what']}: {s['why']}")
    for e in out["errors"]:
        print(f"ERROR  {e['where']}: {e.get('error', '')}")
    print(f"verdict: {out['verdict']}; wrote {path} (send it to us: benchmarks/README.md, 'GPU check')")


if __name__ == "__main__":
    sys.exit(main())
