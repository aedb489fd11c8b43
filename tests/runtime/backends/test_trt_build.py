"""TensorRT build decisions that need no TensorRT: version gates, precision per version, options, profile, batch
range, plan cache keys and files, and the REFIT_INDIVIDUAL weight marking."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cema_deploy.contract.manifest import InputSpec, Manifest, manifest_from_dir
from cema_deploy.exceptions import BackendError, BackendUnavailableError
from cema_deploy.runtime.backends import trt_build as tb
from tests.conftest import needs_torch

DEVICE = tb.DeviceInfo(name="Orin (nvgpu)", compute_capability="8.7")


@pytest.mark.parametrize(
    ("text", "parsed"), [("10.3.0.30", (10, 3, 0)), ("11.4.0.106", (11, 4, 0)), ("10.14", (10, 14, 0))]
)
def test_versions_parse(text: str, parsed: tuple[int, int, int]) -> None:
    assert tb.parse_version(text) == parsed


def test_tensorrt_8_points_to_ort_trt_and_12_to_a_supported_install() -> None:
    with pytest.raises(BackendUnavailableError, match="ort-trt"):
        tb.check_supported("8.6.2")
    with pytest.raises(BackendUnavailableError, match=r"tensorrt>=10\.0,<12"):
        tb.check_supported("12.0.1")
    with pytest.raises(BackendUnavailableError, match="Cannot read"):
        tb.check_supported("nightly")
    assert tb.check_supported("10.3.0") == (10, 3, 0)


def test_fp16_uses_the_builder_flag_on_10_and_an_onnx_copy_on_strongly_typed_11() -> None:
    assert tb.precision_plan((10, 3, 0), "fp16").fp16 == "builder-flag"
    assert tb.precision_plan((10, 16, 1), "fp16").fp16 == "builder-flag"
    assert tb.precision_plan((11, 0, 0), "fp16").fp16 == "onnx-copy"
    for v in ((10, 3, 0), (11, 4, 0)):
        fp32, tf32 = tb.precision_plan(v, "fp32"), tb.precision_plan(v, "tf32")
        assert (fp32.fp16, fp32.tf32) == ("none", False)  # fp32 means IEEE float32: TF32 cleared
        assert (tf32.fp16, tf32.tf32) == ("none", True)
    with pytest.raises(BackendError, match="fp32, tf32, fp16"):
        tb.precision_plan((10, 3, 0), "int8")


def test_refit_individual_needs_10_2() -> None:
    with pytest.raises(BackendUnavailableError, match=r"10\.2"):
        tb.check_refit_mode((10, 1, 0), "individual")
    tb.check_refit_mode((10, 2, 0), "individual")
    tb.check_refit_mode((10, 0, 0), "full")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_batch": 0}, "1..4096"),
        ({"max_batch": 5000}, "1..4096"),
        ({"max_batch": True}, "integer"),
        ({"max_batch": 8.0}, "integer"),
        ({"precision": "bf16"}, "precision"),
        ({"refit_mode": "identical"}, "refit_mode"),
    ],
)
def test_options_are_validated(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(BackendError, match=match):
        tb.TrtOptions(**kwargs)  # type: ignore[arg-type]


@pytest.fixture
def manifest(exported) -> Manifest:  # type: ignore[no-untyped-def]
    out, _ = exported("bn")
    return manifest_from_dir(out)


@needs_torch
def test_max_batch_defaults_and_fixed_batch_exports(manifest: Manifest) -> None:
    assert tb.resolve_max_batch(manifest, None) == tb.DEFAULT_MAX_BATCH
    assert tb.resolve_max_batch(manifest, 64) == 64
    fixed = dataclasses.replace(manifest, input=InputSpec(name="input", shape=(8, *manifest.input.shape[1:])))
    assert tb.resolve_max_batch(fixed, None) == 8
    assert tb.resolve_max_batch(fixed, 8) == 8
    with pytest.raises(BackendError, match="fixed batch of 8"):
        tb.resolve_max_batch(fixed, 64)
    assert tb.profile_shapes(fixed, 8) is None


@needs_torch
def test_profile_spans_batch_1_to_the_largest_asked_for(manifest: Manifest) -> None:
    chw = manifest.input.shape[1:]
    assert tb.profile_shapes(manifest, 64) == ((1, *chw), (64, *chw), (64, *chw))
    tb.batch_fits(64, 64)
    with pytest.raises(BackendError, match="--max-batch 65"):
        tb.batch_fits(65, 64)


def _key(manifest: Manifest, **changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "fingerprint": manifest.fingerprint,
        "tensorrt_version": "10.3.0",
        "device": DEVICE,
        "options": tb.TrtOptions(max_batch=32),
        "kind": "refit",
    }
    base.update(changes)
    return tb.plan_key(**base)  # type: ignore[arg-type]


@needs_torch
def test_every_input_of_a_plan_changes_its_cache_key(manifest: Manifest) -> None:
    variants = [
        {},
        {"fingerprint": "0" * 64},
        {"tensorrt_version": "10.3.1"},
        {"device": tb.DeviceInfo(name="NVIDIA L4", compute_capability="8.7")},
        {"device": tb.DeviceInfo(name="Orin (nvgpu)", compute_capability="8.6")},
        {"options": tb.TrtOptions(max_batch=64)},
        {"options": tb.TrtOptions(max_batch=32, precision="fp16")},
        {"options": tb.TrtOptions(max_batch=32, refit_mode="individual")},
        {"kind": "plain"},
    ]
    digests = {tb.key_digest(_key(manifest, **v)) for v in variants}  # type: ignore[arg-type]
    assert len(digests) == len(variants)
    assert _key(manifest, kind="plain")["refit_mode"] == "none"
    with pytest.raises(BackendError, match="plan kind"):
        _key(manifest, kind="stripped")


@needs_torch
def test_plan_cache_round_trip_and_never_a_near_miss(manifest: Manifest, tmp_path: Path) -> None:
    cache = tb.PlanCache(tmp_path)
    key = _key(manifest)
    assert cache.load(key) is None
    assert cache.store(key, b"plan-bytes") == b"plan-bytes"
    assert cache.load(key) == b"plan-bytes"
    path = cache.path_for(key)
    assert path.parent.name == manifest.fingerprint[:16] and path.with_suffix(".json").is_file()
    assert not list(path.parent.glob("*.tmp"))
    other = _key(manifest, tensorrt_version="10.3.1")
    assert cache.load(other) is None
    path.with_suffix(".json").write_text("{}")  # a sidecar that does not match: treated as absent
    assert cache.load(key) is None
    cache.store(key, b"plan-bytes")
    cache.discard(key)
    assert cache.load(key) is None and not path.exists()


def test_default_cache_dir_follows_cema_deploy_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CEMA_DEPLOY_CACHE", str(tmp_path))
    assert tb.default_cache_dir() == tmp_path / "trt"


class WeightNames:
    """A set of weight names with INetworkDefinition.mark_weights_refittable's contract (True iff present)."""

    def __init__(self, names: set[str]) -> None:
        self.names, self.marked = names, []  # type: ignore[var-annotated]

    def mark_weights_refittable(self, name: str) -> bool:
        if name in self.names:
            self.marked.append(name)
            return True
        return False


@needs_torch
def test_individual_refit_marks_folded_batchnorm_weights_and_refuses_when_they_are_not_found(
    manifest: Manifest,
) -> None:
    layers = tb.bn_layers(manifest)
    assert layers and all(p.layer_type == "BatchNorm" for p in manifest.refittable)
    folded = [tb.BN_FOLD_BASENAME] + [f"{tb.BN_FOLD_BASENAME}_{k}" for k in range(2 * len(layers) - 1)]
    net = WeightNames({*folded, "conv1.weight", "tmp_weight_3"})
    marked = tb.mark_norm_weights_refittable(net, manifest)
    assert sorted(marked) == sorted(folded)  # the scale/shift pairs, never the conv or other temporaries
    with pytest.raises(BackendError, match="refit_mode='full'"):
        tb.mark_norm_weights_refittable(WeightNames(set(folded[:-1])), manifest)
    unfolded = WeightNames({p.name for p in manifest.refittable})  # a parser that kept BN unfolded
    assert sorted(tb.mark_norm_weights_refittable(unfolded, manifest)) == sorted(manifest.refittable_by_name)
