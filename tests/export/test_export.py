from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from cema_deploy.contract import blob_from_path, manifest_from_dir
from cema_deploy.exceptions import ModelError
from cema_deploy.export.norms import collect_norm_params, count_norm_layers
from cema_deploy.export.to_onnx import export_timm
from cema_deploy.runtime.backends.onnxrt import session_from_onnx
from tests.conftest import tiny_model


def _inits(out):
    proto = onnx.load(str(out / "model.onnx"))
    return proto, {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_bn_preserved_for_resnets(tmp_path, name):
    import timm

    model = timm.create_model(name, num_classes=10).eval()
    result = export_timm(name, tmp_path, model=model, img_size=64)
    proto, _ = _inits(tmp_path)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert n_bn == {"resnet18": 20, "resnet50": 53}[name]
    assert sum(n.op_type == "BatchNormalization" for n in proto.graph.node) == n_bn
    assert result.bn_nodes == n_bn and result.parity_max_abs_diff <= 1e-4
    assert len(result.manifest.refittable) == 4 * n_bn


def test_no_aliasing_on_a_fresh_model(tmp_path):
    """A fresh BN has running_mean == beta == 0 and running_var == gamma == 1: the exporter's de-duplication
    would merge them (FACTS.md). Every refittable tensor must stay its own, used initializer."""
    import timm

    model = timm.create_model("test_resnet", num_classes=10).eval()
    export_timm("test_resnet", tmp_path, model=model, img_size=64)
    proto, inits = _inits(tmp_path)
    manifest = manifest_from_dir(tmp_path)
    consumers: dict[str, list[str]] = {}
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append(f"{node.op_type}:{i}")
    state = model.state_dict()
    for p in manifest.refittable:
        assert p.name in inits, p.name
        np.testing.assert_array_equal(inits[p.name], state[p.name].numpy())
        assert len(consumers[p.name]) == 1, (p.name, consumers[p.name])
    assert not any(n.op_type == "Identity" for n in proto.graph.node)
    # every other weight keeps its PyTorch name
    for k, v in state.items():
        if v.is_floating_point():
            assert k in inits, k


@pytest.mark.parametrize("kind", ["bn", "gn", "ln"])
def test_parity_before_and_after_blob(exported, kind):
    out, model = exported(kind)
    manifest = manifest_from_dir(out)
    layer_types = {p.layer_type for p in manifest.refittable}
    assert layer_types == {"bn": {"BatchNorm"}, "gn": {"GroupNorm"}, "ln": {"LayerNorm"}}[kind]
    x = torch.randn(3, *manifest.input.shape[1:], generator=torch.Generator().manual_seed(1))
    blob = blob_from_path(out / "params.safetensors")
    sess = session_from_onnx(out / "model.onnx", tensors=blob.tensors)
    with torch.no_grad():
        np.testing.assert_allclose(sess.run(x.numpy()), model(x).numpy(), atol=1e-4, rtol=0)

    # perturb every refittable tensor in a copy of the torch model, apply the same values through ORT
    import copy

    perturbed = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(7)
    sd = perturbed.state_dict()
    new = {}
    with torch.no_grad():
        for p in manifest.refittable:
            t = sd[p.name]
            delta = torch.randn(t.shape, generator=gen) * 0.2
            t.copy_(t.abs() + 0.1 if p.name.endswith("running_var") else t + delta)
            new[p.name] = t.numpy().copy()
        ref = perturbed(x).numpy()
    sess2 = session_from_onnx(out / "model.onnx", tensors=new)
    got = sess2.run(x.numpy())
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    assert np.abs(got - sess.run(x.numpy())).max() > 1e-2  # the new values really took effect
    # ORT still fuses: no BatchNormalization node survives optimisation
    assert all(n.op_type != "BatchNormalization" for n in _optimized_nodes(out)) or kind != "bn"


def _optimized_nodes(out):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(out / "opt.onnx")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.log_severity_level = 3
    ort.InferenceSession(str(out / "model.onnx"), so, providers=["CPUExecutionProvider"])
    nodes = list(onnx.load(str(out / "opt.onnx"), load_external_data=False).graph.node)
    (out / "opt.onnx").unlink()
    return nodes


def test_collect_norm_params_names_match_state_dict():
    model = tiny_model("bn")
    params = collect_norm_params(model)
    sd = model.state_dict()
    assert all(p.name in sd for p in params)
    assert count_norm_layers(model)["BatchNorm"] * 4 == len(params)


def test_fingerprint_binds_weights_and_graph(tmp_path):
    a = tiny_model("bn", seed=0)
    b = tiny_model("bn", seed=0)
    with torch.no_grad():
        b.fc.weight[0, 0] += 1.0  # a non-refittable weight differs
    c = tiny_model("bn", seed=0)
    with torch.no_grad():
        c.bn1.weight.add_(0.5)  # only a refittable tensor differs
    fps = [
        export_timm("test_resnet", tmp_path / n, model=m, img_size=64).manifest.fingerprint
        for n, m in (("a", a), ("b", b), ("c", c))
    ]
    assert fps[0] != fps[1]
    assert fps[0] == fps[2]


def test_unknown_model_and_bad_weights(tmp_path):
    with pytest.raises(ModelError, match="Did you mean: resnet50"):
        export_timm("resnet5", tmp_path)
    with pytest.raises(ModelError, match="does not exist"):
        export_timm("test_resnet", tmp_path, weights=tmp_path / "missing.pt")
    import timm

    torch.save(timm.create_model("test_resnet", num_classes=5).state_dict(), tmp_path / "w.pt")
    with pytest.raises(ModelError, match="do not fit the model"):
        export_timm("test_resnet", tmp_path, weights=tmp_path / "w.pt", num_classes=10)


def test_weights_are_loaded(tmp_path):
    import timm
    from safetensors.torch import save_file

    src = tiny_model("bn", seed=3)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    export_timm("test_resnet", tmp_path / "out", weights=tmp_path / "w.safetensors", num_classes=10, img_size=64)
    _, inits = _inits(tmp_path / "out")
    np.testing.assert_array_equal(inits["fc.weight"], src.fc.weight.detach().numpy())
    assert timm.__version__
