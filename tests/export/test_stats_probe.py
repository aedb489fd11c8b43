"""The statistics probe written by every export: per-layer batch statistics equal PyTorch's, ops every backend takes."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from cema_deploy.contract.blob import blob_from_path
from cema_deploy.contract.manifest import manifest_from_dir
from cema_deploy.contract.stats_probe import PROBE_FILE, PROBE_SIDECAR, probe_spec_from_dir
from cema_deploy.exceptions import ModelError
from cema_deploy.runtime.stats.probe import probe_from_dir
from tests.conftest import needs_torch

pytestmark = needs_torch


def _torch_bn_input_stats(model, x: np.ndarray, *, train: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:  # type: ignore[no-untyped-def]
    """Mean and biased variance of every BatchNorm input, recorded with forward hooks (train: batch statistics)."""
    import torch

    m = copy.deepcopy(model).train(train)  # a copy: train mode would move the running statistics
    seen: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def hook(name: str):  # type: ignore[no-untyped-def]
        def record(_mod, inputs, _out):  # type: ignore[no-untyped-def]
            x = inputs[0]
            seen[name] = (x.mean((0, 2, 3)).numpy(), x.var((0, 2, 3), unbiased=False).numpy())

        return record

    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.register_forward_hook(hook(name))
    with torch.no_grad():
        m(torch.from_numpy(x))
    return seen


@pytest.mark.parametrize(("mix", "train"), [(0.0, False), (1.0, True)])
@pytest.mark.parametrize("batch", [1, 8])
def test_probe_statistics_equal_pytorch(exported, mix: float, train: bool, batch: int) -> None:  # type: ignore[no-untyped-def]
    """mix=0: each BN input's statistics under the served (running) statistics = PyTorch eval; mix=1: under the
    batch's own = PyTorch train-mode BatchNorm (test-batch BN), layer by layer."""
    out, model = exported("bn")
    manifest = manifest_from_dir(out)
    probe = probe_from_dir(out, manifest)
    assert probe is not None
    x = np.random.default_rng(batch).normal(size=(batch, 3, 64, 64)).astype(np.float32)
    got = probe.run(x, blob_from_path(out / "params.safetensors").tensors, mix=mix)
    want = _torch_bn_input_stats(model, x, train=train)
    assert sorted(got.mean) == sorted(want) and len(want) == 15
    for name, (mean, var) in want.items():
        np.testing.assert_allclose(got.mean[name], mean, rtol=1e-4, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(got.var[name], var, rtol=1e-4, atol=1e-5, err_msg=name)
    assert got.frames == batch


def test_probe_uses_only_ops_every_backend_takes(exported) -> None:  # type: ignore[no-untyped-def]
    """No BatchNormalization node (TensorRT rejects training_mode=1); the BN tensors are graph inputs, not weights."""
    import onnx

    out, _ = exported("bn")
    g = onnx.load(str(out / PROBE_FILE))
    ops = {n.op_type for n in g.graph.node}
    assert "BatchNormalization" not in ops and "ReduceMean" in ops
    inputs = {i.name for i in g.graph.input}
    assert {"stats_mix", "bn1.running_mean", "bn1.running_var", "bn1.weight", "bn1.bias"} <= inputs
    assert not {i.name for i in g.graph.initializer} & inputs


def test_probe_follows_the_fed_statistics(exported) -> None:  # type: ignore[no-untyped-def]
    """The prior the layers normalize with is fed, not baked in: a different prior changes deeper layers' inputs
    at mix=0 and leaves them unchanged at mix=1 (pure batch statistics)."""
    out, _ = exported("bn")
    manifest = manifest_from_dir(out)
    probe = probe_from_dir(out, manifest)
    assert probe is not None
    tensors = blob_from_path(out / "params.safetensors").tensors
    prior = {"bn1.running_mean": tensors["bn1.running_mean"] + 1.0}
    x = np.random.default_rng(0).normal(size=(4, 3, 64, 64)).astype(np.float32)
    deep = probe.layers[-1]
    a0, b0 = probe.run(x, tensors, mix=0.0), probe.run(x, tensors, mix=0.0, prior=prior)
    assert not np.allclose(a0.mean[deep], b0.mean[deep])
    a1, b1 = probe.run(x, tensors, mix=1.0), probe.run(x, tensors, mix=1.0, prior=prior)
    np.testing.assert_allclose(a1.mean[deep], b1.mean[deep], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["gn", "ln"])
def test_no_probe_without_running_statistics(exported, kind: str) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported(kind)
    assert not (out / PROBE_FILE).exists() and not (out / PROBE_SIDECAR).exists()
    assert probe_from_dir(out, manifest_from_dir(out)) is None


def test_probe_of_another_export_is_refused(exported, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    (tmp_path / PROBE_SIDECAR).write_text((out / PROBE_SIDECAR).read_text())
    with pytest.raises(ModelError, match="export the model again"):
        probe_spec_from_dir(tmp_path, "0" * 64)
