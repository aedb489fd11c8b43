"""CUDA through cuda-python for the TensorRT engines (``trt``, ``trt_probe``): checked calls and owned buffers.

Every call whose result says whether it worked goes through :func:`check` and fails as a
:class:`~cema_deploy.exceptions.BackendError` saying what to do. Not run on a GPU by this project yet.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable
from typing import Any

import numpy as np

from cema_deploy.exceptions import BackendError, BackendUnavailableError

__all__ = ["CudaBuffers", "check", "load_cudart"]


def load_cudart() -> Any:
    """cuda-python's runtime module (``cuda.bindings.runtime`` from 12.6, ``cuda.cudart`` before)."""
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


def check(cudart: Any, result: Any, what: str) -> Any:
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


class CudaBuffers:
    """Device and pinned host memory (and streams) owned by one engine, freed together by :meth:`close`."""

    def __init__(self) -> None:
        self.cudart = load_cudart()
        self._allocs: list[tuple[Callable[[Any], Any], Any]] = []

    def malloc(self, nbytes: int) -> Any:
        ptr = check(self.cudart, self.cudart.cudaMalloc(nbytes), f"cudaMalloc({nbytes} bytes)")
        self._allocs.append((self.cudart.cudaFree, ptr))
        return ptr

    def pinned(self, n: int) -> np.ndarray:
        """``n`` float32 values of page-locked host memory, as a numpy view."""
        ptr = check(self.cudart, self.cudart.cudaMallocHost(n * 4), f"cudaMallocHost({n * 4} bytes)")
        self._allocs.append((self.cudart.cudaFreeHost, ptr))
        buf = (ctypes.c_float * n).from_address(int(ptr))
        return np.ctypeslib.as_array(buf)

    def close(self) -> None:
        allocs, self._allocs = self._allocs, []
        for free, ptr in reversed(allocs):
            with contextlib.suppress(Exception):
                free(ptr)
