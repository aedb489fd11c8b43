"""Native TensorRT backend (TensorRT 10.x and 11.x): a cached refittable plan, two slots, hot refit from ONNX.

* **Plan**: built from the export's ONNX (``trt_build.build_plan``) with the batch range, precision and refit
  mode of :class:`~cema_deploy.runtime.backends.trt_build.TrtOptions`, and cached on disk (``trt_build.PlanCache``)
  under a key of fingerprint, TensorRT version, GPU name, compute capability and options. A process start
  deserializes it instead of rebuilding (minutes on a Jetson). The cache holds the plan *as built*; every load
  refits it from the serving blob when that differs from the export's parameters, so no cached engine can
  serve stale weights and no ``SerializationFlag.INCLUDE_REFIT`` (10.14+) is needed.
* **Refit**: the ONNX parser folds BatchNorm at parse time under temporary names, so the new tensors are
  written into a fresh ``model.norms.bin`` (the export's external-data layout, or its fp16 twin) beside a link
  to the ONNX, and ``trt.OnnxParserRefitter.refit_from_file`` refits every refittable weight from it.
* **Slots** (``trt_slots``): two engines, each with its own execution context, CUDA stream, device buffers for
  the largest batch and pinned host buffers, all allocated once; nothing is allocated per request.
* **Precision**: ``fp32`` (TF32 off), ``tf32`` (TensorRT's default), ``fp16`` (``BuilderFlag.FP16`` on 10.x;
  on 11.x a reduced-precision ONNX copy, ``trt_fp16``). The export's fingerprint and fp32 blobs stay.

Every TensorRT and CUDA call whose result says whether it worked is checked and raised as a
:class:`~cema_deploy.exceptions.BackendError` saying what to do. TensorRT 8.x (JetPack 5, JetPack 6.0) has no
parser refitter: use the ``ort-trt`` backend there. Not run on a GPU by this project yet (see the README's
hardware section); tests that need TensorRT and a GPU are marked ``trt``/``gpu``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cema_deploy.contract.manifest import Manifest
from cema_deploy.contract.norms_file import NORMS_FILE, norms_layout, write_norms_file
from cema_deploy.exceptions import BackendError, BackendUnavailableError, RefitError
from cema_deploy.runtime.backends import trt_build as tb
from cema_deploy.runtime.backends.trt_fp16 import COPY_FORMAT, fp16_copy_of_onnx, write_fp16_norms
from cema_deploy.runtime.backends.trt_slots import DoubleBufferedBackend


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError as exc:
            raise BackendUnavailableError(
                "The TensorRT backend needs cuda-python for device memory and streams: pip install "
                "'cema-deploy[trt]' (on a Jetson: pip install 'cuda-python>=12,<13' for JetPack 6's CUDA 12)."
            ) from exc
    return cudart


def _check(cudart: Any, result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(error, *values)`` result; raise when the error is not success."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        try:
            name = cudart.cudaGetErrorName(err)[1]
            name = name.decode() if isinstance(name, bytes) else str(name)
        except Exception:
            name = str(err)
        raise BackendError(
            f"CUDA {what} failed: {name} ({int(err)}). Check that the GPU is visible (nvidia-smi / tegrastats) "
            "and has free memory; on out-of-memory lower --max-batch."
        )
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else tuple(rest)


def device_info(cudart: Any) -> tb.DeviceInfo:
    """Name and compute capability of the current CUDA device (part of the plan cache key)."""
    dev = _check(cudart, cudart.cudaGetDevice(), "cudaGetDevice")
    prop = _check(cudart, cudart.cudaGetDeviceProperties(dev), "cudaGetDeviceProperties")
    raw = prop.name
    name = raw.decode(errors="replace").split("\x00")[0] if isinstance(raw, bytes) else str(raw)
    return tb.DeviceInfo(name=name.strip(), compute_capability=f"{prop.major}.{prop.minor}")


def read_norms_file(manifest: Manifest, path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The export's refittable tensors from ``model.norms.bin`` (what a freshly built plan holds)."""
    data = Path(path).read_bytes()
    by_name = manifest.refittable_by_name
    out: dict[str, np.ndarray] = {}
    for name, offset, nbytes in norms_layout(manifest):
        p = by_name[name]
        out[name] = np.frombuffer(data, dtype=np.dtype(p.dtype), count=p.numel, offset=offset).reshape(p.shape)
        if out[name].nbytes != nbytes:
            raise BackendError(f"{path} is shorter than its manifest says; export again.")
    return out


class _RefitSource:
    """The ONNX a refit reads: a link to the (fp32 or fp16) model in a private folder, plus fresh norms."""

    def __init__(self, onnx_path: Path, manifest: Manifest, fp16: bool) -> None:
        self.manifest, self.fp16 = manifest, fp16
        self.work = Path(tempfile.mkdtemp(prefix="cema-trt-refit-"))
        for src in onnx_path.parent.glob(onnx_path.name + "*"):  # model.onnx and any model.onnx.data
            try:
                os.symlink(src.resolve(), self.work / src.name)
            except OSError:
                shutil.copyfile(src, self.work / src.name)
        self.onnx = self.work / onnx_path.name

    def write(self, tensors: Mapping[str, np.ndarray]) -> Path:
        # a scratch copy in a temporary folder: atomic (the refitter never reads half a file), no fsync
        if self.fp16:
            write_fp16_norms(self.manifest, tensors, self.work / NORMS_FILE, durable=False)
        else:
            write_norms_file(self.manifest, tensors, self.work / NORMS_FILE, durable=False)
        return self.onnx

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


class TrtEngine:
    """One deserialized engine with its context, stream and buffers (a :class:`~.trt_slots.SlotEngine`)."""

    def __init__(
        self, trt: Any, runtime: Any, logger: Any, plan: bytes, manifest: Manifest, max_batch: int,
        source: _RefitSource | None,
    ) -> None:  # fmt: skip
        self.trt, self.logger, self.manifest, self.max_batch, self.source = trt, logger, manifest, max_batch, source
        self.cudart = _cudart()
        self._allocs: list[tuple[Callable[[Any], Any], Any]] = []
        self.engine = runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise BackendError("TensorRT could not deserialize the engine plan (built by another TensorRT or GPU?).")
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        trt, cudart, m = self.trt, self.cudart, self.manifest
        for name in (m.input.name, m.output_name):
            if self.engine.get_tensor_dtype(name) != trt.DataType.FLOAT:
                raise BackendError(f"Engine tensor {name!r} is not float32; export the model again.")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise BackendError("TensorRT could not create an execution context (out of GPU memory?).")
        self.stream = _check(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._allocs.append((cudart.cudaStreamDestroy, self.stream))
        chw = tuple(int(d) for d in m.input.shape[1:])
        self._set_shape((self.max_batch, *chw))
        out_shape = tuple(int(d) for d in self.context.get_tensor_shape(m.output_name))
        if any(d < 0 for d in out_shape):
            raise BackendError(f"TensorRT could not infer the output shape for input {(self.max_batch, *chw)}.")
        self.sample_in, self.sample_out = int(np.prod(chw)), int(np.prod(out_shape[1:]))
        self.out_tail = out_shape[1:]
        n_in, n_out = self.max_batch * self.sample_in, self.max_batch * self.sample_out
        self.d_in = self._malloc(n_in * 4)
        self.d_out = self._malloc(n_out * 4)
        self.h_in = self._pinned(n_in)
        self.h_out = self._pinned(n_out)
        for name, ptr in ((m.input.name, self.d_in), (m.output_name, self.d_out)):
            if not self.context.set_tensor_address(name, int(ptr)):
                raise BackendError(f"TensorRT refused the device address for tensor {name!r}.")

    def _malloc(self, nbytes: int) -> Any:
        ptr = _check(self.cudart, self.cudart.cudaMalloc(nbytes), f"cudaMalloc({nbytes} bytes)")
        self._allocs.append((self.cudart.cudaFree, ptr))
        return ptr

    def _pinned(self, n: int) -> np.ndarray:
        ptr = _check(self.cudart, self.cudart.cudaMallocHost(n * 4), f"cudaMallocHost({n * 4} bytes)")
        self._allocs.append((self.cudart.cudaFreeHost, ptr))
        buf = (ctypes.c_float * n).from_address(int(ptr))
        return np.ctypeslib.as_array(buf)

    def _set_shape(self, shape: tuple[int, ...]) -> None:
        if not self.context.set_input_shape(self.manifest.input.name, shape):
            raise BackendError(
                f"TensorRT refused input shape {shape} for {self.manifest.input.name!r}: outside the engine's "
                f"optimisation profile (batch 1..{self.max_batch}). Use --max-batch {shape[0]}."
            )

    def run(self, x: np.ndarray) -> np.ndarray:
        cudart, m = self.cudart, self.manifest
        n = int(x.shape[0])
        tb.batch_fits(n, self.max_batch)
        if tuple(x.shape[1:]) != tuple(m.input.shape[1:]):
            raise BackendError(f"Input shape {tuple(x.shape)} does not match the model's {m.input.shape}.")
        n_in, n_out = n * self.sample_in, n * self.sample_out
        np.copyto(self.h_in[:n_in], np.ascontiguousarray(x, dtype=np.float32).reshape(-1))
        self._set_shape(tuple(int(d) for d in x.shape))
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(cudart, cudart.cudaMemcpyAsync(self.d_in, self.h_in.ctypes.data, n_in * 4, h2d, self.stream), "H2D copy")
        if not self.context.execute_async_v3(self.stream):
            raise BackendError("TensorRT execute_async_v3 failed; its log above says why.")
        _check(cudart, cudart.cudaMemcpyAsync(self.h_out.ctypes.data, self.d_out, n_out * 4, d2h, self.stream), "D2H")
        _check(cudart, cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return self.h_out[:n_out].reshape(n, *self.out_tail).copy()

    def refit(self, tensors: Mapping[str, np.ndarray]) -> None:
        if self.source is None:
            raise RefitError("This engine was built without REFIT; it cannot take new parameters.")
        trt = self.trt
        onnx_path = self.source.write(tensors)
        refitter = trt.Refitter(self.engine, self.logger)
        parser_refitter = trt.OnnxParserRefitter(refitter, self.logger)
        if not parser_refitter.refit_from_file(str(onnx_path)):
            errors = "; ".join(str(parser_refitter.get_error(i)) for i in range(parser_refitter.num_errors))
            raise RefitError(f"TensorRT's ONNX refitter failed: {errors or 'no error recorded'}.")
        if not refitter.refit_cuda_engine():
            raise RefitError(f"TensorRT refit failed; weights still missing: {refitter.get_missing_weights()[:5]}.")

    def close(self) -> None:
        allocs, self._allocs = self._allocs, []
        for free, ptr in reversed(allocs):
            with contextlib.suppress(Exception):
                free(ptr)
        self.context = None
        self.engine = None


class TrtBackend(DoubleBufferedBackend):
    """Native TensorRT with hot refit through ``OnnxParserRefitter`` on two slots.

    Example:
        >>> with TrtBackend("out/r50", max_batch=64, precision="fp16") as be:  # doctest: +SKIP
        ...     logits = be.infer(x)
        ...     be.refit(blob)
    """

    name = "trt"

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        manifest: Manifest | None = None,
        max_batch: int | None = None,
        precision: str = "fp32",
        refit_mode: str = "full",
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        from cema_deploy.contract.manifest import manifest_from_dir

        self.model_dir = Path(model_dir)
        self.manifest = manifest or manifest_from_dir(self.model_dir)
        self.options = tb.TrtOptions(
            max_batch=tb.resolve_max_batch(self.manifest, max_batch), precision=precision, refit_mode=refit_mode
        )
        self._trt = tb.import_tensorrt()
        self.trt_version = tb.check_supported(self._trt.__version__)
        self.precision_plan = tb.precision_plan(self.trt_version, precision)
        tb.check_refit_mode(self.trt_version, refit_mode)
        self._logger = self._trt.Logger(self._trt.Logger.WARNING)
        self._runtime = self._trt.Runtime(self._logger)
        self.device = device_info(_cudart())
        self.cache = tb.PlanCache(cache_dir or tb.default_cache_dir())
        self.plan_sources: dict[str, str] = {}  # kind -> "cache" | "built", for reports
        self._extra: list[TrtEngine] = []
        self._source: _RefitSource | None = None
        self._export_norms: dict[str, np.ndarray] | None = None
        self._plan_bytes = b""
        super().__init__(model_dir, manifest=self.manifest)

    # ---- plans ----------------------------------------------------------------------------------------
    def _onnx_for_build(self) -> Path:
        if self.precision_plan.fp16 != "onnx-copy":
            return self.model_dir / self.manifest.model_file
        copy_dir = self.cache.root / self.manifest.fingerprint[:16] / f"onnx-fp16-v{COPY_FORMAT}"
        return fp16_copy_of_onnx(self.model_dir, self.manifest, copy_dir)

    def _key(self, kind: str) -> dict[str, Any]:
        return tb.plan_key(
            fingerprint=self.manifest.fingerprint,
            tensorrt_version=self._trt.__version__,
            device=self.device,
            options=self.options,
            kind=kind,
        )

    def _plan(self, kind: str) -> bytes:
        key = self._key(kind)
        plan = self.cache.load(key)
        if plan is not None:
            self.plan_sources[kind] = "cache"
            return plan
        plan = tb.build_plan(
            self._trt, self._logger, self._onnx_for_build(), self.manifest, self.options, refittable=kind == "refit"
        )
        self.plan_sources[kind] = "built"
        return self.cache.store(key, plan)

    def _engine(self, kind: str, source: _RefitSource | None) -> TrtEngine:
        """An engine from the cached plan; a cached plan TensorRT cannot load is discarded and rebuilt once."""
        plan = self._plan_bytes if kind == "refit" and self._plan_bytes else self._plan(kind)
        args = (self._trt, self._runtime, self._logger)
        try:
            engine = TrtEngine(*args, plan, self.manifest, self.options.max_batch, source)
        except BackendError:
            if self.plan_sources.get(kind) != "cache":
                raise
            self.cache.discard(self._key(kind))
            plan = self._plan(kind)
            engine = TrtEngine(*args, plan, self.manifest, self.options.max_batch, source)
        if kind == "refit":
            self._plan_bytes = plan
        return engine

    # ---- DoubleBufferedBackend hook -------------------------------------------------------------------
    def _new_engine(self, tensors: Mapping[str, np.ndarray]) -> TrtEngine:
        if self._source is None:
            self._source = _RefitSource(self._onnx_for_build(), self.manifest, self.precision_plan.fp16 == "onnx-copy")
            self._export_norms = read_norms_file(self.manifest, self.model_dir / NORMS_FILE)
        engine = self._engine("refit", self._source)
        assert self._export_norms is not None
        if any(not np.array_equal(tensors[n], v) for n, v in self._export_norms.items()):
            try:  # the plan holds the export's parameters; the serving blob differs
                engine.refit(tensors)
            except BaseException:
                engine.close()
                raise
        return engine

    # ---- public ---------------------------------------------------------------------------------------
    @property
    def providers(self) -> list[str]:
        return [f"TensorRT {self._trt.__version__} ({self.device.name}, sm {self.device.compute_capability})"]

    def describe(self) -> dict[str, Any]:
        """Build facts for reports: versions, device, options, how fp16 was obtained, where the plan came from."""
        return {
            "tensorrt": self._trt.__version__,
            "device": self.device.name,
            "compute_capability": self.device.compute_capability,
            "max_batch": self.options.max_batch,
            "precision": self.options.precision,
            "fp16_mechanism": self.precision_plan.fp16,
            "tf32": self.precision_plan.tf32,
            "refit_mode": self.options.refit_mode,
            "plan": dict(self.plan_sources),
            "cache_dir": str(self.cache.root),
        }

    def plain_engine(self) -> Callable[[np.ndarray], np.ndarray]:
        """A non-refittable engine of the same ONNX and options (what a plain deployment runs), for ``bench``."""
        engine = self._engine("plain", None)
        self._extra.append(engine)
        return engine.run

    def close(self) -> None:
        super().close()
        extra, self._extra = self._extra, []
        for e in extra:
            e.close()
        if self._source is not None:
            self._source.close()
            self._source = None
