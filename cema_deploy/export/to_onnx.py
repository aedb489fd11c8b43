"""Export a timm model to a refittable ONNX model plus its manifest and version-0 refit blob.

Every normalization layer stays a separate node whose affine parameters (and, for BatchNorm, running
statistics) are stable initializers named as in the PyTorch state dict, never folded into a Conv and never
de-duplicated, so an engine can take new values later without a rebuild (FACTS.md, "Export").
"""

from __future__ import annotations

import difflib
import hashlib
import io
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cema_deploy import __version__
from cema_deploy._lazy import lazy_import
from cema_deploy.contract.blob import RefitBlob, save_blob
from cema_deploy.contract.manifest import (
    FOLDED_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    PARAMS_FILE,
    ExportFile,
    InputSpec,
    Manifest,
    Preprocess,
    RefittableParam,
    graph_summary,
)
from cema_deploy.contract.norms_file import NORMS_FILE, norms_layout, write_norms_file
from cema_deploy.exceptions import ExportError, ModelError
from cema_deploy.export.head import HeadParam, check_refit_scope, collect_head_params
from cema_deploy.export.norms import NormParam, collect_norm_params
from cema_deploy.export.stats_probe import write_stats_probe
from cema_deploy.export.target import check_target, discard, publish, work_dir_for

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
#: Default opset: 17 has a single LayerNormalization op. FACTS.md warns that ORT's Conv+BN fusion matched
#: only BN versions 7/9/14; measured here with ORT 1.32 and this exporter, opset 14 and 17 exports both leave
#: 0 BatchNormalization nodes after optimisation and run at 0.98-1.00x a BN-folded export (resnet18, CPU).
#: ``benchmarks/bench_backends.py`` re-checks it for your ORT version.
DEFAULT_OPSET = 17
#: Above this many bytes of weights, the model is written with external data (protobuf's 2 GB limit).
EXTERNAL_DATA_BYTES = 1_500_000_000

StepCallback = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class ExportResult:
    """What ``export_timm`` wrote and measured."""

    out_dir: Path
    manifest: Manifest
    parity_max_abs_diff: float
    norm_layers: dict[str, int]
    bn_nodes: int
    seconds: dict[str, float] = field(default_factory=dict)


def create_timm_model(
    model_name: str,
    *,
    weights: str | os.PathLike[str] | None = None,
    pretrained: bool = False,
    num_classes: int | None = None,
    img_size: int | None = None,
) -> Any:
    """``timm.create_model`` in eval mode with local weights; never downloads unless ``pretrained``."""
    model, _ = build_timm_model(
        model_name,
        weights=weights,
        pretrained=pretrained,
        model_args={"num_classes": num_classes, "img_size": img_size},
    )
    return model


def build_timm_model(
    model_name: str,
    *,
    weights: str | os.PathLike[str] | None = None,
    pretrained: bool = False,
    model_args: Mapping[str, Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """The model and the keyword arguments ``timm.create_model`` took (what the manifest records as
    ``model_args``, so the cloud can build the same model). ``None`` values are dropped; ``img_size`` is dropped
    for models whose constructor has none (CNNs run at any size; the size then only sets the export's input).
    """
    timm = lazy_import("timm", extra="export", purpose="cema-deploy export")
    names = timm.list_models()
    if model_name not in names:
        raise ModelError(unknown_model_message(model_name, names))
    kwargs = {k: v for k, v in (model_args or {}).items() if v is not None}  # None never reaches constructors
    try:
        model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except TypeError as exc:
        if "img_size" in kwargs:  # CNNs take no img_size; the size then only sets the export's input
            kwargs.pop("img_size")
            model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
        else:
            raise ModelError(f"timm could not build {model_name!r} with {kwargs}: {exc}") from exc
    except Exception as exc:
        if pretrained:
            raise ModelError(
                f"Could not fetch pretrained weights for {model_name!r} ({exc}). Without network access, "
                "download the checkpoint elsewhere and pass it with --weights PATH."
            ) from exc
        raise ModelError(f"timm could not build {model_name!r}: {exc}") from exc
    if weights is not None:
        load_weights(model, weights)
    return model.eval(), kwargs


def unknown_model_message(model_name: str, names: list[str]) -> str:
    """What an unknown name is closest to: names that start with it or look like it, and its family's pattern."""
    lowered = model_name.lower()
    starts = [n for n in names if n.startswith(lowered)][:5]
    close = starts or difflib.get_close_matches(lowered, names, n=5, cutoff=0.6)
    family = re.match(r"[a-z]+", lowered)
    pattern = f"{family.group(0)}*" if family and any(n.startswith(family.group(0)) for n in names) else "*"
    return (
        f"Unknown timm model {model_name!r}."
        + (f" Did you mean: {', '.join(close)}?" if close else "")
        + f" See `python -c \"import timm; print(timm.list_models('{pattern}'))\"`."
    )


def load_weights(model: Any, path: str | os.PathLike[str]) -> None:
    """Load a local state dict (``.safetensors``, or a torch ``.pt``/``.pth`` checkpoint) strictly."""
    torch = lazy_import("torch", extra="export")
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"Weights file {p} does not exist; pass a local .safetensors or .pt/.pth state dict.")
    state: Any
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"Cannot read weights {p}: {exc}") from exc
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelError(f"Weights {p} hold a {type(state).__name__}, expected a state dict.")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even when strict=False
        raise ModelError(
            f"Weights {p} do not fit the model: {str(exc).splitlines()[1:3]}. Check the model name and --num-classes."
        ) from exc
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ModelError(
            f"Weights {p} do not fit the model: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]}). "
            "Check the model name and --num-classes."
        )


def export_timm(
    model_name: str,
    out_dir: str | os.PathLike[str],
    *,
    weights: str | os.PathLike[str] | None = None,
    pretrained: bool = False,
    num_classes: int | None = None,
    img_size: int | None = None,
    batch: int | None = None,
    opset: int = DEFAULT_OPSET,
    model: Any = None,
    model_args: Mapping[str, Any] | None = None,
    atol: float = 1e-4,
    folded_reference: bool = False,
    force: bool = False,
    on_step: StepCallback | None = None,
    refit: str = "norms",
) -> ExportResult:
    """Export a timm model (by name, or ``model`` if given) into ``out_dir`` and verify it.

    Writes ``model.onnx``, ``manifest.json`` and ``params.safetensors`` (the version-0 refit blob), then checks
    the ONNX checker, an ONNX Runtime CPU session and logits parity against PyTorch (max abs diff <= atol).
    ``folded_reference`` also writes ``reference_folded.onnx``: the same weights exported the way a plain
    deployment would (BatchNorm folded into Conv, not refittable), which ``cema-deploy bench`` compares against.

    Everything is written into a hidden work folder next to ``out_dir`` and renamed onto it only after every
    check passed, so a failed export leaves no folder behind (:mod:`cema_deploy.export.target`). An existing
    export in ``out_dir`` is replaced only when it has the same fingerprint, or with ``force``.

    ``model_args`` are the keyword arguments ``model`` was built with by ``timm.create_model`` (recorded in the
    manifest so the cloud builds the same model; a given ``model`` without them records only its class count).

    ``refit="head"`` (beyond the paper) also makes the classifier refittable: its bias, and its weight for heads of
    at most 100 classes (:mod:`cema_deploy.export.head`). The refittable list is bound by the fingerprint, so the
    two scopes of one model are two exports whose blobs never cross.

    Example:
        >>> result = export_timm("resnet18", "out/r18")  # doctest: +SKIP
        >>> result.manifest.fingerprint[:12]  # doctest: +SKIP
    """
    lazy_import("torch", extra="export", purpose="cema-deploy export")  # the missing extra, said first
    check_refit_scope(refit)
    step = on_step or (lambda _msg: None)
    t0 = time.perf_counter()

    step("Building the PyTorch model")
    if model is None:
        model, model_args = build_timm_model(
            model_name,
            weights=weights,
            pretrained=pretrained,
            model_args={"num_classes": num_classes, "img_size": img_size},
        )
    target = Path(out_dir)
    check_target(target, model_name=model_name, force=force)
    work = work_dir_for(target)
    try:
        result = _export_into(
            work,
            model_name,
            model.eval(),
            model_args=dict(model_args or {}),
            img_size=img_size,
            batch=batch,
            opset=opset,
            atol=atol,
            folded_reference=folded_reference,
            refit=refit,
            step=step,
            seconds={"build": time.perf_counter() - t0},
        )
        publish(work, target, result.manifest, force=force)
    except BaseException:
        discard(work)
        raise
    return replace(result, out_dir=target)


def _export_into(
    out: Path,
    model_name: str,
    model: Any,
    *,
    model_args: dict[str, Any],
    img_size: int | None,
    batch: int | None,
    opset: int,
    atol: float,
    folded_reference: bool,
    refit: str,
    step: StepCallback,
    seconds: dict[str, float],
) -> ExportResult:
    """Write and verify the export in ``out`` (the work folder)."""
    from cema_deploy.export.verify import verify_export

    torch = lazy_import("torch", extra="export", purpose="cema-deploy export")
    onnx = lazy_import("onnx", extra="export", purpose="cema-deploy export")
    data_cfg = _data_config(model, img_size)
    _, height, width = data_cfg["input_size"]
    norm_params: list[NormParam | HeadParam] = [*collect_norm_params(model)]
    norm_params += collect_head_params(model) if refit == "head" else []
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}

    step("Exporting to ONNX (normalization layers kept, initializers named as in the state dict)")
    t0 = time.perf_counter()
    proto = _export_proto(torch, onnx, model, state, batch=batch, height=height, width=width, opset=opset)
    seconds["export"] = time.perf_counter() - t0

    refit_names = [p.name for p in norm_params]
    missing = [n for n in refit_names if n not in {i.name for i in proto.graph.initializer}]
    if missing:
        raise ExportError(
            f"{len(missing)} refittable tensors did not survive as ONNX initializers (e.g. {missing[:3]}); "
            f"this model's {'norms and head' if refit == 'head' else 'norms'} cannot be made refittable by the "
            "TorchScript exporter."
        )
    model_path = out / MODEL_FILE

    step("Writing model.onnx, manifest.json and params.safetensors (refit blob version 0)")
    num_out = int(model.num_classes) if hasattr(model, "num_classes") else _num_outputs(torch, model, height, width)
    manifest = Manifest(
        model_name=model_name,
        fingerprint="0",  # set below, from the bytes written
        input=InputSpec(name=INPUT_NAME, shape=(batch or -1, 3, height, width), dtype="float32"),
        output_name=OUTPUT_NAME,
        num_classes=num_out,
        preprocess=Preprocess(
            mean=tuple(float(v) for v in data_cfg["mean"]),
            std=tuple(float(v) for v in data_cfg["std"]),
            size=(height, width),
            interpolation=str(data_cfg.get("interpolation", "bilinear")),
            crop_pct=float(data_cfg.get("crop_pct", 1.0)),
        ),
        refittable=tuple(
            RefittableParam(
                name=p.name,
                shape=tuple(int(d) for d in state[p.name].shape),
                dtype=str(state[p.name].dtype).removeprefix("torch."),
                layer_type=p.layer_type,
            )
            for p in norm_params
        ),
        opset=opset,
        producer=f"cema-deploy {__version__}, torch {torch.__version__}, onnx {onnx.__version__}",
        model_args={"num_classes": num_out, **model_args},
    )
    _externalize(proto, manifest, out / NORMS_FILE)
    total_bytes = sum(int(v.numel() * v.element_size()) for v in state.values())
    if total_bytes > EXTERNAL_DATA_BYTES:
        onnx.save_model(proto, str(model_path), save_as_external_data=True, location=MODEL_FILE + ".data")
    else:
        onnx.save_model(proto, str(model_path))
    # The one fingerprint function, torch-free, over the bytes written: what every load recomputes.
    manifest = replace(manifest, fingerprint=graph_summary(model_path, manifest).fingerprint)
    step("Writing stats_probe.onnx + stats_probe.json (BatchNorm batch statistics for the edge's adapter)")
    write_stats_probe(proto, manifest, out)  # bound to the fingerprint; nothing without BatchNorm running statistics
    blob = RefitBlob(
        tensors={n: state[n].detach().cpu().numpy().copy() for n in refit_names},
        fingerprint=manifest.fingerprint,
        version=0,
        producer=f"cema-deploy export {__version__}",
    )
    save_blob(blob, out / PARAMS_FILE)

    if folded_reference:
        step("Exporting the BN-folded reference (reference_folded.onnx)")
        _export_folded(torch, model, out / FOLDED_FILE, batch=batch, height=height, width=width, opset=opset)
    manifest = replace(manifest, model_bytes=_size_on_disk(out), files=_file_records(out))
    manifest.save(out)

    step("Verifying: ONNX checker, ONNX Runtime session, parity against PyTorch")
    t0 = time.perf_counter()
    report = verify_export(out, model, manifest, atol=atol)
    seconds["verify"] = time.perf_counter() - t0
    return ExportResult(
        out_dir=out,
        manifest=manifest,
        parity_max_abs_diff=report.max_abs_diff,
        norm_layers=report.norm_layers,
        bn_nodes=report.bn_nodes,
        seconds=seconds,
    )


def _file_records(out: Path) -> tuple[ExportFile, ...]:
    """Size and SHA-256 of every file in ``out`` but the manifest, by name."""
    records = []
    for path in sorted(out.iterdir()):
        if path.is_file() and path.name != MANIFEST_FILE:
            h = hashlib.sha256()
            with path.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
            records.append(ExportFile(name=path.name, bytes=path.stat().st_size, sha256=h.hexdigest()))
    return tuple(records)


def _export_proto(
    torch: Any, onnx: Any, model: Any, state: dict[str, Any], *, batch: int | None, height: int, width: int, opset: int
) -> Any:
    """TorchScript export with BN kept (no constant folding) and initializer de-duplication defeated.

    The TorchScript exporter merges initializers with equal values (FACTS.md: on a fresh model a BN's running
    mean/var were merged with its beta/gamma). So the model is exported with every float tensor set to
    distinct random values and the real values are written back into the initializers by name afterwards.
    """
    from onnx import numpy_helper

    float_items = {k: v for k, v in state.items() if v.is_floating_point()}
    saved = {k: v.detach().clone() for k, v in float_items.items()}
    gen = torch.Generator().manual_seed(0)
    buf = io.BytesIO()
    dummy = torch.randn(batch or 2, 3, height, width)
    try:
        with torch.no_grad():
            for v in float_items.values():
                v.copy_(torch.rand(v.shape, generator=gen, dtype=torch.float32).to(v.dtype) + 0.5)
            torch.onnx.export(
                model,
                (dummy,),
                buf,
                dynamo=False,
                opset_version=opset,
                do_constant_folding=False,
                training=torch.onnx.TrainingMode.EVAL,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes=None if batch else {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed for opset {opset}: {exc}") from exc
    finally:
        with torch.no_grad():
            for k, v in float_items.items():
                v.copy_(saved[k])
    proto = onnx.load_from_string(buf.getvalue())
    for init in proto.graph.initializer:
        if init.name in saved:
            init.CopyFrom(numpy_helper.from_array(saved[init.name].cpu().numpy(), init.name))
    proto.producer_name = "cema-deploy"
    proto.producer_version = __version__
    return proto


def _export_folded(
    torch: Any, model: Any, path: Path, *, batch: int | None, height: int, width: int, opset: int
) -> None:
    """The plain-deployment export: default constant folding, so BatchNorm is folded into Conv."""
    try:
        torch.onnx.export(
            model,
            (torch.randn(batch or 2, 3, height, width),),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes=None if batch else {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    except Exception as exc:
        raise ExportError(f"Exporting the BN-folded reference failed: {exc}") from exc


def _externalize(proto: Any, manifest: Manifest, path: Path) -> None:
    """Point the refittable initializers at ``path`` (ONNX external data, layout of ``norms_layout``)."""
    from onnx import numpy_helper
    from onnx.external_data_helper import set_external_data

    inits = {i.name: i for i in proto.graph.initializer}
    tensors = {p.name: numpy_helper.to_array(inits[p.name]) for p in manifest.refittable}
    write_norms_file(manifest, tensors, path)
    for name, offset, nbytes in norms_layout(manifest):
        set_external_data(inits[name], location=path.name, offset=offset, length=nbytes)
        inits[name].ClearField("raw_data")


def _data_config(model: Any, img_size: int | None) -> dict[str, Any]:
    timm = lazy_import("timm", extra="export")
    cfg: dict[str, Any] = dict(timm.data.resolve_data_config({}, model=model))
    if img_size is not None:
        cfg["input_size"] = (3, int(img_size), int(img_size))
    return cfg


def _num_outputs(torch: Any, model: Any, height: int, width: int) -> int:
    with torch.no_grad():
        return int(model(torch.zeros(1, 3, height, width)).shape[-1])


def _size_on_disk(out: Path) -> int:
    return sum(f.stat().st_size for f in out.glob("model.*"))


def state_arrays(model: Any) -> dict[str, np.ndarray]:
    """The model's state dict as float32 numpy arrays (for tests and the cloud replica)."""
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items() if v.is_floating_point()}
