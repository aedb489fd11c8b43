"""TensorRT plans for the export's ONNX: version gates, build options, optimisation profile, plan cache, builder.

Everything here except :func:`build_plan` (and what it calls) is plain Python, so the decisions are tested without
TensorRT. API names and version gates were read in NVIDIA's Python bindings (``python/src/infer/pyCore.cpp``,
``pyGraph.cpp``, ``parsers/pyOnnx.cpp`` of NVIDIA/TensorRT, release branches 10.0 to 11.1) and the TensorRT
developer guide ("Refitting an Engine"):

==========================================  =====================================================================
``trt.OnnxParserRefitter``                  10.0+ (``refit_from_file``; ``load_initializer`` 10.13+, unused here)
``BuilderFlag.REFIT_INDIVIDUAL``,           10.2+; ``mark_weights_refittable`` returns False for a name the
``INetworkDefinition.mark_weights_...``     network does not hold
``SerializationFlag.INCLUDE_REFIT``         10.14+; not needed here: the cache holds the plan as built, never a
                                            refitted engine (see :class:`PlanCache`)
``BuilderFlag.FP16``                        10.x only: removed in 11.0 (networks are strongly typed); on 11.x
                                            fp16 comes from a reduced-precision copy of the ONNX (``trt_fp16``)
``BuilderFlag.TF32``                        10.x and 11.x, on by default; cleared for ``precision="fp32"``
==========================================  =====================================================================

Precision keeps the export's identity: the engine built from an fp16 copy serves the same fingerprint and is
refitted from the same fp32 blobs (cast to fp16 at refit).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cema_deploy._lazy import lazy_import
from cema_deploy.contract.manifest import Manifest
from cema_deploy.exceptions import BackendError, BackendUnavailableError

#: TensorRT major versions this backend is written and checked (against the docs) for.
SUPPORTED_MAJORS = (10, 11)
#: ``fp32``: IEEE float32 (TF32 off); ``tf32``: TensorRT's default (TF32 allowed on Ampere and newer); ``fp16``.
PRECISIONS = ("fp32", "tf32", "fp16")
#: ``full``: BuilderFlag.REFIT (every weight refittable, the default until numbers exist); ``individual``:
#: BuilderFlag.REFIT_INDIVIDUAL with only the normalization weights marked refittable.
REFIT_MODES = ("full", "individual")
DEFAULT_MAX_BATCH = 32
MAX_BATCH_LIMIT = 4096
#: What a plan is: the serving engine, a plain one for ``bench``, the statistics probe (``trt_probe``).
PLAN_KINDS = ("refit", "plain", "probe")
#: Bumped whenever what a cached plan means changes; old plans are then never read again.
PLAN_FORMAT = 1
#: The ONNX parser's names for BatchNormalization folded into a scale/shift (onnx-tensorrt ``WeightsContext``).
BN_FOLD_BASENAME = "tmp_batch_norm_weight"


def parse_version(text: str) -> tuple[int, int, int]:
    """``"10.3.0.30"`` -> ``(10, 3, 0)``."""
    m = re.match(r"^(\d+)\.(\d+)(?:\.(\d+))?", text.strip())
    if not m:
        raise BackendUnavailableError(f"Cannot read the TensorRT version {text!r}; expected e.g. '10.3.0'.")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def check_supported(version: str) -> tuple[int, int, int]:
    """The parsed version, or :class:`BackendUnavailableError` saying which backend to use instead."""
    v = parse_version(version)
    if v[0] < SUPPORTED_MAJORS[0]:
        raise BackendUnavailableError(
            f"TensorRT {version} has no ONNX parser refitter (TensorRT >= 10.0 is needed for the 'trt' backend). "
            "On JetPack 5 (TensorRT 8.5) or JetPack 6.0 (8.6) use --backend ort-trt (onnxruntime-gpu with "
            "TensorRT), or move to JetPack 6.1+ (TensorRT 10.3)."
        )
    if v[0] > SUPPORTED_MAJORS[-1]:
        raise BackendUnavailableError(
            f"TensorRT {version} is newer than this cema-deploy supports (10.x and 11.x); install a supported one: "
            "pip install 'tensorrt>=10.0,<12'."
        )
    return v


@dataclass(frozen=True, kw_only=True)
class TrtOptions:
    """How the engine is built. Every field is part of the plan cache key.

    Example:
        >>> TrtOptions(max_batch=64, precision="fp16").precision
        'fp16'
    """

    max_batch: int = DEFAULT_MAX_BATCH
    precision: str = "fp32"
    refit_mode: str = "full"

    def __post_init__(self) -> None:
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int):
            raise BackendError(f"max_batch must be an integer, got {self.max_batch!r}.")
        if not 1 <= self.max_batch <= MAX_BATCH_LIMIT:
            raise BackendError(f"max_batch must be in 1..{MAX_BATCH_LIMIT}, got {self.max_batch}.")
        if self.precision not in PRECISIONS:
            raise BackendError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}.")
        if self.refit_mode not in REFIT_MODES:
            raise BackendError(f"refit_mode must be one of {', '.join(REFIT_MODES)}, got {self.refit_mode!r}.")


@dataclass(frozen=True, kw_only=True)
class PrecisionPlan:
    """How a precision is obtained on one TensorRT version.

    ``fp16``: ``"none"``, ``"builder-flag"`` (10.x, weakly typed network) or ``"onnx-copy"`` (11.x: the
    network is built from an fp16 copy of the ONNX, see ``trt_fp16``). ``tf32``: whether TF32 stays allowed.
    """

    precision: str
    fp16: str
    tf32: bool


def precision_plan(version: tuple[int, int, int], precision: str) -> PrecisionPlan:
    """The mechanism for ``precision`` on TensorRT ``version`` (see the module table)."""
    if precision not in PRECISIONS:
        raise BackendError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    if precision == "fp16":
        return PrecisionPlan(precision=precision, fp16="builder-flag" if version[0] < 11 else "onnx-copy", tf32=True)
    return PrecisionPlan(precision=precision, fp16="none", tf32=precision == "tf32")


def check_refit_mode(version: tuple[int, int, int], refit_mode: str) -> None:
    if refit_mode == "individual" and version < (10, 2, 0):
        raise BackendUnavailableError(
            f"refit_mode='individual' needs TensorRT >= 10.2 (BuilderFlag.REFIT_INDIVIDUAL); this is "
            f"{'.'.join(map(str, version))}. Use refit_mode='full' (the default)."
        )


def resolve_max_batch(manifest: Manifest, requested: int | None) -> int:
    """The engine's largest batch: ``requested``, or the export's fixed batch, or :data:`DEFAULT_MAX_BATCH`."""
    fixed = manifest.input.shape[0]
    if fixed != -1:
        if requested is not None and requested != fixed:
            raise BackendError(
                f"{manifest.model_name} was exported with a fixed batch of {fixed}; --max-batch {requested} cannot "
                "change it. Export again without --batch (dynamic batch) or use --max-batch "
                f"{fixed}."
            )
        return int(fixed)
    return DEFAULT_MAX_BATCH if requested is None else requested


def profile_shapes(
    manifest: Manifest, max_batch: int
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None:
    """(min, opt, max) input shapes of the one optimisation profile, or None for a fixed-batch export.

    min is batch 1, opt and max the largest batch: the edge serves one batch size (``edge run --batch``), and a
    bench that asks for several gets kernels tuned for its largest.
    """
    if manifest.input.shape[0] != -1:
        return None
    chw = tuple(int(d) for d in manifest.input.shape[1:])
    return (1, *chw), (max_batch, *chw), (max_batch, *chw)


def batch_fits(batch: int, max_batch: int) -> None:
    if not 1 <= batch <= max_batch:
        raise BackendError(
            f"Batch {batch} is outside the TensorRT engine's optimisation profile (1..{max_batch}). Open the "
            f"backend with max_batch={max(batch, 1)} (CLI: --max-batch {max(batch, 1)}); the engine is rebuilt "
            "once and cached."
        )


@dataclass(frozen=True, kw_only=True)
class DeviceInfo:
    """The GPU a plan is built for (a plan only runs on the device model and TensorRT it was built with)."""

    name: str
    compute_capability: str


def plan_key(
    *, fingerprint: str, tensorrt_version: str, device: DeviceInfo, options: TrtOptions, kind: str
) -> dict[str, Any]:
    """Everything a plan depends on. ``kind``: ``"refit"`` (the serving engine), ``"plain"`` (bench baseline) or
    ``"probe"`` (the statistics probe, ``trt_probe``; not refittable).

    The refittable tensors' values are deliberately absent: the cache holds the plan as built from the export,
    and every load refits it from the serving blob, so one plan serves every blob version.
    """
    if kind not in PLAN_KINDS:
        raise BackendError(f"plan kind must be one of {', '.join(PLAN_KINDS)}, got {kind!r}.")
    return {
        "format": PLAN_FORMAT,
        "fingerprint": fingerprint,
        "tensorrt": tensorrt_version,
        "device": device.name,
        "compute_capability": device.compute_capability,
        "kind": kind,
        **asdict(options),
        "refit_mode": options.refit_mode if kind == "refit" else "none",
    }


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def default_cache_dir() -> Path:
    """``$CEMA_DEPLOY_CACHE/trt``, default ``~/.cache/cema-deploy/trt``."""
    return Path(os.environ.get("CEMA_DEPLOY_CACHE", Path.home() / ".cache" / "cema-deploy")) / "trt"


class PlanCache:
    """Serialized plans on disk, one file per :func:`plan_key`, written atomically, with the key beside them.

    Example:
        >>> cache = PlanCache("/tmp/plans")  # doctest: +SKIP
        >>> cache.load(key) or cache.store(key, build())  # doctest: +SKIP
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path_for(self, key: dict[str, Any]) -> Path:
        return self.root / str(key["fingerprint"])[:16] / f"{key['kind']}-{key_digest(key)[:32]}.plan"

    def load(self, key: dict[str, Any]) -> bytes | None:
        """The cached plan for ``key``, or None (absent, or its recorded key differs: never a near miss)."""
        path = self.path_for(key)
        meta = path.with_suffix(".json")
        try:
            if json.loads(meta.read_text()) != key:
                return None
            return path.read_bytes()
        except (OSError, ValueError):
            return None

    def store(self, key: dict[str, Any], plan: bytes) -> bytes:
        path = self.path_for(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            for target, data in ((path, plan), (path.with_suffix(".json"), json.dumps(key, indent=1).encode())):
                tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
                tmp.write_bytes(data)
                os.replace(tmp, target)
        except OSError as exc:  # a read-only or full disk costs a rebuild next start, not this start
            import warnings

            warnings.warn(f"Could not cache the TensorRT plan in {path.parent}: {exc}", RuntimeWarning, stacklevel=2)
        return plan

    def discard(self, key: dict[str, Any]) -> None:
        """Remove a plan that TensorRT refused to deserialize (e.g. truncated by a crash)."""
        for p in (self.path_for(key), self.path_for(key).with_suffix(".json")):
            p.unlink(missing_ok=True)


def bn_layers(manifest: Manifest) -> list[str]:
    """Module names of the BatchNorm layers among the refittable tensors, in manifest order."""
    out: list[str] = []
    for p in manifest.refittable:
        layer = p.name.rsplit(".", 1)[0]
        if p.layer_type == "BatchNorm" and layer not in out:
            out.append(layer)
    return out


def bn_fold_candidates(n_layers: int) -> list[str]:
    """Names the ONNX parser may give the folded scale/shift of ``n_layers`` BatchNorms (with slack).

    onnx-tensorrt names them ``tmp_batch_norm_weight``, then ``tmp_batch_norm_weight_<k>`` from a counter.
    """
    return [BN_FOLD_BASENAME] + [f"{BN_FOLD_BASENAME}_{k}" for k in range(4 * n_layers + 16)]


def mark_norm_weights_refittable(network: Any, manifest: Manifest) -> list[str]:
    """REFIT_INDIVIDUAL: mark only the normalization weights refittable; returns the names marked.

    LayerNorm/GroupNorm weights keep their ONNX names. BatchNorm with constant inputs is folded by the parser
    into a scale and a shift under temporary names, so those are marked by the parser's naming scheme and
    counted: two per folded layer, or this raises rather than build an engine that cannot be refitted.
    """
    marked = [p.name for p in manifest.refittable if network.mark_weights_refittable(p.name)]
    unfolded = {n.rsplit(".", 1)[0] for n in marked}
    folded = [layer for layer in bn_layers(manifest) if layer not in unfolded]
    found = [n for n in bn_fold_candidates(len(folded)) if folded and network.mark_weights_refittable(n)]
    missing = [p.name for p in manifest.refittable if p.layer_type != "BatchNorm" and p.name not in marked]
    if missing or len(found) != 2 * len(folded):
        raise BackendError(
            f"refit_mode='individual' could not mark every normalization weight refittable: {len(found)} folded "
            f"BatchNorm weights found for {len(folded)} layers (expected {2 * len(folded)}), unmarked "
            f"{missing[:3]}. This TensorRT's ONNX parser names folded weights differently; use refit_mode='full' "
            "(the default)."
        )
    return marked + found


def import_tensorrt() -> Any:
    return lazy_import("tensorrt", extra="trt", purpose="the TensorRT backend")


def build_plan(
    trt: Any,
    logger: Any,
    onnx_path: str | os.PathLike[str],
    manifest: Manifest,
    options: TrtOptions,
    *,
    refittable: bool,
) -> bytes:
    """Parse ``onnx_path`` and build a serialized engine (plan) as ``options`` say."""
    version = check_supported(trt.__version__)
    pp = precision_plan(version, options.precision)
    builder = trt.Builder(logger)
    if builder is None:
        raise BackendUnavailableError("TensorRT could not create a builder: is a CUDA GPU visible (nvidia-smi)?")
    network = builder.create_network(0)  # explicit batch is the only mode on 10.x; strongly typed always on 11.x
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}. Export again with opset 17.")
    config = builder.create_builder_config()
    if not pp.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    if pp.fp16 == "builder-flag":
        config.set_flag(trt.BuilderFlag.FP16)
    if refittable:
        check_refit_mode(version, options.refit_mode)
        if options.refit_mode == "full":
            config.set_flag(trt.BuilderFlag.REFIT)  # not REFIT_IDENTICAL: undefined when the weights change
        else:
            config.set_flag(trt.BuilderFlag.REFIT_INDIVIDUAL)
            mark_norm_weights_refittable(network, manifest)
    shapes = profile_shapes(manifest, options.max_batch)
    if shapes is not None:
        profile = builder.create_optimization_profile()
        profile.set_shape(manifest.input.name, *shapes)
        if config.add_optimization_profile(profile) < 0:
            raise BackendError(f"TensorRT refused the optimisation profile {shapes} for input {manifest.input.name!r}.")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BackendError(
            f"TensorRT failed to build an engine for {onnx_path} (max batch {options.max_batch}, "
            f"{options.precision}); its log above says why. Out of GPU memory is common on Jetson: lower --max-batch."
        )
    return bytes(plan)
