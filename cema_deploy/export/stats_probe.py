"""Write the statistics probe of an export: ``stats_probe.onnx`` + ``stats_probe.json`` beside ``model.onnx``.

The probe is the exported graph with every BatchNormalization node replaced by ReduceMean and element-wise ops
(TensorRT's ONNX parser rejects BatchNormalization with ``training_mode=1`` and ONNX Runtime never fuses it;
ReduceMean + element-wise run on both, FACTS.md 2026-12-03). For a BN input ``X`` with channel axis 1::

    bm = mean(X over N and spatial axes)                 bv = mean((X - bm)^2 over the same axes)
    mm = (1 - mix) * running_mean + mix * bm              mv = (1 - mix) * running_var + mix * bv
    Y  = (X - mm) / sqrt(mv + eps) * weight + bias

``mix`` (the scalar input ``stats_mix``) chooses which statistics the layers *inside* the probe normalize with:
0 = the served ones (the statistics of every layer's input as the engine computes it now), 1 = the batch's own
(PyTorch's train-mode BatchNorm, test-batch BN), in between the mix the adapter is about to serve (alpha-BN,
You et al. 2021, normalizes this way in its forward pass). The outputs are ``bm`` and ``bv`` per layer, flattened
to ``[C]``. The layers' tensors are graph inputs fed at every run, so the probe follows every refit without a
rebuild; the other weights stay in the probe file (a copy of the model's, so the probe doubles the disk use).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cema_deploy._lazy import lazy_import
from cema_deploy.contract.manifest import Manifest
from cema_deploy.contract.stats_probe import PROBE_FILE, ProbeLayer, ProbeSpec
from cema_deploy.exceptions import ExportError

MIX_INPUT = "stats_mix"


def write_stats_probe(proto: Any, manifest: Manifest, out_dir: Path) -> ProbeSpec | None:
    """Write the probe of ``proto`` (the exported graph) into ``out_dir``; None (nothing written) without BN layers.

    ``proto`` is not modified. Refittable initializers that the probe does not feed (LayerNorm/GroupNorm of mixed
    models) keep pointing at ``model.norms.bin`` in the same folder.
    """
    onnx = lazy_import("onnx", extra="export", purpose="the statistics probe")
    from onnx import TensorProto, helper

    refittable = {p.name for p in manifest.refittable}
    g = onnx.ModelProto()
    g.CopyFrom(proto)
    graph = g.graph
    bn_nodes = [n for n in graph.node if n.op_type == "BatchNormalization"]
    usable = [n for n in bn_nodes if len(n.input) == 5 and n.input[3] in refittable and n.input[4] in refittable]
    if not usable:
        return None
    if len(usable) != len(bn_nodes):
        raise ExportError(
            f"{len(bn_nodes) - len(usable)} of {len(bn_nodes)} BatchNormalization nodes have no refittable running "
            "statistics; the statistics probe needs all of them (export with track_running_stats=True)."
        )
    opset = next((o.version for o in g.opset_import if o.domain in ("", "ai.onnx")), manifest.opset)
    ranks = _input_ranks(onnx, proto, usable)
    feeds = sorted({name for n in usable for name in n.input[1:] if name in refittable})
    dims = {p.name: p.shape for p in manifest.refittable}

    build = _Builder(graph, opset)
    new_nodes: list[Any] = []
    layers: list[ProbeLayer] = []
    for node in graph.node:
        if node.op_type != "BatchNormalization":
            new_nodes.append(node)
            continue
        layer = _replace_bn(build, node, ranks[node.output[0]], int(dims[node.input[3]][0]), len(layers))
        new_nodes += build.take()
        layers.append(layer)
        graph.output.extend(
            helper.make_tensor_value_info(name, TensorProto.FLOAT, [layer.channels])
            for name in (layer.batch_mean, layer.batch_var)
        )
    del graph.node[:]
    graph.node.extend(new_nodes)
    kept = [i for i in graph.initializer if i.name not in set(feeds)]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.input.append(helper.make_tensor_value_info(MIX_INPUT, TensorProto.FLOAT, []))
    for name in feeds:
        graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(dims[name])))
    del graph.value_info[:]
    onnx.save_model(g, str(out_dir / PROBE_FILE))
    try:  # by path: refittable tensors the probe does not feed (GN/LN, a refittable head) stay in model.norms.bin
        onnx.checker.check_model(str(out_dir / PROBE_FILE))
    except Exception as exc:
        (out_dir / PROBE_FILE).unlink()
        raise ExportError(f"The statistics probe graph fails the ONNX checker: {exc}") from exc
    spec = ProbeSpec(
        fingerprint=manifest.fingerprint,
        model_file=PROBE_FILE,
        input_name=manifest.input.name,
        mix_input=MIX_INPUT,
        feeds=tuple(feeds),
        layers=tuple(layers),
    )
    spec.save(out_dir)
    return spec


class _Builder:
    """Appends nodes (kept until :meth:`take`) and constant initializers to a graph."""

    def __init__(self, graph: Any, opset: int) -> None:
        self.graph, self.opset, self._nodes = graph, opset, list[Any]()
        self.prefix = "stats_probe/"
        self.one = self.const("stats_probe/one", 1.0)
        self.flat = self.const("stats_probe/flat", [-1], np.int64)

    def const(self, name: str, values: Any, dtype: Any = np.float32) -> str:
        from onnx import numpy_helper

        self.graph.initializer.append(numpy_helper.from_array(np.asarray(values, dtype), name))
        return name

    def op(self, kind: str, inputs: list[str], out: str, *, full_name: bool = False, **attrs: Any) -> str:
        from onnx import helper

        name = out if full_name else self.prefix + out
        self._nodes.append(helper.make_node(kind, inputs, [name], name=self.prefix + out.replace(".", "_"), **attrs))
        return name

    def reduce_mean(self, src: str, axes: list[int], out: str) -> str:
        if self.opset >= 18:  # opset 18 moved ReduceMean's axes from an attribute to an input
            return self.op(
                "ReduceMean", [src, self.const(self.prefix + out + "_axes", axes, np.int64)], out, keepdims=1
            )
        return self.op("ReduceMean", [src], out, axes=axes, keepdims=1)

    def take(self) -> list[Any]:
        nodes, self._nodes = self._nodes, []
        return nodes


def _replace_bn(b: _Builder, node: Any, rank: int, channels: int, index: int) -> ProbeLayer:
    """The nodes that replace one BatchNormalization (see the module docstring), written into ``b``."""
    x, scale, bias, mean, var = node.input
    b.prefix = f"stats_probe/{index}/"
    axes = [0, *range(2, rank)]
    shape = b.const(b.prefix + "shape", [1, -1] + [1] * (rank - 2), np.int64)
    eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
    layer = mean.removesuffix(".running_mean")
    bm = b.reduce_mean(x, axes, "bm")
    d = b.op("Sub", [x, bm], "d")
    bv = b.reduce_mean(b.op("Mul", [d, d], "d2"), axes, "bv")
    rest = b.op("Sub", [b.one, MIX_INPUT], "one_minus_mix")
    pm, pv = b.op("Reshape", [mean, shape], "pm"), b.op("Reshape", [var, shape], "pv")
    mm = b.op("Add", [b.op("Mul", [pm, rest], "pm_w"), b.op("Mul", [bm, MIX_INPUT], "bm_w")], "mm")
    mv = b.op("Add", [b.op("Mul", [pv, rest], "pv_w"), b.op("Mul", [bv, MIX_INPUT], "bv_w")], "mv")
    std = b.op("Sqrt", [b.op("Add", [mv, b.const(b.prefix + "eps", eps)], "mv_eps")], "std")
    xn = b.op("Div", [b.op("Sub", [x, mm], "xc"), std], "xn")
    ys = b.op("Mul", [xn, b.op("Reshape", [scale, shape], "w")], "ys")
    b.op("Add", [ys, b.op("Reshape", [bias, shape], "b")], node.output[0], full_name=True)
    out_mean = b.op("Reshape", [bm, b.flat], f"{layer}.batch_mean", full_name=True)
    out_var = b.op("Reshape", [bv, b.flat], f"{layer}.batch_var", full_name=True)
    return ProbeLayer(
        name=layer, mean=mean, var=var, channels=channels, eps=float(eps), batch_mean=out_mean, batch_var=out_var
    )


def _input_ranks(onnx: Any, proto: Any, nodes: list[Any]) -> dict[str, int]:
    """Rank of each BN node's output (= its input's), from ONNX shape inference on the graph without weights."""
    light = onnx.ModelProto()
    light.CopyFrom(proto)
    for init in light.graph.initializer:  # shape inference needs dims, not values (and no external files)
        init.ClearField("raw_data")
        init.ClearField("external_data")
        init.data_location = 0
    inferred = onnx.shape_inference.infer_shapes(light)
    known = {v.name: len(v.type.tensor_type.shape.dim) for v in inferred.graph.value_info}
    known.update({v.name: len(v.type.tensor_type.shape.dim) for v in inferred.graph.output})
    ranks: dict[str, int] = {}
    for n in nodes:
        rank = known.get(n.output[0], 0)
        if rank < 2:
            raise ExportError(
                f"Cannot tell the rank of BatchNormalization {n.name!r}'s input; the statistics probe needs it."
            )
        ranks[n.output[0]] = rank
    return ranks
