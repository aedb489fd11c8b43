"""The model manifest (``manifest.json``): what an exported model is and which tensors are refittable."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cema_deploy._atomic import PUBLIC_FILE_MODE, write_atomic
from cema_deploy.contract.fingerprint import FINGERPRINT_SCHEME, GraphSummary, summarize_graph
from cema_deploy.contract.names import HEAD_KIND, REFIT_KINDS
from cema_deploy.contract.onnx_wire import WireError
from cema_deploy.exceptions import ExportIntegrityError, ManifestError

#: Manifest format identifier; bumped on incompatible changes. 2: the fingerprint binds the manifest's
#: preprocessing, class count and model constructor arguments (``model_args``); the export records every file's
#: size and SHA-256 (``files``).
MANIFEST_FORMAT = "cema-manifest/2"
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
PARAMS_FILE = "params.safetensors"
#: The optional BN-folded export of the same weights (a plain deployment's engine), for benchmarks.
FOLDED_FILE = "reference_folded.onnx"
#: Largest manifest.json read (a ResNet-50 manifest is ~60 KB).
MAX_MANIFEST_BYTES = 16 * 1024 * 1024

_DTYPES = ("float32", "float16", "bfloat16", "uint8", "int64")


@dataclass(frozen=True, kw_only=True)
class RefittableParam:
    """One refittable tensor: state-dict name, shape, dtype and the kind of layer it belongs to."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    layer_type: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True, kw_only=True)
class InputSpec:
    """The model input: name, shape (``-1`` marks the dynamic batch axis) and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"


@dataclass(frozen=True, kw_only=True)
class Preprocess:
    """How a uint8 RGB image becomes the model input: resize, scale to [0, 1], normalize, NCHW."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: tuple[int, int]
    interpolation: str = "bilinear"
    crop_pct: float = 1.0


@dataclass(frozen=True, kw_only=True)
class ExportFile:
    """One file of the export folder besides ``manifest.json``: its name, size and SHA-256 (hex)."""

    name: str
    bytes: int
    sha256: str


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """Everything that joins an exported model, the edge runtime and the cloud.

    Example:
        >>> m = manifest_from_dir("out/r50")  # doctest: +SKIP
        >>> m.fingerprint[:12], len(m.refittable)  # doctest: +SKIP
    """

    model_name: str
    fingerprint: str
    input: InputSpec
    output_name: str
    num_classes: int
    preprocess: Preprocess
    refittable: tuple[RefittableParam, ...]
    opset: int
    model_file: str = MODEL_FILE
    params_file: str = PARAMS_FILE
    model_bytes: int = 0
    producer: str = ""
    format: str = MANIFEST_FORMAT
    extra: Mapping[str, Any] = field(default_factory=dict)
    #: The keyword arguments ``timm.create_model`` was called with (e.g. ``img_size``, ``num_classes``): the
    #: cloud rebuilds its replica of the edge model with them. Bound into the fingerprint.
    model_args: Mapping[str, Any] = field(default_factory=dict)
    #: Every file of the export folder but this manifest, with its size and hash (``cema-deploy inspect`` checks
    #: them; a load checks the sizes).
    files: tuple[ExportFile, ...] = ()

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise ManifestError("Invalid manifest: " + "; ".join(problems) + ". Export the model again.")

    # ---- derived ------------------------------------------------------------------------------------
    @property
    def refittable_by_name(self) -> dict[str, RefittableParam]:
        return {p.name: p for p in self.refittable}

    @property
    def refittable_bytes(self) -> int:
        """Size of the refittable tensors' payload (what one refit blob carries, headers aside)."""
        return sum(p.numel * _itemsize(p.dtype) for p in self.refittable)

    @property
    def head_refittable(self) -> tuple[RefittableParam, ...]:
        """The classifier's refittable tensors (exported with ``--refit head``; empty for a norms-only export)."""
        return tuple(p for p in self.refittable if p.layer_type == HEAD_KIND)

    @property
    def refit_scope(self) -> str:
        """What a refit carries: ``"head"`` (norms plus classifier tensors) or ``"norms"`` (the paper's)."""
        return "head" if self.head_refittable else "norms"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, 3): the uint8 image an edge uploads for one sample."""
        h, w = self.preprocess.size
        return (h, w, 3)

    # ---- (de)serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["extra"] = dict(self.extra)
        d["model_args"] = dict(self.model_args)
        return d

    def to_json(self) -> str:
        # allow_nan=False: the manifest is standard JSON that any reader can parse (no NaN/Infinity tokens).
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        path = Path(directory) / MANIFEST_FILE
        write_atomic(path, (self.to_json() + "\n").encode("utf-8"), mode=PUBLIC_FILE_MODE)
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        if not isinstance(data, Mapping):
            raise ManifestError(f"Manifest must be a JSON object, got {type(data).__name__}.")
        fmt = data.get("format")
        if fmt == "cema-manifest/1":
            raise ManifestError(
                "This export was made by an older cema-deploy (manifest format 'cema-manifest/1'), whose "
                f"fingerprint does not bind the preprocessing and class count ({FINGERPRINT_SCHEME} does); "
                "export the model again with this version (its fingerprint changes, so edges and the cloud "
                "move to the new export together)."
            )
        if fmt != MANIFEST_FORMAT:
            raise ManifestError(
                f"Manifest format {fmt!r} is not supported (expected {MANIFEST_FORMAT!r}); "
                "export the model again with this version of cema-deploy."
            )
        try:
            inp = data["input"]
            pre = data["preprocess"]
            return cls(
                model_name=str(data["model_name"]),
                fingerprint=str(data["fingerprint"]),
                input=InputSpec(name=str(inp["name"]), shape=_ints(inp["shape"]), dtype=str(inp["dtype"])),
                output_name=str(data["output_name"]),
                num_classes=int(data["num_classes"]),
                preprocess=Preprocess(
                    mean=tuple(float(v) for v in pre["mean"]),
                    std=tuple(float(v) for v in pre["std"]),
                    size=_pair(pre["size"]),
                    interpolation=str(pre.get("interpolation", "bilinear")),
                    crop_pct=float(pre.get("crop_pct", 1.0)),
                ),
                refittable=tuple(
                    RefittableParam(
                        name=str(p["name"]),
                        shape=_ints(p["shape"]),
                        dtype=str(p["dtype"]),
                        layer_type=str(p["layer_type"]),
                    )
                    for p in data["refittable"]
                ),
                opset=int(data["opset"]),
                model_file=str(data.get("model_file", MODEL_FILE)),
                params_file=str(data.get("params_file", PARAMS_FILE)),
                model_bytes=int(data.get("model_bytes", 0)),
                producer=str(data.get("producer", "")),
                format=MANIFEST_FORMAT,
                extra=dict(data.get("extra", {})),
                model_args=dict(data.get("model_args", {})),
                files=tuple(
                    ExportFile(name=str(f["name"]), bytes=int(f["bytes"]), sha256=str(f["sha256"]))
                    for f in data.get("files", [])
                ),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ManifestError(f"Manifest is missing or has a malformed field ({exc!r:.300}); export again.") from exc


def manifest_from_dir(directory: str | os.PathLike[str], *, verify: bool = True) -> Manifest:
    """Read ``DIR/manifest.json`` written by ``cema-deploy export`` and, unless ``verify`` is False, check it
    against the folder: every recorded file has its recorded size, and ``model.onnx`` re-hashes to the recorded
    fingerprint (:func:`check_graph`). Raises :class:`ExportIntegrityError` when they disagree.

    Example:
        >>> manifest_from_dir("out/r50").num_classes  # doctest: +SKIP
        1000
    """
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"No {MANIFEST_FILE} in {directory}; expected a folder written by `cema-deploy export`.")
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise ManifestError(
                f"{path} is {size} bytes, more than the {MAX_MANIFEST_BYTES} a manifest may have; export again."
            )
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ManifestError(f"Cannot read {path}: {exc!s:.300}. Export the model again.") from exc
    manifest = Manifest.from_dict(data)
    if verify:
        check_file_sizes(directory, manifest)
        check_graph(directory, manifest)
    return manifest


def binding(manifest: Manifest) -> dict[str, Any]:
    """The manifest fields the fingerprint binds: what the edge and the cloud act on besides the graph."""
    pre = manifest.preprocess
    return {
        "model_name": manifest.model_name,
        "model_args": dict(manifest.model_args),
        "num_classes": manifest.num_classes,
        "input": {"name": manifest.input.name, "shape": list(manifest.input.shape), "dtype": manifest.input.dtype},
        "output_name": manifest.output_name,
        "preprocess": {
            "mean": list(pre.mean),
            "std": list(pre.std),
            "size": list(pre.size),
            "interpolation": pre.interpolation,
            "crop_pct": pre.crop_pct,
        },
        "refittable": [[p.name, list(p.shape), p.dtype, p.layer_type] for p in manifest.refittable],
        "opset": manifest.opset,
    }


def graph_summary(model_path: str | os.PathLike[str], manifest: Manifest) -> GraphSummary:
    """Read and hash ``model_path`` with ``manifest``'s binding. A file that is not a whole ONNX model (e.g.
    truncated) raises :class:`ExportIntegrityError`."""
    path = Path(model_path)
    try:
        data = path.read_bytes()
        return summarize_graph(
            data, base_dir=path.parent, refittable=[p.name for p in manifest.refittable], binding=binding(manifest)
        )
    except (OSError, WireError, UnicodeDecodeError, ValueError) as exc:
        raise ExportIntegrityError(
            f"{path} is not a readable ONNX model ({exc!s:.200}): it may be truncated or replaced. "
            "Export the model again with `cema-deploy export` (or restore the folder)."
        ) from exc


def check_graph(directory: str | os.PathLike[str], manifest: Manifest) -> GraphSummary:
    """Re-hash ``DIR/model.onnx`` with the manifest's binding and compare with the recorded fingerprint.

    Costs one read of the model file and one SHA-256 over it (numpy-free, torch-free).
    """
    model_path = Path(directory) / manifest.model_file
    summary = graph_summary(model_path, manifest)
    if summary.fingerprint != manifest.fingerprint:
        raise ExportIntegrityError(
            f"{model_path} and {Path(directory) / MANIFEST_FILE} hash to fingerprint {summary.fingerprint!r}, "
            f"but the manifest records {manifest.fingerprint!r}: the folder was changed after export (a replaced "
            "model.onnx, or a hand-edited manifest.json: num_classes, preprocessing, input, refittable list, "
            "model arguments). Export the model again with `cema-deploy export` (or restore the original files)."
        )
    return summary


def check_file_sizes(directory: str | os.PathLike[str], manifest: Manifest) -> None:
    """Every file the manifest records exists with its recorded size (a cheap check for truncation)."""
    for f in manifest.files:
        path = Path(directory) / f.name
        size = path.stat().st_size if path.is_file() else None
        if size != f.bytes:
            seen = "is missing" if size is None else f"has {size:,} bytes"
            raise ExportIntegrityError(
                f"{path} {seen}; the manifest records {f.bytes:,} bytes. The folder is incomplete or was changed "
                "after export: export the model again with `cema-deploy export` (or restore the file)."
            )


def _is_plain_json(value: Any, depth: int = 0) -> bool:
    """True when ``value`` survives ``json.dumps``/``json.loads`` unchanged (so a manifest round-trips exactly)."""
    if depth > 32:
        return False
    if value is None or isinstance(value, (str, bool, int)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_is_plain_json(v, depth + 1) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _is_plain_json(v, depth + 1) for k, v in value.items())
    return False


def _refuse_constant(token: str) -> Any:
    raise ValueError(f"{token} is not standard JSON")


def _problems(m: Manifest) -> list[str]:
    out: list[str] = []
    if not _is_plain_json(m.extra):
        out.append("extra is not a JSON object of string keys, strings, finite numbers, booleans, null and lists")
    if not _is_plain_json(m.model_args):
        out.append("model_args is not a JSON object of string keys, strings, finite numbers, booleans, null and lists")
    for f in m.files:
        if Path(f.name).name != f.name or f.name in ("", ".", "..", MANIFEST_FILE):
            out.append(f"file name {f.name!r} is not a plain file name of the export folder")
        if f.bytes < 0 or len(f.sha256) != 64 or not all(c in "0123456789abcdef" for c in f.sha256):
            out.append(f"file {f.name!r} has size {f.bytes} or SHA-256 {f.sha256!r:.80}")
    if not m.fingerprint or not all(c in "0123456789abcdef" for c in m.fingerprint):
        out.append(f"fingerprint {m.fingerprint!r} is not a lowercase hex digest")
    if m.num_classes < 1:
        out.append(f"num_classes {m.num_classes} < 1")
    if len(m.input.shape) != 4 or any(d == 0 or d < -1 for d in m.input.shape):
        out.append(f"input shape {m.input.shape} is not (batch, C, H, W) with batch -1 for dynamic")
    pre = m.preprocess
    if len(pre.mean) != len(pre.std) or not all(math.isfinite(v) for v in (*pre.mean, *pre.std, pre.crop_pct)):
        out.append("preprocess mean/std lengths differ or a mean, std or crop_pct is not finite")
    elif any(s <= 0 for s in pre.std) or pre.crop_pct <= 0:
        out.append("preprocess std and crop_pct must be positive")
    if any(d < 1 for d in pre.size):
        out.append(f"preprocess size {pre.size} is not positive")
    seen: set[str] = set()
    for p in m.refittable:
        if p.name in seen:
            out.append(f"refittable name {p.name!r} appears twice")
        seen.add(p.name)
        if p.dtype not in _DTYPES:
            out.append(f"refittable {p.name!r} has unsupported dtype {p.dtype!r}")
        if p.layer_type not in REFIT_KINDS:
            out.append(f"refittable {p.name!r} has layer type {p.layer_type!r}, expected one of {REFIT_KINDS}")
        if any(d < 1 for d in p.shape):
            out.append(f"refittable {p.name!r} has shape {p.shape}")
    return out


def _ints(v: Sequence[Any]) -> tuple[int, ...]:
    return tuple(int(x) for x in v)


def _pair(v: Sequence[Any]) -> tuple[int, int]:
    a, b = _ints(v)
    return (a, b)


def _itemsize(dtype: str) -> int:
    return {"float32": 4, "float16": 2, "bfloat16": 2, "uint8": 1, "int64": 8}[dtype]
