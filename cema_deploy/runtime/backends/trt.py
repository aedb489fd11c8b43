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
* **Statistics** (``edge run --adapt-stats``): the export's statistics probe runs as a second engine
  (``trt_probe``, :meth:`TrtBackend.stats_probe_engine`); a local statistics refit writes both slots, so a cloud
  blob's rollback stays possible (``trt_slots.DoubleBufferedBackend.refit_local``).
* **Precision**: ``fp32`` (TF32 off), ``tf32`` (TensorRT's default), ``fp16`` (``BuilderFlag.FP16`` on 10.x;
  on 11.x a reduced-precision ONNX copy, ``trt_fp16``). The export's fingerprint and fp32 blobs stay.

Every TensorRT and CUDA call whose result says whether it worked is checked and raised as a
:class:`~cema_deploy.exceptions.BackendError` saying what to do. TensorRT 8.x (JetPack 5, JetPack 6.0) has no
parser refitter: use the ``ort-trt`` backend there. Not run on a GPU by this project yet (see the README's
hardware section); tests that need TensorRT and a GPU are marked ``trt``/``gpu``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from cema_deploy.contract.manifest import Manifest
from cema_deploy.contract.norms_file import NORMS_FILE, norms_layout, write_norms_file
from cema_deploy.contract.stats_probe import PROBE_SIDECAR, ProbeSpec
from cema_deploy.exceptions import BackendError, RefitError
from cema_deploy.runtime.backends import trt_build as tb
from cema_deploy.runtime.backends.trt_cuda import CudaBuffers
from cema_deploy.runtime.backends.trt_cuda import check as _check
from cema_deploy.runtime.backends.trt_cuda import load_cudart as _cudart
from cema_deploy.runtime.backends.trt_fp16 import COPY_FORMAT, fp16_copy_of_onnx, write_fp16_norms
from cema_deploy.runtime.backends.trt_probe import TrtProbeEngine, probe_options
from cema_deploy.runtime.backends.trt_slots import DoubleBufferedBackend


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


_E = TypeVar("_E")


class _ProbeSource:
    """The export's probe graph as the plan cache keys it: its sidecar's digest and the graph file's size (hashing
    the graph itself would read the model's weights again at every start)."""

    def __init__(self, spec: ProbeSpec, model_dir: Path) -> None:
        self.spec = spec
        sidecar = (model_dir / PROBE_SIDECAR).read_bytes()
        size = (model_dir / spec.model_file).stat().st_size
        self.digest = f"{hashlib.sha256(sidecar).hexdigest()[:32]}:{size}"


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


class TrtEngine(CudaBuffers):
    """One deserialized engine with its context, stream and buffers (a :class:`~.trt_slots.SlotEngine`)."""

    def __init__(
        self, trt: Any, runtime: Any, logger: Any, plan: bytes, manifest: Manifest, max_batch: int,
        source: _RefitSource | None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.trt, self.logger, self.manifest, self.max_batch, self.source = trt, logger, manifest, max_batch, source
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
        self.d_in = self.malloc(n_in * 4)
        self.d_out = self.malloc(n_out * 4)
        self.h_in = self.pinned(n_in)
        self.h_out = self.pinned(n_out)
        for name, ptr in ((m.input.name, self.d_in), (m.output_name, self.d_out)):
            if not self.context.set_tensor_address(name, int(ptr)):
                raise BackendError(f"TensorRT refused the device address for tensor {name!r}.")

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
        super().close()
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
        self._extra: list[TrtEngine | TrtProbeEngine] = []
        self._probe: _ProbeSource | None = None
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

    def _options(self, kind: str) -> tb.TrtOptions:
        return probe_options(self.options) if kind == "probe" else self.options

    def _key(self, kind: str) -> dict[str, Any]:
        key = tb.plan_key(
            fingerprint=self.manifest.fingerprint,
            tensorrt_version=self._trt.__version__,
            device=self.device,
            options=self._options(kind),
            kind=kind,
        )
        if kind == "probe" and self._probe is not None:  # the probe graph as the sidecar describes it
            key["probe"] = self._probe.digest
        return key

    def _plan(self, kind: str) -> bytes:
        key = self._key(kind)
        plan = self.cache.load(key)
        if plan is not None:
            self.plan_sources[kind] = "cache"
            return plan
        if kind == "probe":
            assert self._probe is not None
            onnx = self.model_dir / self._probe.spec.model_file
        else:
            onnx = self._onnx_for_build()
        plan = tb.build_plan(
            self._trt, self._logger, onnx, self.manifest, self._options(kind), refittable=kind == "refit"
        )
        self.plan_sources[kind] = "built"
        return self.cache.store(key, plan)

    def _load(self, kind: str, make: Callable[[bytes], _E]) -> _E:
        """An engine from the cached plan; a cached plan TensorRT cannot load is discarded and rebuilt once."""
        plan = self._plan_bytes if kind == "refit" and self._plan_bytes else self._plan(kind)
        try:
            engine = make(plan)
        except BackendError:
            if self.plan_sources.get(kind) != "cache":
                raise
            self.cache.discard(self._key(kind))
            plan = self._plan(kind)
            engine = make(plan)
        if kind == "refit":
            self._plan_bytes = plan
        return engine

    def _engine(self, kind: str, source: _RefitSource | None) -> TrtEngine:
        args = (self._trt, self._runtime, self._logger)
        return self._load(kind, lambda plan: TrtEngine(*args, plan, self.manifest, self.options.max_batch, source))

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

    def stats_probe_engine(self, spec: ProbeSpec) -> TrtProbeEngine:
        """The statistics probe as a second TensorRT engine (``trt_probe``), from the cached plan or built once."""
        self._probe = _ProbeSource(spec, self.model_dir)
        chw = tuple(int(d) for d in self.manifest.input.shape[1:])
        max_batch = self.options.max_batch
        engine = self._load("probe", lambda plan: TrtProbeEngine(self._trt, self._runtime, plan, spec, max_batch, chw))
        self._extra.append(engine)
        return engine

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
