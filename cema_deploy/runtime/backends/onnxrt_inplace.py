"""ONNX Runtime's in-place refit: two sessions on the prepared graph, new parameters written into the idle one.

A session made by :meth:`PreparedGraph.session_on` reads the arrays handed to it with
``SessionOptions.add_initializer`` in place at every run (measured on ORT 1.32 CPU, x86 AVX-512, ResNet-18/50:
writing new fused weights into them gives exactly what a fresh session computes, max |diff| 0; ORT does not
promise it, so :func:`self_test` checks it at start-up on this machine, ORT version and model). Writing them
while a run is in flight tears its output (53-83 % of outputs in the same measurement), so two sessions share
every constant array and each owns its refit-dependent arrays (:class:`InplaceEngine`); a refit writes the one
that does not serve, once the runs on it drained, then swaps the serving pointer, under the same two-slot
discipline as TensorRT (:class:`~cema_deploy.runtime.backends.trt_slots.SlotPair`). The swap lock is never held
across the numpy recompute.

Fused in place, or the hybrid (``onnxrt_hybrid``: refits land on unfused engines, ``ConvBNFusion`` disabled, and
the fused engines catch up once refits pause), decided by measurement (ResNet-50 batch 1, ORT 1.32 CPU, this
2-core machine; benchmarks/README.md, "In-place refit"): the fused recompute into the idle engine takes 14 ms
at load ~1.5 (0.07x an idle plain session build, 199 ms) and 85 ms at load 12-16, too slow for the 0.05x target
and, at 10 blobs/s, for 8 applied per second at 0.9x throughput (measured: 2.9/s, 0.77x). The unfused engines'
refit writes 212 KB of per-channel scale and shift in ~1.5 ms, so the hybrid is the default wherever the model
has fused BatchNorm layers and both self-tests pass; its costs are three more sessions on a second planned
graph (its constants: the conv weights once more, ~100 MB for ResNet-50), a longer start (two more ORT
optimisations) and unfused speed (+3-8 % CPU at batch 1, +8-13 % at batch 16, feasibility run) while refits
keep coming faster than the promoter's quiet period. Fused in place alone (``inplace``) remains the path for
models without fused BatchNorm (GroupNorm, LayerNorm: nothing to unfuse) and when the hybrid's self-test fails.

CUDA execution provider: not applicable. The prepared graph is made for the CPU provider, and the CUDA
provider copies initializers to device memory when the session is made, so host writes are never seen; the
CUDA backend keeps building a session per refit (the self-test would refuse it anyway).

Environment: ``CEMA_INPLACE_SELF_TEST=copy`` hands ORT copies of the arrays (as ``add_external_initializers``
would), so the self-test sees what it would if ORT stopped reading them in place, and the backend falls back
to building a session per refit. For tests and drills.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from cema_deploy.runtime.backends.onnxrt_prepared import PreparedGraph, _perturbed
from cema_deploy.runtime.backends.trt_slots import SlotPair

#: Environment variable that forces the self-test to fail (see the module docstring).
SELF_TEST_ENV = "CEMA_INPLACE_SELF_TEST"


class InplaceEngine:
    """One session on the prepared graph plus the refit-dependent arrays it reads in place (a ``SlotEngine``).

    Lifetime rule: ``arrays`` live exactly as long as the session; :meth:`refit` writes them, so it runs only
    while no request runs on this engine (the slot discipline guarantees it).
    """

    def __init__(
        self,
        prepared: PreparedGraph,
        tensors: Mapping[str, np.ndarray],
        options: Callable[[], Any],
        *,
        hand_copies: bool = False,
    ) -> None:
        self._prepared = prepared
        self.arrays = prepared.initializers(tensors)
        handed = {n: a.copy() for n, a in self.arrays.items()} if hand_copies else self.arrays
        self.session: Any
        self.session, self._held = prepared.session_on(handed, options, in_place=True)
        self._input = self.session.get_inputs()[0].name
        self._output = self.session.get_outputs()[0].name

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays this engine owns (constants, shared with the other engine, excluded)."""
        return sum(a.nbytes for a in self.arrays.values())

    def run(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run([self._output], {self._input: x})[0])

    def refit(self, tensors: Mapping[str, np.ndarray]) -> None:
        self._prepared.initializers(tensors, into=self.arrays)

    def close(self) -> None:
        self.session = None
        self._held = []


def pair_from_prepared(
    prepared: PreparedGraph, tensors: Mapping[str, np.ndarray], options: Callable[[], Any], *, count: int = 2
) -> SlotPair:
    """``count`` :class:`InplaceEngine` slots holding ``tensors`` (sharing the prepared graph's constants)."""
    copies = os.environ.get(SELF_TEST_ENV, "") == "copy"
    make = lambda t: InplaceEngine(prepared, t, options, hand_copies=copies)  # noqa: E731
    return SlotPair(make, tensors, serial=False, count=count)


def self_test(
    pair: SlotPair,
    tensors: Mapping[str, np.ndarray],
    fresh: Callable[[Mapping[str, np.ndarray]], Callable[[np.ndarray], np.ndarray]],
    x: np.ndarray,
    *,
    seed: int = 0,
) -> str | None:
    """Check in-place refits on this machine: None when they work, else the reason (one line).

    Every refit tensor is perturbed and written into slot 1 in place; its logits must match a fresh session
    built with the perturbed tensors (``fresh``: today's session-build path) within the export's parity
    tolerance, ``1e-4 * (1 + max |logit|)``, while slot 0 keeps computing exactly what it did. Then the
    serving tensors are written back and slot 1 must compute exactly slot 0's logits again.
    """
    a, b = pair.slots[0].engine, pair.slots[1].engine
    before = a.run(x)
    rng = np.random.default_rng(seed)
    perturbed = {n: _perturbed(n, np.asarray(t), rng) for n, t in tensors.items()}
    b.run(x)  # a run before the write, as in service (ORT may set things up at the first run)
    b.refit(perturbed)
    got = b.run(x)
    ref = fresh(perturbed)(x)
    tol = 1e-4 * (1.0 + float(np.abs(ref).max()))
    err = float(np.abs(got - ref).max())
    if not err <= tol:
        unseen = float(np.abs(got - before).max()) == 0.0
        return (
            f"in-place writes {'were not seen by' if unseen else 'did not match'} the session: logits differ from a "
            f"fresh session's by {err:.3g} (tolerance {tol:.3g})"
        )
    if not np.array_equal(a.run(x), before):
        return "writing one engine's arrays changed the other engine's logits (shared buffers)"
    b.refit(tensors)
    if not np.array_equal(b.run(x), before):
        return "writing the serving parameters back did not restore the engine's logits exactly"
    return None
