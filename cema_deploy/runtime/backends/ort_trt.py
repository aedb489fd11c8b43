"""``ort-trt``: ONNX Runtime's TensorRT execution provider, the GPU path where native ``trt`` cannot run
(TensorRT 8.x: JetPack 5 and JetPack 6.0 have no ONNX parser refitter).

A refit here is a new ONNX Runtime session holding the new tensors (``OnnxrtBackend``: built off the serving
path, swapped in atomically), and for the TensorRT EP a new session means a new TensorRT engine build. What
this module adds are the provider options that make that safe and as cheap as it can be:

* **Engine cache keyed by the weights.** ORT's engine cache file name comes from the graph and the GPU, not
  from initializer values, so with one cache folder a refitted session would load the engine built with the
  old weights. Each (fingerprint, weights digest, precision, max batch) gets its own cache folder: a restart
  with the same serving blob loads its engine at once, a new blob can never hit an old engine. Folders other
  than the newest two (serving + the rollback target) are deleted.
* **Timing cache shared** (``trt_timing_cache_enable``/``trt_timing_cache_path``): tactic timings do not depend
  on weight values, so rebuilds after the first skip most of the kernel search.
* **Explicit profile** (``trt_profile_min/opt/max_shapes``, batch 1..max batch): the engine is built once at
  session creation instead of again for each new batch size.
* ``trt_fp16_enable`` for ``precision="fp16"`` (ORT's TensorRT EP builds weakly typed networks on TensorRT 8/10).

**Why not ORT's weight-stripped engines** (``trt_weight_stripped_engine_enable`` with ``trt_onnx_model_folder_path``
(ORT >= 1.18.1, microsoft/onnxruntime#20412), ``trt_onnx_bytestream``/``trt_onnx_bytestream_size`` (#21357,
ORT 1.19/1.20) or ``trt_external_data_bytestream`` (ORT 1.23, TensorRT >= 10.13, #25409)), which refit a cached
engine from ONNX weights at session creation instead of rebuilding: (1) they need TensorRT >= 10 (the EP only
warns and ignores the option on 8.x), and 8.x is the reason ``ort-trt`` exists; (2) the EP builds those engines
with ``BuilderFlag.kREFIT_IDENTICAL`` (``tensorrt_execution_provider.cc``: ``kSTRIP_PLAN`` +
``kREFIT_IDENTICAL``), which TensorRT documents as *undefined behaviour when the refit weights differ from the
build-time ones*, and CEMA's refits always change them; (3) the refitted engine is written back to the same
weights-less cache name. So they are left off (``trt_weight_stripped_engine_enable=False``) and the rebuild is
kept. Its cost is a full TensorRT build per refit: not measured by this project (no GPU lent); NVIDIA users
report minutes for ResNet-50 on a Jetson from scratch, less with the timing cache. The old session keeps serving
throughout, but GPU memory holds both engines while the new one builds. On TensorRT 10+ prefer ``--backend trt``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cema_deploy.contract.manifest import Manifest, manifest_from_dir
from cema_deploy.exceptions import BackendError
from cema_deploy.runtime.backends import trt_build as tb
from cema_deploy.runtime.backends.onnxrt import PROVIDERS, OnnxrtBackend

#: ORT versions whose TensorRT EP has every option used here (explicit profiles: 1.15; timing cache path: 1.16).
MIN_ORT_FOR_OPTIONS = (1, 16)
#: Engine folders kept per model and build options: the serving weights and the rollback target.
KEEP_ENGINE_DIRS = 2
PRECISIONS = ("fp32", "fp16")


def weights_digest(manifest: Manifest, tensors: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the refittable tensors' names, dtypes, shapes and bytes, in manifest order."""
    h = hashlib.sha256()
    for p in manifest.refittable:
        a = np.ascontiguousarray(tensors[p.name])
        h.update(f"{p.name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def engine_cache_dir(root: Path, manifest: Manifest, digest: str, *, precision: str, max_batch: int) -> Path:
    return root / manifest.fingerprint[:16] / f"{precision}-b{max_batch}" / f"w-{digest[:24]}"


def shape_option(name: str, shape: tuple[int, ...]) -> str:
    """ORT's profile-shape syntax: ``input:1x3x224x224``."""
    return f"{name}:{'x'.join(str(int(d)) for d in shape)}"


def trt_provider_options(
    manifest: Manifest,
    tensors: Mapping[str, np.ndarray],
    *,
    max_batch: int,
    precision: str,
    cache_root: Path,
    ort_version: str,
) -> dict[str, str]:
    """TensorRT EP options for a session holding ``tensors`` (values are strings, as ORT's Python API wants)."""
    if precision not in PRECISIONS:
        raise BackendError(
            f"ort-trt supports precision {' or '.join(PRECISIONS)}, got {precision!r} (ORT's TensorRT EP has no "
            "TF32 switch: TensorRT's default applies; set NVIDIA_TF32_OVERRIDE=0 to disable TF32)."
        )
    if tb.parse_version(ort_version)[:2] < MIN_ORT_FOR_OPTIONS:
        return {}  # an old EP: rebuild per shape, no cache (never a stale one)
    digest = weights_digest(manifest, tensors)
    opts = {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(
            engine_cache_dir(cache_root, manifest, digest, precision=precision, max_batch=max_batch)
        ),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache_root / "timing"),
        "trt_fp16_enable": "True" if precision == "fp16" else "False",
        "trt_weight_stripped_engine_enable": "False",
    }
    shapes = tb.profile_shapes(manifest, max_batch)
    if shapes is not None:
        for key, shape in zip(("min", "opt", "max"), shapes, strict=True):
            opts[f"trt_profile_{key}_shapes"] = shape_option(manifest.input.name, shape)
    return opts


def prune_engine_dirs(current: Path, keep: int = KEEP_ENGINE_DIRS) -> list[Path]:
    """Delete sibling engine folders of ``current`` but the ``keep`` most recently used; returns those deleted."""
    parent = current.parent
    if not parent.is_dir():
        return []
    dirs = sorted((d for d in parent.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime, reverse=True)
    survivors = [current, *[d for d in dirs if d != current][: keep - 1]]
    removed = [d for d in dirs if d not in survivors]
    for d in removed:
        shutil.rmtree(d, ignore_errors=True)
    return removed


class OrtTrtBackend(OnnxrtBackend):
    """ONNX Runtime with the TensorRT EP: weights-keyed engine cache, shared timing cache, explicit profile.

    Example:
        >>> with OrtTrtBackend("out/r50", max_batch=64, precision="fp16") as be:  # doctest: +SKIP
        ...     be.refit(blob)  # a new session and engine build, off the serving path
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        manifest: Manifest | None = None,
        intra_op_threads: int | None = None,
        max_batch: int | None = None,
        precision: str = "fp32",
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        manifest = manifest or manifest_from_dir(model_dir)
        self.max_batch = tb.resolve_max_batch(manifest, max_batch)
        tb.TrtOptions(max_batch=self.max_batch, precision=precision)  # validates
        if precision not in PRECISIONS:
            raise BackendError(f"ort-trt supports precision {' or '.join(PRECISIONS)}, got {precision!r}.")
        self.precision = precision
        self.cache_root = Path(cache_dir) if cache_dir else tb.default_cache_dir().parent / "ort-trt"
        #: Engine cache folders in use, oldest first: at most KEEP_ENGINE_DIRS (those prune_engine_dirs keeps).
        self.engine_dirs: list[Path] = []
        super().__init__(model_dir, provider="ort-trt", manifest=manifest, intra_op_threads=intra_op_threads)

    def _provider_options(self, tensors: Mapping[str, np.ndarray]) -> list[dict[str, Any]] | None:
        import onnxruntime as ort

        if PROVIDERS["ort-trt"][0] not in ort.get_available_providers():
            return None  # session_from_onnx says what to install; no cache folders for an EP that is not here
        opts = trt_provider_options(
            self.manifest,
            tensors,
            max_batch=self.max_batch,
            precision=self.precision,
            cache_root=self.cache_root,
            ort_version=ort.__version__,
        )
        if "trt_engine_cache_path" in opts:
            path = Path(opts["trt_engine_cache_path"])
            path.mkdir(parents=True, exist_ok=True)
            os.utime(path)
            if path in self.engine_dirs:  # the same weights again (a rollback target rebuilt): most recent last
                self.engine_dirs.remove(path)
            self.engine_dirs.append(path)
            del self.engine_dirs[:-KEEP_ENGINE_DIRS]  # the folders left on disk: serving + rollback target
            prune_engine_dirs(path)
            Path(opts["trt_timing_cache_path"]).mkdir(parents=True, exist_ok=True)
        return [opts, *({} for _ in PROVIDERS["ort-trt"][1:])]

    def _run(self, engine: Any, x: np.ndarray) -> np.ndarray:
        tb.batch_fits(int(x.shape[0]), self.max_batch)
        return super()._run(engine, x)
