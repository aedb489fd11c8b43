"""The statistics probe on TensorRT: a second engine, built from the export's ``stats_probe.onnx`` and cached.

* **A second engine, not a second optimisation profile.** A profile is a range of input shapes of *one* network;
  the probe is another network: every BatchNormalization replaced by ReduceMean and element-wise ops (TensorRT's
  ONNX parser rejects BatchNormalization in training mode and takes these), the layers' tensors as inputs, two
  outputs per layer (``export/stats_probe.py``). So it is its own plan, built by the same ``trt_build.build_plan``
  with the serving engine's batch range and cached under the kind ``"probe"``.
* **The layers' normalization parameters are inputs, not refitted weights.** What each layer normalizes with inside
  the probe is not the serving engine's statistics but the prior the adapter asks for at this call (alpha-BN: the
  source statistics; ema: its running estimate), mixed with the batch's by ``stats_mix``; the affine parameters are
  the serving ones. Feeding them (``StatsProbe`` builds the feed from ``backend.tensors``, so it follows every cloud
  blob and local refit) costs one host-to-device copy of four vectors per BatchNorm channel (ResNet-50: 26,560
  channels, 425 KB) per probed batch. Refitting instead would cost an ONNX-parser refit per probe, need a REFIT
  engine (users report full-REFIT engines up to ~2x slower, NVIDIA/TensorRT#2936) and still could not express a
  per-call prior without one. The probe engine is therefore built without REFIT.
* **Precision**: ``fp32`` for an ``fp32`` backend, TensorRT's default (TF32 allowed) otherwise, never fp16: the
  probe's variances are means of squares (an fp16 engine would round and can overflow them), and on TensorRT 11 fp16
  would need a reduced-precision copy of the probe graph. An fp16 serving engine thus gets statistics measured at
  TF32, which the adapter mixes with the source ones anyway.
* **Cost**: a second copy of the network's constant weights on the device (ResNet-50 ~100 MB fp32) plus its own
  context, stream and buffers for the largest batch, allocated once; nothing is allocated per probe.

The I/O checks (:func:`check_probe_io`) and the options (:func:`probe_options`) are plain Python, tested without
TensorRT; :class:`TrtProbeEngine` needs TensorRT and a GPU and is not run by this project yet (README, hardware).
API names as in ``trt.py`` (TensorRT 10.x and 11.x Python API: ``ICudaEngine.num_io_tensors``,
``get_tensor_name``, ``get_tensor_mode``/``TensorIOMode``, ``IExecutionContext.set_input_shape``,
``get_tensor_shape``, ``set_tensor_address``, ``execute_async_v3``).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cema_deploy.contract.stats_probe import ProbeSpec
from cema_deploy.exceptions import BackendError
from cema_deploy.runtime.backends import trt_build as tb
from cema_deploy.runtime.backends.trt_cuda import CudaBuffers, check

__all__ = ["IoTensor", "TrtProbeEngine", "check_probe_io", "probe_options"]


def probe_options(options: tb.TrtOptions) -> tb.TrtOptions:
    """The probe's build options: the serving batch range; ``fp32`` stays, ``tf32`` and ``fp16`` -> ``tf32``."""
    precision = "fp32" if options.precision == "fp32" else "tf32"
    return tb.TrtOptions(max_batch=options.max_batch, precision=precision, refit_mode=options.refit_mode)


@dataclass(frozen=True)
class IoTensor:
    """One input or output of the probe engine, with its shape at the largest batch."""

    name: str
    is_input: bool
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))  # a 0-d tensor (the mix) holds one value


def check_probe_io(io: Sequence[IoTensor], spec: ProbeSpec) -> None:
    """Raise :class:`BackendError` unless the engine takes only what the probe feeds (the batch, the mix, the layers'
    tensors) and returns every layer's batch mean and variance as ``[C]``."""
    fed = {spec.input_name, spec.mix_input, *spec.feeds}
    unknown = [t.name for t in io if t.is_input and t.name not in fed]
    outputs = {t.name: t.shape for t in io if not t.is_input}
    wrong = [
        f"{name} {outputs.get(name)} (expected ({layer.channels},))"
        for layer in spec.layers
        for name in (layer.batch_mean, layer.batch_var)
        if outputs.get(name) != (layer.channels,)
    ]
    if spec.input_name not in {t.name for t in io if t.is_input} or unknown or wrong:
        raise BackendError(
            f"The TensorRT statistics probe engine does not match {spec.model_file}'s sidecar: inputs it would not be "
            f"fed {unknown[:3]}, outputs missing or of the wrong shape {wrong[:3]}. Export the model again; if that "
            "persists, run the probe on ONNX Runtime (another --backend)."
        )


class TrtProbeEngine(CudaBuffers):
    """The probe plan deserialized, with its context, stream and one device + pinned host buffer per I/O tensor
    (a :class:`~cema_deploy.runtime.stats.probe.ProbeEngine`). One probe runs at a time."""

    kind = "tensorrt"

    def __init__(self, trt: Any, runtime: Any, plan: bytes, spec: ProbeSpec, max_batch: int,
                 chw: tuple[int, ...]) -> None:  # fmt: skip
        super().__init__()
        self.trt, self.spec, self.max_batch, self.chw = trt, spec, max_batch, chw
        self._lock = threading.Lock()
        self.engine = runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise BackendError("TensorRT could not deserialize the probe plan (built by another TensorRT or GPU?).")
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        trt, cudart, engine = self.trt, self.cudart, self.engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise BackendError("TensorRT could not create the probe's execution context (out of GPU memory?).")
        self.stream = check(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._allocs.append((cudart.cudaStreamDestroy, self.stream))
        self._set_shape((self.max_batch, *self.chw))
        io: list[IoTensor] = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_dtype(name) != trt.DataType.FLOAT:
                raise BackendError(f"Probe engine tensor {name!r} is not float32; export the model again.")
            shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise BackendError(f"TensorRT could not infer the probe's shape of {name!r} at batch {self.max_batch}.")
            io.append(IoTensor(name, engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT, shape))
        check_probe_io(io, self.spec)
        self.io = {t.name: t for t in io}
        self.buffers: dict[str, tuple[Any, np.ndarray]] = {}
        for t in io:
            device = self.malloc(max(t.size, 1) * 4)
            self.buffers[t.name] = (device, self.pinned(max(t.size, 1)))
            if not self.context.set_tensor_address(t.name, int(device)):
                raise BackendError(f"TensorRT refused the device address for probe tensor {t.name!r}.")

    def _set_shape(self, shape: tuple[int, ...]) -> None:
        if not self.context.set_input_shape(self.spec.input_name, shape):
            raise BackendError(f"TensorRT refused the probe's input shape {shape} (batch 1..{self.max_batch}).")

    def run(self, feed: Mapping[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        cudart = self.cudart
        x = feed[self.spec.input_name]
        tb.batch_fits(int(x.shape[0]), self.max_batch)
        if tuple(x.shape[1:]) != self.chw:
            raise BackendError(f"Probe input shape {tuple(x.shape)} does not match the model's (N, {self.chw}).")
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        with self._lock:
            self._set_shape(tuple(int(d) for d in x.shape))
            for name, t in self.io.items():
                if not t.is_input:
                    continue
                value = np.ascontiguousarray(feed[name], np.float32).reshape(-1)
                if name != self.spec.input_name and value.size != t.size:
                    raise BackendError(f"Probe input {name!r} has {value.size} values; the engine takes {t.size}.")
                device, host = self.buffers[name]
                np.copyto(host[: value.size], value)
                check(cudart, cudart.cudaMemcpyAsync(device, host.ctypes.data, value.nbytes, h2d, self.stream),
                      f"probe H2D copy of {name!r}")  # fmt: skip
            if not self.context.execute_async_v3(self.stream):
                raise BackendError("TensorRT execute_async_v3 failed on the statistics probe; its log above says why.")
            shapes = [tuple(int(d) for d in self.context.get_tensor_shape(name)) for name in outputs]
            for name, shape in zip(outputs, shapes, strict=True):
                device, host = self.buffers[name]
                nbytes = int(np.prod(shape, dtype=np.int64)) * 4
                check(cudart, cudart.cudaMemcpyAsync(host.ctypes.data, device, nbytes, d2h, self.stream),
                      f"probe D2H copy of {name!r}")  # fmt: skip
            check(cudart, cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
            return [
                self.buffers[name][1][: int(np.prod(shape, dtype=np.int64))].reshape(shape).copy()
                for name, shape in zip(outputs, shapes, strict=True)
            ]

    def close(self) -> None:
        super().close()
        self.context = None
        self.engine = None
