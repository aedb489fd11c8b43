"""Refits that skip a session build's graph work: ORT's optimised graph saved once, its initializers made in numpy.

Where a refit's session build goes (ResNet-50, ORT 1.32 CPU, measured with verbose logging): reading and
parsing the 100 MB model, fusing each BatchNormalization into its Conv (ORT recomputes every conv weight),
the NCHWc layout transform (reorders every conv weight again), then copying the initializers into the session.
None of it depends on the refit tensors except the arithmetic of the fusion. So once per backend:

1. ORT optimises the model twice and saves the optimised graph (``optimized_model_filepath``, initializers in
   an external-data file): once with perturbed refit tensors (the *reference*), once with *trace* values —
   every fused conv weight replaced by its element index + 1, each BatchNormalization made an exact identity
   scale (gamma = sqrt(1 + eps), var = 1, mean = 0) with beta = a code naming the layer and channel.
2. Reading the trace back says, for every initializer of the optimised graph, what it is: a constant
   (equal in both runs: reused by every engine), a refit tensor kept by name, a fused conv weight (which
   source element sits where, and which channel's scale multiplies it), or a fused bias (which channel).
3. A refit computes each fused tensor as ``base * scale[channel]`` (a broadcast multiply, the same
   arithmetic ORT's fusion does) and builds a session on the small optimised graph with optimisations off,
   handing every initializer over with ``SessionOptions.add_initializer``, which ORT uses in place.

Checked before use: the plan must explain every initializer that differs between the two runs, and a
session made by the plan with the reference tensors must reproduce the reference session's logits;
otherwise :func:`prepared_from_onnx` raises :class:`PreparedGraphError` and the backend keeps building
plain sessions. Lifetime rule: arrays handed to ``add_initializer`` are read by the session for as long as
it lives and are never written again; every refit makes new arrays, constants are shared read-only.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from cema_deploy.contract.names import is_variance_name
from cema_deploy.runtime.backends._onnx_wire import WireError, WireModel, model_from_bytes, model_from_path

log = logging.getLogger(__name__)

#: Channels per layer a trace code can name (code = layer * CODE_BASE + channel + 1, exact in float32).
CODE_BASE = 4096
#: Largest conv weight whose element indices float32 holds with room for rounding.
MAX_TRACED_ELEMENTS = 1 << 22
_DATA_FILE = "initializers.bin"
#: Initializers smaller than this stay inline in the saved graph (ORT reads shape inputs only from there).
INLINE_BYTES = 1024
#: Byte alignment of the arrays handed to sessions.
ALIGN = 64
#: Elements per row of the broadcast multiply that computes a fused weight.
ROW = 1024
#: Operators whose CPU kernels copy a constant weight input (``B``, input 1) into a packed buffer when the session
#: is made (``PrePack``), so later in-place writes to it are never seen: a refittable head's Gemm/MatMul weight.
#: Their bias (Gemm's ``C``) is read at every run.
PREPACKING_OPS = frozenset({"Gemm", "MatMul", "FusedGemm", "FusedMatMul"})


class PreparedGraphError(RuntimeError):
    """The optimised graph cannot be driven from refit tensors (an unexplained initializer, a parity miss)."""


@dataclass(frozen=True)
class _Fused:
    """One Conv followed by a BatchNormalization whose four inputs are refit tensors."""

    layer: int
    weight: str  # conv weight initializer
    bias: str | None  # conv bias initializer, if the conv has one
    gamma: str
    beta: str
    mean: str
    var: str
    eps: float


@dataclass(frozen=True)
class _Scaled:
    """A fused conv weight: ``base * scale[layer][channel]``, both viewed as ``(outer, middle, inner)`` blocks.

    The scale of an element depends on its output channel only, and every layout ORT uses (OIHW, NCHWc's
    OIHWBiBo) puts the output channel in the outer and the innermost block index, so ``channel`` has shape
    ``(outer, 1, inner)`` and the multiply broadcasts over the middle axis (rows of ``ROW`` elements).
    """

    layer: int
    base: np.ndarray  # (outer, middle / rep, rep * inner)
    channel: np.ndarray  # (outer, 1, rep * inner): the per-block channels, repeated
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _Shifted:
    """A fused bias: ``(conv_bias - mean) * scale + beta`` per channel; 0 where ``valid`` is False."""

    layer: int
    conv_bias: np.ndarray
    channel: np.ndarray
    valid: np.ndarray


@dataclass(frozen=True)
class _Channel:
    """An unfused BatchNormalization's scale (``fuse=False``): ``scale[layer][channel]`` in the layout ORT made."""

    layer: int
    channel: np.ndarray
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _Copied:
    """A refit tensor as it is, or reshaped (ORT folds e.g. the Unsqueeze of a GroupNorm's gamma)."""

    source: str
    shape: tuple[int, ...]


Recipe = _Copied | _Scaled | _Shifted | _Channel


class PreparedGraph:
    """The optimised graph of one model plus the recipe of each of its initializers.

    Example:
        >>> prep = prepared_from_onnx("out/r50/model.onnx", tensors, make_options)  # doctest: +SKIP
        >>> session, held, recycle = prep.session(new_tensors, make_options)  # doctest: +SKIP
    """

    def __init__(
        self,
        graph_bytes: bytes,
        data_dir: Path,
        constants: dict[str, Any],
        recipes: dict[str, Recipe],
        fused: list[_Fused],
        packed: frozenset[str] = frozenset(),
    ) -> None:
        self._graph = graph_bytes
        #: Refit-dependent initializers that a prepacking kernel reads (a refittable head's weight): sessions
        #: written in place are made with prepacking off (:meth:`session_on`).
        self.packed = packed
        self._dir = data_dir
        self._cleanup = weakref.finalize(self, shutil.rmtree, data_dir, ignore_errors=True)
        self._constants = constants  # name -> OrtValue, shared by every session (read-only)
        self._recipes = recipes
        self._fused = fused
        # Arrays of sessions that are gone, by initializer name, for the next refit to write into: a fresh
        # 100 MB allocation costs ResNet-50 ~90 ms of page faults per refit on top of ~25 ms of arithmetic.
        self._free: dict[str, list[np.ndarray]] = {}
        self._free_lock = threading.Lock()
        self._helper: ThreadPoolExecutor | None = None
        self._halves: tuple[list[str], list[str]] = (list(recipes), [])
        if (os.cpu_count() or 1) > 1:
            self._helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cema-fold")
            self._halves = _halves(recipes)

    @property
    def fused_layers(self) -> int:
        return len(self._fused)

    def close(self) -> None:
        """Remove the stand-in data file (sessions made already keep working; new ones cannot be made)."""
        self._cleanup()
        if self._helper is not None:
            self._helper.shutdown(wait=True)
            self._helper = None

    def recycle(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Take back the arrays of a session that no longer exists (:meth:`session`'s third result does this).

        Only for arrays no live session reads: the next :meth:`initializers` overwrites them.
        """
        with self._free_lock:
            for name, a in arrays.items():
                free = self._free.setdefault(name, [])
                if not free:
                    free.append(a)

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        with self._free_lock:
            free = self._free.get(name)
            if free:
                a = free.pop()
                if a.shape == shape and a.dtype == dtype:
                    return a
        return _aligned(shape, dtype)

    def initializers(
        self, tensors: Mapping[str, np.ndarray], into: Mapping[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """Arrays for every initializer that depends on the refit tensors (constants excluded): new ones, or
        recycled ones of a session that is gone, never arrays a live session reads; or, with ``into``, those
        arrays written in place (the caller makes sure no run reads them meanwhile: ``onnxrt_inplace``).

        The fused weights (memory-bound multiplies, numpy releases the GIL) are split in two halves of equal
        size, one computed on a helper thread, where the machine has more than one core.
        """
        scale: list[np.ndarray] = []
        for f in self._fused:
            var = np.asarray(tensors[f.var], np.float32)
            scale.append(np.asarray(tensors[f.gamma], np.float32) / np.sqrt(var + np.float32(f.eps)))
        names = list(self._recipes)
        if self._helper is None:
            return self._compute(names, tensors, scale, into)
        second = self._helper.submit(self._compute, self._halves[1], tensors, scale, into)
        out = self._compute(self._halves[0], tensors, scale, into)
        out.update(second.result())
        return {n: out[n] for n in names}

    def _compute(
        self,
        names: list[str],
        tensors: Mapping[str, np.ndarray],
        scale: list[np.ndarray],
        into: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        def buffer(name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
            if into is None:
                return self._buffer(name, shape, dtype)
            a = into[name]
            if a.shape != shape or a.dtype != dtype:
                raise PreparedGraphError(f"{name}: buffer {a.dtype}{list(a.shape)} cannot take {dtype}{list(shape)}")
            return a

        out: dict[str, np.ndarray] = {}
        for name in names:
            r = self._recipes[name]
            if isinstance(r, _Copied):
                src = np.asarray(tensors[r.source])
                a = buffer(name, r.shape, src.dtype)
                a[...] = src.reshape(r.shape)
            elif isinstance(r, _Scaled):
                a = buffer(name, r.shape, np.dtype(np.float32))
                np.multiply(r.base, scale[r.layer][r.channel], out=a.reshape(r.base.shape))
            elif isinstance(r, _Channel):
                a = buffer(name, r.shape, np.dtype(np.float32))
                a[...] = scale[r.layer][r.channel].reshape(r.shape)
            else:
                f = self._fused[r.layer]
                s = scale[r.layer][r.channel]
                mean = np.asarray(tensors[f.mean], np.float32)[r.channel]
                beta = np.asarray(tensors[f.beta], np.float32)[r.channel]
                a = buffer(name, r.channel.shape, np.dtype(np.float32))
                a[...] = np.where(r.valid, (r.conv_bias - mean) * s + beta, np.float32(0))
            out[name] = a
        return out

    def session(
        self, tensors: Mapping[str, np.ndarray], options: Callable[[], Any]
    ) -> tuple[Any, list[Any], Callable[[], None]]:
        """An ``InferenceSession`` with ``tensors``, the objects it borrows (keep them while it lives), and a
        callable to run once the session is gone: it hands the session's arrays back for reuse."""
        arrays = self.initializers(tensors)
        session, held = self.session_on(arrays, options)
        return session, held, partial(self.recycle, arrays)

    def session_on(
        self, arrays: Mapping[str, np.ndarray], options: Callable[[], Any], *, in_place: bool = False
    ) -> tuple[Any, list[Any]]:
        """An ``InferenceSession`` reading ``arrays`` (from :meth:`initializers`) in place, and the objects it
        borrows (keep them while it lives).

        ``in_place``: the arrays will be written while the session lives (``onnxrt_inplace``). Where a
        refit-dependent array is a prepacking kernel's weight (:attr:`packed`: a refittable head's Gemm), the
        session is made with ``session.disable_prepacking``, so the kernel reads the array itself at every run
        (the head's matrix product then packs its weight per run: one small matrix for the <= 100-class heads
        whose weight an export makes refittable).
        """
        import onnxruntime as ort

        so = options()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if in_place and self.packed:
            so.add_session_config_entry("session.disable_prepacking", "1")
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self._dir))
        values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in arrays.items()}
        for name, value in (*self._constants.items(), *values.items()):
            so.add_initializer(name, value)
        session = ort.InferenceSession(self._graph, sess_options=so, providers=["CPUExecutionProvider"])
        return session, [*arrays.values(), *values.values(), self._constants]


def prepared_from_onnx(
    path: str | os.PathLike[str],
    tensors: Mapping[str, np.ndarray],
    options: Callable[[], Any],
    *,
    input_shape: tuple[int, ...],
    seed: int = 0,
    fuse: bool = True,
) -> PreparedGraph:
    """Optimise ``path`` once with ORT's CPU provider and plan its initializers from refit tensors.

    ``fuse=False`` plans the graph ORT makes with ``ConvBNFusion`` disabled: each BatchNormalization stays a
    per-channel scale and shift (a depthwise NCHWc Conv), so a refit writes a few KB instead of every conv weight.
    ``tensors`` are the serving refit tensors (names and shapes of every refittable initializer);
    ``options`` makes the ``SessionOptions`` every session uses (threads, logging). Raises
    :class:`PreparedGraphError` when the optimised graph cannot be planned or fails the parity check.
    """
    import onnxruntime as ort

    try:
        src = model_from_path(path)
    except (OSError, WireError) as exc:
        raise PreparedGraphError(f"cannot read {path}: {exc}") from exc
    fused = _fused_pairs(src, tensors) if fuse else _norm_layers(src, tensors)
    rng = np.random.default_rng(seed)
    reference = {n: _perturbed(n, np.asarray(a), rng) for n, a in tensors.items()}
    trace = _trace_values(src, tensors, fused)
    if not fuse:
        options = _WithoutFusion(options)
    x = rng.standard_normal((1, *input_shape[1:])).astype(np.float32)
    work = tempfile.TemporaryDirectory(prefix="cema-prepared-")
    try:
        ref_model, ref_logits = _optimised(path, src, reference, options, Path(work.name) / "reference", x)
        trace_model, _ = _optimised(path, src, trace, options, Path(work.name) / "trace", None)
        recipes, constant_names = _plan(src, ref_model, trace_model, tensors, reference, trace, fused)
        constants = {
            n: ort.OrtValue.ortvalue_from_numpy(_aligned_copy(ref_model.array(n)))
            for n in constant_names
            if ref_model.initializers[n].external  # inline ones come with the graph bytes
        }
        graph_bytes = ref_model.buffer
        data_size = (Path(work.name) / "reference" / _DATA_FILE).stat().st_size
    finally:
        work.cleanup()
    # The graph names its external-data file; a sparse file of zeros stands in for it (ORT checks that it
    # exists, the values come from add_initializer). Had ORT read it, the parity check below would fail.
    data_dir = Path(tempfile.mkdtemp(prefix="cema-prepared-"))
    with open(data_dir / _DATA_FILE, "wb") as fh:
        fh.truncate(data_size)
    assert ref_logits is not None
    packed = frozenset(n.inputs[1] for n in ref_model.nodes if n.op_type in PREPACKING_OPS and n.inputs[1] in recipes)
    prepared = PreparedGraph(graph_bytes, data_dir, constants, recipes, fused, packed)
    session, held, recycle = prepared.session(reference, options)
    got = np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])
    tol = 1e-4 * (1.0 + float(np.abs(ref_logits).max()))
    err = float(np.abs(got - ref_logits).max())
    if not err <= tol:
        raise PreparedGraphError(f"the prepared graph's logits differ from ORT's own session by {err:.3g}")
    del session, held
    recycle()  # the check's arrays (written, so their pages are in) serve the first refit
    return prepared


def _halves(recipes: Mapping[str, Recipe]) -> tuple[list[str], list[str]]:
    """Two lists of initializer names of about equal total size (largest first, each to the lighter list)."""
    size = {n: r.base.size if isinstance(r, _Scaled) else 0 for n, r in recipes.items()}
    halves: tuple[list[str], list[str]] = ([], [])
    load = [0, 0]
    for name in sorted(size, key=lambda n: -size[n]):
        i = 0 if load[0] <= load[1] else 1
        halves[i].append(name)
        load[i] += size[name]
    return halves


def _aligned(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An empty C-contiguous array whose data starts on a 64-byte boundary, as ORT's own allocations do
    (MLAS kernels read weights handed over in place ~5 % slower from numpy's 16-byte-aligned memory)."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = np.empty(nbytes + ALIGN, np.uint8)
    offset = -buf.ctypes.data % ALIGN
    return buf[offset : offset + nbytes].view(dtype).reshape(shape)


def _aligned_copy(a: np.ndarray) -> np.ndarray:
    out = _aligned(a.shape, a.dtype)
    out[...] = a
    return out


# ---- planning -----------------------------------------------------------------------------------------
def _fused_pairs(src: WireModel, tensors: Mapping[str, np.ndarray]) -> list[_Fused]:
    producer = {o: n for n in src.nodes for o in n.outputs}
    consumers: dict[str, int] = {}
    for n in src.nodes:
        for i in n.inputs:
            consumers[i] = consumers.get(i, 0) + 1
    out: list[_Fused] = []
    for n in src.nodes:
        if n.op_type != "BatchNormalization" or n.domain not in ("", "ai.onnx") or len(n.inputs) != 5:
            continue
        if not all(i in tensors for i in n.inputs[1:]):
            continue
        conv = producer.get(n.inputs[0])
        if conv is None or conv.op_type != "Conv" or consumers.get(n.inputs[0], 0) != 1:
            continue
        weight = conv.inputs[1]
        bias = conv.inputs[2] if len(conv.inputs) > 2 and conv.inputs[2] else None
        if weight not in src.initializers or weight in tensors or (bias is not None and bias in tensors):
            continue
        if bias is not None and bias not in src.initializers:
            continue
        if consumers.get(weight, 0) != 1 or int(np.prod(src.initializers[weight].dims)) >= MAX_TRACED_ELEMENTS:
            continue
        eps = n.attributes.get("epsilon", 1e-5)
        if not isinstance(eps, float | int):
            continue
        gamma, beta, mean, var = n.inputs[1:]
        out.append(_Fused(len(out), weight, bias, gamma, beta, mean, var, eps=float(eps)))
    if len(out) >= CODE_BASE:
        raise PreparedGraphError(f"{len(out)} fused layers: more than the trace codes can name")
    return out


def _norm_layers(src: WireModel, tensors: Mapping[str, np.ndarray]) -> list[_Fused]:
    """Every BatchNormalization whose four parameters are refit tensors (``fuse=False``; no conv involved)."""
    out: list[_Fused] = []
    for n in src.nodes:
        if n.op_type != "BatchNormalization" or n.domain not in ("", "ai.onnx") or len(n.inputs) != 5:
            continue
        if not all(i in tensors for i in n.inputs[1:]):
            continue
        eps = n.attributes.get("epsilon", 1e-5)
        if not isinstance(eps, float | int):
            continue
        gamma, beta, mean, var = n.inputs[1:]
        out.append(_Fused(len(out), "", None, gamma, beta, mean, var, eps=float(eps)))
    if len(out) >= CODE_BASE:
        raise PreparedGraphError(f"{len(out)} norm layers: more than the trace codes can name")
    return out


class _WithoutFusion:
    """``options`` whose sessions are made with ORT's ``ConvBNFusion`` disabled (see :func:`_optimised`)."""

    def __init__(self, options: Callable[[], Any]) -> None:
        self.options = options

    def __call__(self) -> Any:
        return self.options()


def _perturbed(name: str, a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    factor = rng.uniform(0.7, 1.3, a.shape).astype(a.dtype)
    if is_variance_name(name):
        out = np.abs(a) * factor + np.asarray(0.05, a.dtype)
    else:
        out = a * factor + rng.normal(0, 0.1, a.shape)
    return np.asarray(out, a.dtype)


def _trace_values(src: WireModel, tensors: Mapping[str, np.ndarray], fused: list[_Fused]) -> dict[str, np.ndarray]:
    # Tensors kept by name get non-integral values, so they are never mistaken for a fused bias's codes.
    trace = {n: (np.abs(np.asarray(a)) + np.asarray(0.375, a.dtype)).astype(a.dtype) for n, a in tensors.items()}
    for f in fused:
        c = tensors[f.gamma].shape[0]
        if c >= CODE_BASE:
            raise PreparedGraphError(f"{f.gamma}: {c} channels, more than the trace codes can name")
        one = np.float32(1.0)
        trace[f.gamma] = np.full(c, np.sqrt(one + np.float32(f.eps)), np.float32)  # scale exactly 1
        trace[f.var] = np.ones(c, np.float32)
        trace[f.mean] = np.zeros(c, np.float32)
        trace[f.beta] = (f.layer * CODE_BASE + np.arange(c) + 1).astype(np.float32)
        if not f.weight:  # an unfused norm layer: its conv weights stay constant
            continue
        w = src.initializers[f.weight]
        trace[f.weight] = (np.arange(int(np.prod(w.dims))) + 1).astype(np.float32).reshape(w.dims)
        if f.bias is not None:
            trace[f.bias] = np.zeros(src.initializers[f.bias].dims, np.float32)
    return trace


def _optimised(
    path: str | os.PathLike[str],
    src: WireModel,
    overrides: Mapping[str, np.ndarray],
    options: Callable[[], Any],
    out_dir: Path,
    x: np.ndarray | None,
) -> tuple[WireModel, np.ndarray | None]:
    """ORT's fully optimised graph of ``path`` with ``overrides`` as initializers (and logits on ``x``).

    ORT replaces only initializers stored as external data (``add_external_initializers``); one stored in
    the model's bytes is overridden by patching those bytes in a copy (same length, same encoding).
    """
    import onnxruntime as ort

    out_dir.mkdir(parents=True)
    so = options()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(out_dir / "model.onnx")
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", _DATA_FILE)
    # Small initializers (shape tensors among them, which ORT must read inline) stay in the graph bytes.
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", str(INLINE_BYTES))
    patched: bytearray | None = None
    names, arrays = [], []
    for name in sorted(overrides):
        a = np.ascontiguousarray(overrides[name])
        raw = src.initializers[name].raw if name in src.initializers else None
        if raw is None:
            names.append(name)
            arrays.append(a)
            continue
        if raw[1] != a.nbytes:
            raise PreparedGraphError(f"override of {name!r} has {a.nbytes} bytes, the model stores {raw[1]}")
        patched = bytearray(src.buffer) if patched is None else patched
        patched[raw[0] : raw[0] + raw[1]] = a.tobytes()
    if names:
        so.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays])
    kw: dict[str, Any] = {"providers": ["CPUExecutionProvider"]}
    if isinstance(options, _WithoutFusion):
        kw["disabled_optimizers"] = ["ConvBNFusion"]
    if patched is None:
        session = ort.InferenceSession(str(path), sess_options=so, **kw)
    else:
        folder = str(Path(path).parent)
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
        session = ort.InferenceSession(bytes(patched), sess_options=so, **kw)
    logits = None if x is None else np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])
    del session
    model = model_from_bytes((out_dir / "model.onnx").read_bytes())
    model.base_dir = out_dir
    return model, logits


def _plan(
    src: WireModel,
    ref: WireModel,
    trace: WireModel,
    tensors: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    traced: Mapping[str, np.ndarray],
    fused: list[_Fused],
) -> tuple[dict[str, Recipe], list[str]]:
    if [(n.op_type, n.inputs, n.outputs) for n in ref.nodes] != [(n.op_type, n.inputs, n.outputs) for n in trace.nodes]:
        raise PreparedGraphError("the reference and trace runs optimised the graph differently")
    if {n: t.dims for n, t in ref.initializers.items()} != {n: t.dims for n, t in trace.initializers.items()}:
        raise PreparedGraphError("the reference and trace runs kept different initializers")
    recipes: dict[str, Recipe] = {}
    constants: list[str] = []
    bias_layer: dict[str, int] = {}
    pending: list[str] = []
    by_value = {(a.size, a.tobytes()): n for n, a in reference.items()}
    for name in ref.initializers:
        r, t = ref.array(name), trace.array(name)
        source = by_value.get((r.size, r.tobytes()))
        if source is not None and np.array_equal(t.ravel(), traced[source].ravel()):
            recipes[name] = _Copied(source, tuple(r.shape))
        elif name in tensors:
            raise PreparedGraphError(f"refit tensor {name!r} was transformed by the optimiser")
        elif np.array_equal(r, t):
            constants.append(name)
        elif r.dtype == np.float32 and r.ndim == 1 and (layer := _bias_layer(t)) is not None:
            if layer >= len(fused):
                raise PreparedGraphError(f"initializer {name!r}: trace codes name layer {layer} of {len(fused)}")
            recipes[name] = _shifted(src, fused[layer], t)
            bias_layer[name] = layer
        else:
            pending.append(name)
    layer_of: dict[str, int] = {}
    for node in ref.nodes:  # a fused weight sits in the same node as its fused bias
        layers = {bias_layer[i] for i in node.inputs if i in bias_layer}
        for i in node.inputs:
            if i in pending and (len(layers) != 1 or layer_of.setdefault(i, next(iter(layers))) not in layers):
                raise PreparedGraphError(f"initializer {i!r} is not the weight of exactly one fused layer")
    bias_of = {i: next(j for j in node.inputs if j in bias_layer) for node in ref.nodes for i in node.inputs
               if i in pending and any(j in bias_layer for j in node.inputs)}  # fmt: skip
    for name in pending:
        if name not in layer_of:
            raise PreparedGraphError(f"initializer {name!r} depends on refit tensors in a way not planned here")
        f = fused[layer_of[name]]
        if f.weight:
            recipes[name] = _scaled(src, f, trace.array(name))
        else:  # an unfused norm layer's scale: ones in the trace, one per channel of its shift
            shift = recipes[bias_of[name]]
            t = trace.array(name)
            assert isinstance(shift, _Shifted)
            if t.size != shift.channel.size or not np.all(t.ravel()[shift.valid.ravel()] == 1):
                raise PreparedGraphError(f"initializer {name!r}: not a per-channel scale of layer {f.layer}")
            if not shift.valid.all():
                raise PreparedGraphError(f"initializer {name!r}: padded channels are not planned")
            recipes[name] = _Channel(f.layer, shift.channel.reshape(t.shape), tuple(t.shape))
    used = {r.source for r in recipes.values() if isinstance(r, _Copied)}
    for f in fused:
        kinds = {type(r) for r in recipes.values() if not isinstance(r, _Copied) and r.layer == f.layer}
        if kinds in ({_Scaled, _Shifted}, {_Channel, _Shifted}):
            used |= {f.gamma, f.beta, f.mean, f.var}
    if used != set(tensors):
        missing = sorted(set(tensors) - used)[:3]
        raise PreparedGraphError(f"refit tensors {missing} do not reach the optimised graph through the plan")
    return recipes, constants


def _bias_layer(t: np.ndarray) -> int | None:
    codes = t[t != 0]
    if codes.size == 0 or not np.array_equal(codes, np.rint(codes)):
        return None
    layers = np.unique((codes.astype(np.int64) - 1) // CODE_BASE)
    return int(layers[0]) if layers.size == 1 else None


def _shifted(src: WireModel, f: _Fused, t: np.ndarray) -> _Shifted:
    valid = t != 0
    channel = np.where(valid, t.astype(np.int64) - 1 - f.layer * CODE_BASE, 0)
    out_ch = int(src.initializers[f.weight].dims[0]) if f.weight else int(src.initializers[f.gamma].dims[0])
    if channel.min() < 0 or channel.max() >= out_ch:
        raise PreparedGraphError(f"fused bias of {f.weight}: channel codes out of range")
    conv_bias = np.zeros(t.shape, np.float32)
    if f.bias is not None:
        conv_bias = np.where(valid, src.array(f.bias).astype(np.float32)[channel], 0).astype(np.float32)
    return _Shifted(f.layer, conv_bias, channel, valid)


def _scaled(src: WireModel, f: _Fused, t: np.ndarray) -> _Scaled:
    if not np.all(np.abs(t - np.rint(t)) < 0.25):
        raise PreparedGraphError(f"fused weight of {f.weight}: trace values are not element indices")
    index = np.rint(t).astype(np.int64).ravel() - 1  # -1: padding the layout added
    weight = np.asarray(src.array(f.weight), np.float32)
    size = weight.size
    valid = index >= 0
    if index.max() >= size or not np.array_equal(np.bincount(index[valid], minlength=size), np.ones(size, np.int64)):
        raise PreparedGraphError(f"fused weight of {f.weight}: the layout is not a permutation of the weight")
    base = np.where(valid, weight.ravel()[np.where(valid, index, 0)], 0).astype(np.float32)
    channel = np.where(valid, index // (size // weight.shape[0]), -1)
    outer, inner = _blocks(channel, int(weight.shape[0]))
    blocked = channel.reshape(outer, -1, inner)
    middle = blocked.shape[1]
    # Repeat the per-block channels `rep` times along the middle axis, so numpy's inner loop runs over
    # rep * inner contiguous elements instead of `inner` (16): the multiply then runs at memory speed.
    rep = max(d for d in range(1, min(middle, ROW // inner) + 1) if middle % d == 0)
    small = np.tile(np.maximum(blocked.max(axis=1, keepdims=True), 0), (1, rep, 1)).reshape(outer, 1, rep * inner)
    return _Scaled(f.layer, base.reshape(outer, middle // rep, rep * inner), small, tuple(t.shape))


def _blocks(channel: np.ndarray, channels: int) -> tuple[int, int]:
    """``(outer, inner)`` such that the channel of flat element ``p`` depends on ``p``'s outer and inner index
    only (``-1`` marks padding, which matches anything); ``(size, 1)`` (one element per row) always works."""
    size = channel.size
    for inner in (1, 4, 8, 16, 32, 64):
        outer = -(-channels // inner)
        if size % (outer * inner):
            continue
        blocked = channel.reshape(outer, -1, inner)
        small = blocked.max(axis=1, keepdims=True)
        if np.all((blocked == small) | (blocked < 0)):
            return outer, inner
    return size, 1
