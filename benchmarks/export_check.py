"""What the load-time fingerprint re-hash costs: resnet50 (random init, 224 px) loaded with and without it, the full
``inspect`` check, against an ONNX Runtime session build of the same model (all measured in one run; medians).

    PYTHONPATH=$PWD python benchmarks/export_check.py --out benchmarks/results/export_check.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cema_deploy.contract.export_check import check_export
from cema_deploy.contract.manifest import manifest_from_dir
from cema_deploy.export import export_timm
from cema_deploy.runtime.backends.onnxrt import session_from_onnx


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/export_check.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / args.model
        export_timm(args.model, model_dir)
        onnx_path = model_dir / "model.onnx"
        result = {
            "model": args.model,
            "model_onnx_bytes": onnx_path.stat().st_size,
            "manifest_only_s": _median_s(lambda: manifest_from_dir(model_dir, verify=False), args.repeats),
            "load_with_rehash_s": _median_s(lambda: manifest_from_dir(model_dir), args.repeats),
            "inspect_check_s": _median_s(lambda: check_export(model_dir), args.repeats),
            "ort_session_s": _median_s(lambda: session_from_onnx(onnx_path), args.repeats),
        }
    result["rehash_vs_ort_session"] = result["load_with_rehash_s"] / result["ort_session_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
