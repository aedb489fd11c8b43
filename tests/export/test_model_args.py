"""The manifest records timm's constructor arguments and the cloud rebuilds the edge model with them: a ViT-style
export at 64 px (its ``pos_embed`` sized for 64 px) reloads as the cloud's replica and adapts in a deployment.

Issue 19 item 6: before, the replica was built without ``img_size`` and died with a raw ``RuntimeError``
(``pos_embed`` size mismatch) at cloud start.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.cloud.conftest import batch, make_deployment, teacher_ckpt  # noqa: F401 (teacher_ckpt: a fixture)
from tests.conftest import needs_torch

pytestmark = needs_torch

#: The smallest ViT in timm's registry with a learned ``pos_embed``; random init, nothing downloaded.
VIT = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def vit64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from cema_deploy.export.to_onnx import export_timm

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("vit64") / "edge"
    export_timm(VIT, out, img_size=64, num_classes=10)
    return out


def test_the_manifest_records_the_constructor_arguments(vit64: Path) -> None:
    from cema_deploy.contract.manifest import manifest_from_dir

    m = manifest_from_dir(vit64)
    assert m.model_args == {"num_classes": 10, "img_size": 64}
    assert m.input.shape[1:] == (3, 64, 64)


def test_the_cloud_replica_of_a_64px_vit_matches_the_export(vit64: Path) -> None:
    import torch

    from cema_deploy.cloud.models import replica_from_export
    from cema_deploy.contract.manifest import manifest_from_dir
    from cema_deploy.runtime.backends.onnxrt import session_from_onnx

    manifest = manifest_from_dir(vit64)
    replica = replica_from_export(vit64, manifest)  # raised RuntimeError (pos_embed 197 vs 17 tokens) before
    assert tuple(replica.pos_embed.shape) == (1, 1 + (64 // 16) ** 2, 192)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = replica(x).numpy()
    got = session_from_onnx(vit64 / "model.onnx").run(x.numpy())
    assert ref.shape == got.shape == (3, 10)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_a_64px_vit_deployment_takes_a_cloud_step(vit64: Path, teacher_ckpt: Path, tmp_path: Path) -> None:  # noqa: F811
    dep = make_deployment(vit64, teacher_ckpt, tmp_path / "s", batch_size=8)
    dep.start()
    try:
        for i in range(2):
            dep.upload(batch(dep.manifest, 4, seed=i))
        assert dep.wait_idle(120)
        assert dep.version >= 1  # a step ran on the replica and a blob for the 64 px export was published
    finally:
        dep.stop()
