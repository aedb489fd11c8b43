"""Checks an export must pass before ``cema-deploy export`` returns: a failed check is an error."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cema_deploy._lazy import lazy_import
from cema_deploy.contract.manifest import Manifest, manifest_from_dir
from cema_deploy.exceptions import VerificationError
from cema_deploy.export.norms import count_norm_layers


@dataclass(frozen=True, kw_only=True)
class VerifyReport:
    max_abs_diff: float
    norm_layers: dict[str, int]
    bn_nodes: int


def verify_export(out_dir: Path, model: Any, manifest: Manifest, *, atol: float = 1e-4, seed: int = 0) -> VerifyReport:
    """ONNX checker, refittable initializers (present, separate, right values), BN count, ORT parity."""
    torch = lazy_import("torch", extra="export")
    onnx = lazy_import("onnx", extra="export")
    from onnx import numpy_helper

    model_path = out_dir / manifest.model_file
    if manifest_from_dir(out_dir) != manifest:  # re-hashes model.onnx as every load does
        raise VerificationError(f"{out_dir / 'manifest.json'} does not read back as the manifest written.")
    try:
        onnx.checker.check_model(str(model_path), full_check=True)
    except Exception as exc:
        raise VerificationError(f"ONNX checker rejected {model_path}: {exc}") from exc

    proto = onnx.load(str(model_path))
    inits = {i.name: i for i in proto.graph.initializer}
    graph_inputs = {i.name for i in proto.graph.input}
    consumed = {name for node in proto.graph.node for name in node.input}
    state = model.state_dict()
    for p in manifest.refittable:
        if p.name not in inits:
            raise VerificationError(f"Refittable tensor {p.name!r} is not an initializer of {model_path}.")
        if p.name in graph_inputs:
            raise VerificationError(f"Refittable tensor {p.name!r} is a graph input; ORT would not fuse it.")
        if p.name not in consumed:
            raise VerificationError(f"Refittable tensor {p.name!r} is not used by any node (aliased?).")
        value = numpy_helper.to_array(inits[p.name])
        expected = state[p.name].detach().cpu().numpy()
        if value.shape != expected.shape or not np.array_equal(value, expected):
            raise VerificationError(f"Initializer {p.name!r} does not hold the model's value (de-duplicated?).")

    norm_layers = count_norm_layers(model)
    bn_nodes = sum(1 for n in proto.graph.node if n.op_type == "BatchNormalization")
    if bn_nodes != norm_layers["BatchNorm"]:
        raise VerificationError(
            f"{bn_nodes} BatchNormalization nodes in the graph, but the PyTorch model has "
            f"{norm_layers['BatchNorm']} BatchNorm layers: some were folded or merged."
        )

    session = _ort_session(model_path)
    batch = manifest.input.shape[0] if manifest.input.shape[0] > 0 else 2
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *manifest.input.shape[1:], generator=gen)
    with torch.no_grad():
        ref = model(x).float().numpy()
    got = np.asarray(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    if got.shape != ref.shape:
        raise VerificationError(f"ORT output shape {got.shape} differs from PyTorch's {ref.shape}.")
    diff = float(np.max(np.abs(got - ref)))
    if not diff <= atol:
        raise VerificationError(f"Logits differ from PyTorch by {diff:.3g} (> {atol:g}); the export is not faithful.")
    return VerifyReport(max_abs_diff=diff, norm_layers=norm_layers, bn_nodes=bn_nodes)


def _ort_session(model_path: Path) -> Any:
    """A plain ONNX Runtime CPU session on the export, fully optimised as the edge runs it (the export side checks
    its own output with ONNX Runtime directly; the edge runtime's loaders are not the exporter's business)."""
    ort = lazy_import("onnxruntime", extra="export")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(model_path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise VerificationError(f"ONNX Runtime could not load {model_path}: {exc}") from exc
