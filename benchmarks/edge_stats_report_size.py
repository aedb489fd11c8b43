"""Bytes of one edge statistics report (protocol 3) for the demo's resnet10t and for ResNet-50: BatchNorm layers and
channels counted on the timm models (random init, no download), the report encoded as the edge sends it (float16
safetensors, base64 in the batch report's JSON). Writes JSON beside the printout.

    PYTHONPATH=$PWD python benchmarks/edge_stats_report_size.py --out benchmarks/results/2026-12-03-edge-stats-cloud
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import timm
from torch import nn

from cema_deploy.contract.edge_statistics import statistics_to_bytes, statistics_to_text
from cema_deploy.contract.messages import BatchReport


def measure(name: str, num_classes: int) -> dict[str, object]:
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    tensors = {}
    layers = channels = 0
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_mean is not None:
            layers += 1
            channels += mod.num_features
            tensors[f"{mod_name}.running_mean"] = mod.running_mean.numpy().astype(np.float32)
            tensors[f"{mod_name}.running_var"] = mod.running_var.numpy().astype(np.float32)
    raw = statistics_to_bytes(tensors, local_generation=123)
    report = BatchReport(seen=0, selected=0, uploaded=0, generation=1, statistics=statistics_to_text(tensors),
                         stats_generation=123)  # fmt: skip
    body = json.dumps(report.to_json(), separators=(",", ":")).encode()
    return {
        "model": name,
        "bn_layers": layers,
        "channels": channels,
        "data_bytes": 4 * channels,
        "safetensors_bytes": len(raw),
        "header_bytes": len(raw) - 4 * channels,
        "report_json_bytes": len(body),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rows = [measure("resnet10t", 10), measure("resnet50", 1000)]
    for r in rows:
        print(
            f"{r['model']}: {r['bn_layers']} BN layers, {r['channels']} channels -> {r['data_bytes']} B of float16 "
            f"values, {r['safetensors_bytes']} B safetensors, {r['report_json_bytes']} B report JSON (base64)"
        )
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report_size.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
