"""The cloud method pinned to hand-computed values (Eqn. 6-7) and its BatchNorm handling (TBR)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.conftest import needs_torch

pytestmark = needs_torch


def _entropy(z: list[float]) -> float:
    m = max(z)
    e = [math.exp(v - m) for v in z]
    s = sum(e)
    p = [v / s for v in e]
    return -sum(pi * math.log(pi) for pi in p)


def _softmax(z: list[float]) -> list[float]:
    m = max(z)
    e = [math.exp(v - m) for v in z]
    return [v / sum(e) for v in e]


STUDENT = [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]]
TEACHER = [[3.0, -1.0, 0.0], [-0.5, 1.5, 0.2]]
E0 = 0.4 * math.log(3)


def test_e0_comes_from_the_class_count_and_bad_settings_are_refused() -> None:
    from cema_deploy.cloud.config import CemaConfig
    from cema_deploy.exceptions import CloudError

    assert CemaConfig().e0(10) == pytest.approx(0.4 * math.log(10))
    assert CemaConfig().e0(1000) == pytest.approx(0.4 * math.log(1000))
    with pytest.raises(CloudError, match="batch_size = 0 must be >= 1"):
        CemaConfig(batch_size=0)


def test_weighted_entropy_matches_hand_computation() -> None:
    import torch

    from cema_deploy.cloud.cema import weighted_entropy

    expected = sum(_entropy(z) * math.exp(-(_entropy(z) - E0)) for z in STUDENT) / 2
    got = float(weighted_entropy(torch.tensor(STUDENT), E0))
    assert got == pytest.approx(expected, rel=1e-6)


def test_distill_loss_matches_hand_computation() -> None:
    import torch

    from cema_deploy.cloud.cema import distill_loss

    alpha, beta, gamma, t = 3.0, 3.0, 1.0, 1.0
    ent, kl, ce = 0.0, 0.0, 0.0
    for s, te in zip(STUDENT, TEACHER, strict=True):
        w_s = math.exp(-(_entropy(s) - E0))
        w_t = math.exp(-(_entropy(te) - E0))
        ps, pt = _softmax(s), _softmax(te)
        ent += _entropy(s) * w_s
        kl += w_t * sum(pt[c] * (math.log(pt[c]) - math.log(ps[c])) for c in range(3))
        ce += w_t * -math.log(ps[max(range(3), key=lambda c: te[c])])
    expected = (alpha * ent + beta * kl + gamma * ce) / 2
    got = float(
        distill_loss(
            torch.tensor(STUDENT), torch.tensor(TEACHER), e0=E0, alpha=alpha, beta=beta, gamma=gamma, temperature=t
        )
    )
    assert got == pytest.approx(expected, rel=1e-6)
    # the weights are constants: gradients flow through the student only, not through 1/exp(E - E0)
    s = torch.tensor(STUDENT, requires_grad=True)
    distill_loss(s, torch.tensor(TEACHER), e0=E0, alpha=0, beta=0, gamma=1, temperature=1).backward()
    w_t = torch.tensor([math.exp(-(_entropy(te) - E0)) for te in TEACHER])
    onehot = torch.nn.functional.one_hot(torch.tensor(TEACHER).argmax(1), 3).float()
    expected_grad = (torch.softmax(torch.tensor(STUDENT), 1) - onehot) * w_t[:, None] / 2
    assert torch.allclose(s.grad, expected_grad, atol=1e-6)


def test_tbr_forward_value_uses_running_stats_and_first_batch_replaces_them() -> None:
    import torch

    from cema_deploy.cloud.cema import collect_params, configure_model, set_bn_training

    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, -1.0, 0.5, 0.0]))
        bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.0, 3.0]))
        bn.weight.copy_(torch.tensor([1.5, 0.5, 1.0, 2.0]))
    model = torch.nn.Sequential(bn)
    configure_model(model, bn_momentum=0.1)
    params, names = collect_params(model)
    assert names == ["0.weight", "0.bias"] and all(p.requires_grad for p in params)
    x1 = torch.randn(8, 4, 3, 3) * 2 + 3
    set_bn_training(model, True)
    y1 = model(x1)
    mu, var = x1.mean((0, 2, 3)), x1.var((0, 2, 3), unbiased=True)  # official torch.var_mean: unbiased
    # first adapted batch: stats replaced by the batch's, so the output is batch-normalised
    ref = (x1 - mu[None, :, None, None]) / torch.sqrt(var + bn.eps)[None, :, None, None]
    ref = ref * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    assert torch.allclose(y1, ref, atol=1e-5)
    assert torch.allclose(bn.running_mean, mu, atol=1e-5)
    assert torch.allclose(bn.running_var, var, atol=1e-5)
    # second batch: the forward value equals eval mode with the current running stats ...
    x2 = torch.randn(8, 4, 3, 3)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    set_bn_training(model, False)
    y_eval = model(x2)
    set_bn_training(model, True)
    y2 = model(x2)
    assert torch.allclose(y2, y_eval, atol=1e-5)
    # ... then the running stats move by momentum 0.1
    mu2, var2 = x2.mean((0, 2, 3)), x2.var((0, 2, 3), unbiased=True)
    assert torch.allclose(bn.running_mean, 0.9 * rm + 0.1 * mu2, atol=1e-5)
    assert torch.allclose(bn.running_var, 0.9 * rv + 0.1 * var2, atol=1e-5)
    # ... and gradients flow through the batch statistics: d(sum y)/dx is ~0 for a per-channel shift
    x3 = torch.randn(8, 4, 3, 3, requires_grad=True)
    model(x3).sum().backward()
    assert x3.grad is not None and float(x3.grad.abs().max()) < 1e-4


def test_teacher_step_changes_only_normalization_affine_parameters() -> None:
    import torch

    from cema_deploy.cloud.cema import collect_params, configure_model, teacher_step
    from tests.conftest import tiny_model

    model = configure_model(tiny_model("bn", seed=3))
    params, names = collect_params(model)
    assert names and all(n.endswith((".weight", ".bias")) for n in names)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(names)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    loss = teacher_step(model, opt, torch.randn(8, 3, 64, 64), e0=0.4 * math.log(10))
    assert math.isfinite(loss) and not any(m.training for m in model.modules())  # back in eval mode
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    stat_names = {k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert changed and changed <= set(names) | stat_names
    assert changed & set(names)  # affine parameters moved


def test_adapt_replays_once_the_buffer_is_full_and_idle_steps_replay_4b(exported) -> None:  # type: ignore[no-untyped-def]
    from cema_deploy.cloud.cema import Cema
    from cema_deploy.cloud.config import CemaConfig
    from cema_deploy.cloud.models import replica_from_export
    from cema_deploy.contract.manifest import manifest_from_dir
    from tests.cloud.conftest import images
    from tests.conftest import tiny_model

    out, _ = exported("bn")
    manifest = manifest_from_dir(out)
    cfg = CemaConfig(batch_size=4, replay_min=8)
    cema = Cema(tiny_model("bn", seed=7), replica_from_export(out, manifest), manifest=manifest, config=cfg)
    assert cema.idle_step() is None  # nothing stored yet
    reports = [cema.adapt(images(4, seed=i)) for i in range(3)]
    assert [r.replayed for r in reports] == [0, 0, 12]  # 3B once more than replay_min (8) are stored
    assert [r.step for r in reports] == [1, 2, 3] and cema.steps == 3
    idle = cema.idle_step()
    assert idle is not None and idle.replayed == 12 and idle.new_samples == 0  # min(4B, 12 stored)
    assert math.isnan(idle.teacher_loss) and math.isfinite(idle.student_loss) and cema.steps == 4


def test_blob_tensors_reproduce_the_replica_eval_output(exported) -> None:  # type: ignore[no-untyped-def]
    import copy

    import torch

    from cema_deploy.cloud.cema import Cema
    from cema_deploy.cloud.config import CemaConfig
    from cema_deploy.cloud.models import replica_from_export
    from cema_deploy.contract.blob import RefitBlob, validate_blob
    from cema_deploy.contract.manifest import manifest_from_dir
    from cema_deploy.runtime.preprocess import normalize
    from cema_deploy.runtime.registry import get_backend
    from tests.cloud.conftest import images
    from tests.conftest import tiny_model

    out, _ = exported("bn")
    manifest = manifest_from_dir(out)
    fresh = replica_from_export(out, manifest)
    before = copy.deepcopy(fresh)
    cema = Cema(
        tiny_model("bn", seed=7), replica_from_export(out, manifest), manifest=manifest, config=CemaConfig(batch_size=8)
    )
    for i in range(2):
        cema.adapt(images(8, seed=i))
    tensors = cema.blob_tensors()
    assert list(tensors) == [p.name for p in manifest.refittable]
    assert all(tensors[p.name].shape == p.shape and tensors[p.name].dtype.name == p.dtype for p in manifest.refittable)
    blob = RefitBlob(tensors=tensors, fingerprint=manifest.fingerprint, version=1)
    validate_blob(blob, manifest)
    # the blob alone turns a fresh eval-mode copy of the export into the replica
    state = fresh.state_dict()
    state.update({k: torch.from_numpy(v) for k, v in tensors.items()})
    fresh.load_state_dict(state)
    probe = torch.from_numpy(normalize(images(4, seed=99), manifest.preprocess))
    with torch.no_grad():
        want = cema.student.eval()(probe).numpy()
        got = fresh.eval()(probe).numpy()
        old = before(probe).numpy()
    assert np.abs(got - want).max() <= 1e-5
    assert np.abs(want - old).max() > 1e-3  # adaptation changed the replica
    with get_backend("ort-cpu", out) as be:  # and so does the exported ONNX graph, refitted
        be.refit(blob)
        assert np.abs(be.infer(probe.numpy()) - want).max() <= 1e-4


def test_channels_last_layout_gives_the_same_adaptation(exported) -> None:  # type: ignore[no-untyped-def]
    # channels_last is a speed setting (CemaConfig): the same steps must publish the same tensors.
    from cema_deploy.cloud.cema import Cema
    from cema_deploy.cloud.config import CemaConfig
    from cema_deploy.cloud.models import replica_from_export
    from cema_deploy.contract.manifest import manifest_from_dir
    from tests.cloud.conftest import images
    from tests.conftest import tiny_model

    out, _ = exported("bn")
    manifest = manifest_from_dir(out)
    blobs = []
    for layout in (False, True):
        cfg = CemaConfig(batch_size=8, replay_min=8, channels_last=layout)
        cema = Cema(tiny_model("bn", seed=7), replica_from_export(out, manifest), manifest=manifest, config=cfg)
        for i in range(3):  # the third step replays
            cema.adapt(images(8, seed=i))
        blobs.append(cema.blob_tensors())
    plain, nhwc = blobs
    moved = max(float(np.abs(plain[k] - v).max()) for k, v in nhwc.items())
    assert moved <= 1e-4
    fresh = replica_from_export(out, manifest).state_dict()
    assert max(float(np.abs(plain[k] - fresh[k].numpy()).max()) for k in plain) > 1e-3  # the steps did move them
