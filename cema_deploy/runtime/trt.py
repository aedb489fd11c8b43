"""Native TensorRT backend (TensorRT >= 10): a REFIT engine refitted through the ONNX parser, double-buffered.

The ONNX parser folds BatchNorm into a scale/shift at parse time under temporary names, so BN tensors never
appear by their ONNX names in ``Refitter.get_all_weights()`` (FACTS.md). ``OnnxParserRefitter`` does the same
folding from an ONNX file, so a refit writes the new tensors into a fresh ``model.norms.bin`` (the export's
external-data layout, ``contract.norms_file``) next to a link to ``model.onnx`` and refits from that file.

Atomic swap: refitting an engine in place would change the weights under requests in flight. The backend
therefore deserializes the plan twice (two *slots*). A refit waits until the standby slot has no request in
flight, refits it, and the base class swaps it in; the slot serving before becomes the standby and still holds
the previous parameters, which is what ``rollback`` returns to.

TensorRT 8.5 (JetPack 5) has no parser refitter: use the ``ort-trt`` backend there.

Not exercised by this repository's CI (no GPU); tests marked ``trt`` run where TensorRT and a GPU exist.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cema_deploy._lazy import lazy_import
from cema_deploy.contract.manifest import Manifest
from cema_deploy.contract.norms_file import write_norms_file
from cema_deploy.exceptions import BackendError, BackendUnavailableError, RefitError
from cema_deploy.runtime.base import Backend


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError as exc:
            raise BackendUnavailableError(
                "The TensorRT backend needs cuda-python for device memory: pip install 'cema-deploy[trt]'"
            ) from exc
    return cudart


def _check(result: Any) -> Any:
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BackendError(f"CUDA call failed with error {err}.")
    return rest[0] if len(rest) == 1 else rest


def engine_bytes_from_onnx(
    path: str | os.PathLike[str], manifest: Manifest, *, refit: bool, max_batch: int = 32, fp16: bool = False
) -> bytes:
    """Build a serialized TensorRT engine (plan) from the export's ONNX file."""
    trt = lazy_import("tensorrt", extra="trt", purpose="the TensorRT backend")
    if int(trt.__version__.split(".")[0]) < 10:
        raise BackendUnavailableError(
            f"TensorRT {trt.__version__} has no ONNX parser refitter; TensorRT >= 10 is needed "
            "(on JetPack 5 use the ort-trt backend)."
        )
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT could not parse {path}: {errors}")
    config = builder.create_builder_config()
    if refit:
        config.set_flag(trt.BuilderFlag.REFIT)  # not REFIT_IDENTICAL: the weights will change
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    _, c, h, w = manifest.input.shape
    if manifest.input.shape[0] == -1:
        profile = builder.create_optimization_profile()
        opt = min(max(1, max_batch // 2), max_batch)
        profile.set_shape(manifest.input.name, (1, c, h, w), (opt, c, h, w), (max_batch, c, h, w))
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BackendError(f"TensorRT failed to build an engine for {path}.")
    return bytes(plan)


class _Slot:
    """One deserialized engine with its execution context and a count of requests in flight."""

    def __init__(self, trt: Any, runtime: Any, plan: bytes, manifest: Manifest) -> None:
        self.trt = trt
        self.engine = runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise BackendError("TensorRT could not deserialize the engine plan.")
        self.context = self.engine.create_execution_context()
        self.manifest = manifest
        self.lock = threading.Lock()  # one execution context runs one request at a time
        self.in_flight = 0
        self.idle = threading.Condition()
        self.cudart = _cudart()
        self.stream = _check(self.cudart.cudaStreamCreate())

    def run(self, x: np.ndarray) -> np.ndarray:
        with self.idle:
            self.in_flight += 1
        try:
            with self.lock:
                return self._run_locked(np.ascontiguousarray(x, dtype=np.float32))
        finally:
            with self.idle:
                self.in_flight -= 1
                self.idle.notify_all()

    def wait_idle(self, timeout: float = 30.0) -> None:
        with self.idle:
            if not self.idle.wait_for(lambda: self.in_flight == 0, timeout=timeout):
                raise RefitError("The standby TensorRT engine still had requests in flight after 30 s.")

    def _run_locked(self, x: np.ndarray) -> np.ndarray:
        cudart, m = self.cudart, self.manifest
        self.context.set_input_shape(m.input.name, x.shape)
        out_shape = tuple(self.context.get_tensor_shape(m.output_name))
        out = np.empty(out_shape, dtype=np.float32)
        d_in = _check(cudart.cudaMallocAsync(x.nbytes, self.stream))
        d_out = _check(cudart.cudaMallocAsync(out.nbytes, self.stream))
        try:
            h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            _check(cudart.cudaMemcpyAsync(d_in, x.ctypes.data, x.nbytes, h2d, self.stream))
            self.context.set_tensor_address(m.input.name, int(d_in))
            self.context.set_tensor_address(m.output_name, int(d_out))
            if not self.context.execute_async_v3(self.stream):
                raise BackendError("TensorRT execute_async_v3 failed.")
            _check(cudart.cudaMemcpyAsync(out.ctypes.data, d_out, out.nbytes, d2h, self.stream))
            _check(cudart.cudaStreamSynchronize(self.stream))
        finally:
            cudart.cudaFreeAsync(d_in, self.stream)
            cudart.cudaFreeAsync(d_out, self.stream)
        return out


class TrtBackend(Backend):
    """Native TensorRT with hot refit through ``OnnxParserRefitter`` on a double-buffered REFIT engine."""

    name = "trt"

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        manifest: Manifest | None = None,
        max_batch: int = 32,
        fp16: bool = False,
    ) -> None:
        self._trt = lazy_import("tensorrt", extra="trt", purpose="the TensorRT backend")
        self._logger = self._trt.Logger(self._trt.Logger.WARNING)
        self._runtime = self._trt.Runtime(self._logger)
        self._max_batch = max_batch
        self._fp16 = fp16
        self._work = Path(tempfile.mkdtemp(prefix="cema-trt-"))
        self._slots: list[_Slot] = []
        super().__init__(model_dir, manifest=manifest)

    def _build(self, tensors: Mapping[str, np.ndarray]) -> _Slot:
        if not self._slots:  # first build: the plan, deserialized twice
            plan = engine_bytes_from_onnx(
                self.model_dir / self.manifest.model_file,
                self.manifest,
                refit=True,
                max_batch=self._max_batch,
                fp16=self._fp16,
            )
            self._slots = [_Slot(self._trt, self._runtime, plan, self.manifest) for _ in range(2)]
            return self._slots[0]
        serving = self._state.engine
        standby = self._slots[1] if serving is self._slots[0] else self._slots[0]
        standby.wait_idle()
        self._refit_slot(standby, tensors)
        return standby

    def _refit_slot(self, slot: _Slot, tensors: Mapping[str, np.ndarray]) -> None:
        trt = self._trt
        onnx_link = self._work / self.manifest.model_file
        if not onnx_link.exists():  # the graph (and any large external data) by link; only the norms are new
            for src in self.model_dir.glob(self.manifest.model_file + "*"):
                try:
                    os.symlink(src.resolve(), self._work / src.name)
                except OSError:
                    shutil.copyfile(src, self._work / src.name)
        write_norms_file(self.manifest, tensors, self._work / "model.norms.bin")
        refitter = trt.Refitter(slot.engine, self._logger)
        parser_refitter = trt.OnnxParserRefitter(refitter, self._logger)
        if not parser_refitter.refit_from_file(str(onnx_link)):
            errors = "; ".join(str(parser_refitter.get_error(i)) for i in range(parser_refitter.num_errors))
            raise RefitError(f"TensorRT parser refit failed: {errors}")
        if not refitter.refit_cuda_engine():
            raise RefitError(f"TensorRT refit left weights missing: {refitter.get_missing_weights()}")

    def _run(self, engine: Any, x: np.ndarray) -> np.ndarray:
        if x.shape[0] > self._max_batch:
            raise BackendError(f"Batch {x.shape[0]} exceeds the engine's max batch {self._max_batch}.")
        out: np.ndarray = engine.run(x)
        return out

    @property
    def providers(self) -> list[str]:
        return [f"TensorRT {self._trt.__version__}"]

    def plain_engine(self) -> Callable[[np.ndarray], np.ndarray]:
        """A non-refittable engine of the same ONNX (what a plain deployment runs), for ``bench``."""
        plan = engine_bytes_from_onnx(
            self.model_dir / self.manifest.model_file,
            self.manifest,
            refit=False,
            max_batch=self._max_batch,
            fp16=self._fp16,
        )
        slot = _Slot(self._trt, self._runtime, plan, self.manifest)
        return slot.run

    def close(self) -> None:
        super().close()
        shutil.rmtree(self._work, ignore_errors=True)
