"""The cloud trains the replica's head when the export marks it refittable (``export --refit head``, beyond the
paper): the blob carries the new head, ORT serves what the replica computes, the head has its own learning rate
and survives a state save, and a norms-only export's head never moves."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import needs_torch

pytestmark = needs_torch


def _cema(out, **config):  # type: ignore[no-untyped-def]
    from cema_deploy.cloud.config import CemaConfig
    from cema_deploy.cloud.method import Cema
    from cema_deploy.cloud.models import replica_from_export
    from cema_deploy.contract.manifest import manifest_from_dir
    from tests.conftest import tiny_model

    manifest = manifest_from_dir(out)
    replica = replica_from_export(out, manifest)
    return Cema(
        tiny_model("bn", seed=7), replica, manifest=manifest, config=CemaConfig.preset("cema", batch_size=8, **config)
    )


def test_the_cloud_publishes_a_trained_head_that_ort_serves_as_the_replica_computes(exported_head) -> None:  # type: ignore[no-untyped-def]
    import torch

    from cema_deploy.contract.blob import RefitBlob, validate_blob
    from cema_deploy.runtime.backends.registry import get_backend
    from cema_deploy.runtime.frames.preprocess import normalize
    from tests.cloud.conftest import images

    out, model = exported_head("bn")
    cema = _cema(out)
    exported_head_values = {k: v.numpy().copy() for k, v in model.state_dict().items() if k.startswith("fc.")}
    for i in range(3):
        cema.adapt(images(8, seed=i), images(8, seed=10 + i) if i else None)
    tensors = cema.blob_tensors()
    assert {"fc.weight", "fc.bias"} <= set(tensors)
    for name, before in exported_head_values.items():
        assert np.abs(tensors[name] - before).max() > 0  # distillation moved the head
    blob = RefitBlob(tensors=tensors, fingerprint=cema.manifest.fingerprint, version=1)
    validate_blob(blob, cema.manifest)
    probe = normalize(images(4, seed=99), cema.manifest.preprocess)
    with torch.no_grad():
        want = cema.student.eval()(torch.from_numpy(probe)).numpy()
    with get_backend("ort-cpu", out) as be:
        be.refit(blob)
        assert np.abs(be.infer(probe) - want).max() <= 1e-4


def test_the_head_has_its_own_learning_rate_defaulting_to_the_affine_one(exported_head) -> None:  # type: ignore[no-untyped-def]
    from cema_deploy.exceptions import CloudError

    out, _ = exported_head("bn")
    default = _cema(out)
    assert [g["lr"] for g in default.opt_student.param_groups] == [2.5e-3, 2.5e-3]
    own = _cema(out, head_lr=1e-4)
    norms_group, head_group = own.opt_student.param_groups
    assert (norms_group["lr"], head_group["lr"]) == (2.5e-3, 1e-4)
    params = dict(own.student.named_parameters())
    assert all(p is params[n] for p, n in zip(head_group["params"], ("fc.weight", "fc.bias"), strict=True))
    with pytest.raises(CloudError, match="head_lr = -1"):
        _cema(out, head_lr=-1.0)


def test_the_head_is_saved_restored_and_reset_with_the_norms(exported_head) -> None:  # type: ignore[no-untyped-def]
    import torch

    from tests.cloud.conftest import images

    out, _ = exported_head("bn")
    cema = _cema(out, head_lr=1e-2)
    initial = cema.student.fc.bias.detach().clone()
    cema.adapt(images(8, seed=0))
    saved = cema.state_dict()
    assert torch.equal(saved["student"]["fc.bias"], cema.student.fc.bias.detach())
    trained = cema.student.fc.bias.detach().clone()
    cema.adapt(images(8, seed=1))
    assert not torch.equal(cema.student.fc.bias, trained)
    cema.load_state_dict(saved)
    assert torch.equal(cema.student.fc.bias.detach(), trained)
    assert [g["lr"] for g in cema.opt_student.param_groups] == [2.5e-3, 1e-2]  # the config's, per group
    cema.reset()
    assert torch.equal(cema.student.fc.bias.detach(), initial)
    with torch.no_grad():
        cema.student.fc.weight[0, 0] = float("nan")
    assert cema.problem() == "the replica's fc.weight holds NaN or Inf"


def test_a_norms_only_export_never_moves_the_head(exported) -> None:  # type: ignore[no-untyped-def]
    import torch

    from tests.cloud.conftest import images

    out, _ = exported("bn")
    cema = _cema(out)
    before = {k: v.detach().clone() for k, v in cema.student.fc.state_dict().items()}
    cema.adapt(images(8, seed=0))
    assert len(cema.opt_student.param_groups) == 1 and "fc.bias" not in cema.blob_tensors()
    assert all(torch.equal(v, before[k]) for k, v in cema.student.fc.state_dict().items())


def test_head_scope_episode_restores_the_exports_head_at_a_new_episode_only(exported_head) -> None:  # type: ignore[no-untyped-def]
    import torch

    from cema_deploy.exceptions import CloudError
    from tests.cloud.conftest import images

    out, model = exported_head("bn")
    exported_bias = model.state_dict()["fc.bias"]
    for scope in ("run", "episode"):
        cema = _cema(out, head_lr=1e-2, head_scope=scope)
        cema.adapt(images(8, seed=0))
        trained = cema.student.fc.bias.detach().clone()
        assert not torch.equal(trained, exported_bias)
        cema.calibrate(images(8, seed=1), keep=0.5)  # merged into the current episode: the head stays
        assert torch.equal(cema.student.fc.bias.detach(), trained)
        cema.calibrate(images(8, seed=2))  # keep = 0: a new episode (a generation's start, a shift)
        restored = torch.equal(cema.student.fc.bias.detach(), exported_bias)
        assert restored == (scope == "episode")
        head = cema.student.fc.bias
        assert (head in cema.opt_student.state) == (scope == "run")  # its momentum went with it
    with pytest.raises(CloudError, match="head_scope = 'device'"):
        _cema(out, head_scope="device")
