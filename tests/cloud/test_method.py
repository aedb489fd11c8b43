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

    from cema_deploy.cloud.method import weighted_entropy

    expected = sum(_entropy(z) * math.exp(-(_entropy(z) - E0)) for z in STUDENT) / 2
    got = float(weighted_entropy(torch.tensor(STUDENT), E0))
    assert got == pytest.approx(expected, rel=1e-6)


def test_distill_loss_matches_hand_computation() -> None:
    import torch

    from cema_deploy.cloud.method import distill_loss

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

    from cema_deploy.cloud.method import collect_params, configure_model, set_bn_training

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

    from cema_deploy.cloud.method import collect_params, configure_model, teacher_step
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


def test_adapt_distils_on_the_batch_plus_what_it_is_given_and_replay_steps_skip_the_teacher(exported) -> None:  # type: ignore[no-untyped-def]
    import torch

    from cema_deploy.cloud.config import CemaConfig
    from cema_deploy.cloud.method import Cema
    from cema_deploy.cloud.models import replica_from_export
    from cema_deploy.contract.manifest import manifest_from_dir
    from tests.cloud.conftest import images
    from tests.conftest import tiny_model

    out, _ = exported("bn")
    manifest = manifest_from_dir(out)
    cema = Cema(
        tiny_model("bn", seed=7),
        replica_from_export(out, manifest),
        manifest=manifest,
        config=CemaConfig.preset("cema"),
    )
    first = cema.adapt(images(4, seed=0))
    mixed = cema.adapt(images(4, seed=1), images(12, seed=2))
    assert (first.replayed, mixed.replayed, mixed.new_samples, cema.steps) == (0, 12, 4, 2)
    teacher_before = {k: v.clone() for k, v in cema.teacher.state_dict().items()}
    replay = cema.replay_step(images(16, seed=3))
    assert replay.replayed == 16 and replay.new_samples == 0 and cema.steps == 3
    assert math.isnan(replay.teacher_loss) and math.isfinite(replay.student_loss)
    assert all(torch.equal(v, teacher_before[k]) for k, v in cema.teacher.state_dict().items())  # no teacher step


def test_blob_tensors_reproduce_the_replica_eval_output(exported) -> None:  # type: ignore[no-untyped-def]
    import copy

    import torch

    from cema_deploy.cloud.config import CemaConfig
    from cema_deploy.cloud.method import Cema
    from cema_deploy.cloud.models import replica_from_export
    from cema_deploy.contract.blob import RefitBlob, validate_blob
    from cema_deploy.contract.manifest import manifest_from_dir
    from cema_deploy.runtime.backends.registry import get_backend
    from cema_deploy.runtime.frames.preprocess import normalize
    from tests.cloud.conftest import images
    from tests.conftest import tiny_model

    out, _ = exported("bn")
    manifest = manifest_from_dir(out)
    fresh = replica_from_export(out, manifest)
    before = copy.deepcopy(fresh)
    cema = Cema(
        tiny_model("bn", seed=7),
        replica_from_export(out, manifest),
        manifest=manifest,
        config=CemaConfig.preset("cema", batch_size=8),
    )
    for i in range(2):
        cema.adapt(images(8, seed=i), images(8, seed=10 + i) if i else None)
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
    from cema_deploy.cloud.config import CemaConfig
    from cema_deploy.cloud.method import Cema
    from cema_deploy.cloud.models import replica_from_export
    from cema_deploy.contract.manifest import manifest_from_dir
    from tests.cloud.conftest import images
    from tests.conftest import tiny_model

    out, _ = exported("bn")
    manifest = manifest_from_dir(out)
    blobs = []
    for layout in (False, True):
        cfg = CemaConfig.preset("cema", batch_size=8, channels_last=layout)
        cema = Cema(tiny_model("bn", seed=7), replica_from_export(out, manifest), manifest=manifest, config=cfg)
        for i in range(3):  # the third step replays
            cema.adapt(images(8, seed=i), images(16, seed=20) if i == 2 else None)
        blobs.append(cema.blob_tensors())
    plain, nhwc = blobs
    moved = max(float(np.abs(plain[k] - v).max()) for k, v in nhwc.items())
    assert moved <= 1e-4
    fresh = replica_from_export(out, manifest).state_dict()
    assert max(float(np.abs(plain[k] - fresh[k].numpy()).max()) for k in plain) > 1e-3  # the steps did move them


def _first_forward_stats(model, x):  # type: ignore[no-untyped-def]
    """Reference for the official first forward, independent of TBR: each BatchNorm of a plain eval-mode copy
    takes its input's batch statistics (unbiased variance, as ``torch.var_mean``) before normalising with them."""
    import copy

    import torch

    ref = copy.deepcopy(model).eval()
    stats = {}
    hooks = []
    for name, mod in ref.named_modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):

            def pre(mod, inp, name=name):  # type: ignore[no-untyped-def]
                var, mu = torch.var_mean(inp[0], dim=(0, 2, 3), correction=1)
                mod.running_mean.copy_(mu)
                mod.running_var.copy_(var)
                stats[name] = (mu.clone(), var.clone())

            hooks.append(mod.register_forward_pre_hook(pre))
    with torch.no_grad():
        ref(x)
    return stats


def _bn_stats(model):  # type: ignore[no-untyped-def]
    import torch

    return {
        n: (m.running_mean.clone(), m.running_var.clone())
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    }


def test_calibration_is_the_official_first_forward_layer_by_layer_and_merges_by_sample_count(exported) -> None:  # type: ignore[no-untyped-def]
    import torch

    from cema_deploy.cloud.config import CemaConfig
    from cema_deploy.cloud.method import Cema
    from cema_deploy.cloud.models import replica_from_export
    from cema_deploy.contract.manifest import manifest_from_dir
    from cema_deploy.runtime.frames.preprocess import normalize
    from tests.cloud.conftest import images
    from tests.conftest import tiny_model

    out, _ = exported("bn")
    manifest = manifest_from_dir(out)
    plain = replica_from_export(out, manifest).eval()
    source = _bn_stats(plain)
    x1, x2 = images(16, seed=1), images(8, seed=2)
    ref1 = _first_forward_stats(plain, torch.from_numpy(normalize(x1, manifest.preprocess)))
    ref2 = _first_forward_stats(plain, torch.from_numpy(normalize(x2, manifest.preprocess)))
    cema = Cema(
        tiny_model("bn", seed=7),
        replica_from_export(out, manifest),
        manifest=manifest,
        config=CemaConfig.preset("cema"),
    )
    teacher_before = _bn_stats(cema.teacher)
    cema.calibrate(x1)
    got = _bn_stats(cema.student)
    assert set(got) == set(ref1) and len(got) > 3
    for name, (mu, var) in ref1.items():
        assert torch.allclose(got[name][0], mu, atol=1e-4) and torch.allclose(got[name][1], var, atol=1e-4), name
    assert any(not torch.allclose(source[n][0], ref1[n][0], atol=1e-3) for n in ref1)  # it did replace them
    assert all(torch.equal(v[0], teacher_before[n][0]) for n, v in _bn_stats(cema.teacher).items())  # replica only
    # a second calibration batch of the same episode: (n_old * old + n_new * new) / (n_old + n_new), per layer,
    # where new is that batch's own first-forward statistics
    cema.calibrate(x2, keep=16 / 24)
    merged = _bn_stats(cema.student)
    for name in ref1:
        for i in (0, 1):
            want = (16 * ref1[name][i] + 8 * ref2[name][i]) / 24
            assert torch.allclose(merged[name][i], want, atol=1e-4), name
    # the served output now uses those statistics: no training forward replaces them any more
    cema.adapt(x1)
    assert any(not torch.allclose(_bn_stats(cema.student)[n][0], merged[n][0]) for n in merged)  # momentum moved


def test_statistics_samples_mode_keeps_training_forwards_off_the_running_statistics(exported) -> None:  # type: ignore[no-untyped-def]
    import torch

    from cema_deploy.cloud.config import CemaConfig
    from cema_deploy.cloud.method import Cema
    from cema_deploy.cloud.models import replica_from_export
    from cema_deploy.contract.manifest import manifest_from_dir
    from cema_deploy.runtime.frames.preprocess import normalize
    from tests.cloud.conftest import images
    from tests.conftest import tiny_model

    out, _ = exported("bn")
    manifest = manifest_from_dir(out)
    runs = {}
    for mode in ("training", "samples"):
        cema = Cema(
            tiny_model("bn", seed=7),
            replica_from_export(out, manifest),
            manifest=manifest,
            config=CemaConfig.preset("cema", statistics=mode),
        )
        cema.calibrate(images(16, seed=1), teacher=True)
        before = {"s": _bn_stats(cema.student), "t": _bn_stats(cema.teacher)}
        affine = {k: v.clone() for k, v in cema.student.state_dict().items() if k.endswith("weight")}
        cema.adapt(images(8, seed=2), images(8, seed=3))
        after = {"s": _bn_stats(cema.student), "t": _bn_stats(cema.teacher)}
        moved = {
            side: any(not torch.equal(after[side][n][0], before[side][n][0]) for n in before[side]) for side in "st"
        }
        runs[mode] = moved
        assert any(not torch.equal(v, affine[k]) for k, v in cema.student.state_dict().items() if k in affine)
        if mode == "samples":
            # a statistics batch moves each BN by momentum 0.1 toward its input's batch statistics; the first
            # layer's input does not depend on any statistics, so it is checked against a direct computation
            x = images(8, seed=4)
            first_name, first_bn = next(
                (n, m) for n, m in cema.student.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
            )
            seen: dict[str, torch.Tensor] = {}

            def grab(m, i, seen=seen):  # type: ignore[no-untyped-def]
                seen.setdefault("x", i[0].detach().clone())

            h = first_bn.register_forward_pre_hook(grab)
            old = first_bn.running_mean.clone()
            cema.update_statistics(x)
            h.remove()
            mu = seen["x"].float().mean((0, 2, 3))
            assert torch.allclose(first_bn.running_mean, 0.9 * old + 0.1 * mu, atol=1e-5), first_name
            with torch.no_grad():
                y = cema.student.eval()(torch.from_numpy(normalize(x, manifest.preprocess)))
            assert torch.isfinite(y).all()
    assert runs["training"] == {"s": True, "t": True}  # official: training forwards move them by momentum
    assert runs["samples"] == {"s": False, "t": False}


def test_device_strings_and_refusals() -> None:
    import torch

    from cema_deploy.cloud.models import resolve_device
    from cema_deploy.exceptions import CloudError

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    expect_auto = torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == expect_auto
    for bad, message in (("tpu", "not one of cpu, cuda, cuda:N, auto"), ("cuda:x", "expected cuda:N")):
        with pytest.raises(CloudError, match=message):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(CloudError, match=r"sees no CUDA GPU here .*Use --device cpu or auto"):
            resolve_device("cuda:0")
    else:
        with pytest.raises(CloudError, match="CUDA GPU"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


#: bf16 autocast of the teacher's forward: published tensors stay float32 and within this of a float32 step
#: (measured on the tiny models: 2.2e-5 after three steps, CPU; bf16 keeps 8 bits of mantissa).
AUTOCAST_TOLERANCE = 1e-3


def test_bf16_teacher_autocast_publishes_float32_close_to_a_float32_step(exported) -> None:  # type: ignore[no-untyped-def]
    import torch

    from cema_deploy.cloud.config import CemaConfig
    from cema_deploy.cloud.method import Cema
    from cema_deploy.cloud.models import replica_from_export
    from cema_deploy.contract.manifest import manifest_from_dir
    from tests.cloud.conftest import images
    from tests.conftest import tiny_model

    out, _ = exported("bn")
    manifest = manifest_from_dir(out)
    blobs = {}
    for dtype in ("float32", "bfloat16"):
        cema = Cema(
            tiny_model("bn", seed=7),
            replica_from_export(out, manifest),
            manifest=manifest,
            config=CemaConfig.preset("cema"),
            device="cpu",
            teacher_dtype=dtype,
        )
        assert all(p.device == cema.device for p in [*cema.teacher.parameters(), *cema.student.parameters()])
        for i in range(3):
            cema.adapt(images(8, seed=i), images(8, seed=9) if i else None)
        assert all(s["momentum_buffer"].device == cema.device for s in cema.opt_student.state.values())
        blobs[dtype] = cema.blob_tensors()
        teacher_params = [p.dtype for p in cema.teacher.parameters()]
        assert set(teacher_params) == {torch.float32}  # autocast changes the forward, not the weights
    assert all(v.dtype == np.float32 for v in blobs["bfloat16"].values())
    diff = max(float(np.abs(blobs["bfloat16"][k] - v).max()) for k, v in blobs["float32"].items())
    assert 0 < diff <= AUTOCAST_TOLERANCE  # it did run in bf16, and stays close


def test_teacher_input_comes_from_settings_checkpoint_or_timm_and_refuses_what_cannot_be_fed(
    exported, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    import json

    from cema_deploy.cloud.models import teacher_input
    from cema_deploy.contract.manifest import manifest_from_dir
    from cema_deploy.exceptions import CloudError
    from tests.conftest import tiny_model

    out, _ = exported("bn")
    manifest = manifest_from_dir(out)
    teacher = tiny_model("bn", seed=7)
    timm_cfg = teacher_input(teacher, manifest, name="test_resnet")
    assert timm_cfg.mean == (0.5, 0.5, 0.5) and timm_cfg.size == tuple(manifest.preprocess.size)  # CNN: edge size
    weights = tmp_path / "t.safetensors"
    weights.write_bytes(b"")
    weights.with_suffix(".json").write_text(
        json.dumps({"preprocess": {"mean": [0.4] * 3, "std": [0.2] * 3, "size": [96, 96]}})
    )
    recorded = teacher_input(teacher, manifest, name="test_resnet", weights=weights)
    assert recorded.mean == (0.4,) * 3 and recorded.size == (96, 96) and "t.json" in recorded.source
    explicit = teacher_input(teacher, manifest, name="test_resnet", weights=weights, mean=(0.1, 0.2, 0.3))
    assert explicit.mean == (0.1, 0.2, 0.3) and explicit.std == (0.2,) * 3
    with pytest.raises(CloudError, match=r"test_resnet.*test_resnet"):  # names the teacher and the edge model
        teacher_input(teacher, manifest, name="test_resnet", std=(0.0, 1.0, 1.0))
    teacher.pretrained_cfg = {**teacher.pretrained_cfg, "input_size": (1, 64, 64), "fixed_input_size": True}
    with pytest.raises(CloudError, match="expects 1-channel input, but the edge model test_resnet"):
        teacher_input(teacher, manifest, name="gray")


def test_the_teacher_gets_its_own_size_and_normalisation(exported) -> None:  # type: ignore[no-untyped-def]
    import torch

    from cema_deploy.cloud.config import CemaConfig
    from cema_deploy.cloud.method import Cema, TeacherInput
    from cema_deploy.cloud.models import replica_from_export
    from cema_deploy.contract.manifest import manifest_from_dir
    from tests.cloud.conftest import images
    from tests.conftest import tiny_model

    out, _ = exported("bn")
    manifest = manifest_from_dir(out)
    ti = TeacherInput(mean=(0.2, 0.3, 0.4), std=(0.5, 0.6, 0.7), size=(32, 48))
    cema = Cema(
        tiny_model("bn", seed=7),
        replica_from_export(out, manifest),
        manifest=manifest,
        config=CemaConfig.preset("cema"),
        teacher_input=ti,
    )
    seen = {}
    cema.teacher.register_forward_pre_hook(lambda m, i: seen.setdefault("t", i[0].detach().clone()))
    cema.student.register_forward_pre_hook(lambda m, i: seen.setdefault("s", i[0].detach().clone()))
    x = images(4, seed=1)
    cema.adapt(x)
    assert tuple(seen["t"].shape[2:]) == (32, 48) and tuple(seen["s"].shape[2:]) == tuple(manifest.preprocess.size)
    u = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    want = torch.nn.functional.interpolate(u, size=(32, 48), mode="bilinear", antialias=True)
    want = (want - torch.tensor(ti.mean).view(1, 3, 1, 1)) / torch.tensor(ti.std).view(1, 3, 1, 1)
    assert torch.allclose(seen["t"], want, atol=1e-5)
